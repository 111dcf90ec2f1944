"""`fedamole compare` end to end on the tiny model, and resuming runs of a baseline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_run import TINY_RUN
from typer.testing import CliRunner

import fedamole.compare
import fedamole.transports.in_process as in_process
from fedamole.cli import app
from fedamole.config import load_config
from fedamole.reporting import RunDir, RunDirError

TINY = [*TINY_RUN, "federation.local_steps=1"]
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _compare(out, *extra: str, methods: str = "local,fedamole") -> None:
    args = ["compare", "--methods", methods, "--out", str(out), *extra]
    for item in TINY:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output


@pytest.mark.e2e
def test_compare_two_methods_two_seeds_in_parallel_writes_report_with_intervals(
    tmp_path, shared_data
):
    """SNLI is scored by accuracy, which varies even on the tiny random model, so the intervals
    are not degenerate."""
    out = tmp_path / "cmp"
    snli = [
        "data.source=snli",
        f"data.path={shared_data / 'snli' / 'snli_sample.jsonl'}",
        "data.min_client_size=20",
        "data.test_cap=30",
    ]
    args = [*(a for item in snli for a in ("--set", item)), "--seeds", "42,43", "--jobs", "2"]
    _compare(out, *args)
    doc = json.loads((out / "summary.json").read_text())
    assert doc["metric"] == "accuracy" and doc["reference"] == "fedamole"
    assert sorted(p.name for p in (out / "logs").iterdir()) == [
        f"{m}-seed{s}.log" for m in ("fedamole", "local") for s in (42, 43)
    ]
    for name, row in doc["methods"].items():
        runs = [
            json.loads((out / name / f"seed{s}" / "summary.json").read_text()) for s in (42, 43)
        ]
        assert row["mean"] == pytest.approx(
            np.mean([r["mean"]["selected"]["accuracy"] for r in runs])
        )
        assert row["interval"]["low"] <= row["mean"] <= row["interval"]["high"]
        assert row["interval"]["low"] < row["interval"]["high"]  # examples do differ
        assert len(doc["curves"][name]) == 1  # one round
    local = doc["methods"]["local"]
    diff = local["difference"]
    assert diff["mean"] == pytest.approx(local["mean"] - doc["methods"]["fedamole"]["mean"])
    assert diff["includes_zero"] == (diff["low"] <= 0 <= diff["high"])
    report = (out / "report.md").read_text()
    assert "95 % interval" in report and "| local |" in report
    assert ("includes 0" in report) == diff["includes_zero"]
    assert "RSEA diagnostics" in report and "assignment_change" in report
    assert set(doc["diagnostics"]) == {"fedamole"}  # local has no server diagnostics
    assert (out / "comparison.png").stat().st_size > 0 and (out / "curves.png").stat().st_size > 0
    protocol = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "protocol_report.py"),
            "--out",
            str(out),
            "--seeds",
            "42,43",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "best baseline by validation accuracy: local" in protocol  # the only baseline
    row = next(line for line in protocol.splitlines() if line.startswith("| fedamole - local |"))
    assert float(row.split("|")[2]) == pytest.approx(-diff["mean"], abs=1e-4)


@pytest.mark.e2e
def test_compare_skips_finished_runs_and_resumes_killed_ones(tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    _compare(out)
    doc = json.loads((out / "summary.json").read_text())
    assert set(doc["methods"]) == {"local", "fedamole"} and doc["round"] == "selected"
    assert doc["methods"]["local"]["bytes_up_per_round"] == 0
    assert doc["methods"]["fedamole"]["bytes_up_per_round"] > 0

    calls = []
    real = fedamole.compare.run_in_process
    monkeypatch.setattr(
        fedamole.compare,
        "run_in_process",
        lambda cfg, **kw: (
            calls.append((cfg.output.dir.parent.name, kw["resume"])) or real(cfg, **kw)
        ),
    )
    (out / "summary.json").unlink()
    _compare(out)
    assert calls == [] and (out / "summary.json").is_file()

    (out / "local" / "seed42" / "summary.json").unlink()  # as if killed before it finished
    _compare(out)
    assert calls == [("local", True)]


def test_killed_baseline_run_resumes_with_its_private_state(tmp_path, monkeypatch):
    """FedDPA's local adapters live only on the clients: a resumed run must get them back."""
    tiny = [*TINY, "federation.rounds=2"]
    in_process.run_in_process(
        load_config(None, [*tiny, f"output.dir={tmp_path / 'ref'}"]), method="feddpa"
    )

    save = RunDir.save_checkpoint

    def killed(run_dir, checkpoint):
        save(run_dir, checkpoint)
        raise KeyboardInterrupt  # right after round 0's checkpoint

    out = tmp_path / "killed"
    with monkeypatch.context() as patch:
        patch.setattr(RunDir, "save_checkpoint", killed)
        with pytest.raises(KeyboardInterrupt):
            in_process.run_in_process(
                load_config(None, [*tiny, f"output.dir={out}"]), method="feddpa"
            )
    assert not (out / "summary.json").exists()
    in_process.run_in_process(
        load_config(None, [*tiny, f"output.dir={out}"]), resume=True, method="feddpa"
    )
    for cid in (0, 1):
        ref = load_file(str(tmp_path / "ref" / "clients" / str(cid) / "adapter.safetensors"))
        got = load_file(str(out / "clients" / str(cid) / "adapter.safetensors"))
        assert ref.keys() == got.keys() and all((ref[k] == got[k]).all() for k in ref)


@pytest.mark.e2e
def test_compare_runs_the_paper_baselines_end_to_end(tmp_path):
    out = tmp_path / "cmp"
    _compare(out, methods="fedprompt,fedptuning,fdlora")
    doc = json.loads((out / "summary.json").read_text())
    assert set(doc["methods"]) == {"fedprompt", "fedptuning", "fdlora"}
    for row in doc["methods"].values():
        assert set(row["per_client"]) == {"0", "1"} and row["bytes_up_per_round"] > 0
    table = (out / "table.md").read_text()
    assert all(f"| {name} |" in table for name in ("fedprompt", "fedptuning", "fdlora"))
    fdlora_client = load_file(
        str(out / "fdlora" / "seed42" / "clients" / "0" / "adapter.safetensors")
    )
    assert "fusion/weights" in fdlora_client and any(
        k.startswith("personal/") for k in fdlora_client
    )


@pytest.mark.parametrize("method", ["fedprompt", "fedptuning", "fdlora"])
def test_a_killed_run_of_a_paper_baseline_resumes_to_the_uninterrupted_result(
    tmp_path, monkeypatch, method
):
    """Killed after round 1's checkpoint: FDLoRA's personal LoRAs (synchronised in round 0, kept
    by the clients) and the server's outer momentum (made in round 1) must both come back."""
    tiny = [*TINY, "federation.rounds=3"]
    reference = in_process.run_in_process(
        load_config(None, [*tiny, f"output.dir={tmp_path / 'ref'}"]), method=method
    )

    save = RunDir.save_checkpoint
    saved = []

    def killed(run_dir, checkpoint):
        save(run_dir, checkpoint)
        saved.append(checkpoint.state.round)
        if len(saved) == 2:
            raise KeyboardInterrupt  # right after round 1's checkpoint

    out = tmp_path / "killed"
    cfg = load_config(None, [*tiny, f"output.dir={out}"])
    with monkeypatch.context() as patch:
        patch.setattr(RunDir, "save_checkpoint", killed)
        with pytest.raises(KeyboardInterrupt):
            in_process.run_in_process(cfg, method=method)
    resumed = in_process.run_in_process(cfg, resume=True, method=method)

    def without_time(summary: dict) -> dict:
        return {k: v for k, v in summary.items() if k != "wall_time_s"}

    assert without_time(resumed) == without_time(reference)
    assert RunDir(out).read_records() == RunDir(tmp_path / "ref").read_records()
    for cid in (0, 1):
        ref = load_file(str(tmp_path / "ref" / "clients" / str(cid) / "adapter.safetensors"))
        got = load_file(str(out / "clients" / str(cid) / "adapter.safetensors"))
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_resume_refuses_a_run_of_another_method(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(None, [*TINY, f"output.dir={out}"])
    in_process.run_in_process(cfg, method="local")
    with pytest.raises(RunDirError, match="'local' run"):
        in_process.run_in_process(cfg, resume=True, method="fedit")


def test_comparison_reports_the_optimistic_best_test_round_and_the_worst_client(tmp_path):
    """Beside the validation-selected headline: the paper's metric (each client's best test
    round, labelled optimistic) and the lowest client's selected score, read off the records."""
    out = tmp_path / "cmp"
    cfg = load_config(
        None, [*TINY, "federation.rounds=2", f"output.dir={out / 'local' / 'seed42'}"]
    )
    in_process.run_in_process(cfg, method="local")
    result = fedamole.compare.summarise_comparison(out, ["local"], [42])

    run = RunDir(out / "local" / "seed42")
    metric = result["metric"]
    tests: dict[int, list[float]] = {}
    for r in run.read_records():
        if r["split"] == "test":
            tests.setdefault(r["client"], []).append(r[metric])
    assert all(len(values) == 2 for values in tests.values())
    row = result["methods"]["local"]
    assert row["best_test_round"] == pytest.approx(np.mean([max(v) for v in tests.values()]))
    selected = [c["selected"][metric] for c in run.read_summary()["per_client"].values()]
    assert row["worst_client"] == pytest.approx(min(selected))
    assert row["worst_client"] <= row["mean"] <= row["best_test_round"]

    table = fedamole.compare.render_table(result)
    header, _, local = table.splitlines()[2:5]
    columns = [c.strip() for c in header.split("|")]
    values = [c.strip() for c in local.split("|")]
    assert values[columns.index("best test round (optimistic)")] == f"{row['best_test_round']:.4f}"
    assert values[columns.index("worst client")] == f"{row['worst_client']:.4f}"
    assert "never used to choose a method" in table
