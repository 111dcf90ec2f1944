"""The floors hold: importing a layer, in a fresh interpreter, loads nothing above it.

The layers are imported from the bottom up in one interpreter: a lower layer that loaded a
higher one would be caught at its own step, so each step sees only what its own layer (and
those below it) imported. `fedamole.serving` must not load Flower (the models of
tests/serving/test_loading.py load without it)."""

from __future__ import annotations

import json
import subprocess
import sys

# bottom up: each layer with the packages it must not have loaded once all its modules are in
FLOORS = [
    ("fedamole.hmole", ["fedamole.federation", "fedamole.serving"]),  # its static-LoRA fold too
    ("fedamole.federation", ["fedamole.methods", "fedamole.transports", "fedamole.serving"]),
    ("fedamole.methods", ["fedamole.transports", "fedamole.serving", "fedamole.compare"]),
    ("fedamole.serving", ["fedamole.transports", "flwr"]),
    ("fedamole", ["fedamole.cli"]),  # every module but the CLI itself
]

SCRIPT = """
import importlib, json, pkgutil, sys
found = {}
for layer, forbidden in json.loads(sys.argv[1]):
    package = importlib.import_module(layer)
    for info in pkgutil.walk_packages(package.__path__, layer + "."):
        if info.name not in ("fedamole.cli", "fedamole.__main__"):
            importlib.import_module(info.name)
    found[layer] = sorted(
        m for m in sys.modules for f in forbidden if m == f or m.startswith(f + ".")
    )
print(json.dumps(found))
"""


def test_each_layer_imports_nothing_above_it() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(FLOORS)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == {layer: [] for layer, _ in FLOORS}, found
