"""The Flower run config (``[tool.flwr.app.config]`` plus ``flwr run -c`` overrides) as a fedamole
:class:`Config` and the few settings that only the Flower runner has; the node config keys.

Flower only accepts ``-c`` overrides for keys that pyproject.toml declares, and always passes
every declared key, so the fedamole keys declared there default to ``""``, meaning "not set":
the value then comes from ``config-file`` or the built-in defaults. Every other key is a
fedamole ``--set`` override (``"federation.rounds" = 3`` is ``--set federation.rounds=3``).

Files named by the run config (``config-file``, ``roster-file``) are read only from inside the
submitted app folder or the directory the operator names with ``$FEDAMOLE_FLOWER_CONFIG_DIR``:
whoever submits a run must not be able to make the ServerApp read, and echo in its errors, any
other file of the SuperLink's machine.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from flwr.app import UserConfig, UserConfigValue

from fedamole.config import Config, ConfigError, load_config
from fedamole.files import TextFileError, read_utf8

CONFIG_FILE = "config-file"
ROSTER_FILE = "roster-file"
SELF_DECLARED = "self-declared-partitions"
METHOD = "method"
RESUME = "resume"
REPLY_TIMEOUT = "reply-timeout"
JOIN_TIMEOUT = "join-timeout"
_APP_KEYS = {CONFIG_FILE, ROSTER_FILE, SELF_DECLARED, METHOD, RESUME, REPLY_TIMEOUT, JOIN_TIMEOUT}

# The one directory besides the app folder that run-config files may come from, set by the
# operator in the SuperLink's environment (the ServerApp process inherits it).
CONFIG_DIR_ENV = "FEDAMOLE_FLOWER_CONFIG_DIR"

# Node config keys (`flower-supernode --node-config`), set by each organisation for its node.
# (PARTITION_ID, NUM_PARTITIONS, DATA_PATH, STATE_DIR: fedamole.transports.flower.node_config)

NodeRoster = dict[int, int]  # SuperNode id (as `flwr supernode register` printed it) -> client id


@dataclass(frozen=True)
class FlowerSettings:
    """What the ServerApp needs: the validated run config, the method ("" = FedAMoLE as
    ``rsea.mode`` says), whether to resume ``output.dir`` from its checkpoint, the waiting
    limits (seconds), and who is which client: the operator's ``roster`` (node id -> client id),
    or None when the operator opted in to nodes' self-declared ``partition-id``."""

    config: Config
    method: str | None
    resume: bool
    reply_timeout: float
    join_timeout: float
    roster: NodeRoster | None = None


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


def allowed_dirs(app_dir: Path) -> list[Path]:
    """Where run-config files may be: the app folder, then the operator's directory if set."""
    operator_dir = os.environ.get(CONFIG_DIR_ENV, "")
    return [app_dir, *([Path(operator_dir)] if operator_dir else [])]


def app_file(key: str, name: str, app_dir: Path) -> Path:
    """``name`` (relative to the app folder, or absolute) if it lies inside an allowed directory,
    symlinks resolved; refused otherwise, before the file is opened or even looked at."""
    for root in allowed_dirs(app_dir):
        root = root.resolve()
        path = (root / name).resolve()
        if path.is_relative_to(root):
            return path
    raise ConfigError(
        f"{key}={name!r} is outside the app folder: run-config files are read only from the "
        f"submitted app (where they travel in the FAB) or from the directory the operator sets "
        f"in ${CONFIG_DIR_ENV} on the SuperLink's machine; put the file there"
    )


def load_roster(path: Path, num_clients: int) -> NodeRoster:
    """The operator's roster file: a YAML mapping of SuperNode id -> client id, exactly one node
    per client ``0 .. num_clients - 1``."""
    where = f"{ROSTER_FILE} {path.name}"
    if not path.is_file():
        raise ConfigError(f"{where}: no such file in the app folder")
    try:
        doc = yaml.safe_load(read_utf8(path))
    except TextFileError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not a YAML file ({exc})") from None
    if not isinstance(doc, dict) or not all(
        isinstance(k, int) and isinstance(v, int) and not isinstance(v, bool)
        for k, v in doc.items()
    ):
        raise ConfigError(
            f"{where}: expected a mapping of SuperNode id -> client id, one line per "
            "organisation, e.g. `8412933671094321: 0` (the id `flwr supernode register` printed)"
        )
    clients = sorted(doc.values())
    if clients != list(range(num_clients)):
        raise ConfigError(
            f"{where}: names clients {clients}, but federation.num_clients={num_clients} needs "
            f"exactly one node for each of 0 .. {num_clients - 1}"
        )
    return dict(doc)


def _roster(run_config: UserConfig, app_dir: Path, num_clients: int) -> NodeRoster | None:
    """The roster, or None where the operator explicitly trusts self-declared partitions."""
    name = str(run_config.get(ROSTER_FILE, ""))
    self_declared = bool(run_config.get(SELF_DECLARED, False))
    if name and self_declared:
        raise ConfigError(f"give either {ROSTER_FILE} or {SELF_DECLARED}=true, not both")
    if name:
        return load_roster(app_file(ROSTER_FILE, name, app_dir), num_clients)
    if self_declared:
        return None
    raise ConfigError(
        f"no {ROSTER_FILE}: the server would take each SuperNode's word for which organisation it "
        f"is, so any registered node could claim another's client. Give {ROSTER_FILE}=<YAML "
        "file in the app: SuperNode id -> client id>, or, for local experiments only, "
        f"-c '{SELF_DECLARED}=true'"
    )


def load_settings(run_config: UserConfig, app_dir: Path) -> FlowerSettings:
    """Resolve the run config's files inside the app folder and validate everything."""
    name = str(run_config.get(CONFIG_FILE, ""))
    path = app_file(CONFIG_FILE, name, app_dir) if name else None
    config = load_config(path, config_overrides(run_config))
    return FlowerSettings(
        config=config,
        method=str(run_config.get(METHOD, "")) or None,
        resume=bool(run_config.get(RESUME, False)),
        reply_timeout=float(run_config[REPLY_TIMEOUT]),
        join_timeout=float(run_config[JOIN_TIMEOUT]),
        roster=_roster(run_config, app_dir, config.federation.num_clients),
    )
