"""Bring-your-own data end to end: each supported shape runs a 1-round tiny federation."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from datasets import Dataset
from rich.console import Console
from tiny_run import TINY_RUN

from fedamole.config import load_config
from fedamole.data.example import DataError
from fedamole.transports.in_process import run_in_process

TINY = [*TINY_RUN, "federation.local_steps=1", "eval.max_new_tokens=2"]
TOPICS = ("cooking", "travel")


def _question(i: int) -> tuple[str, str, str]:
    topic = TOPICS[i % 2]
    return f"Tell me fact {i} about {topic}.", f"Fact {i} about {topic}.", topic


def _messages_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        question, answer, topic = _question(i)
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        rows.append({"messages": messages, "label": topic})
    return rows


def _prompt_completion_rows(n: int) -> list[dict]:
    return [
        {"prompt": q, "completion": a, "label": t} for q, a, t in (_question(i) for i in range(n))
    ]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _run(tmp_path: Path, *settings: str) -> dict:
    cfg = load_config(None, [*TINY, f"output.dir={tmp_path / 'run'}", *settings])
    return run_in_process(cfg, console=Console(file=io.StringIO()))


@pytest.mark.parametrize("rows", [_messages_rows, _prompt_completion_rows])
def test_conversational_jsonl_runs_a_federation(tmp_path, rows):
    path = _write_jsonl(tmp_path / "data.jsonl", rows(60))
    summary = _run(tmp_path, "data.source=jsonl", f"data.path={path}", "data.dirichlet_alpha=1.0")
    assert summary["rounds"] == 1 and set(summary["per_client"]) == {"0", "1"}


def test_hugging_face_folder_with_a_column_mapping_runs_a_federation(tmp_path):
    questions = [_question(i) for i in range(60)]
    Dataset.from_dict(
        {
            "question": [q for q, _, _ in questions],
            "answer": [a for _, a, _ in questions],
            "topic": [t for _, _, t in questions],
        }
    ).save_to_disk(str(tmp_path / "hf"))
    summary = _run(
        tmp_path,
        "data.source=hf",
        f"data.path={tmp_path / 'hf'}",
        "data.columns.instruction=question",
        "data.columns.output=answer",
        "data.columns.label=topic",
    )
    assert summary["rounds"] == 1


def test_a_malformed_row_names_file_and_line_before_the_model_loads(tmp_path):
    rows = _messages_rows(20)
    rows[6] = {"messages": [{"role": "user", "content": "hi"}]}  # no assistant answer
    path = _write_jsonl(tmp_path / "broken.jsonl", rows)
    with pytest.raises(DataError, match=r"broken\.jsonl, line 7"):
        _run(tmp_path, "data.source=jsonl", f"data.path={path}")
    assert not (tmp_path / "run").exists()


def _readme_section(title: str) -> str:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index(f"## {title}\n")
    return readme[start : readme.index("\n## ", start + 1)]


def _readme_rows() -> list[dict]:
    blocks = _readme_section("Your own data").split("```json\n")[1:]
    return [json.loads(block.split("```")[0]) for block in blocks]


@pytest.mark.parametrize("row", _readme_rows(), ids=lambda row: next(iter(row)))
def test_the_readmes_own_data_rows_train_with_its_command(row, tmp_path, monkeypatch):
    """Each example row of the README's "Your own data", as the file its command names, trains
    through that command as written (plus the tiny test model's settings)."""
    import shlex

    from typer.testing import CliRunner

    from fedamole.cli import app

    line = next(
        line
        for line in _readme_section("Your own data").splitlines()
        if line.startswith(".venv/bin/fedamole run")
    )
    words = shlex.split(line)[1:]
    data_file = next(w.split("=", 1)[1] for w in words if w.startswith("data.path="))
    text = json.dumps(row)
    (tmp_path / data_file).write_text("".join(text.replace("2", str(i)) + "\n" for i in range(40)))
    monkeypatch.chdir(tmp_path)
    settings = [arg for item in TINY for arg in ("--set", item)]
    result = CliRunner().invoke(app, [*words, *settings])
    assert result.exit_code == 0, result.output
    out = tmp_path / words[words.index("--out") + 1]
    assert json.loads((out / "summary.json").read_text())["rounds"] == 1
