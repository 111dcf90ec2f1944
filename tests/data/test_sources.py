"""Loaders: the shared samples load with the documented counts; bad data fails with file + line."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest

from fedamole.config import DataConfig
from fedamole.data.example import DataError, Example
from fedamole.data.prompts import NLI_LABELS
from fedamole.data.sources import (
    load_dolly,
    load_jsonl,
    load_natural_instructions,
    load_snli,
    load_source,
    stratified_subsample,
)


def _write_jsonl(path: Path, rows: list[object | str]) -> Path:
    """Rows as JSON lines; a str row is written verbatim (for blank or broken lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_dolly_sample_matches_readme(shared_data: Path) -> None:
    examples = load_dolly(shared_data / "dolly" / "dolly_sample.jsonl")
    counts = Counter(ex.label for ex in examples)
    assert len(examples) == 1296
    assert len(counts) == 8
    assert counts["open_qa"] == 323 and counts["creative_writing"] == 58
    assert all(ex.output and ex.choices is None for ex in examples)
    assert any(ex.input for ex in examples) and any(not ex.input for ex in examples)


def test_snli_sample_matches_readme(shared_data: Path) -> None:
    examples = load_snli(shared_data / "snli" / "snli_sample.jsonl")
    assert len(examples) == 623
    assert Counter(ex.label for ex in examples) == {
        "entailment": 210,
        "neutral": 202,
        "contradiction": 211,
    }
    first = examples[0]
    assert first.choices == NLI_LABELS and first.output == first.label
    assert first.input.startswith(f"Premise: {first.group}\nHypothesis: ")
    assert len({ex.group for ex in examples}) < len(examples)  # ~3 hypotheses per premise


def test_natural_instructions_sample_matches_readme(shared_data: Path) -> None:
    folder = shared_data / "natural_instructions"
    examples = load_natural_instructions(folder)
    counts = Counter(ex.label for ex in examples)
    assert len(examples) == 1554 and len(counts) == 10
    assert counts["task085_unnatural_addsub_arithmetic"] == 145
    task = json.loads((folder / "task085_unnatural_addsub_arithmetic.json").read_text())
    first = next(ex for ex in examples if ex.label == "task085_unnatural_addsub_arithmetic")
    assert first.instruction == task["Definition"][0]
    assert (first.input, first.output) == (
        task["Instances"][0]["input"],
        task["Instances"][0]["output"][0],
    )


def test_snli_accepts_integer_labels_and_skips_unlabelled(tmp_path: Path, caplog) -> None:
    pair = {"premise": "A dog runs.", "hypothesis": "An animal moves."}
    path = _write_jsonl(
        tmp_path / "snli.jsonl", [{**pair, "label": label} for label in (0, 1, 2, -1, "neutral")]
    )
    with caplog.at_level(logging.INFO, logger="fedamole.data"):
        examples = load_snli(path)
    assert [ex.label for ex in examples] == ["entailment", "neutral", "contradiction", "neutral"]
    assert "skipped 1 pairs" in caplog.text


def test_jsonl_field_aliases_and_default_category(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "data.jsonl",
        [
            {"instruction": "a", "input": "b", "output": "c", "category": "x"},
            {"instruction": "d", "context": "e", "response": "f"},
            {"instruction": "g", "output": "h"},
        ],
    )
    assert load_jsonl(path) == [
        Example("a", "b", "c", "x", source="jsonl"),
        Example("d", "e", "f", "default", source="jsonl"),
        Example("g", "", "h", "default", source="jsonl"),
    ]


DOLLY_ROW = {"instruction": "i", "context": "", "response": "r", "category": "open_qa"}
SNLI_ROW = {"premise": "p", "hypothesis": "h", "label": "neutral"}
JSONL_LOADERS = [
    (load_dolly, DOLLY_ROW),
    (load_snli, SNLI_ROW),
    (load_jsonl, {"instruction": "i", "output": "o"}),
]


@pytest.mark.parametrize("loader", [load_dolly, load_snli, load_jsonl])
def test_missing_file_names_path_and_setting(tmp_path: Path, loader) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=r"data\.path .*nope\.jsonl does not exist"):
        loader(missing)


def test_missing_folder_names_path_and_setting(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.path .*tasks does not exist"):
        load_natural_instructions(tmp_path / "tasks")


@pytest.mark.parametrize(("loader", "row"), JSONL_LOADERS)
def test_row_missing_field_names_file_line_and_field(tmp_path: Path, loader, row) -> None:
    field = next(iter(row))
    broken = {k: v for k, v in row.items() if k != field}
    path = _write_jsonl(tmp_path / "data.jsonl", [row, "", broken])  # blank line 2 still counts
    with pytest.raises(DataError, match=rf"data\.jsonl, line 3: missing field '{field}'"):
        loader(path)


@pytest.mark.parametrize(("loader", "row"), JSONL_LOADERS)
def test_bad_json_line_names_file_and_line(tmp_path: Path, loader, row) -> None:
    path = _write_jsonl(tmp_path / "data.jsonl", [row, '{"instruction": "cut off'])
    with pytest.raises(DataError, match=r"data\.jsonl, line 2: not valid JSON"):
        loader(path)


def test_unknown_snli_label_lists_allowed_labels(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "snli.jsonl", [SNLI_ROW, {**SNLI_ROW, "label": "maybe"}])
    with pytest.raises(
        DataError,
        match=r"snli\.jsonl, line 2: unknown SNLI label 'maybe'; "
        r"allowed: entailment, neutral, contradiction",
    ):
        load_snli(path)


def test_natural_instructions_instance_without_output(tmp_path: Path) -> None:
    task = {
        "Definition": ["Do it."],
        "Instances": [{"input": "a", "output": ["b"]}, {"input": "c", "output": []}],
    }
    (tmp_path / "task1_x.json").write_text(json.dumps(task))
    with pytest.raises(DataError, match=r"task1_x\.json, instance 2: missing field 'output'"):
        load_natural_instructions(tmp_path)


def test_natural_instructions_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no task .json files"):
        load_natural_instructions(tmp_path)


def test_load_source_synthetic_and_max_examples() -> None:
    full = load_source(DataConfig(source="synthetic", synthetic_per_task=20), seed=0)
    capped = load_source(
        DataConfig(source="synthetic", synthetic_per_task=20, max_examples=40), seed=0
    )
    full_counts = Counter(ex.label for ex in full)
    assert set(full_counts.values()) == {20}
    assert len(capped) == 40 and set(capped) <= set(full)
    assert set(Counter(ex.label for ex in capped).values()) == {40 // len(full_counts)}


def test_load_source_reads_configured_path(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [DOLLY_ROW] * 3)
    assert len(load_source(DataConfig(source="dolly", path=path), seed=0)) == 3
    with pytest.raises(DataError, match="data.source=jsonl needs data.path"):
        load_source(DataConfig(source="jsonl"), seed=0)


def test_stratified_subsample_keeps_shares_and_order() -> None:
    examples = [Example(str(i), "", "", "a" if i % 4 else "b") for i in range(400)]  # 3:1
    kept = stratified_subsample(examples, 101, seed=1)
    counts = Counter(ex.label for ex in kept)
    assert len(kept) == 101 and counts == {"a": 76, "b": 25}
    assert kept == sorted(kept, key=examples.index)
    assert kept == stratified_subsample(examples, 101, seed=1)
    assert kept != stratified_subsample(examples, 101, seed=2)
