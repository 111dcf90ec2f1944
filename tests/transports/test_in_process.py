"""The in-process runner end to end on the tiny random Llama: outputs, kill-and-resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tiny_run import TINY_RUN

from fedamole.config import ConfigError, load_config
from fedamole.data.example import DataError
from fedamole.federation.participation import participants
from fedamole.reporting import RunDir, RunDirError
from fedamole.rsea.solver import InfeasibleAssignmentError
from fedamole.transports.in_process import run_in_process

TINY = [*TINY_RUN, "federation.num_clients=3", "federation.rounds=2"]


def tiny_config(out: Path, *extra: str):
    return load_config(None, [*TINY, f"output.dir={out}", *extra])


def _metrics_of(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "wall_time_s"}


def test_two_round_three_client_run_writes_every_output(tmp_path):
    out = tmp_path / "run"
    summary = run_in_process(tiny_config(out))
    assert (out / "config.yaml").is_file()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if r["split"] != "server"]
    assert len(records) == 2 * 3 * 2  # rounds x clients x (val, test)
    assert {r["split"] for r in records} == {"val", "test"}
    server = [r for r in map(json.loads, lines) if r["split"] == "server"]
    assert [r["round"] for r in server] == [0, 1]  # RSEA diagnostics, one record per round
    assert all(0 <= r["rsea_assignment_change"] <= 1 for r in server)
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 and "train_loss" in r for r in records)
    for rnd in (0, 1):
        doc = json.loads((out / "assignments" / f"round_{rnd:03d}.json").read_text())
        assert set(doc["clients"]) == {"0", "1", "2"}
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["rounds"] == 2 and set(on_disk["per_client"]) == {"0", "1", "2"}
    assert _metrics_of(on_disk) == _metrics_of(summary)
    for cid in range(3):
        folder = out / "clients" / str(cid)
        arch = json.loads((folder / "architecture.json").read_text())["architecture"]
        state = load_file(str(folder / "adapter.safetensors"))
        experts = {k for k in state if ".experts." in k}
        assert len(experts) == 2 * sum(len(ids) for ids in arch.values())
    assert (out / "plots" / "metric_per_round.png").stat().st_size > 0
    assert (out / "plots" / "experts_heatmap.png").stat().st_size > 0
    assert (out / "plots" / "rsea_diagnostics.png").stat().st_size > 0


@pytest.mark.e2e
@pytest.mark.parametrize("method", [None, "fedalt", "fedlease"])
def test_killed_run_resumes_to_the_same_summary(tmp_path, method):
    extra = ["federation.rounds=3"]
    reference = run_in_process(tiny_config(tmp_path / "reference", *extra), method=method)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fedamole.cli", "run", "--out", str(out)]
    cmd += ["--method", method] if method else []
    for item in [*TINY, *extra]:
        cmd += ["--set", item]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoint.safetensors").exists():
            assert proc.poll() is None, "run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # mid round 1, at whatever point it has reached
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "summary.json").exists()

    resumed = run_in_process(tiny_config(out, *extra), resume=True, method=method)
    assert _metrics_of(resumed) == _metrics_of(reference)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def finished_run(tmp_path):
    out = tmp_path / "done"
    run_in_process(tiny_config(out, "federation.rounds=1"))
    return out


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ([], RunDirError, "already exists"),
        (
            ["data.source=jsonl", "data.path=/nonexistent/x.jsonl"],
            (DataError, RunDirError),
            "x.jsonl",
        ),
        (["hmole.num_experts=1"], InfeasibleAssignmentError, "num_experts"),
    ],
)
def test_bad_input_fails_early_and_leaves_run_untouched(finished_run, overrides, error, message):
    before = _snapshot(finished_run)
    with pytest.raises(error, match=message):
        run_in_process(tiny_config(finished_run, "federation.rounds=1", *overrides))
    assert _snapshot(finished_run) == before


def test_missing_data_file_error_names_file_before_model_loads(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl"):
        run_in_process(
            tiny_config(tmp_path / "new", "data.source=jsonl", f"data.path={tmp_path}/nope.jsonl")
        )
    assert not (tmp_path / "new").exists()


def test_resume_refuses_different_settings(finished_run):
    before = _snapshot(finished_run)
    with pytest.raises(RunDirError, match="federation.local_steps"):
        run_in_process(
            tiny_config(finished_run, "federation.rounds=1", "federation.local_steps=5"),
            resume=True,
        )
    assert _snapshot(finished_run) == before


def test_unknown_and_bad_config_keys_are_named():
    with pytest.raises(ConfigError, match="federation.roundz: unknown key"):
        load_config(None, ["federation.roundz=2"])
    with pytest.raises(ConfigError, match="hmole.rank"):
        load_config(None, ["hmole.rank=0"])


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_sampled_participation_trains_and_assigns_only_the_sampled_clients(tmp_path):
    extra = ["federation.num_clients=4", "federation.clients_per_round=2", "federation.rounds=3"]
    out = tmp_path / "sampled"
    summary = run_in_process(tiny_config(out, *extra))
    cfg = tiny_config(out, *extra)
    for rnd in range(3):
        sampled = participants(cfg, rnd)
        assert len(sampled) == 2
        trained = {r["client"] for r in _records(out) if r["round"] == rnd and "client" in r}
        assert trained == set(sampled)
        doc = json.loads((out / "assignments" / f"round_{rnd:03d}.json").read_text())
        assert sorted(map(int, doc["clients"])) == sampled
    assert len({tuple(participants(cfg, rnd)) for rnd in range(3)}) > 1  # samples do change
    rounds_of = {int(c): v["rounds"] for c, v in summary["per_client"].items()}
    assert sum(rounds_of.values()) == 3 * 2


def test_resumed_sampled_run_replays_the_same_samples(tmp_path):
    extra = ["federation.num_clients=4", "federation.clients_per_round=0.5", "federation.rounds=3"]
    reference = run_in_process(tiny_config(tmp_path / "reference", *extra))
    out = tmp_path / "killed"
    save = RunDir.save_checkpoint

    def killed(run_dir, checkpoint):
        save(run_dir, checkpoint)
        if checkpoint.state.round == 1:
            raise KeyboardInterrupt  # right after round 0's checkpoint

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RunDir, "save_checkpoint", killed)
        with pytest.raises(KeyboardInterrupt):
            run_in_process(tiny_config(out, *extra))
    resumed = run_in_process(tiny_config(out, *extra), resume=True)
    assert _metrics_of(resumed) == _metrics_of(reference)
    for rnd in range(3):
        name = f"round_{rnd:03d}.json"
        assert (out / "assignments" / name).read_text() == (
            tmp_path / "reference" / "assignments" / name
        ).read_text()


def test_the_base_model_is_scored_beside_the_personalised_one(tmp_path):
    """With a learning rate too small to move the adapter, the personalised model is the base
    model: its scores must equal the base model's, client by client."""
    still = ["eval.base_model=true", "optim.lr=1e-12", "federation.rounds=1"]
    summary = run_in_process(tiny_config(tmp_path / "still", *still), method="fedit-ft")
    metric = summary["metric"]
    base = summary["base_model"]
    assert set(base) == set(summary["per_client"]) == {"0", "1", "2"}
    for cid, values in summary["per_client"].items():
        assert base[cid][metric] == values["selected"][metric]
        assert base[cid]["num_examples"] == values["selected"]["num_examples"]
    saved = json.loads((tmp_path / "still" / "summary.json").read_text())
    assert saved["base_model"] == base
    assert "base_model" not in run_in_process(
        tiny_config(tmp_path / "plain", "federation.rounds=1")
    )
