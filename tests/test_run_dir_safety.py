"""Nothing already written is lost or silently wrong: one writer per run directory, a finished run
never retrained, a damaged checkpoint refused, a comparison never mixed into other files, and a
moved run resumed where it lies."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file
from same_run import wait_for
from tiny_run import TINY_RUN

from fedamole.compare import compare
from fedamole.config import ConfigError, load_config
from fedamole.reporting import RunDirError
from fedamole.transports.in_process import run_in_process

TINY = [*TINY_RUN, "federation.rounds=2"]
FEDAMOLE = Path(sys.executable).parent / "fedamole"


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def _run(out: Path, *extra: str, resume: bool = False) -> dict:
    cfg = load_config(None, [*TINY, f"output.dir={out}", *extra])
    return run_in_process(cfg, resume=resume)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    _run(out)
    return out


def _killed_after_last_round(finished: Path, dest: Path) -> Path:
    """A copy of the run as a kill right after its last checkpoint leaves it."""
    shutil.copytree(finished, dest)
    (dest / "summary.json").unlink()
    return dest


@pytest.mark.e2e
def test_a_second_writer_is_refused_naming_the_first(tmp_path):
    """Two real `fedamole run` processes on one folder: the second (--resume) is refused while
    the first holds it (stopped mid-run, so it surely does), and the first's records stay
    single."""
    out = tmp_path / "run"
    command = [str(FEDAMOLE), "run", "--out", str(out)]
    command += [arg for item in [*TINY, "federation.rounds=3"] for arg in ("--set", item)]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (out / "config.yaml").is_file(), "the first run to start")
        first.send_signal(signal.SIGSTOP)
        second = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stdout + second.stderr
        message = " ".join(second.stdout.split())
        assert f"is being written by process {first.pid}" in message, message
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = Counter((r["round"], r.get("client"), r["split"]) for r in rows)
    assert max(keys.values()) == 1 and {r["round"] for r in rows} == {0, 1, 2}


def test_resume_never_retrains_a_finished_run(finished):
    before = _files(finished)
    with pytest.raises(RunDirError, match="is a finished run"):
        _run(finished, resume=True)
    (checkpoint := finished / "checkpoint.safetensors").rename(finished / "moved-away")
    try:
        with pytest.raises(RunDirError, match="is a finished run"):
            _run(finished, resume=True)
    finally:
        (finished / "moved-away").rename(checkpoint)
    assert _files(finished) == before


def test_records_without_their_checkpoint_are_not_retrained_over(finished, tmp_path):
    run = _killed_after_last_round(finished, tmp_path / "killed")
    (run / "checkpoint.safetensors").unlink()
    before = _files(run)
    with pytest.raises(RunDirError, match="records through round 1 but no checkpoint"):
        _run(run, resume=True)
    assert _files(run) == before


def _rewrite_checkpoint(path: Path, change) -> None:
    """The checkpoint with one tensor changed and its metadata (checksum included) kept."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    key = next(k for k in sorted(tensors) if k.startswith("store/"))
    tensors[key] = change(tensors[key].clone())
    save_file(tensors, str(path), metadata)


def test_a_damaged_checkpoint_is_refused(finished, tmp_path):
    def one_float(tensor):
        tensor.view(-1)[0] += 1e-3
        return tensor

    edited = _killed_after_last_round(finished, tmp_path / "edited")
    _rewrite_checkpoint(edited / "checkpoint.safetensors", one_float)
    before = _files(edited)
    with pytest.raises(RunDirError, match="checksum does not match"):
        _run(edited, resume=True)
    assert _files(edited) == before

    cut = _killed_after_last_round(finished, tmp_path / "cut")
    data = (cut / "checkpoint.safetensors").read_bytes()
    (cut / "checkpoint.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(RunDirError, match="not a readable safetensors file"):
        _run(cut, resume=True)

    garbled = _killed_after_last_round(finished, tmp_path / "garbled")
    with (garbled / "metrics.jsonl").open("r+b") as f:
        f.write(b"{garbage")
    with pytest.raises(RunDirError, match=r"metrics.jsonl, line 1: damaged"):
        _run(garbled, resume=True)


def test_an_intact_killed_run_moved_elsewhere_resumes_where_it_lies(
    finished, tmp_path, monkeypatch
):
    moved = _killed_after_last_round(finished, tmp_path / "elsewhere" / "run")
    monkeypatch.chdir(tmp_path / "elsewhere")
    summary = run_in_process(load_config(None, [*TINY, "output.dir=run"]), resume=True)
    reference = json.loads((finished / "summary.json").read_text())
    assert summary["mean"] == reference["mean"] and (moved / "summary.json").is_file()


def test_compare_writes_only_into_an_empty_folder_or_its_own(finished, tmp_path):
    before = _files(finished)
    with pytest.raises(ConfigError, match="which no comparison writes"):
        compare(None, ["fedit"], [42], TINY, finished)
    assert _files(finished) == before
    papers = tmp_path / "papers"
    papers.mkdir()
    (papers / "thesis.tex").write_text("mine")
    with pytest.raises(ConfigError, match="thesis.tex"):
        compare(None, ["fedit"], [42], TINY, papers)
    assert [p.name for p in papers.iterdir()] == ["thesis.tex"]
