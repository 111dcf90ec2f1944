"""The contract between the round engine and a federated fine-tuning method.

The engine (:mod:`fedamole.federation.engine`) drives any :class:`FederatedMethod` through the
same round over any transport: payloads -> client rounds (where the data lives) -> server
completion -> optional evaluation of the aggregated model -> records, checkpoint and the clients'
personalised models. A method only says what differs: what the server keeps and sends, what a
client trains and uploads, how the server aggregates, which model a client is evaluated with.
Methods return data (states, architectures, metrics); the run directory writes files.

The server side (``init_state``, ``payload``, ``complete_round``) never touches client data; the
client side (``client_round``, ``evaluate``, ``personal_model``) runs with a
:class:`ClientRuntime` wherever the client is: in this process, or on an organisation's node.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Generic, Literal, Protocol, TypeVar, runtime_checkable

from torch import nn
from transformers import PreTrainedTokenizerBase

from fedamole.config import Config
from fedamole.data.example import Example
from fedamole.data.pipeline import ClientDataset
from fedamole.federation.training import StepCallback
from fedamole.types import (
    Architecture,
    ClientEvaluation,
    ClientPayload,
    ClientUpdate,
    Metrics,
    ServerState,
    StateDict,
)


class ModelHandle(Protocol):
    """A frozen backbone with a method's adapters, shared by the clients of one process."""

    model: nn.Module

    def state(self) -> StateDict:
        """Every adapter tensor currently loaded, as detached CPU copies."""
        ...


@runtime_checkable
class PerRowHandle(ModelHandle, Protocol):
    """A handle whose batches can hold several clients' prompts, each row with its own client's
    adapter, so `fedamole serve` decodes them together (a handle that is not one serves one
    client at a time). Per-row adapters are for inference only: a model in training mode is
    refused (as PEFT refuses ``adapter_names`` in training)."""

    def keep(self, key: str) -> None:
        """Copy the adapter now in the handle under ``key``, on the model's device."""
        ...

    def forget(self, key: str) -> None:
        """Free the copy kept under ``key``."""
        ...

    def rows(self, keys: list[str]) -> AbstractContextManager[dict[str, object]]:
        """Forward passes in which row i uses the copy kept under ``keys[i]``; yields further
        arguments for the forward (or ``generate``) call."""
        ...


H = TypeVar("H", bound=ModelHandle)


@dataclass
class ClientRuntime(Generic[H]):
    """One client where its data lives: the shared model handle, the tokenizer, the run config,
    its own data, and the tensors it never uploads (``private``; checkpointed by the transport)."""

    handle: H
    tokenizer: PreTrainedTokenizerBase
    cfg: Config
    data: ClientDataset
    private: StateDict = field(default_factory=dict)


# Indices of examples answered together under one context (e.g. a LoRA mix of adapter weights).
AnswerGroup = tuple[AbstractContextManager[object], list[int]]


class FederatedMethod(ABC, Generic[H]):
    """One federated fine-tuning method, as the rules the round engine asks it for."""

    name: str
    # True: a client's model is the aggregated one (plus private parts), evaluated by a second
    # message after aggregation; False: the model it just trained locally, evaluated right away.
    evaluates_after_aggregation: bool = False
    # False when the personalised model holds tensors that never leave the client: on Flower
    # the model then stays on the organisation's node.
    shares_personal_model: bool = True
    client_model_file: str = "adapter.json"

    def configure(self, cfg: Config) -> Config:
        """The run's config as this method runs it (FedAMoLE ablations pin ``rsea.mode``)."""
        return cfg

    def check(self, cfg: Config) -> None:  # noqa: B027 - optional hook, nothing to check by default
        """Reject unusable settings before anything expensive runs."""

    @abstractmethod
    def build(self, cfg: Config) -> tuple[H, PreTrainedTokenizerBase]:
        """The model handle (frozen backbone + adapters on the configured device) and tokenizer."""

    def runtime(
        self, handle: H, tokenizer: PreTrainedTokenizerBase, cfg: Config, data: ClientDataset
    ) -> ClientRuntime[H]:
        """One client on the shared handle, with its initial private state."""
        return ClientRuntime(handle, tokenizer, cfg, data)

    # ------------------------------------------------------------------------------ server side
    @abstractmethod
    def init_state(self, cfg: Config, handle: H, participants: list[int]) -> ServerState:
        """Round-0 server state, from the run seed, for the clients of round 0."""

    def payload(self, state: ServerState, client_id: int) -> ClientPayload:
        """What the server sends this client (by default: every stored tensor)."""
        return ClientPayload(round=state.round, architecture={}, weights=state.store, lr=state.lr)

    @abstractmethod
    def complete_round(
        self,
        cfg: Config,
        state: ServerState,
        updates: list[ClientUpdate],
        next_participants: list[int],
    ) -> tuple[ServerState, Metrics]:
        """Aggregate the uploads and move to the next round (whose clients are given); also
        returns server-side diagnostics of the round (empty when there are none)."""

    def notes(self) -> dict[str, object]:
        """What the run's summary should say about how this method was built (e.g. a rank it
        derived from the config); {} when nothing."""
        return {}

    def architectures(self, state: ServerState) -> dict[int, Architecture]:
        """Per-client expert sets of ``state.round`` (assignments/, heatmap); {} without experts."""
        return {}

    @abstractmethod
    def describe(self, cfg: Config, payload: ClientPayload) -> dict[str, object]:
        """How to rebuild a client's saved personalised model (written beside its weights)."""

    # ------------------------------------------------------------------------------ client side
    @abstractmethod
    def client_round(
        self, payload: ClientPayload, runtime: ClientRuntime[H], on_step: StepCallback | None = None
    ) -> ClientUpdate:
        """Local training (and evaluation, unless the method evaluates after aggregation)."""

    def evaluate(self, payload: ClientPayload, runtime: ClientRuntime[H]) -> ClientEvaluation:
        """The client's model built from the aggregated ``payload`` on its own splits."""
        raise NotImplementedError(f"{self.name} evaluates the model it trains locally")

    def personal_model(self, runtime: ClientRuntime[H]) -> StateDict:
        """The client's personalised model: the state it was just evaluated with."""
        return runtime.handle.state()

    # ------------------------------------------------------------------------------ serving
    # How `fedamole export` writes a client's model: PEFT's own adapter folder, or FedAMoLE's
    # routed experts with what rebuilds them.
    export_format: Literal["peft", "hmole"] = "peft"
    # True when answering needs the client's own data (FedDPA's mix compares each prompt with
    # the client's training prompts): serving then rebuilds the client's splits. A method whose
    # handle is a :class:`PerRowHandle` is served many clients per batch.
    serves_from_client_data: bool = False

    def answer_groups(
        self, runtime: ClientRuntime[H], examples: list[Example]
    ) -> list[AnswerGroup]:
        """How the client's model answers ``examples``: their indices in groups, each group under
        one context. Evaluation and serving both answer through it, so the model a client is
        served is the model it was evaluated with. Default: all at once, as the handle is."""
        return [(nullcontext(), list(range(len(examples))))]

    def answer_doc(self, runtime: ClientRuntime[H]) -> dict[str, object]:
        """How the client's model answers, as JSON for an export's readers ({}: as it is)."""
        return {}

    @abstractmethod
    def restore(
        self, runtime: ClientRuntime[H], model: StateDict, description: Mapping[str, object]
    ) -> None:
        """Put a client's saved personalised model (the tensors :meth:`personal_model` gave,
        the JSON :meth:`describe` wrote) back into ``runtime``, as it was evaluated."""
