"""Many clients' personalised models on one frozen backbone, answering batches of requests.

A :class:`RunPool` builds the run's method once (one backbone on ``model.device``, in
``model.dtype``) and restores each client into it through
:func:`~fedamole.serving.loading.client_runtime`, the function every loader uses. When the
method's handle is a :class:`~fedamole.federation.method.PerRowHandle` (FedAMoLE's routed HMoLE,
the single-LoRA baselines through PEFT's mixed-adapter batches) each resident client keeps its
adapter on the device and a mixed batch decodes in one forward; otherwise (FedDPA's per-prompt
mix, FDLoRA's fusion, soft prompts) one client at a time is restored and answers its rows under
its method's answer rule. An :class:`ExportPool` serves exported folders, one model each.

``max_loaded`` bounds how many clients are resident at once (vLLM's ``max_loras``): the least
recently used one is dropped and read again from the run or the folder when next asked for; no
copy of a client's tensors is kept besides the resident ones.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from torch import nn

from fedamole.data.example import UNLABELLED, Example
from fedamole.data.prompts import Prompter
from fedamole.federation.method import (
    AnswerGroup,
    ClientRuntime,
    FederatedMethod,
    ModelHandle,
    PerRowHandle,
)
from fedamole.serving.continuous import ContinuousBatch
from fedamole.serving.decoding import DecodeResult, DecodeRow, decode_batch
from fedamole.serving.loading import (
    backbone,
    client_runtime,
    load_pretrained,
    open_saved_client,
    saved_client_ids,
)
from fedamole.serving.personalised import AnswerRule, ClientModel

# What answer rules that do not read the prompt are given for a raw (non-instruction) prompt.
_RAW_PROMPT = Example("", "", "", UNLABELLED)

V = TypeVar("V")


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


class Resident(Generic[V]):
    """The loaded models by name, at most ``limit`` of them (None: no bound): asking for one
    that is not loaded first unloads the least recently used ones, then loads it."""

    def __init__(
        self,
        limit: int | None,
        load: Callable[[str], V],
        unload: Callable[[str], None] = lambda name: None,
    ) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"--max-loaded {limit}: at least 1 model must be loaded")
        self.limit, self._load, self._unload = limit, load, unload
        self.loaded: OrderedDict[str, V] = OrderedDict()  # least recently used first

    def get(self, name: str, needed: Collection[str] = ()) -> V:
        """``name``'s model, loaded if need be; the models in ``needed`` stay loaded."""
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return self.loaded[name]
        while self.limit is not None and len(self.loaded) >= self.limit:
            victim = next((n for n in self.loaded if n not in needed), None)
            if victim is None:
                raise RuntimeError(
                    f"{len(set(needed))} models are needed at once, above --max-loaded {self.limit}"
                )
            del self.loaded[victim]
            self._unload(victim)
        self.loaded[name] = self._load(name)
        return self.loaded[name]


class RunPool:
    """The selected clients of one finished run on one backbone, at most ``max_loaded`` of them
    resident at once (None: all)."""

    def __init__(
        self,
        run_dir: Path,
        client_ids: list[int] | None = None,
        device: str | None = None,
        max_loaded: int | None = None,
    ) -> None:
        ids = saved_client_ids(run_dir) if not client_ids else list(dict.fromkeys(client_ids))
        # Every client is checked before the backbone loads: a bad id fails in seconds.
        saved = [open_saved_client(run_dir, client_id, device) for client_id in ids]
        if not saved:
            raise ValueError(f"--run {run_dir}: no client has a saved model")
        self.saved = {client_name(s.client_id): s for s in saved}
        self.method: FederatedMethod = saved[0].method
        self.cfg = saved[0].cfg
        self.handle: ModelHandle
        self.handle, self._prompter = backbone(saved[0])
        self.per_row = isinstance(self.handle, PerRowHandle)
        self.resident = Resident(max_loaded, self._load, self._unload)
        self.active: str | None = None  # whose adapter the handle itself now holds
        self.batch: ContinuousBatch | None = None
        for name in self.saved:  # each client loads once now: a broken one fails at start
            self.resident.get(name)

    def _load(self, name: str) -> ClientRuntime | None:
        """The client restored into the handle; a per-row pool then keeps its adapter on the
        device and nothing else (its runtime may hold the tensors again, on the CPU)."""
        runtime = client_runtime(self.saved[name], self.handle, self._prompter)
        self.active = name
        if self.per_row:
            self.handle.keep(name)
            return None
        return runtime

    def _unload(self, name: str) -> None:
        if self.per_row:
            self.handle.forget(name)

    def names(self) -> list[str]:
        return list(self.saved)

    def prompter(self, name: str) -> Prompter:
        return self._prompter

    def max_length(self, name: str) -> int:
        return self.cfg.model.max_length

    def needs_instruction(self, name: str) -> bool:
        return self.method.serves_from_client_data

    def continuous_batch(self) -> ContinuousBatch | None:
        if self.per_row and self.batch is None:
            self.batch = ContinuousBatch(
                self.handle.model, self._prompter, self._rows, self.resident.limit
            )
        return self.batch

    @contextmanager
    def _rows(self, keys: list[str]) -> Iterator[dict[str, object]]:
        """Row i on client ``keys[i]``'s adapter, each client made resident first; the clients
        of the rows already running stay resident."""
        needed = set(keys) | (self.batch.clients() if self.batch is not None else set())
        for key in dict.fromkeys(keys):
            self.resident.get(key, needed)
        with self.handle.rows(keys) as extra:
            yield extra

    def answer(self, rows: list[DecodeRow]) -> list[DecodeResult]:
        if self.per_row:  # each row on its client's kept adapter, all in one generate
            with self._rows([row.served for row in rows]) as extra:
                return decode_batch(self.handle.model, self._prompter, rows, extra)
        return one_model_at_a_time(rows, self._answering)

    def _answering(self, name: str) -> tuple[nn.Module, Prompter, AnswerRule]:
        runtime = self.resident.get(name)
        assert runtime is not None  # a pool that is not per-row keeps its clients' runtimes
        if self.active != name:
            saved = self.saved[name]
            self.method.restore(runtime, saved.weights(), saved.doc)
            self.active = name

        def rule(examples: list[Example]) -> list[AnswerGroup]:
            return self.method.answer_groups(runtime, examples)

        return self.handle.model, self._prompter, rule


class ExportPool:
    """Exported client folders, each its own model (and backbone), served under its folder's
    name, at most ``max_loaded`` of them loaded at once (None: all)."""

    def __init__(
        self, folders: list[Path], device: str = "auto", max_loaded: int | None = None
    ) -> None:
        self.folders: dict[str, Path] = {}
        for folder in folders:
            name = Path(folder).resolve().name
            if name in self.folders:
                raise ValueError(f"--model {folder}: two export folders are named {name!r}")
            self.folders[name] = Path(folder)
        self.device = device
        self.resident = Resident(max_loaded, self._load)
        self._prompters: dict[str, Prompter] = {}
        self._lengths: dict[str, int] = {}
        for name in self.folders:  # each folder loads once now: a broken one fails at start
            model = self.resident.get(name)
            self._prompters[name], self._lengths[name] = model.prompter, _context_length(model)

    def _load(self, name: str) -> ClientModel:
        return load_pretrained(self.folders[name], device=self.device)

    def names(self) -> list[str]:
        return list(self.folders)

    def prompter(self, name: str) -> Prompter:
        return self._prompters[name]

    def max_length(self, name: str) -> int:
        return self._lengths[name]

    def needs_instruction(self, name: str) -> bool:
        return False

    def continuous_batch(self) -> ContinuousBatch | None:
        return None

    def answer(self, rows: list[DecodeRow]) -> list[DecodeResult]:
        return one_model_at_a_time(rows, self._answering)

    def _answering(self, name: str) -> tuple[nn.Module, Prompter, AnswerRule]:
        served = self.resident.get(name)
        return served.model, self._prompters[name], served.answer_rule


def one_model_at_a_time(
    rows: list[DecodeRow], answering: Callable[[str], tuple[nn.Module, Prompter, AnswerRule]]
) -> list[DecodeResult]:
    """Each model's rows in turn, under its answer rule's groups; ``answering(name)`` makes the
    model ready (restores a client) and says how it answers."""
    results: dict[int, DecodeResult] = {}
    for name in dict.fromkeys(row.served for row in rows):
        members = [i for i, row in enumerate(rows) if row.served == name]
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
