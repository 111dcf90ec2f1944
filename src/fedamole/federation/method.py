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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedamole.config import Config
from fedamole.data.example import Example
from fedamole.data.pipeline import ClientDataset
from fedamole.device import autocast, model_device, resolve_device
from fedamole.evaluation import SplitScores, evaluate_examples, split_metrics
from fedamole.federation.state import ServerState
from fedamole.federation.training import StepCallback
from fedamole.models import load_base_model
from fedamole.types import (
    Architecture,
    ClientEvaluation,
    ClientPayload,
    ClientUpdate,
    ExampleScores,
    Metrics,
    StateDict,
)


class ModelHandle(Protocol):
    """A frozen backbone with a method's adapters, shared by the clients of one process."""

    model: nn.Module

    def state(self) -> StateDict:
        """Every adapter tensor currently loaded, as detached CPU copies."""
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


SplitScorer = Callable[[list[Example]], SplitScores]


def build_base_model(cfg: Config) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The configured frozen backbone on its device and dtype, with gradient checkpointing if
    asked (activations recomputed in backward: for models that do not fit otherwise)."""
    model, tokenizer = load_base_model(
        cfg.model.name, cfg.model.dtype, resolve_device(cfg.model.device)
    )
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def evaluate_client(
    runtime: ClientRuntime, score_split: SplitScorer | None = None
) -> tuple[Metrics, ExampleScores]:
    """The model currently loaded in the handle on the client's validation and test splits, as
    ``val_*``/``test_*`` means and per-example scores (in the split's order, so runs on the same
    data pair up), under the configured mixed precision."""
    cfg, data = runtime.cfg, runtime.data
    model = runtime.handle.model

    def default_scorer(examples: list[Example]) -> SplitScores:
        return evaluate_examples(
            model,
            data.prompter,
            examples,
            cfg.eval,
            cfg.model.max_length,
            classification=data.classification,
        )

    scorer = score_split or default_scorer
    with autocast(model_device(model), cfg.optim.mixed_precision):
        scores = {split: scorer(getattr(data.splits, split)) for split in ("val", "test")}
    per_example = {
        f"{split}_{name}": values
        for split, split_scores in scores.items()
        for name, values in split_scores.values.items()
    }
    return split_metrics(scores), per_example


class FederatedMethod(ABC, Generic[H]):
    """One federated fine-tuning method, as the rules the round engine asks it for."""

    name: str
    communicates: bool = True
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
