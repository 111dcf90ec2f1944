"""Loaders: the shared samples load with the documented counts; bad data fails with file + line."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest

from fedamole.config import ColumnMap, DataConfig
from fedamole.data.example import UNLABELLED, DataError, Example
from fedamole.data.prompts import NLI_LABELS
from fedamole.data.sources import (
    largest_tasks,
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


# Own data: conversational JSONL shapes and any Hugging Face data set.

CHAT = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
        ],
        "category": "geo",
    },
    {
        "messages": [
            {"role": "user", "content": "Pick a number."},
            {"role": "assistant", "content": "7."},
            {"role": "user", "content": "Double it."},
            {"role": "user", "content": "Then add one."},
            {"role": "assistant", "content": "15."},
        ],
        "label": "math",
    },
]


def test_messages_jsonl_last_reply_is_output_earlier_turns_are_input(tmp_path: Path) -> None:
    examples = load_jsonl(_write_jsonl(tmp_path / "chat.jsonl", CHAT))
    assert examples == [
        Example("Be brief.\n\nCapital of France?", "", "Paris.", "geo", source="jsonl"),
        Example(
            "Double it.\n\nThen add one.",
            "User: Pick a number.\nAssistant: 7.",
            "15.",
            "math",
            source="jsonl",
        ),
    ]


def test_prompt_completion_jsonl(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Say hi.", "completion": "Hi!", "category": "greet"},
        {"prompt": "Say bye.", "completion": "Bye!"},
    ]
    path = _write_jsonl(tmp_path / "pc.jsonl", rows)
    assert load_source(DataConfig(source="jsonl", path=path), seed=0) == [
        Example("Say hi.", "", "Hi!", "greet", source="jsonl"),
        Example("Say bye.", "", "Bye!", UNLABELLED, source="jsonl"),
    ]


def test_jsonl_column_mapping_and_integer_labels(tmp_path: Path) -> None:
    rows = [{"q": "2+2?", "ctx": "arithmetic", "a": "4", "cls": 1}]
    columns = ColumnMap(instruction="q", input="ctx", output="a", label="cls")
    path = _write_jsonl(tmp_path / "own.jsonl", rows)
    assert load_jsonl(path, "alpaca", columns) == [
        Example("2+2?", "arithmetic", "4", "1", source="jsonl")
    ]
    with pytest.raises(
        DataError, match=r"own\.jsonl, line 1: missing field 'ctx2' \(fields present"
    ):
        load_jsonl(path, "alpaca", columns.model_copy(update={"input": "ctx2"}))


BAD_CHAT_ROWS = [
    ({"category": "x"}, r"field 'messages' must be a non-empty list .*got nothing"),
    ({"messages": "hi"}, r"field 'messages' must be a non-empty list .*got str"),
    ({"messages": [{"role": "bot", "content": "a"}]}, r"field 'messages\[0\]\.role' is 'bot'"),
    (
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}]},
        r"field 'messages\[1\]\.content' must be a string, got int",
    ),
    (
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
        r"field 'messages' must end with the assistant's reply",
    ),
    (
        {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]},
        r"field 'messages': the last assistant message must follow a user message",
    ),
    ({**CHAT[0], "category": 1.5}, r"field 'category' must be a string or an integer class"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_CHAT_ROWS)
def test_bad_messages_row_names_file_line_and_field(tmp_path: Path, bad, message) -> None:
    path = _write_jsonl(tmp_path / "chat.jsonl", [CHAT[0], "", bad])
    with pytest.raises(DataError, match=rf"chat\.jsonl, line 3: {message}"):
        load_jsonl(path, "messages")


def test_bad_prompt_completion_row_names_file_line_and_field(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "pc.jsonl", [{"prompt": "p", "completion": "c"}, {"prompt": "p"}]
    )
    with pytest.raises(DataError, match=r"pc\.jsonl, line 2: missing field 'completion'"):
        load_jsonl(path)
    path = _write_jsonl(tmp_path / "pc.jsonl", [{"prompt": ["p"], "completion": "c"}])
    with pytest.raises(DataError, match=r"pc\.jsonl, line 1: field 'prompt' must be a string"):
        load_jsonl(path)


def test_auto_format_follows_the_first_row_and_names_a_row_that_differs(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "mixed.jsonl", [CHAT[0], {"instruction": "i", "output": "o"}, CHAT[1]]
    )
    with pytest.raises(
        DataError,
        match=r"mixed\.jsonl, line 2: row in alpaca format, but the first row \(.*line 1\) is in "
        "messages format",
    ):
        load_jsonl(path)
    path = _write_jsonl(tmp_path / "unknown.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(
        DataError, match=r"line 1: cannot tell the row format.*'question', 'answer'"
    ):
        load_jsonl(path)


def _save_hf(folder: Path, columns: dict[str, list], **class_names: list[str]) -> Path:
    """`Dataset.save_to_disk`: string columns, and a `ClassLabel` column per `class_names`."""
    from datasets import ClassLabel, Dataset, Features, Value

    features = {
        name: ClassLabel(names=class_names[name]) if name in class_names else Value("string")
        for name in columns
    }
    Dataset.from_dict(columns, features=Features(features)).save_to_disk(str(folder))
    return folder


QA_COLUMNS = {
    "question": ["What is 2+2?", "Name a colour."],
    "context": ["", "Primary colours."],
    "answer": ["4", "Red"],
    "topic": [0, 1],
}
QA_MAP = {"instruction": "question", "input": "context", "output": "answer", "label": "topic"}


def test_saved_hf_dataset_with_column_mapping_and_class_names(tmp_path: Path) -> None:
    folder = _save_hf(tmp_path / "hf_set", QA_COLUMNS, topic=["math", "art"])
    cfg = DataConfig(source="hf", path=folder, columns=ColumnMap(**QA_MAP), partition="iid")
    assert load_source(cfg, seed=0) == [
        Example("What is 2+2?", "", "4", "math", source="hf"),
        Example("Name a colour.", "Primary colours.", "Red", "art", source="hf"),
    ]


def test_saved_hf_dict_takes_the_configured_split(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    rows = {"instruction": ["a", "b"], "output": ["x", "y"]}
    folder = tmp_path / "dict"
    DatasetDict({"train": Dataset.from_dict(rows), "test": Dataset.from_dict(rows)}).save_to_disk(
        str(folder)
    )
    cfg = DataConfig(source="hf", path=folder, hf_split="test")
    assert [ex.output for ex in load_source(cfg, seed=0)] == ["x", "y"]
    with pytest.raises(
        DataError, match=r"no split 'dev'; set data\.hf_split to one of: train, test"
    ):
        load_source(cfg.model_copy(update={"hf_split": "dev"}), seed=0)


def test_hf_folder_of_files_in_messages_form(tmp_path: Path, monkeypatch) -> None:
    """A folder of .jsonl files goes through datasets.load_dataset(folder)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = tmp_path / "files"
    folder.mkdir()
    _write_jsonl(folder / "part.jsonl", CHAT)
    examples = load_source(DataConfig(source="hf", path=folder), seed=0)
    assert [(ex.instruction, ex.output, ex.label) for ex in examples] == [
        ("Be brief.\n\nCapital of France?", "Paris.", "geo"),
        ("Double it.\n\nThen add one.", "15.", "math"),
    ]


def test_bad_hf_row_names_data_set_row_and_field(tmp_path: Path) -> None:
    folder = _save_hf(tmp_path / "hf_set", {**QA_COLUMNS, "answer": ["4", None]})
    cfg = DataConfig(source="hf", path=folder, columns=ColumnMap(**QA_MAP))
    with pytest.raises(DataError, match=r"hf_set, row index 1: missing field 'answer'"):
        load_source(cfg, seed=0)
    classes = _save_hf(tmp_path / "cls", {**QA_COLUMNS, "topic": [0, -1]}, topic=["math", "art"])
    with pytest.raises(
        DataError, match=r"row index 1: field 'topic' is -1, not one of .*math, art"
    ):
        load_source(cfg.model_copy(update={"path": classes}), seed=0)


def test_hf_needs_a_folder_or_a_hub_id(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.source=hf needs data\.path .* or data\.hf_id"):
        load_source(DataConfig(source="hf"), seed=0)
    with pytest.raises(DataError, match=r"data\.path .*nowhere does not exist"):
        load_source(DataConfig(source="hf", path=tmp_path / "nowhere"), seed=0)


def test_natural_instructions_from_the_hub_keeps_the_largest_tasks():
    examples = [
        Example("i", str(k), "o", task)
        for task, size in (("b", 3), ("a", 3), ("c", 1), ("d", 5))
        for k in range(size)
    ]
    kept = largest_tasks(examples, 3)
    assert [e.label for e in kept] == ["b"] * 3 + ["a"] * 3 + ["d"] * 5  # order kept; c dropped
    assert largest_tasks(examples, 2) == [e for e in examples if e.label in ("a", "d")]
