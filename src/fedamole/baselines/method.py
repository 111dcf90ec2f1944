"""The seam every federated fine-tuning method plugs into, and FedAMoLE behind it.

The in-process runner (:func:`fedamole.runners.simulation.run_simulation`) drives any
:class:`FederatedMethod` through the same round: payload -> client round -> server completion ->
optional evaluation of the aggregated model -> metrics, checkpoint and saved client models. A
method differs only in these few rules; data, seeds, training loop, evaluation, reporting and
resume logic are shared, so methods compare on identical ground.

:class:`FedAMoLE` implements the interface by delegating to ``fedamole.federation``; its
ablations FedAMoLE-R and FedAMoLE-H are the same class with ``rsea.mode`` pinned.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from fedamole.config import Config
from fedamole.data.pipeline import ClientDataset
from fedamole.federation.client import ClientRuntime, run_client_round
from fedamole.federation.server import (
    ServerState,
    check_assignment_settings,
    client_payload,
    complete_round,
    init_server_state,
)
from fedamole.federation.training import StepCallback
from fedamole.federation.types import Architecture, ClientPayload, ClientUpdate, StateDict
from fedamole.hmole import HMoLEAdapter
from fedamole.personalised import build_hmole_model
from fedamole.reporting import primary_name, save_client_adapter, write_assignment


class FederatedMethod(ABC):
    """One federated fine-tuning method, as the rules the shared runner asks it for."""

    name: str
    communicates: bool = True

    def configure(self, cfg: Config) -> Config:
        """The run's config as this method runs it (FedAMoLE ablations pin ``rsea.mode``)."""
        return cfg

    def check(self, cfg: Config) -> None:  # noqa: B027 - optional hook, nothing to check by default
        """Reject unusable settings before anything expensive runs."""

    @abstractmethod
    def build(self, cfg: Config) -> tuple[Any, PreTrainedTokenizerBase]:
        """The model handle all simulated clients share (frozen backbone + adapters), and its
        tokenizer."""

    @abstractmethod
    def runtime(
        self, handle: Any, tokenizer: PreTrainedTokenizerBase, cfg: Config, data: ClientDataset
    ) -> Any:
        """One client: the shared handle, its own data and the private state it keeps."""

    @abstractmethod
    def init_state(self, cfg: Config, handle: Any) -> ServerState:
        """Round-0 server state, from the run seed."""

    @abstractmethod
    def payload(self, state: ServerState, client_id: int) -> ClientPayload:
        """What the server sends this client this round."""

    @abstractmethod
    def client_round(
        self, payload: ClientPayload, runtime: Any, on_step: StepCallback | None = None
    ) -> ClientUpdate:
        """Local training (and evaluation, if the method evaluates the locally trained model)."""

    @abstractmethod
    def complete_round(
        self, cfg: Config, state: ServerState, updates: list[ClientUpdate]
    ) -> ServerState:
        """Aggregate the uploads and move to the next round."""

    def evaluate_after_round(self, state: ServerState, runtime: Any) -> dict[str, float]:
        """``val_*``/``test_*`` metrics of a model that only exists after aggregation (the global
        model, say); empty when the client round already evaluated the personalised model."""
        return {}

    def private_state(self, runtime: Any) -> StateDict:
        """What this client keeps to itself between rounds (checkpointed with the server state)."""
        return {}

    def restore_private_state(self, runtime: Any, state: StateDict) -> None:  # noqa: B027
        """Give a client back its private state on resume."""

    def start_round(self, run_dir: Path, state: ServerState) -> None:  # noqa: B027
        """Record anything the method decides at the start of a round (FedAMoLE: assignments)."""

    @abstractmethod
    def save_client(
        self,
        run_dir: Path,
        state: ServerState,
        payload: ClientPayload,
        update: ClientUpdate,
        runtime: Any,
    ) -> None:
        """Write the client's personalised model after the last round: ``clients/<id>/
        adapter.safetensors`` and a JSON that says how to rebuild it."""

    def final_architectures(self, run_dir: Path, num_clients: int) -> list[Architecture] | None:
        """Per-client expert architectures for the heatmap plot; None when there are none."""
        return None


def primary_test_metric(metrics: dict[str, float]) -> dict[str, float]:
    """``{"test_<primary metric>": value}`` for a saved client model's description."""
    name = primary_name({k.removeprefix("test_"): v for k, v in metrics.items()})
    return {f"test_{name}": metrics[f"test_{name}"]}


def save_fedamole_adapter(
    run_dir: Path, payload: ClientPayload, update: ClientUpdate, cfg: Config
) -> None:
    """A FedAMoLE client's experts as it trained them this round, and its architecture."""
    info = {
        "method": FedAMoLE.for_config(cfg).name,
        "round": payload.round,
        "base_model": cfg.model.name,
        "hmole": cfg.hmole.model_dump(mode="json"),
    }
    save_client_adapter(
        run_dir,
        update.client_id,
        update.weights,
        payload.architecture,
        info | primary_test_metric(update.metrics),
    )


class FedAMoLE(FederatedMethod):
    """FedAMoLE (SPEC 3) and its ablations, by delegation to ``fedamole.federation``."""

    MODES = {"fedamole": "rsea", "fedamole-r": "random", "fedamole-h": "homogeneous"}

    def __init__(self, name: str = "fedamole") -> None:
        if name not in self.MODES:
            raise ValueError(f"unknown FedAMoLE variant {name!r}; one of {sorted(self.MODES)}")
        self.name = name

    @classmethod
    def for_config(cls, cfg: Config) -> FedAMoLE:
        """The variant a config's ``rsea.mode`` selects (what ``fedamole run`` runs)."""
        return cls(next(name for name, mode in cls.MODES.items() if mode == cfg.rsea.mode))

    def configure(self, cfg: Config) -> Config:
        cfg = cfg.model_copy(deep=True)
        cfg.rsea.mode = self.MODES[self.name]
        return cfg

    def check(self, cfg: Config) -> None:
        check_assignment_settings(cfg)

    def build(self, cfg: Config) -> tuple[HMoLEAdapter, PreTrainedTokenizerBase]:
        return build_hmole_model(cfg)

    def runtime(
        self,
        handle: HMoLEAdapter,
        tokenizer: PreTrainedTokenizerBase,
        cfg: Config,
        data: ClientDataset,
    ) -> ClientRuntime:
        return ClientRuntime(handle, tokenizer, cfg, data)

    def init_state(self, cfg: Config, handle: HMoLEAdapter) -> ServerState:
        return init_server_state(
            cfg, handle.modules, handle.init_global_state(cfg.hmole.num_experts, cfg.seed)
        )

    def payload(self, state: ServerState, client_id: int) -> ClientPayload:
        return client_payload(state, client_id)

    def client_round(
        self, payload: ClientPayload, runtime: ClientRuntime, on_step: StepCallback | None = None
    ) -> ClientUpdate:
        return run_client_round(payload, runtime, on_step)

    def complete_round(
        self, cfg: Config, state: ServerState, updates: list[ClientUpdate]
    ) -> ServerState:
        return complete_round(cfg, state, updates)

    def start_round(self, run_dir: Path, state: ServerState) -> None:
        write_assignment(run_dir, state.round, state.architectures)

    def save_client(
        self,
        run_dir: Path,
        state: ServerState,
        payload: ClientPayload,
        update: ClientUpdate,
        runtime: ClientRuntime,
    ) -> None:
        save_fedamole_adapter(run_dir, payload, update, runtime.cfg)

    def final_architectures(self, run_dir: Path, num_clients: int) -> list[Architecture]:
        return [
            json.loads((run_dir / "clients" / str(c) / "architecture.json").read_text())[
                "architecture"
            ]
            for c in range(num_clients)
        ]
