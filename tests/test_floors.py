"""The floors hold: each layer, imported alone in a fresh interpreter, loads nothing above it."""

from __future__ import annotations

import subprocess
import sys

import pytest

# layer -> packages it must never load (a higher floor)
FORBIDDEN = {
    "fedamole.federation": ["fedamole.methods", "fedamole.transports", "fedamole.serving"],
    "fedamole.methods": ["fedamole.transports", "fedamole.serving"],
    "fedamole.serving": ["fedamole.transports", "flwr"],
}
EVERYTHING_BUT_CLI = "fedamole"


def _loaded_after_importing(layer: str) -> set[str]:
    """Every module of ``layer`` imported in a fresh interpreter; the fedamole/flwr modules then
    loaded."""
    script = f"""
import importlib, pkgutil, sys
import {layer} as layer
for info in pkgutil.walk_packages(layer.__path__, "{layer}."):
    if info.name not in ("fedamole.cli", "fedamole.__main__"):
        importlib.import_module(info.name)
print("\\n".join(sorted(m for m in sys.modules if m.startswith(("fedamole", "flwr")))))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_above_it(layer: str) -> None:
    loaded = _loaded_after_importing(layer)
    for higher in FORBIDDEN[layer]:
        above = sorted(m for m in loaded if m == higher or m.startswith(higher + "."))
        assert not above, f"importing {layer} loads {above}"


def test_no_module_but_the_cli_imports_the_cli() -> None:
    loaded = _loaded_after_importing(EVERYTHING_BUT_CLI)
    assert "fedamole.cli" not in loaded
