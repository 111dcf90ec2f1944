"""Bad inputs that used to end in a traceback (or after expensive work), through the real
command line in process: each is now exit code 2 with a message naming the file, line or setting,
before any model loads, and changes no file. (benchmarks/bad_inputs.py tries 87, each in its own
process.)"""

from __future__ import annotations

import socket
from pathlib import Path

import huggingface_hub
import pytest
from tiny_run import TINY_RUN
from typer.testing import CliRunner

from fedamole import models
from fedamole.cli import app
from fedamole.transports.in_process import run_in_process


def _sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


TINY = _sets(*TINY_RUN)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    from fedamole.config import load_config

    out = tmp_path_factory.mktemp("bad-inputs") / "run"
    run_in_process(load_config(None, [*TINY_RUN, f"output.dir={out}"]))
    return out


@pytest.fixture
def no_model_loads(monkeypatch):
    """A guard: these inputs must be refused before any weights load."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("a model was loaded for a bad input")

    monkeypatch.setattr(models, "load_base_model", refuse)  # build_base_model calls it there


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(args: list[str], *messages: str, cwd: Path) -> None:
    before = _files(cwd)
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 2, result.output
    for message in messages:
        assert message in result.output, result.output
    assert _files(cwd) == before


def test_files_that_are_not_utf8_are_named_with_their_line(tmp_path, finished, no_model_loads):
    config = tmp_path / "config.yaml"
    config.write_bytes(b"seed: 1\nfederation:\n  rounds: 2 # r\xe9sum\xe9\n")
    _refused(["run", "--config", str(config)], f"{config}, line 3: not UTF-8", cwd=tmp_path)
    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9"}\n')
    args = ["run", "--out", str(tmp_path / "new"), *TINY, *_sets("data.source=jsonl")]
    _refused([*args, *_sets(f"data.path={data}")], f"{data}, line 2: not UTF-8", cwd=tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"Name a caf\xe9.\n")
    _refused(
        ["generate", "--run", str(finished), "--input-file", str(prompts)],
        f"{prompts}, line 1: not UTF-8",
        cwd=tmp_path,
    )


def test_models_and_modules_that_do_not_exist_are_refused_before_loading(
    tmp_path, no_model_loads, monkeypatch
):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    folder = tmp_path / "notamodel"
    folder.mkdir()
    out = ["--out", str(tmp_path / "new")]
    _refused(["run", *out, *_sets(f"model.name={folder}")], "has no config.json", cwd=tmp_path)
    _refused(
        ["run", *out, *_sets("model.name=nosuch-org/nosuch-model")],
        "is not in the local Hugging Face cache and HF_HUB_OFFLINE is set",
        cwd=tmp_path,
    )
    _refused(
        ["run", *out, *TINY, *_sets("hmole.target_modules=[nosuch]")],
        "no linear module matches ['nosuch']",
        cwd=tmp_path,
    )
    _refused(
        ["run", *out, *TINY, *_sets("hmole.top_k=9", "hmole.num_experts=4")],
        "hmole.top_k=9 exceeds hmole.num_experts=4",
        cwd=tmp_path,
    )


def test_outputs_that_cannot_be_written_are_refused_first(tmp_path, finished, no_model_loads):
    _refused(
        ["run", "--out", "/sys/fedamole-run", *TINY],
        "cannot write into /sys/fedamole-run",
        cwd=tmp_path,
    )
    answers = tmp_path / "answers.jsonl"
    answers.write_text("earlier answers\n")
    for output, message in ((answers, "is an existing file"), (tmp_path, "is a folder")):
        _refused(
            ["generate", "--run", str(finished), "hi", "--output", str(output)],
            message,
            cwd=tmp_path,
        )


def test_serve_refuses_missing_and_unfinished_runs_and_a_busy_port(
    tmp_path, finished, no_model_loads
):
    _refused(["serve", "--run", str(tmp_path / "nowhere")], "no such directory", cwd=tmp_path)
    (tmp_path / "unfinished").mkdir()
    for name in ("config.yaml", "method.json"):
        (tmp_path / "unfinished" / name).write_bytes((finished / name).read_bytes())
    _refused(["serve", "--run", str(tmp_path / "unfinished")], "is not finished", cwd=tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        _refused(["serve", "--run", str(finished), "--port", port], "cannot listen", cwd=tmp_path)
