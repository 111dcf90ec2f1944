"""The Flower run config (``[tool.flwr.app.config]`` plus ``flwr run -c`` overrides) as a fedamole
:class:`Config` and the few settings that only the Flower runner has; the node config keys.

Flower only accepts ``-c`` overrides for keys that pyproject.toml declares, and always passes
every declared key, so the fedamole keys declared there default to ``""``, meaning "not set":
the value then comes from ``config-file`` or the built-in defaults. Every other key is a
fedamole ``--set`` override (``"federation.rounds" = 3`` is ``--set federation.rounds=3``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from flwr.app import UserConfig, UserConfigValue

from fedamole.config import Config, load_config

CONFIG_FILE = "config-file"
METHOD = "method"
RESUME = "resume"
REPLY_TIMEOUT = "reply-timeout"
JOIN_TIMEOUT = "join-timeout"
_APP_KEYS = {CONFIG_FILE, METHOD, RESUME, REPLY_TIMEOUT, JOIN_TIMEOUT}

# Node config keys (`flower-supernode --node-config`), set by each organisation for its node.
# (PARTITION_ID, NUM_PARTITIONS, DATA_PATH, STATE_DIR: fedamole.transports.flower.node_config)


@dataclass(frozen=True)
class FlowerSettings:
    """What the ServerApp needs: the validated run config, the method ("" = FedAMoLE as
    ``rsea.mode`` says), whether to resume ``output.dir`` from its checkpoint, and the waiting
    limits (seconds)."""

    config: Config
    method: str | None
    resume: bool
    reply_timeout: float
    join_timeout: float


def _override(key: str, value: UserConfigValue) -> str:
    """`key=value` as `--set` parses it (YAML); JSON spells bools and numbers the YAML way."""
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def config_overrides(run_config: UserConfig) -> list[str]:
    """The run config's fedamole keys that are set, as `--set` items (sorted, so reproducible)."""
    return [
        _override(key, value)
        for key, value in sorted(run_config.items())
        if key not in _APP_KEYS and value != ""
    ]


def load_settings(run_config: UserConfig, app_dir: Path) -> FlowerSettings:
    """Resolve ``config-file`` against the app folder (it travels inside the FAB) and validate."""
    name = str(run_config.get(CONFIG_FILE, ""))
    path = app_dir / name if name else None
    return FlowerSettings(
        config=load_config(path, config_overrides(run_config)),
        method=str(run_config.get(METHOD, "")) or None,
        resume=bool(run_config.get(RESUME, False)),
        reply_timeout=float(run_config[REPLY_TIMEOUT]),
        join_timeout=float(run_config[JOIN_TIMEOUT]),
    )
