"""benchmarks/gpu_suite.sh in its SMOKE mode: the GPU call's whole pipeline, on the CPU with the
tiny model, as a fresh checkout would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
METHODS = ["fedamole", "fedamole-r", "fedit-ft", "local"]


def run_suite(out: Path, data: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    """The suite with this test's interpreter and this checkout's src first on PYTHONPATH."""
    pythonpath = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    env = {
        **os.environ,
        "PYTHONPATH": pythonpath,
        "PYTHON": sys.executable,
        "SMOKE": "1",
        "OUT": str(out),
        "DATA": str(data),
        **settings,
    }
    return subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_suite.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.e2e
def test_smoke_suite_runs_both_stages_and_writes_the_summary(tmp_path, shared_data):
    out = tmp_path / "out"
    result = run_suite(out, shared_data)
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads((out / "summary.json").read_text())
    assert [(s["name"], s["status"]) for s in doc["stages"]] == [
        ("overhead", "ok"),
        ("compare", "ok"),
    ]
    assert doc["smoke"] and doc["machine"]["torch"]
    comparison = json.loads((out / "compare" / "summary.json").read_text())
    assert list(comparison["methods"]) == METHODS
    assert doc["comparison"]["summary"] == comparison
    assert len(doc["comparison"]["runs"]["finished"]) == 4  # 4 methods x 1 seed (SMOKE=1)
    overhead = doc["overhead"]
    hmole, lora = overhead["methods"]["hmole"], overhead["methods"]["lora"]
    assert overhead["ratios"]["step_time"] == pytest.approx(hmole["step_ms"] / lora["step_ms"])
    assert hmole["aten_ops"] > lora["aten_ops"] > 0  # routing adds ops to the same LoRA
    summary = (out / "summary.md").read_text()
    assert (out / "compare" / "table.md").read_text().strip() in summary
    assert f"| aten ops per step | {hmole['aten_ops']} | {lora['aten_ops']} |" in summary


@pytest.mark.e2e
def test_stages_cut_by_their_time_limit_are_reported_and_fail_the_suite(tmp_path, shared_data):
    out = tmp_path / "out"
    result = run_suite(out, shared_data, OVERHEAD_TIMEOUT="1", COMPARE_TIMEOUT="1")
    assert result.returncode == 1
    assert "stages not ok: overhead, compare" in result.stderr
    doc = json.loads((out / "summary.json").read_text())
    assert [s["status"] for s in doc["stages"]] == ["timed out", "timed out"]
    assert doc["overhead"] is None and doc["comparison"]["summary"] is None
    assert len(doc["comparison"]["runs"]["unfinished"]) == 4  # 4 methods x 1 seed (SMOKE=1)
    summary = (out / "summary.md").read_text()
    assert "No figures: the stage did not finish" in summary
    assert "Rerun the suite with the same OUT to resume" in summary


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"SMOKE": "yes"}, "SMOKE=yes: use SMOKE=1"),
        ({"COMPARE_TIMEOUT": "5m"}, "COMPARE_TIMEOUT=5m: give a whole number of seconds"),
    ],
)
def test_bad_settings_are_named_before_anything_runs(tmp_path, shared_data, setting, message):
    result = run_suite(tmp_path / "out", shared_data, **setting)
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_data_names_the_folder_and_the_setting(tmp_path):
    result = run_suite(tmp_path / "out", tmp_path / "nowhere")
    assert result.returncode == 2
    assert f"no Natural Instructions sample at {tmp_path / 'nowhere'}" in result.stderr
    assert "set DATA" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the suite would run in full")
def test_without_cuda_the_full_suite_says_to_use_smoke(tmp_path, shared_data):
    result = run_suite(tmp_path / "out", shared_data, SMOKE="0")
    assert result.returncode == 2 and "no CUDA device visible" in result.stderr
    assert "SMOKE=1" in result.stderr and not (tmp_path / "out").exists()
