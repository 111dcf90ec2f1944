"""The fedamole ServerApp and ClientApp on Flower's Simulation Engine (Ray backend): one virtual
SuperNode per client, each given ``partition-id``/``num-partitions`` by the engine exactly as an
organisation sets them with ``--node-config``, so it reads its own partition as a SuperNode does.

:func:`launch` runs the simulation in a child process (``python -m`` this module) on the
installed package: Ray replaces ``PYTHONPATH`` in its workers and keeps processes of its own. The
child leads a process group of its own, which Ray's processes share, and that group never
outlives the run: the child asks the kernel for SIGTERM when its parent dies (Linux
``PR_SET_PDEATHSIG``), turns SIGTERM into a clean exit that shuts Ray down and then kills what is
left of its group, and the parent kills the group on every way it leaves :func:`launch`
(normal end, error, Ctrl-C). A killed ``fedamole run`` therefore never leaves a simulation
finishing, and writing, in the background. Flower 1.41's public ``run_simulation`` cannot pass
a run config, so the child calls the function behind it (and ``flwr-simulation``) with the run
config in the ServerApp's context; flwr is pinned, and a test runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flwr.app import UserConfigValue

from fedamole.transports.flower.settings import (
    CONFIG_DIR_ENV,
    CONFIG_FILE,
    JOIN_TIMEOUT,
    METHOD,
    REPLY_TIMEOUT,
    RESUME,
    SELF_DECLARED,
)

# Every virtual SuperNode is registered before the first round (the wait ends once each has said
# which client it is); a reply never travels a network.
REPLY_TIMEOUT_S = 3600.0
JOIN_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class Resources:
    """What Ray reserves for each virtual client (Flower's ``client-resources``): a fractional
    GPU puts several clients on one card (0.25: four at once), CPUs bound how many run at once."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass(frozen=True)
class SimulationSpec:
    """Everything the child process needs, as JSON on its command line."""

    num_supernodes: int
    run_config: dict[str, UserConfigValue]
    resources: Resources = field(default_factory=Resources)

    def backend_config(self) -> dict[str, dict[str, float]]:
        return {"client_resources": asdict(self.resources)}


def run_config(
    config_file: Path | None, overrides: list[str], method: str | None, resume: bool
) -> dict[str, UserConfigValue]:
    """The ServerApp's run config for these CLI arguments: ``--set`` items become keys of their
    own, which the ServerApp turns back into exactly those items. Virtual nodes are numbered by
    the engine itself, in one process tree of the user's, so their partitions are trusted."""
    items = dict(_split(item) for item in overrides)
    return {
        CONFIG_FILE: str(config_file.resolve()) if config_file else "",
        SELF_DECLARED: True,
        METHOD: method or "",
        RESUME: resume,
        REPLY_TIMEOUT: REPLY_TIMEOUT_S,
        JOIN_TIMEOUT: JOIN_TIMEOUT_S,
        **items,
    }


def _split(item: str) -> tuple[str, str]:
    key, _, value = item.partition("=")
    return key.strip(), value


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
RAY_SHUTDOWN_S = 5.0  # then the group is killed whatever Ray's shutdown is doing
GRACE_S = 10.0  # how long a SIGTERMed simulation may take to shut Ray down


def launch(spec: SimulationSpec) -> int:
    """Run the simulation in a child process; its exit status (0: the run finished)."""
    cmd = [sys.executable, "-m", __name__, json.dumps(asdict(spec)), str(os.getpid())]
    child = subprocess.Popen(cmd, env=_child_env(spec), start_new_session=True)
    try:
        return child.wait()
    finally:
        _end_group(child)


def _end_group(child: subprocess.Popen) -> None:
    """SIGTERM the child's group if the child still runs (it shuts Ray down), then SIGKILL
    whatever of the group is left (Ray's agents linger for a minute otherwise)."""
    if child.poll() is None:
        _signal_group(child.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=GRACE_S)
    _signal_group(child.pid, signal.SIGKILL)
    child.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _on_sigterm(signum: int, _frame: object) -> None:
    sys.exit(128 + signum)


def _die_with(parent: int) -> None:
    """In the child: SIGTERM when ``parent`` dies (Linux; elsewhere the parent's own clean-up
    is all there is), and SIGTERM as an exit that runs clean-up code."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the request took effect
        sys.exit(128 + signal.SIGTERM)


def _take_ray_down() -> None:
    """Ray's driver-side shutdown, given at most ``RAY_SHUTDOWN_S`` (it can stall on a loaded
    machine), then every other process of this group (agents included)."""
    shutdown = threading.Thread(target=_ray_shutdown, daemon=True)
    shutdown.start()
    shutdown.join(RAY_SHUTDOWN_S)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _signal_group(os.getpgrp(), signal.SIGKILL)


def _ray_shutdown() -> None:
    with contextlib.suppress(Exception):
        import ray

        ray.shutdown()


def _child_env(spec: SimulationSpec) -> dict[str, str]:
    """The user's own config file may lie anywhere: its folder is where the ServerApp may read
    run-config files from (there is no app folder without a FAB)."""
    config_file = str(spec.run_config.get(CONFIG_FILE, ""))
    folder = {CONFIG_DIR_ENV: str(Path(config_file).parent)} if config_file else {}
    return {**os.environ, **folder}


def _simulate(spec: SimulationSpec) -> None:
    """In the child: the apps of the FAB (``pyproject.toml``'s components) on the Ray backend."""
    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from fedamole.transports.flower.client_app import app as client_app
    from fedamole.transports.flower.server_app import app as server_app

    context = Context(
        run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=spec.run_config
    )
    _run_simulation(
        num_supernodes=spec.num_supernodes,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app=client_app,
        server_app=server_app,
        backend_config=spec.backend_config(),
        server_app_context=context,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("spec", help="SimulationSpec as JSON")
    parser.add_argument("parent", type=int, help="the launching process: this one dies with it")
    args = parser.parse_args()
    _die_with(args.parent)
    doc = json.loads(args.spec)
    resources = Resources(**doc.pop("resources"))
    try:
        _simulate(SimulationSpec(resources=resources, **doc))
    except SystemExit:  # SIGTERM (Ray's handler or ours), or Flower giving up
        if os.getppid() != args.parent:  # orphaned: nobody else will take Ray down
            _take_ray_down()  # ends this process too
        raise


if __name__ == "__main__":
    main()
