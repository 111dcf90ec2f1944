"""Examples to token ids for causal-LM fine-tuning, with the loss on the response only."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from fedamole.data.example import Example
from fedamole.data.prompts import Prompter

log = logging.getLogger("fedamole.data")

IGNORE_INDEX = -100  # label value that torch's cross-entropy (and HF models) skip


def encode_labelled(prompter: Prompter, example: Example) -> dict[str, list[int]]:
    """prompt + target, labels masked on the prompt: what the model sees at generation time
    followed by the answer (and its eos / end-of-turn), the loss on the answer only."""
    prompt_ids = prompter.prompt_ids(example)
    target = prompter.target_ids(example)
    return {
        "input_ids": [*prompt_ids, *target],
        "labels": [IGNORE_INDEX] * len(prompt_ids) + target,
    }


def encode_example(
    prompter: Prompter, example: Example, max_length: int
) -> dict[str, list[int]] | None:
    """Encoded example, or None if longer than `max_length` tokens (truncation would cut the
    answer, so the caller drops and counts it)."""
    encoded = encode_labelled(prompter, example)
    return encoded if len(encoded["input_ids"]) <= max_length else None


def encode_split(
    prompter: Prompter, examples: Sequence[Example], max_length: int
) -> tuple[list[dict[str, list[int]]], int]:
    """All examples that fit in `max_length`, and how many were dropped (logged)."""
    encoded = [encode_example(prompter, example, max_length) for example in examples]
    kept = [item for item in encoded if item is not None]
    dropped = len(encoded) - len(kept)
    if dropped:
        log.warning(
            "dropped %d of %d examples longer than model.max_length=%d tokens",
            dropped,
            len(encoded),
            max_length,
        )
    return kept, dropped


def collate(batch: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids with `pad_id`, labels with IGNORE_INDEX, attention_mask 1/0."""
    width = max(len(item["input_ids"]) for item in batch)

    def padded(key: str, value: int) -> torch.Tensor:
        return torch.tensor([item[key] + [value] * (width - len(item[key])) for item in batch])

    lengths = torch.tensor([len(item["input_ids"]) for item in batch])
    return {
        "input_ids": padded("input_ids", pad_id),
        "labels": padded("labels", IGNORE_INDEX),
        "attention_mask": (torch.arange(width)[None, :] < lengths[:, None]).long(),
    }
