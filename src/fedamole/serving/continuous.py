"""Continuous batching: requests join the running batch at the next decoding step.

The batch is a set of rows over one shared backbone, each row with its own client (its adapter
chosen per row by the pool's ``rows`` context, at most ``max_clients`` clients at once), its own
sampling and its own end (:class:`~fedamole.serving.decoding.RowDecoder`). Joining rows are prefilled on their own, then
their KV cache is left-padded to the running batch's length (or the batch's to theirs) and
concatenated along the batch; finished rows leave after every step, and columns that are padding
in every row are cropped. Positions are given explicitly per row (the number of real tokens
before each token, as ``generate`` computes them from the attention mask), so padding never
shifts a row's rotary positions and a greedy row decodes the tokens ``generate`` gives it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache

from fedamole.data.prompts import Prompter
from fedamole.device import model_device
from fedamole.models import cache_argument
from fedamole.serving.decoding import DecodeResult, DecodeRow, RowDecoder, Sampling

# The pool's per-row adapter selection: row i uses ``keys[i]``; yields extra forward arguments.
RowsContext = Callable[[list[str]], AbstractContextManager[dict[str, object]]]


@dataclass
class Slot:
    """One row of the running batch and who waits for its answer."""

    decoder: RowDecoder
    done: Callable[[DecodeResult | BaseException], None]
    generator: torch.Generator | None

    @property
    def row(self) -> DecodeRow:
        return self.decoder.row


class ContinuousBatch:
    """The rows being decoded together, their KV cache and attention mask (left-padded)."""

    def __init__(
        self,
        model: nn.Module,
        prompter: Prompter,
        rows: RowsContext,
        max_clients: int | None = None,
    ) -> None:
        self.model, self.prompter, self.rows = model, prompter, rows
        self.max_clients = max_clients  # distinct clients the running rows may have (None: any)
        self.device = model_device(model)
        self.cache_argument = cache_argument(model)
        self.slots: list[Slot] = []
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # (B, T)
        self.last = torch.zeros(0, dtype=torch.long, device=self.device)  # (B,) next inputs

    @property
    def active(self) -> int:
        return len(self.slots)

    def clients(self) -> set[str]:
        """The clients of the running rows."""
        return {slot.row.served for slot in self.slots}

    def takes(self, rows: list[DecodeRow]) -> list[bool]:
        """Which of ``rows``, in order, can join now without the batch holding more than
        ``max_clients`` clients."""
        clients, fits = self.clients(), []
        for row in rows:
            fits.append(
                row.served in clients or self.max_clients is None or len(clients) < self.max_clients
            )
            if fits[-1]:
                clients.add(row.served)
        return fits

    @torch.no_grad()
    def admit(self, arrivals: list[tuple[DecodeRow, Callable]]) -> None:
        """Prefill the arriving rows together and merge them into the running batch."""
        if not arrivals:
            return
        slots = [
            Slot(
                RowDecoder(row, self.prompter.tokenizer, self.prompter.stop_token_ids),
                done,
                _generator(row.sampling),
            )
            for row, done in arrivals
        ]
        width = max(len(s.row.prompt_ids) for s in slots)
        pad = self.prompter.tokenizer.pad_token_id
        ids = torch.tensor(
            [[pad] * (width - len(s.row.prompt_ids)) + s.row.prompt_ids for s in slots],
            device=self.device,
        )
        mask = torch.tensor(
            [[0] * (width - len(s.row.prompt_ids)) + [1] * len(s.row.prompt_ids) for s in slots],
            device=self.device,
        )
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        logits, cache = self._forward(slots, ids, mask, positions, None)
        self._merge(slots, cache, mask)
        self._advance(slots, logits, len(self.slots) - len(slots))

    @torch.no_grad()
    def step(self) -> None:
        """One token for every running row; finished rows are answered and leave."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.active, 1)], dim=1)
        positions = self.mask.sum(-1, keepdim=True) - 1
        logits, self.cache = self._forward(
            self.slots, self.last[:, None], self.mask, positions, self.cache
        )
        self._advance(self.slots, logits, 0)

    def fail(self, error: BaseException) -> None:
        """Answer every running row with ``error`` and start empty (nothing half-decoded stays)."""
        for slot in self.slots:
            slot.done(error)
        self._reset()

    def _reset(self) -> None:
        self.slots, self.cache = [], None
        self.mask = self.mask.new_zeros(0, 0)
        self.last = self.last.new_zeros(0)

    # ------------------------------------------------------------------------------ internals
    def _forward(
        self,
        slots: list[Slot],
        ids: Tensor,
        mask: Tensor,
        positions: Tensor,
        cache: DynamicCache | None,
    ) -> tuple[Tensor, DynamicCache]:
        with self.rows([s.row.served for s in slots]) as extra:
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
                **{self.cache_argument: cache},
                **extra,
            )
        return out.logits[:, -1].float(), getattr(out, self.cache_argument)

    def _merge(self, slots: list[Slot], cache: DynamicCache, mask: Tensor) -> None:
        """Append prefilled rows: both caches left-padded to the longer, then concatenated."""
        if self.cache is None or not self.slots:
            self.slots, self.cache, self.mask = list(slots), cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for running, joining in zip(self.cache.layers, cache.layers, strict=True):
            running.keys = torch.cat(
                [_left_pad(running.keys, width), _left_pad(joining.keys, width)]
            )
            running.values = torch.cat(
                [_left_pad(running.values, width), _left_pad(joining.values, width)]
            )
        self.mask = torch.cat([_left_pad(self.mask, width, dim=1), _left_pad(mask, width, dim=1)])
        self.slots.extend(slots)

    def _advance(self, slots: list[Slot], logits: Tensor, offset: int) -> None:
        """Choose each row's next token, feed its decoder; drop the rows that are done."""
        tokens = choose_tokens(
            logits, [s.row.sampling for s in slots], [s.generator for s in slots]
        )
        self.last = tokens if offset == 0 else torch.cat([self.last[:offset], tokens])
        for slot, token in zip(slots, tokens.tolist(), strict=True):
            slot.decoder.add(token)
        keep = [i for i, s in enumerate(self.slots) if not s.decoder.done]
        for slot in self.slots:
            if slot.decoder.done:
                slot.done(slot.decoder.result())
        if len(keep) == len(self.slots):
            return
        if not keep:
            self._reset()
            return
        self.slots = [self.slots[i] for i in keep]
        index = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask, self.last = self.mask[index], self.last[index]
        self._crop()

    def _crop(self) -> None:
        """Drop leading columns that are padding in every row (a long prompt that left)."""
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start == 0:
            return
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]


def _left_pad(x: Tensor, width: int, dim: int = -2) -> Tensor:
    """Zeros before the existing entries along ``dim`` (keys/values: -2; masks: 1)."""
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    if dim == -2:
        return F.pad(x, (0, 0, missing, 0))
    return F.pad(x, (missing, 0))


def _generator(sampling: Sampling) -> torch.Generator | None:
    """A sampled row's own random stream (seeded: repeatable whatever else is in the batch)."""
    if sampling.greedy:
        return None
    generator = torch.Generator()
    if sampling.seed is None:
        generator.seed()
    else:
        generator.manual_seed(sampling.seed)
    return generator


def choose_tokens(
    logits: Tensor, samplings: list[Sampling], generators: list[torch.Generator | None]
) -> Tensor:
    """(B, V) float logits -> (B,) next tokens: argmax for greedy rows; for the others a sample
    at the row's temperature from its nucleus (the smallest set of tokens whose probability
    reaches ``top_p``), drawn with its own generator."""
    tokens = logits.argmax(dim=-1)
    for i, (sampling, generator) in enumerate(zip(samplings, generators, strict=True)):
        if sampling.greedy:
            continue
        probs = (logits[i] / sampling.temperature).softmax(-1).cpu()
        ordered, order = probs.sort(descending=True)
        outside = ordered.cumsum(-1) - ordered >= sampling.top_p  # the first token is always in
        ordered[outside] = 0.0
        pick = torch.multinomial(ordered, 1, generator=generator)
        tokens[i] = order[pick].to(tokens.device).squeeze()
    return tokens
