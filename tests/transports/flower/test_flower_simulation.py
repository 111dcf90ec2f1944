"""The Flower apps on Flower's Simulation Engine (Ray), launched by `fedamole run --transport
flower-simulation`: the same run as in-process, also after the simulation was killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from same_run import assert_same_run, wait_for
from typer.testing import CliRunner

from fedamole.cli import app
from fedamole.config import load_config
from fedamole.transports.flower import simulation
from fedamole.transports.in_process import run_simulation

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


def _simulate(config: Path, out: Path, *extra: str) -> str:
    """Run to the end; Ray's processes (in the command's own process group) end with it."""
    proc = subprocess.Popen(
        _command(config, out, *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout + stderr
    wait_for(lambda: not _processes_in_group(proc.pid), "Ray's processes to end", timeout=30)
    return stdout


def _reference(config: Path, out: Path, *overrides: str, method: str | None = None) -> Path:
    cfg = load_config(
        config, [f"output.dir={out}", f"federation.num_clients={CLIENTS}", *overrides]
    )
    run_simulation(cfg, method=method)
    return out


def _processes_in_group(pgid: int) -> list[int]:
    """Live processes of a process group (Ray's raylet, GCS and workers included), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[2]) == pgid and stat[0] != "Z":
                found.append(int(entry.name))
    return found


def test_simulated_fedit_equals_the_in_process_run(tiny_yaml, tmp_path):
    """FedIT (a train then an evaluate message per client and round), 4 virtual SuperNodes."""
    out = tmp_path / "simulation"
    log = _simulate(tiny_yaml, out, "--method", "fedit")
    assert "is client 3" in log and "dropped" not in log
    reference = _reference(tiny_yaml, tmp_path / "in-process", method="fedit")
    assert_same_run(out, reference, rounds=2, clients=CLIENTS)


def test_killed_simulation_resumes_to_the_in_process_run(tiny_yaml, tmp_path):
    """FedAMoLE for 3 rounds; the simulation (with all of Ray's processes) is killed once round
    0's checkpoint is written, then resumed: the outcome is the uninterrupted in-process run's."""
    out = tmp_path / "simulation"
    three = ("--set", "federation.rounds=3")
    proc = subprocess.Popen(
        _command(tiny_yaml, out, *three),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(lambda: (out / "checkpoint.safetensors").exists(), "round 0", interval=0.05)
        assert proc.poll() is None and not (out / "summary.json").exists()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    wait_for(lambda: not _processes_in_group(proc.pid), "Ray's processes to end", timeout=30)

    log = _simulate(tiny_yaml, out, *three, "--resume")
    assert "resuming" in log and "at round 1" in log
    reference = _reference(tiny_yaml, tmp_path / "in-process", "federation.rounds=3")
    assert_same_run(out, reference, rounds=3, clients=CLIENTS)


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
