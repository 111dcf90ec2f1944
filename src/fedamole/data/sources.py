"""Loaders from local files or the Hugging Face hub into `Example`s, validated before training.

Every loader turns rows into examples through one converter per format, whatever the origin
(local file, saved data set or hub), so the same checks apply to all; errors name the file and
1-based line (or the data set and 0-based row index) and the field.

Own data (`jsonl` and `hf` sources) comes in three row shapes (`data.format`):
  alpaca             instruction, [input], output, [label]; field names set by `data.columns`
  messages           {"messages": [{"role": system|user|assistant, "content": str}, ...]}: the
                     last message is the assistant's reply (output), the user message(s) just
                     before it the instruction, system messages are put in front of the
                     instruction, and earlier turns become the input as a "User: ..." /
                     "Assistant: ..." transcript
  prompt_completion  {"prompt": str, "completion": str}: instruction and output, no input
Every shape takes its label from the label column (`data.columns.label`, else label or category).
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from fedamole.config import ColumnMap, DataConfig, DataFormat
from fedamole.data.example import UNLABELLED, DataError, Example
from fedamole.data.prompts import NLI_INSTRUCTION, NLI_LABELS, nli_input
from fedamole.data.synthetic import generate_synthetic
from fedamole.files import read_utf8

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger("fedamole.data")

Row = tuple[str, Mapping[str, Any]]  # (where the row comes from, e.g. "file, line 3"; the row)

DOLLY_HUB = "databricks/databricks-dolly-15k"
SNLI_HUB = "stanfordnlp/snli"
NI_HUB = "Muennighoff/natural-instructions"
_SNLI_UNLABELLED = (-1, "-")  # SNLI's marks for pairs without a gold label

RowFormat = Literal["alpaca", "messages", "prompt_completion"]
_ROLES = ("system", "user", "assistant")
_USUAL_NAMES = {
    "instruction": ("instruction",),
    "input": ("input", "context"),
    "output": ("output", "response"),
    "label": ("label", "category"),
}


def _check_path(path: Path, want_dir: bool) -> Path:
    """Fail early, naming the setting, when `data.path` points at nothing usable."""
    path = Path(path)
    kind = "folder" if want_dir else "file"
    if not path.exists():
        raise DataError(f"data.path {path} does not exist; set data.path to an existing {kind}")
    if path.is_dir() != want_dir:
        raise DataError(f"data.path {path} is not a {kind}; set data.path to a {kind}")
    return path


def _read_jsonl(path: Path) -> Iterator[Row]:
    """Rows of a JSON Lines file; blank lines are skipped, anything else must be a JSON object."""
    text = read_utf8(_check_path(path, want_dir=False))
    for lineno, line in enumerate(text.split("\n"), 1):  # JSON strings may hold U+2028
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg}); fix or remove it") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield where, row


def _dataset_rows(dataset: Dataset, origin: str) -> Iterator[Row]:
    """Rows of a Hugging Face data set, located by their index (`dataset[i]`)."""
    for index, row in enumerate(dataset):
        yield f"{origin}, row index {index}", row


def _hub_rows(name: str, split: str) -> Iterator[Row]:
    """Rows of a hub data set; `datasets` is imported here because it is slow to import."""
    from datasets import load_dataset

    yield from _dataset_rows(load_dataset(name, split=split), f"hub {name} ({split})")


def _field(row: Mapping[str, Any], where: str, *names: str, default: str | None = None) -> str:
    """The first present of `names` (aliases of one field) as a string, else `default`."""
    for name in names:
        if row.get(name) is not None:
            value = row[name]
            if not isinstance(value, str):
                raise DataError(
                    f"{where}: field {name!r} must be a string, got {type(value).__name__}"
                )
            return value
    if default is not None:
        return default
    wanted = " or ".join(repr(name) for name in names)
    present = ", ".join(repr(name) for name in row) or "none"
    raise DataError(
        f"{where}: missing field {wanted} (fields present: {present}); add it to the row or "
        "remove the row, or name the field in data.columns"
    )


def _dolly_example(where: str, row: Mapping[str, Any]) -> Example:
    return Example(
        instruction=_field(row, where, "instruction"),
        input=_field(row, where, "context", default=""),
        output=_field(row, where, "response"),
        label=_field(row, where, "category"),
        source="dolly",
    )


def _snli_label(where: str, row: Mapping[str, Any]) -> str | None:
    """The label name; None for SNLI's unlabelled pairs (-1 on the hub, '-' in the original)."""
    if "label" not in row:
        raise DataError(f"{where}: missing field 'label'; add it to the row or remove the row")
    value = row["label"]
    if value in _SNLI_UNLABELLED:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(NLI_LABELS):
        return NLI_LABELS[value]
    if isinstance(value, str) and value in NLI_LABELS:
        return value
    raise DataError(
        f"{where}: unknown SNLI label {value!r}; allowed: {', '.join(NLI_LABELS)} "
        "(or 0/1/2 in that order; -1 marks an unlabelled pair and is skipped)"
    )


def _snli_examples(rows: Iterable[Row]) -> list[Example]:
    examples, unlabelled = [], 0
    for where, row in rows:
        premise = _field(row, where, "premise")
        hypothesis = _field(row, where, "hypothesis")
        label = _snli_label(where, row)
        if label is None:
            unlabelled += 1
            continue
        examples.append(
            Example(
                NLI_INSTRUCTION,
                nli_input(premise, hypothesis),
                label,
                label,
                choices=NLI_LABELS,
                group=premise,
                source="snli",
            )
        )
    if unlabelled:
        log.info("SNLI: skipped %d pairs without a gold label (label -1)", unlabelled)
    return examples


def _ni_output(where: str, instance: Mapping[str, Any]) -> str:
    """The first reference output (the official files hold a list of references)."""
    outputs = instance.get("output")
    if isinstance(outputs, str):
        return outputs
    if isinstance(outputs, list) and outputs and isinstance(outputs[0], str):
        return outputs[0]
    raise DataError(f"{where}: missing field 'output' (a non-empty list of strings)")


def _ni_task(path: Path) -> list[Example]:
    """The instances of one official task file; label = task name (the file stem)."""
    try:
        task = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg})") from None
    definition = task.get("Definition") if isinstance(task, dict) else None
    if not (isinstance(definition, list) and definition and isinstance(definition[0], str)):
        raise DataError(f"{path}: missing field 'Definition' (a list holding the task definition)")
    instances = task.get("Instances")
    if not isinstance(instances, list):
        raise DataError(f"{path}: missing field 'Instances' (a list of input/output objects)")
    examples = []
    for index, instance in enumerate(instances, 1):
        where = f"{path}, instance {index}"
        if not isinstance(instance, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(instance).__name__}")
        examples.append(
            Example(
                definition[0],
                _field(instance, where, "input"),
                _ni_output(where, instance),
                path.stem,
                source="natural_instructions",
            )
        )
    return examples


def _ni_hub_example(where: str, row: Mapping[str, Any]) -> Example:
    return Example(
        instruction=_field(row, where, "definition"),
        input=_field(row, where, "inputs"),
        output=_field(row, where, "targets"),
        label=_field(row, where, "task_name"),
        source="natural_instructions",
    )


def _names(columns: ColumnMap, part: str) -> tuple[str, ...]:
    """The field a part is read from: the one named in `data.columns`, else its usual names."""
    named = getattr(columns, part)
    return (named,) if named is not None else _USUAL_NAMES[part]


def _row_label(
    where: str,
    row: Mapping[str, Any],
    columns: ColumnMap,
    class_names: Mapping[str, tuple[str, ...]],
) -> str:
    """The label: a string, or an integer class (named through the column's `ClassLabel` in an
    HF set); `UNLABELLED` when the row has none and no label column is named."""
    for name in _names(columns, "label"):
        value = row.get(name)
        if value is None:
            continue
        if isinstance(value, str):
            return value
        if not isinstance(value, int) or isinstance(value, bool):
            raise DataError(
                f"{where}: field {name!r} must be a string or an integer class, "
                f"got {type(value).__name__}"
            )
        if name not in class_names:
            return str(value)
        if 0 <= value < len(class_names[name]):
            return class_names[name][value]
        raise DataError(
            f"{where}: field {name!r} is {value}, not one of the data set's classes "
            f"0..{len(class_names[name]) - 1} ({', '.join(class_names[name])}); drop rows "
            "without a class (e.g. unlabelled ones) first"
        )
    if columns.label is not None:
        return _field(row, where, columns.label)  # raises: the named label field is missing
    return UNLABELLED


def _alpaca_parts(where: str, row: Mapping[str, Any], columns: ColumnMap) -> tuple[str, str, str]:
    optional_input = "" if columns.input is None else None
    return (
        _field(row, where, *_names(columns, "instruction")),
        _field(row, where, *_names(columns, "input"), default=optional_input),
        _field(row, where, *_names(columns, "output")),
    )


def _prompt_completion_parts(
    where: str, row: Mapping[str, Any], columns: ColumnMap
) -> tuple[str, str, str]:
    return _field(row, where, "prompt"), "", _field(row, where, "completion")


def _turns(where: str, row: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(role, content) of each message, checked."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        got = "nothing" if messages is None else type(messages).__name__
        raise DataError(
            f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects, "
            f"got {got}"
        )
    turns = []
    for index, message in enumerate(messages):
        name = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise DataError(
                f"{where}: field {name!r} must be an object with 'role' and 'content', "
                f"got {type(message).__name__}"
            )
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or role not in _ROLES:
            raise DataError(
                f"{where}: field '{name}.role' is {role!r}; allowed: {', '.join(_ROLES)}"
            )
        if not isinstance(content, str):
            raise DataError(
                f"{where}: field '{name}.content' must be a string, got {type(content).__name__}"
            )
        turns.append((role, content))
    return turns


def _messages_parts(where: str, row: Mapping[str, Any], columns: ColumnMap) -> tuple[str, str, str]:
    """Instruction = system messages + the user message(s) right before the last (assistant)
    message, which is the output; earlier turns are the input, as a transcript."""
    turns = _turns(where, row)
    system = [content for role, content in turns if role == "system"]
    dialogue = [(role, content) for role, content in turns if role != "system"]
    if not dialogue or dialogue[-1][0] != "assistant":
        raise DataError(
            f"{where}: field 'messages' must end with the assistant's reply (role 'assistant'), "
            "which is the output"
        )
    start = len(dialogue) - 1
    while start > 0 and dialogue[start - 1][0] == "user":
        start -= 1
    if start == len(dialogue) - 1:
        raise DataError(
            f"{where}: field 'messages': the last assistant message must follow a user message "
            "(the instruction)"
        )
    instruction = "\n\n".join(system + [content for _, content in dialogue[start:-1]])
    transcript = "\n".join(f"{role.capitalize()}: {content}" for role, content in dialogue[:start])
    return instruction, transcript, dialogue[-1][1]


# (instruction, input, output) of a row, per row format; all take the column map, which only
# the alpaca shape reads.
_PARTS = {
    "alpaca": _alpaca_parts,
    "messages": _messages_parts,
    "prompt_completion": _prompt_completion_parts,
}


def _detect_format(row: Mapping[str, Any], columns: ColumnMap) -> RowFormat | None:
    """The shape of one row, from the fields it has; None when it has none of the markers."""
    if row.get("messages") is not None:
        return "messages"
    if row.get("prompt") is not None or row.get("completion") is not None:
        return "prompt_completion"
    if any(row.get(name) is not None for name in _names(columns, "instruction")):
        return "alpaca"
    return None


@dataclass(frozen=True)
class RowReader:
    """Turns the rows of one JSONL file or data set into examples, all rows in one shape:
    `data.format`, or with `auto` the shape of the first row, which every later row must match.

    `class_names` maps an HF set's `ClassLabel` columns to their class names.
    """

    data_format: DataFormat
    columns: ColumnMap
    source: str
    class_names: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def examples(self, rows: Iterable[Row]) -> list[Example]:
        examples: list[Example] = []
        shape: RowFormat | None = None if self.data_format == "auto" else self.data_format
        first = ""
        for where, row in rows:
            if shape is None:
                shape, first = self._first_shape(where, row), where
            elif self.data_format == "auto":
                self._check_shape(where, row, shape, first)
            instruction, inputs, output = _PARTS[shape](where, row, self.columns)
            label = _row_label(where, row, self.columns, self.class_names)
            examples.append(Example(instruction, inputs, output, label, source=self.source))
        return examples

    def _first_shape(self, where: str, row: Mapping[str, Any]) -> RowFormat:
        shape = _detect_format(row, self.columns)
        if shape is None:
            names = " or ".join(repr(name) for name in _names(self.columns, "instruction"))
            present = ", ".join(repr(name) for name in row) or "none"
            raise DataError(
                f"{where}: cannot tell the row format: expected a 'messages' list, 'prompt' and "
                f"'completion', or an instruction field ({names}); fields present: {present}. "
                "Set data.format, or name the instruction field in data.columns.instruction"
            )
        return shape

    def _check_shape(self, where: str, row: Mapping[str, Any], shape: str, first: str) -> None:
        found = _detect_format(row, self.columns)
        if found is not None and found != shape:
            raise DataError(
                f"{where}: row in {found} format, but the first row ({first}) is in {shape} "
                "format; use one row format throughout (data.format=auto detects it from the "
                "first row)"
            )


def _is_saved_dataset(folder: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    from datasets import config

    return (folder / config.DATASET_STATE_JSON_FILENAME).is_file() or (
        folder / config.DATASETDICT_JSON_FILENAME
    ).is_file()


def _load_saved(folder: Path, split: str) -> tuple[Dataset, str]:
    """A saved data set, or the `split` of a saved dict of splits; and its name in messages."""
    from datasets import DatasetDict, load_from_disk

    loaded = load_from_disk(str(folder))
    if not isinstance(loaded, DatasetDict):
        return loaded, str(folder)
    if split not in loaded:
        raise DataError(
            f"{folder} has no split {split!r}; set data.hf_split to one of: {', '.join(loaded)}"
        )
    return loaded[split], f"{folder} ({split})"


def _load_hf_dataset(cfg: DataConfig) -> tuple[Dataset, str]:
    """The configured data set and a name for it in messages."""
    from datasets import load_dataset

    if cfg.path is not None:
        folder = _check_path(cfg.path, want_dir=True)
        if _is_saved_dataset(folder):
            return _load_saved(folder, cfg.hf_split)
        name, origin = str(folder), f"{folder} ({cfg.hf_split})"
    elif cfg.hf_id is not None:
        name, origin = cfg.hf_id, f"hub {cfg.hf_id} ({cfg.hf_split})"
    else:
        raise DataError(
            "data.source=hf needs data.path (a folder saved with save_to_disk, or of "
            "json/jsonl/csv/parquet files) or data.hf_id (a hub data set id)"
        )
    try:
        return load_dataset(name, split=cfg.hf_split), origin
    except (OSError, ValueError) as exc:
        raise DataError(
            f"{origin}: datasets.load_dataset failed: {exc}; check data.path / data.hf_id and "
            "data.hf_split"
        ) from None


def load_hf(cfg: DataConfig) -> list[Example]:
    """Any Hugging Face data set (a local folder or a hub id), rows read as `data.format`."""
    from datasets import ClassLabel

    dataset, origin = _load_hf_dataset(cfg)
    class_names = {
        name: tuple(feature.names)
        for name, feature in dataset.features.items()
        if isinstance(feature, ClassLabel)
    }
    reader = RowReader(cfg.format, cfg.columns, "hf", class_names)
    return reader.examples(_dataset_rows(dataset, origin))


def load_dolly(path: Path | None = None) -> list[Example]:
    """Dolly-15k: a local .jsonl (instruction/context/response/category) or, if None, the hub."""
    rows = _hub_rows(DOLLY_HUB, "train") if path is None else _read_jsonl(path)
    return [_dolly_example(where, row) for where, row in rows]


def load_jsonl(
    path: Path,
    data_format: DataFormat = "auto",
    columns: ColumnMap | None = None,
) -> list[Example]:
    """Any instruction .jsonl in one of the row shapes of `data.format` (see the module doc)."""
    reader = RowReader(data_format, columns or ColumnMap(), "jsonl")
    return reader.examples(_read_jsonl(path))


def load_snli(path: Path | None = None) -> list[Example]:
    """SNLI as 3-way instruction classification, grouped by premise; None = hub train split."""
    return _snli_examples(_hub_rows(SNLI_HUB, "train") if path is None else _read_jsonl(path))


NI_LARGEST_TASKS = 100  # the paper's code draws its clients' tasks from the 100 largest


def largest_tasks(examples: list[Example], count: int) -> list[Example]:
    """The examples of the ``count`` tasks with the most examples (ties: task name), in their
    original order; the task partition then gives client i the i-th of these in sorted order."""
    sizes = Counter(example.label for example in examples)
    kept = set(sorted(sizes, key=lambda task: (-sizes[task], task))[:count])
    return [example for example in examples if example.label in kept]


def load_natural_instructions(path: Path | None = None) -> list[Example]:
    """A folder of official task .json files (label = task name, every task kept) or, if None,
    the hub copy restricted to its 100 largest tasks, as the paper's code does."""
    if path is None:
        rows = _hub_rows(NI_HUB, "train")
        return largest_tasks([_ni_hub_example(where, row) for where, row in rows], NI_LARGEST_TASKS)
    files = sorted(_check_path(path, want_dir=True).glob("*.json"))
    if not files:
        raise DataError(f"data.path {path} holds no task .json files; point it at a task folder")
    return [example for file in files for example in _ni_task(file)]


def stratified_subsample(examples: list[Example], size: int, seed: int) -> list[Example]:
    """`size` examples keeping each label's share (largest remainder), in the original order."""
    by_label: dict[str, list[int]] = defaultdict(list)
    for index, example in enumerate(examples):
        by_label[example.label].append(index)
    labels = sorted(by_label)
    exact = [size * len(by_label[label]) / len(examples) for label in labels]
    quota = [int(share) for share in exact]
    by_remainder = sorted(range(len(labels)), key=lambda i: quota[i] - exact[i])
    for i in by_remainder[: size - sum(quota)]:
        quota[i] += 1
    rng = np.random.default_rng(seed)
    keep = [
        int(index)
        for label, count in zip(labels, quota, strict=True)
        for index in rng.choice(by_label[label], size=count, replace=False)
    ]
    return [examples[index] for index in sorted(keep)]


_PATH_LOADERS = {
    "dolly": load_dolly,
    "natural_instructions": load_natural_instructions,
    "snli": load_snli,
}


def load_source(cfg: DataConfig, seed: int) -> list[Example]:
    """All examples of the configured source, capped at `data.max_examples`."""
    if cfg.source == "synthetic":
        examples = generate_synthetic(cfg.synthetic_per_task, seed)
    elif cfg.source == "jsonl":
        if cfg.path is None:
            raise DataError("data.source=jsonl needs data.path (an instruction .jsonl file)")
        examples = load_jsonl(cfg.path, cfg.format, cfg.columns)
    elif cfg.source == "hf":
        examples = load_hf(cfg)
    else:
        examples = _PATH_LOADERS[cfg.source](cfg.path)
    if not examples:
        raise DataError(f"data.source={cfg.source} (data.path={cfg.path}) gave no examples")
    if cfg.max_examples is not None and len(examples) > cfg.max_examples:
        examples = stratified_subsample(examples, cfg.max_examples, seed)
    log.info("loaded %d examples from %s", len(examples), cfg.source)
    return examples
