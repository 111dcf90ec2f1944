"""FedAMoLE (SPEC 3) and its ablations FedAMoLE-R, FedAMoLE-H and FedAMoLE-C behind the method
interface.

Server side: the expert store, the payloads (each client gets only its own experts plus the
shared experts and routers), aggregation (SPEC 3.5) and the next round's expert assignment by
RSEA (SPEC 4). Client side: load the architecture and weights, train locally, evaluate the
personalised model, compute the RSEA embeddings (optionally noised, SPEC 5) and upload.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from fedamole.aggregation import aggregate
from fedamole.config import Config
from fedamole.data.partition import client_groups
from fedamole.federation.client import evaluate_client
from fedamole.federation.method import ClientRuntime, FederatedMethod
from fedamole.federation.training import (
    StepCallback,
    fixed_batches,
    round_seed,
    shuffled_batches,
    train_steps,
)
from fedamole.hmole import HMoLEAdapter, inject_hmole
from fedamole.hmole.keys import router_key, state_keys
from fedamole.models import build_base_model
from fedamole.rsea.diagnostics import (
    assignment_diagnostics,
    holder_preference,
    score_diagnostics,
)
from fedamole.rsea.embeddings import compute_embeddings
from fedamole.rsea.privacy import embedding_norms, noise_generator, privatize_embeddings
from fedamole.rsea.scoring import expert_preferences, held_mask, with_continuity
from fedamole.rsea.solver import (
    InfeasibleAssignmentError,
    architectures_from_assignment,
    check_feasibility,
    homogeneous_bounds,
    random_assignment,
    solve_assignments,
)
from fedamole.types import (
    Architecture,
    ClientEmbeddings,
    ClientPayload,
    ClientUpdate,
    Metrics,
    ServerState,
    StateDict,
)

log = logging.getLogger("fedamole.fedamole")

FedAMoLERuntime = ClientRuntime[HMoLEAdapter]


def build_hmole_model(cfg: Config) -> tuple[HMoLEAdapter, PreTrainedTokenizerBase]:
    """The configured frozen base model on its device with HMoLE injected (no architecture yet)."""
    model, tokenizer = build_base_model(cfg)
    h = cfg.hmole
    adapter = inject_hmole(model, h.target_modules, h.rank, h.alpha, h.dropout, h.top_k)
    return adapter, tokenizer


# ---------------------------------------------------------------------------- assignment settings
def assignment_bounds(cfg: Config) -> tuple[int, int]:
    """(k_min, M) for the configured variant; FedAMoLE-H pins every client to the same count."""
    if cfg.rsea.mode == "homogeneous":
        return homogeneous_bounds(
            cfg.hmole.num_experts,
            cfg.federation.participants_per_round,
            cfg.rsea.clients_per_expert,
            min_experts=cfg.min_experts,
        )
    return cfg.min_experts, cfg.rsea.max_experts


def check_assignment_settings(cfg: Config) -> None:
    """Reject infeasible assignment settings before anything expensive runs. N_c is the number
    of clients that take part in a round (all of them unless federation.clients_per_round)."""
    if cfg.hmole.top_k > cfg.hmole.num_experts:
        raise InfeasibleAssignmentError(
            f"hmole.top_k={cfg.hmole.top_k} exceeds hmole.num_experts={cfg.hmole.num_experts}: "
            "routing cannot pick more experts than a module has; set hmole.top_k to at most "
            f"{cfg.hmole.num_experts}, or raise hmole.num_experts"
        )
    try:
        k_min, max_experts = assignment_bounds(cfg)
        check_feasibility(
            cfg.federation.participants_per_round,
            cfg.hmole.num_experts,
            cfg.rsea.clients_per_expert,
            k_min,
            max_experts,
        )
    except InfeasibleAssignmentError as err:
        if cfg.federation.clients_per_round is None:
            raise
        raise InfeasibleAssignmentError(
            f"{err} [N_c here is the {cfg.federation.participants_per_round} clients of each "
            f"round (federation.clients_per_round={cfg.federation.clients_per_round})]"
        ) from None
    if k_min < cfg.hmole.top_k:
        raise InfeasibleAssignmentError(
            f"rsea.min_experts={k_min} is below hmole.top_k={cfg.hmole.top_k}: a client could get "
            f"fewer experts than top-k routing selects; raise rsea.min_experts or lower hmole.top_k"
        )


def _by_client(x: np.ndarray, modules: list[str], clients: list[int]) -> dict[int, Architecture]:
    """Columns of X (n_modules, N_e, len(clients)) as each client's architecture."""
    return dict(zip(clients, architectures_from_assignment(x, modules), strict=True))


def random_architectures(
    cfg: Config, modules: list[str], clients: list[int], rng: np.random.Generator
) -> dict[int, Architecture]:
    """The solver's assignment from uniform random scores (round 0, and FedAMoLE-R)."""
    k_min, max_experts = assignment_bounds(cfg)
    x = random_assignment(
        len(modules),
        cfg.hmole.num_experts,
        len(clients),
        cfg.rsea.clients_per_expert,
        k_min,
        max_experts,
        rng,
    )
    return _by_client(x, modules, clients)


def rsea_architectures(
    cfg: Config,
    modules: list[str],
    clients: list[int],
    embeddings: dict[int, ClientEmbeddings],
    rank: int,
    holders: Mapping[int, Architecture],
) -> tuple[dict[int, Architecture], np.ndarray]:
    """RSEA (SPEC 4) over the given clients: each expert's preference over them, then the exact
    assignment (with rsea.mode=continuity, of P plus the bonus for this round's ``holders``).
    Returns the architectures and the score matrix P (n_modules, N_e, len(clients))."""
    columns = {col: embeddings[c] for col, c in enumerate(clients) if c in embeddings}
    scores = expert_preferences(columns, modules, cfg.hmole.num_experts, len(clients), rank)
    objective = scores
    if cfg.rsea.mode == "continuity":
        held = held_mask(modules, cfg.hmole.num_experts, clients, holders)
        objective = with_continuity(scores, held)
    k_min, max_experts = assignment_bounds(cfg)
    x = solve_assignments(objective, cfg.rsea.clients_per_expert, k_min, max_experts)
    return _by_client(x, modules, clients), scores


class FedAMoLE(FederatedMethod[HMoLEAdapter]):
    """FedAMoLE (SPEC 3) and its ablations; the variant pins ``rsea.mode``."""

    export_format = "hmole"

    MODES = {
        "fedamole": "rsea",
        "fedamole-r": "random",
        "fedamole-h": "homogeneous",
        "fedamole-c": "continuity",
    }
    client_model_file = "architecture.json"

    def __init__(self, name: str = "fedamole") -> None:
        if name not in self.MODES:
            raise ValueError(f"unknown FedAMoLE variant {name!r}; one of {sorted(self.MODES)}")
        self.name = name

    @classmethod
    def for_config(cls, cfg: Config) -> FedAMoLE:
        """The variant a config's ``rsea.mode`` selects (what ``fedamole run`` runs by default)."""
        return cls(next(name for name, mode in cls.MODES.items() if mode == cfg.rsea.mode))

    def configure(self, cfg: Config) -> Config:
        cfg = cfg.model_copy(deep=True)
        cfg.rsea.mode = self.MODES[self.name]
        return cfg

    def check(self, cfg: Config) -> None:
        check_assignment_settings(cfg)

    def build(self, cfg: Config) -> tuple[HMoLEAdapter, PreTrainedTokenizerBase]:
        return build_hmole_model(cfg)

    # ------------------------------------------------------------------------------ server side
    def init_state(self, cfg: Config, handle: HMoLEAdapter, participants: list[int]) -> ServerState:
        """Round 0: the seeded fresh expert store and a random assignment (SPEC 3)."""
        store = handle.init_global_state(cfg.hmole.num_experts, cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        architectures = random_architectures(cfg, handle.modules, participants, rng)
        return ServerState(0, store, cfg.optim.lr, participants, architectures)

    def payload(self, state: ServerState, client_id: int) -> ClientPayload:
        """Download (SPEC 3.1): the client's architecture and the weights of what it holds."""
        arch = state.architectures[client_id]
        weights = {key: state.store[key] for key in state_keys(arch)}
        return ClientPayload(round=state.round, architecture=arch, weights=weights, lr=state.lr)

    def complete_round(
        self,
        cfg: Config,
        state: ServerState,
        updates: list[ClientUpdate],
        next_participants: list[int],
    ) -> tuple[ServerState, Metrics]:
        """Aggregate (SPEC 3.5), re-assign experts to next round's clients (SPEC 3.6)."""
        store, rejected = aggregate(state.store, updates, cfg.federation.weighted_aggregation)
        rejected_ids = {r.client_id for r in rejected}
        embeddings = dict(state.embeddings)
        for update in updates:
            if update.client_id not in rejected_ids and update.embeddings is not None:
                embeddings[update.client_id] = update.embeddings
        modules = list(next(iter(state.architectures.values())))
        diagnostics: Metrics = {}
        if cfg.rsea.mode == "random":
            architectures = self._random_next(cfg, state, modules, next_participants)
        else:
            rank = store[router_key(modules[0])].shape[0]
            architectures, scores = rsea_architectures(
                cfg, modules, next_participants, embeddings, rank, state.architectures
            )
            diagnostics |= score_diagnostics(scores)
            preference = holder_preference(scores, modules, next_participants, state.architectures)
            if not math.isnan(preference):
                diagnostics["rsea_holder_preference"] = preference
        diagnostics |= assignment_diagnostics(
            state.architectures, architectures, client_groups(cfg.data, cfg.federation.num_clients)
        )
        next_state = ServerState(
            round=state.round + 1,
            store=store,
            lr=state.lr * cfg.optim.lr_decay,
            participants=next_participants,
            architectures=architectures,
            embeddings=embeddings,
        )
        return next_state, diagnostics

    @staticmethod
    def _random_next(
        cfg: Config, state: ServerState, modules: list[str], clients: list[int]
    ) -> dict[int, Architecture]:
        """FedAMoLE-R keeps its random assignment; a new sample of clients gets a new one."""
        if clients == state.participants:
            return state.architectures
        rng = np.random.default_rng([cfg.seed, state.round + 1])
        return random_architectures(cfg, modules, clients, rng)

    def architectures(self, state: ServerState) -> dict[int, Architecture]:
        return state.architectures

    def describe(self, cfg: Config, payload: ClientPayload) -> dict[str, object]:
        return {
            "architecture": payload.architecture,
            "base_model": cfg.model.name,
            "hmole": cfg.hmole.model_dump(mode="json"),
        }

    def restore(
        self, runtime: FedAMoLERuntime, model: StateDict, description: Mapping[str, object]
    ) -> None:
        """The client's experts (its recorded architecture), shared expert and router."""
        architecture = description["architecture"]
        if not isinstance(architecture, dict):
            raise ValueError(
                f"a FedAMoLE client model needs its architecture, got {architecture!r}"
            )
        runtime.handle.set_architecture(architecture)
        runtime.handle.load_state(model)

    # ------------------------------------------------------------------------------ client side
    def client_round(
        self, payload: ClientPayload, runtime: FedAMoLERuntime, on_step: StepCallback | None = None
    ) -> ClientUpdate:
        """Download -> local training -> local evaluation -> RSEA embeddings -> upload."""
        cfg, data, adapter = runtime.cfg, runtime.data, runtime.handle
        adapter.set_architecture(payload.architecture)
        adapter.load_state(payload.weights)
        seed = round_seed(cfg.seed, payload.round, data.client_id)
        torch.manual_seed(seed)  # dropout
        generator = torch.Generator().manual_seed(seed)
        pad_id = runtime.tokenizer.pad_token_id
        train_loss = train_steps(
            adapter.model,
            adapter.trainable_parameters(),
            shuffled_batches(data.train, cfg.federation.batch_size, pad_id, generator),
            cfg.federation.local_steps,
            payload.lr,
            cfg.optim,
            aux_loss=adapter.load_balancing_loss,
            on_step=on_step,
        )
        metrics, example_scores = evaluate_client(self, runtime)
        aux_batches = fixed_batches(data.aux, cfg.eval.batch_size, pad_id)
        embeddings = compute_embeddings(adapter, aux_batches, cfg.optim.mixed_precision)
        norms = embedding_norms(embeddings, cfg.privacy.clip_norm)
        if cfg.privacy.enabled:
            noise = noise_generator(cfg.privacy.seed, payload.round, data.client_id)
            embeddings = privatize_embeddings(
                embeddings, cfg.privacy.eta, cfg.privacy.clip_norm, noise
            )
            norms = {"emb_clipped_share": norms["emb_clipped_share"]}  # sizes stay private
        metrics |= norms
        return ClientUpdate(
            client_id=data.client_id,
            weights=adapter.state(),
            num_examples=len(data.train),
            embeddings=embeddings,
            metrics={"train_loss": train_loss, **metrics},
            example_scores=example_scores,
        )
