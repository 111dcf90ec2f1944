"""A client's personalised model, for every method, ready to answer prompts.

A :class:`ClientModel` is what :mod:`fedamole.serving.loading` gives for a run's saved client
(``load_client_model``) or an exported folder (``load_pretrained``): the model, its prompt format
and how its method answers. ``fedamole generate`` is the command-line face of
:meth:`ClientModel.generate`.

Requests become examples here (:func:`request_examples`, :func:`read_prompt_file`), and
:meth:`ClientModel.generate` answers them under the method's rule through
:func:`fedamole.evaluation.generate`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedamole.data.example import UNLABELLED, DataError, Example
from fedamole.data.prompts import Prompter
from fedamole.evaluation import generate
from fedamole.federation.method import AnswerGroup
from fedamole.files import read_utf8

# How a client's model answers examples: index groups, each under one context (its method's rule).
AnswerRule = Callable[[list[Example]], list[AnswerGroup]]


def all_at_once(examples: list[Example]) -> list[AnswerGroup]:
    """A model that answers every prompt as it is (an exported single-adapter model)."""
    return [(nullcontext(), list(range(len(examples))))]


def request_examples(
    instructions: str | Sequence[str], inputs: Sequence[str] | None = None
) -> list[Example]:
    """Instructions (and optional inputs/contexts, one per instruction) as examples to answer."""
    if isinstance(instructions, str):
        instructions = [instructions]
    inputs = [""] * len(instructions) if inputs is None else list(inputs)
    if len(inputs) != len(instructions):
        raise ValueError(f"got {len(instructions)} instructions but {len(inputs)} inputs")
    return [
        Example(instruction=i, input=x, output="", label=UNLABELLED)
        for i, x in zip(instructions, inputs, strict=True)
    ]


def read_prompt_file(path: Path) -> tuple[list[str], list[str]]:
    """Instructions and their inputs from a file: ``*.jsonl`` holds one JSON object per line with
    a string ``instruction`` and optionally ``input``; any other file one instruction per
    non-empty line (no inputs)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--input-file {path}: no such file")
    lines = [(n, line) for n, line in enumerate(read_utf8(path).splitlines(), 1) if line.strip()]
    if not lines:
        raise DataError(f"--input-file {path}: no prompts in it")
    if path.suffix != ".jsonl":
        return [line.strip() for _, line in lines], [""] * len(lines)
    rows = [_prompt_row(path, n, line) for n, line in lines]
    return [i for i, _ in rows], [x for _, x in rows]


def _prompt_row(path: Path, line_no: int, line: str) -> tuple[str, str]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}:{line_no}: not valid JSON ({exc.msg}); a .jsonl file holds one JSON object "
            "per line (use another extension for plain-text instructions)"
        ) from None
    if (
        not isinstance(row, dict)
        or not isinstance(row.get("instruction"), str)
        or not isinstance(row.get("input", ""), str)
    ):
        raise DataError(
            f'{path}:{line_no}: expected an object with a string "instruction" and optionally a '
            f'string "input", e.g. {{"instruction": "Sort these words", "input": "pear apple"}}'
        )
    return row["instruction"], row.get("input", "")


@dataclass
class ClientModel:
    """One client's personalised model: ``model`` is a ``transformers`` model (a ``PeftModel``
    for the PEFT baselines) in eval mode with the client's adapters in it, ``prompter`` the
    prompt format it was trained with (and its tokenizer), ``answer_rule`` how its method answers
    (a mix of adapters, FedDPA's per-prompt weights), which :meth:`generate` applies."""

    model: nn.Module
    prompter: Prompter
    name: str
    answer_rule: AnswerRule = all_at_once

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.prompter.tokenizer

    def generate(
        self,
        instructions: str | Sequence[str],
        inputs: Sequence[str] | None = None,
        max_new_tokens: int = 64,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        batch_size: int = 8,
    ) -> list[str]:
        """One answer per instruction (with its input, if given): greedy by default, sampled
        with ``do_sample`` (``seed`` makes the samples repeatable)."""
        examples = request_examples(instructions, inputs)
        if seed is not None:
            torch.manual_seed(seed)
        options = {"do_sample": do_sample, "temperature": temperature, "top_p": top_p}
        answers = [""] * len(examples)
        for context, members in self.answer_rule(examples):
            group = [examples[i] for i in members]
            with context:
                texts = generate(
                    self.model, self.prompter, group, max_new_tokens, batch_size, **options
                )
            for i, text in zip(members, texts, strict=True):
                answers[i] = text
        return answers
