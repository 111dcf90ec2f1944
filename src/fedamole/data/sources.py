"""Loaders from local files or the Hugging Face hub into `Example`s, validated before training.

Every loader turns rows into examples through one converter per format, whatever the origin
(local file or hub), so the same checks apply to both; errors name the file and 1-based line.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedamole.config import DataConfig
from fedamole.data.example import DataError, Example
from fedamole.data.prompts import NLI_INSTRUCTION, NLI_LABELS, nli_input
from fedamole.data.synthetic import generate_synthetic

log = logging.getLogger("fedamole.data")

Row = tuple[str, Mapping[str, Any]]  # (where the row comes from, e.g. "file, line 3"; the row)

DOLLY_HUB = "databricks/databricks-dolly-15k"
SNLI_HUB = "stanfordnlp/snli"
NI_HUB = "Muennighoff/natural-instructions"
_SNLI_UNLABELLED = (-1, "-")  # SNLI's marks for pairs without a gold label


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
    with _check_path(path, want_dir=False).open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
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


def _hub_rows(name: str, split: str) -> Iterator[Row]:
    """Rows of a hub data set; `datasets` is imported here because it is slow to import."""
    from datasets import load_dataset

    for index, row in enumerate(load_dataset(name, split=split), 1):
        yield f"hub {name} ({split}), row {index}", row


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
    raise DataError(f"{where}: missing field {wanted}; add it to the row or remove the row")


def _dolly_example(where: str, row: Mapping[str, Any]) -> Example:
    return Example(
        instruction=_field(row, where, "instruction"),
        input=_field(row, where, "context", default=""),
        output=_field(row, where, "response"),
        label=_field(row, where, "category"),
        source="dolly",
    )


def _jsonl_example(where: str, row: Mapping[str, Any]) -> Example:
    return Example(
        instruction=_field(row, where, "instruction"),
        input=_field(row, where, "input", "context", default=""),
        output=_field(row, where, "output", "response"),
        label=_field(row, where, "category", default="default"),
        source="jsonl",
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


def load_dolly(path: Path | None = None) -> list[Example]:
    """Dolly-15k: a local .jsonl (instruction/context/response/category) or, if None, the hub."""
    rows = _hub_rows(DOLLY_HUB, "train") if path is None else _read_jsonl(path)
    return [_dolly_example(where, row) for where, row in rows]


def load_jsonl(path: Path) -> list[Example]:
    """Any instruction .jsonl: instruction, [input|context], output|response, [category]."""
    return [_jsonl_example(where, row) for where, row in _read_jsonl(path)]


def load_snli(path: Path | None = None) -> list[Example]:
    """SNLI as 3-way instruction classification, grouped by premise; None = hub train split."""
    return _snli_examples(_hub_rows(SNLI_HUB, "train") if path is None else _read_jsonl(path))


def load_natural_instructions(path: Path | None = None) -> list[Example]:
    """A folder of official task .json files (label = task name) or, if None, the hub copy."""
    if path is None:
        return [_ni_hub_example(where, row) for where, row in _hub_rows(NI_HUB, "train")]
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
        examples = load_jsonl(cfg.path)
    else:
        examples = _PATH_LOADERS[cfg.source](cfg.path)
    if not examples:
        raise DataError(f"data.source={cfg.source} (data.path={cfg.path}) gave no examples")
    if cfg.max_examples is not None and len(examples) > cfg.max_examples:
        examples = stratified_subsample(examples, cfg.max_examples, seed)
    log.info("loaded %d examples from %s", len(examples), cfg.source)
    return examples
