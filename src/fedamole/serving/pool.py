"""Many clients' personalised models on one frozen backbone, answering batches of requests.

A :class:`RunPool` builds the run's method once (one backbone on ``model.device``, in
``model.dtype``) and restores every selected client's saved model into it, as
:func:`~fedamole.serving.personalised.load_client_model` does for one. Methods whose handle can
give each row of a batch its own adapter (``serves_per_row``: FedAMoLE's routed HMoLE, the
single-LoRA baselines through PEFT's mixed-adapter batches) keep each client's adapter and decode
a mixed batch in one ``generate``; the others (FedDPA's per-prompt mix, FDLoRA's fusion, soft
prompts) restore one client at a time and answer its rows under its method's answer rule. An
:class:`ExportPool` serves exported folders, one model each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from torch import nn

from fedamole.data.example import UNLABELLED, Example
from fedamole.data.prompts import Prompter, build_prompter
from fedamole.federation.method import AnswerGroup, ClientRuntime, FederatedMethod, ModelHandle
from fedamole.reporting import CLIENTS, RunDir
from fedamole.serving.continuous import ContinuousBatch
from fedamole.serving.decoding import DecodeResult, DecodeRow, decode_batch
from fedamole.serving.export import load_pretrained
from fedamole.serving.personalised import (
    AnswerRule,
    ClientModel,
    SavedClient,
    client_data,
    no_data,
    open_saved_client,
)
from fedamole.types import StateDict

# What answer rules that do not read the prompt are given for a raw (non-instruction) prompt.
_RAW_PROMPT = Example("", "", "", UNLABELLED)


class ModelPool(Protocol):
    """Served models by name, each with its prompt format and context length."""

    def names(self) -> list[str]: ...

    def prompter(self, name: str) -> Prompter: ...

    def max_length(self, name: str) -> int: ...

    def needs_instruction(self, name: str) -> bool:
        """True when the model's answer rule reads the prompt as an instruction (FedDPA)."""
        ...

    def answer(self, rows: list[DecodeRow]) -> list[DecodeResult]:
        """Decode rows that share one sampling setting (any mix of this pool's models)."""
        ...

    def continuous_batch(self) -> ContinuousBatch | None:
        """A batch that rows of any of this pool's models can join mid-decode, if it has one."""
        ...


def client_name(client_id: int) -> str:
    return f"client-{client_id}"


def saved_client_ids(run_dir: Path) -> list[int]:
    """Every client with a saved model in a finished run, in order."""
    run = RunDir(Path(run_dir))
    run.check_finished()
    folder = run.path / CLIENTS
    return sorted(int(p.name) for p in folder.glob("*") if p.name.isdigit())


@dataclass
class _Client:
    saved: SavedClient
    runtime: ClientRuntime
    weights: StateDict


class RunPool:
    """The selected clients of one finished run on one backbone."""

    def __init__(
        self, run_dir: Path, client_ids: list[int] | None = None, device: str | None = None
    ) -> None:
        ids = saved_client_ids(run_dir) if not client_ids else list(dict.fromkeys(client_ids))
        # Every client is checked before the backbone loads: a bad id fails in seconds.
        saved = [open_saved_client(run_dir, client_id, device) for client_id in ids]
        if not saved:
            raise ValueError(f"--run {run_dir}: no client has a saved model")
        self.method: FederatedMethod = saved[0].method
        self.cfg = saved[0].cfg
        self.handle: ModelHandle
        self.handle, tokenizer = self.method.build(self.cfg)
        self._prompter = build_prompter(tokenizer, self.cfg.data.prompt_format)
        self.clients = {client_name(s.client_id): self._restore(s) for s in saved}
        self.handle.model.eval()

    def _restore(self, saved: SavedClient) -> _Client:
        method, prompter = self.method, self._prompter
        data = client_data(saved, prompter) if method.serves_from_client_data else None
        runtime = method.runtime(
            self.handle, prompter.tokenizer, saved.cfg, data or no_data(saved, prompter)
        )
        client = _Client(saved, runtime, saved.weights())
        method.restore(runtime, client.weights, saved.doc)
        if method.serves_per_row:
            self.handle.keep(client_name(saved.client_id))
        return client

    def names(self) -> list[str]:
        return list(self.clients)

    def prompter(self, name: str) -> Prompter:
        return self._prompter

    def max_length(self, name: str) -> int:
        return self.cfg.model.max_length

    def needs_instruction(self, name: str) -> bool:
        return self.method.serves_from_client_data

    def continuous_batch(self) -> ContinuousBatch | None:
        if not self.method.serves_per_row:
            return None
        return ContinuousBatch(self.handle.model, self._prompter, self.handle.rows)

    def answer(self, rows: list[DecodeRow]) -> list[DecodeResult]:
        model = self.handle.model
        if self.method.serves_per_row:
            with self.handle.rows([row.model for row in rows]) as extra:
                return decode_batch(model, self._prompter, rows, extra)
        return one_model_at_a_time(rows, self._answering)

    def _answering(self, name: str) -> tuple[nn.Module, Prompter, AnswerRule]:
        client = self.clients[name]
        self.method.restore(client.runtime, client.weights, client.saved.doc)

        def rule(examples: list[Example]) -> list[AnswerGroup]:
            return self.method.answer_groups(client.runtime, examples)

        return self.handle.model, self._prompter, rule


class ExportPool:
    """Exported client folders, each its own model (and backbone), served under its folder's name."""

    def __init__(self, folders: list[Path], device: str = "auto") -> None:
        self.models: dict[str, ClientModel] = {}
        for folder in folders:
            name = Path(folder).resolve().name
            if name in self.models:
                raise ValueError(f"--model {folder}: two export folders are named {name!r}")
            self.models[name] = load_pretrained(Path(folder), device=device)
        self._lengths = {name: _context_length(m) for name, m in self.models.items()}

    def names(self) -> list[str]:
        return list(self.models)

    def prompter(self, name: str) -> Prompter:
        return self.models[name].prompter

    def max_length(self, name: str) -> int:
        return self._lengths[name]

    def needs_instruction(self, name: str) -> bool:
        return False

    def continuous_batch(self) -> ContinuousBatch | None:
        return None

    def answer(self, rows: list[DecodeRow]) -> list[DecodeResult]:
        return one_model_at_a_time(rows, self._answering)

    def _answering(self, name: str) -> tuple[nn.Module, Prompter, AnswerRule]:
        served = self.models[name]
        return served.model, served.prompter, served.answer_rule


def one_model_at_a_time(
    rows: list[DecodeRow], answering: Callable[[str], tuple[nn.Module, Prompter, AnswerRule]]
) -> list[DecodeResult]:
    """Each model's rows in turn, under its answer rule's groups; ``answering(name)`` makes the
    model ready (restores a client) and says how it answers."""
    results: dict[int, DecodeResult] = {}
    for name in dict.fromkeys(row.model for row in rows):
        members = [i for i, row in enumerate(rows) if row.model == name]
        model, prompter, rule = answering(name)
        for context, group in rule([rows[i].example or _RAW_PROMPT for i in members]):
            with context:
                answers = decode_batch(model, prompter, [rows[members[j]] for j in group])
            results.update((members[j], a) for j, a in zip(group, answers, strict=True))
    return [results[i] for i in range(len(rows))]


def _context_length(model: ClientModel) -> int:
    """The model's own context length (an export does not record the run's model.max_length)."""
    config = getattr(model.model, "config", None)
    return int(getattr(config, "max_position_embeddings", 2048) or 2048)
