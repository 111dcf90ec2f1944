"""Decoding one batch of requests whose rows may differ in length, stop rule and even client.

Rows are decoded by :func:`fedamole.evaluation.generate_tokens`, the very call ``fedamole
generate`` and evaluation make (left padding, the prompter's stop tokens, greedy unless
sampling), so a greedy answer here is token for token the answer ``fedamole generate`` gives. What
differs per row (its ``max_tokens``, ``stop`` strings, a streaming sink) is kept by a
:class:`RowDecoder`, which ``generate`` feeds through its streamer hook and consults through a
stopping criterion: a row that is done is padded until the batch ends, and the batch ends when
every row is done. The other decoder is :class:`~fedamole.serving.continuous.ContinuousBatch`,
for rows that join a running batch; a test holds the two to the same greedy text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from fedamole.data.example import Example
from fedamole.data.prompts import Prompter
from fedamole.evaluation import generate_tokens

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy at temperature 0, else sampled (``seed``: repeatable)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generate_kwargs(self) -> dict[str, object]:
        if self.greedy:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}


@dataclass
class DecodeRow:
    """One request to decode: the served model's name (``served``: the API's ``model``), its
    prompt's token ids and how to end.

    ``example`` is the request as an instruction when it is one (a single user message), for the
    answer rules that read the prompt (FedDPA's mix); ``on_text`` receives each new piece of
    the answer as it is decoded (streaming)."""

    served: str
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple[str, ...] = ()
    example: Example | None = None
    on_text: Callable[[str], None] | None = None
    cancelled: bool = False  # set when the client went away: the row ends at its next token


@dataclass(frozen=True)
class DecodeResult:
    text: str
    completion_tokens: int
    finish_reason: FinishReason


class RowDecoder:
    """One row's answer as tokens arrive: ends it at a stop token, a stop string or its own
    ``max_new_tokens``, and streams only text that can no longer change (no partial character,
    no possible start of a stop string, no trailing whitespace, which the final answer strips)."""

    def __init__(
        self, row: DecodeRow, tokenizer: PreTrainedTokenizerBase, stop_ids: Sequence[int]
    ) -> None:
        self.row, self.tokenizer, self.stop_ids = row, tokenizer, set(stop_ids)
        self.ids: list[int] = []
        self.text = ""
        self.finish: FinishReason | None = None
        self.streamed = 0
        self.hold = max((len(s) for s in row.stop), default=1) - 1

    @property
    def done(self) -> bool:
        return self.finish is not None

    def add(self, token: int) -> None:
        if self.done:
            return
        if token in self.stop_ids or self.row.cancelled:
            self._end("stop")
            return
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        cut = min((i for i in (self.text.find(s) for s in self.row.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            self._end("stop")
        elif len(self.ids) >= self.row.max_new_tokens:
            self._end("length")
        else:
            self._stream(self._settled())

    def _settled(self) -> int:
        """How much of the text cannot change with later tokens."""
        stable = self.text.rstrip()
        if stable.endswith("\ufffd"):  # a character split over tokens
            stable = stable[:-1]
        return max(len(stable) - self.hold, 0)

    def _end(self, reason: FinishReason) -> None:
        self.finish = reason
        self.text = self.text.strip()
        self._stream(len(self.text))

    def _stream(self, upto: int) -> None:
        if self.row.on_text is not None and upto > self.streamed:
            self.row.on_text(self.text[self.streamed : upto])
            self.streamed = upto

    def result(self) -> DecodeResult:
        if not self.done:  # generate stopped for its own reason (e.g. the model's max length)
            self._end("length")
        return DecodeResult(self.text, len(self.ids), self.finish or "length")


class _RowStreamer(BaseStreamer):
    """``generate``'s per-step hook: the first call carries the prompts, then one token per row."""

    def __init__(self, rows: list[RowDecoder]) -> None:
        self.rows, self.prompts_seen = rows, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompts_seen:
            self.prompts_seen = True
            return
        for row, token in zip(self.rows, value.reshape(-1).tolist(), strict=True):
            row.add(token)

    def end(self) -> None:
        pass


class _RowsDone(StoppingCriteria):
    def __init__(self, rows: list[RowDecoder]) -> None:
        self.rows = rows

    def __call__(
        self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object
    ) -> torch.Tensor:
        return torch.tensor([row.done for row in self.rows], device=input_ids.device)


def decode_batch(
    model: nn.Module,
    prompter: Prompter,
    rows: Sequence[DecodeRow],
    extra: Mapping[str, object] | None = None,
) -> list[DecodeResult]:
    """Decode ``rows`` (one shared :class:`Sampling`) in one ``generate`` call; ``extra`` are
    further ``generate`` arguments (PEFT's per-row ``adapter_names``)."""
    sampling = rows[0].sampling
    if any(row.sampling != sampling for row in rows):
        raise ValueError("a batch is decoded with one sampling setting; group rows by it")
    decoders = [RowDecoder(row, prompter.tokenizer, prompter.stop_token_ids) for row in rows]
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    generate_tokens(
        model,
        prompter,
        [row.prompt_ids for row in rows],
        max(row.max_new_tokens for row in rows),
        **sampling.generate_kwargs(),
        streamer=_RowStreamer(decoders),
        stopping_criteria=StoppingCriteriaList([_RowsDone(decoders)]),
        **(extra or {}),
    )
    return [decoder.result() for decoder in decoders]


def batches_by_sampling(rows: Sequence[DecodeRow]) -> Iterator[list[int]]:
    """Indices of rows that can share a batch: greedy rows all together, sampled rows with the
    same settings together, a seeded row alone (its seed fixes its samples)."""
    groups: dict[object, list[int]] = {}
    for i, row in enumerate(rows):
        key = ("seeded", i) if row.sampling.seed is not None else row.sampling
        groups.setdefault(key, []).append(i)
    yield from groups.values()
