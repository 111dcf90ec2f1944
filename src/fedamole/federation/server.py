"""Server side of a FedAMoLE round (SPEC 3, steps 1, 5, 6), independent of transport: the round
state, per-client payloads, aggregation and the next expert assignment."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from fedamole.aggregation import aggregate
from fedamole.config import Config
from fedamole.federation.types import (
    Architecture,
    ClientEmbeddings,
    ClientPayload,
    ClientUpdate,
    StateDict,
)
from fedamole.hmole.keys import router_key, state_keys
from fedamole.rsea.scoring import expert_preferences
from fedamole.rsea.solver import (
    architectures_from_assignment,
    check_feasibility,
    homogeneous_bounds,
    random_assignment,
    solve_assignments,
)

log = logging.getLogger("fedamole.server")


@dataclass
class ServerState:
    """Everything the server carries from one round to the next; checkpointed after each round.

    ``store`` (all N_e experts of every module, shared experts, routers) is the single source of
    truth for weights; a client's architecture is its row of ``architectures``.
    """

    round: int
    store: StateDict
    architectures: list[Architecture]
    lr: float
    embeddings: dict[int, ClientEmbeddings] = field(default_factory=dict)


def assignment_bounds(cfg: Config) -> tuple[int, int]:
    """(k_min, M) for the configured variant; FedAMoLE-H pins every client to the same count."""
    if cfg.rsea.mode == "homogeneous":
        return homogeneous_bounds(
            cfg.hmole.num_experts,
            cfg.federation.num_clients,
            cfg.rsea.clients_per_expert,
            min_experts=cfg.min_experts,
        )
    return cfg.min_experts, cfg.rsea.max_experts


def check_assignment_settings(cfg: Config) -> None:
    """Reject infeasible assignment settings before anything expensive runs."""
    k_min, max_experts = assignment_bounds(cfg)
    check_feasibility(
        cfg.federation.num_clients,
        cfg.hmole.num_experts,
        cfg.rsea.clients_per_expert,
        k_min,
        max_experts,
    )
    if k_min < cfg.hmole.top_k:
        raise ValueError(
            f"rsea.min_experts={k_min} is below hmole.top_k={cfg.hmole.top_k}: a client could get "
            f"fewer experts than top-k routing selects; raise rsea.min_experts or lower hmole.top_k"
        )


def _solve(cfg: Config, scores: np.ndarray, modules: list[str]) -> list[Architecture]:
    k_min, max_experts = assignment_bounds(cfg)
    x = solve_assignments(scores, cfg.rsea.clients_per_expert, k_min, max_experts)
    return architectures_from_assignment(x, modules)


def init_server_state(cfg: Config, modules: list[str], store: StateDict) -> ServerState:
    """Round 0: fresh expert store and the solver's assignment from seeded random scores."""
    check_assignment_settings(cfg)
    rng = np.random.default_rng(cfg.seed)
    k_min, max_experts = assignment_bounds(cfg)
    x = random_assignment(
        len(modules),
        cfg.hmole.num_experts,
        cfg.federation.num_clients,
        cfg.rsea.clients_per_expert,
        k_min,
        max_experts,
        rng,
    )
    return ServerState(0, store, architectures_from_assignment(x, modules), cfg.optim.lr)


def client_payload(state: ServerState, client_id: int) -> ClientPayload:
    """Download (SPEC 3.1): the client's architecture and the current weights of what it holds."""
    arch = state.architectures[client_id]
    weights = {key: state.store[key] for key in state_keys(arch)}
    return ClientPayload(round=state.round, architecture=arch, weights=weights, lr=state.lr)


def complete_round(cfg: Config, state: ServerState, updates: list[ClientUpdate]) -> ServerState:
    """Aggregate (SPEC 3.5), re-assign experts (SPEC 3.6) and move to the next round."""
    store, rejected = aggregate(state.store, updates, weighted=cfg.federation.weighted_aggregation)
    rejected_ids = {r.client_id for r in rejected}
    embeddings = dict(state.embeddings)
    for update in updates:
        if update.client_id not in rejected_ids and update.embeddings is not None:
            embeddings[update.client_id] = update.embeddings
    modules = list(state.architectures[0])
    if cfg.rsea.mode == "random":
        architectures = state.architectures
    else:
        rank = store[router_key(modules[0])].shape[0]
        scores = expert_preferences(
            embeddings, modules, cfg.hmole.num_experts, cfg.federation.num_clients, rank
        )
        architectures = _solve(cfg, scores, modules)
    return ServerState(
        round=state.round + 1,
        store=store,
        architectures=architectures,
        lr=state.lr * cfg.optim.lr_decay,
        embeddings=embeddings,
    )
