"""The Flower apps on Flower's Simulation Engine (Ray), launched by `fedamole run --transport
flower-simulation`: the same run as in-process, also after the simulation was killed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from same_run import assert_same_run, wait_for
from typer.testing import CliRunner

from fedamole.cli import app
from fedamole.config import load_config
from fedamole.transports.flower import simulation
from fedamole.transports.in_process import run_in_process

pytestmark = pytest.mark.e2e  # starts real processes (see pyproject markers)

pytest.importorskip("ray", reason="needs the simulation extra: pip install -e '.[simulation]'")

FEDAMOLE = Path(sys.executable).parent / "fedamole"
CLIENTS = 4


def _command(config: Path, out: Path, *extra: str) -> list[str]:
    return [
        str(FEDAMOLE),
        "run",
        "--transport",
        "flower-simulation",
        "--num-cpus",
        "1",
        "-c",
        str(config),
        "--out",
        str(out),
        "--set",
        f"federation.num_clients={CLIENTS}",
        *extra,
    ]


class Family:
    """Every process a command started, seen by polling /proc while it runs: its descendants
    (the simulation child, Ray's GCS, raylet, agents and workers) and their process groups."""

    def __init__(self, root: int) -> None:
        self.root, self.pids, self.groups = root, {root}, set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.snapshot()
            time.sleep(0.2)

    def snapshot(self) -> None:
        table = _process_table()
        todo = [self.root]
        while todo:
            parent = todo.pop()
            children = [pid for pid, (ppid, _) in table.items() if ppid == parent]
            self.pids.update(children)
            todo += children
        self.groups.update(table[pid][1] for pid in self.pids if pid in table)

    def alive(self) -> list[int]:
        table = _process_table()
        return [pid for pid, (_, pgid) in table.items() if pid in self.pids or pgid in self.groups]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every live, non-zombie process, from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if stat[0] != "Z":
                table[int(entry.name)] = (int(stat[1]), int(stat[2]))
    return table


def _simulate(config: Path, out: Path, *extra: str) -> str:
    """Run to the end; every process it started (Ray's included) ends with it."""
    proc = subprocess.Popen(
        _command(config, out, *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    family = Family(proc.pid)
    stdout, stderr = proc.communicate(timeout=300)
    family.stop()
    assert proc.returncode == 0, stdout + stderr
    assert len(family.pids) > 3  # the child and Ray's processes were seen
    wait_for(lambda: not family.alive(), "Ray's processes to end", timeout=15)
    return stdout


def _reference(config: Path, out: Path, *overrides: str, method: str | None = None) -> Path:
    cfg = load_config(
        config, [f"output.dir={out}", f"federation.num_clients={CLIENTS}", *overrides]
    )
    run_in_process(cfg, method=method)
    return out


def test_simulated_fedit_equals_the_in_process_run(tiny_yaml, tmp_path):
    """FedIT (a train then an evaluate message per client and round), 4 virtual SuperNodes;
    the base model is scored on each virtual node's own test split (eval.base_model)."""
    settings = yaml.safe_load(tiny_yaml.read_text())
    settings["eval"]["base_model"] = True
    tiny_yaml.write_text(yaml.safe_dump(settings))
    out = tmp_path / "simulation"
    log = _simulate(tiny_yaml, out, "--method", "fedit")
    assert "is client 3" in log and "dropped" not in log
    reference = _reference(tiny_yaml, tmp_path / "in-process", method="fedit")
    assert_same_run(out, reference, rounds=2, clients=CLIENTS)
    simulated, in_process = (json.loads((d / "summary.json").read_text()) for d in (out, reference))
    assert set(simulated["base_model"]) == {str(c) for c in range(CLIENTS)}
    assert simulated["base_model"] == in_process["base_model"]


def test_a_killed_parent_takes_the_simulation_down_and_resumes_to_the_in_process_run(
    tiny_yaml, tmp_path
):
    """FedAMoLE for 2 rounds; only `fedamole run` itself is SIGKILLed once round 0's checkpoint
    is written. Within 15 s none of the processes it started (simulation child, Ray) is left,
    nothing finished the run in the background, and the resumed run is the uninterrupted
    in-process run."""
    out = tmp_path / "simulation"
    proc = subprocess.Popen(
        _command(tiny_yaml, out),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    family = Family(proc.pid)
    try:
        wait_for(lambda: (out / "checkpoint.safetensors").exists(), "round 0", interval=0.05)
        assert proc.poll() is None and not (out / "summary.json").exists()
        family.snapshot()
        assert len(family.pids) > 3  # the child and Ray's processes were seen
        os.kill(proc.pid, signal.SIGKILL)  # the parent only: its children are on their own
        proc.wait(timeout=30)
        family.stop()
        wait_for(lambda: not family.alive(), "the simulation and Ray to end", timeout=30)
    finally:
        for pid in family.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not (out / "summary.json").exists()

    log = _simulate(tiny_yaml, out, "--resume")
    assert "resuming" in log and "at round 1" in log
    reference = _reference(tiny_yaml, tmp_path / "in-process")
    assert_same_run(out, reference, rounds=2, clients=CLIENTS)


def test_bad_run_directory_is_refused_before_ray_starts(tiny_yaml, tmp_path, monkeypatch):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "something").write_text("")
    monkeypatch.setattr(simulation, "launch", _must_not_launch)  # a guard: nothing may start
    result = CliRunner().invoke(app, _command(tiny_yaml, out)[1:])
    message = " ".join(result.output.split())  # rich wraps it
    assert result.exit_code == 2 and "already exists and is not empty" in message


def _must_not_launch(spec):
    raise AssertionError("the simulation was launched despite a bad run directory")
