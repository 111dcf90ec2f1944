"""Server aggregation of one round's client updates (SPEC 3.5).

Every key is averaged over the accepted updates that contain it. Since a client uploads only the
experts it held, a domain expert is averaged over its holders, while the shared expert and the
router (in every update) are averaged over all participants: one rule covers both. A key that no
accepted update contains (an expert whose holders all dropped out) keeps its stored value.

A broken update (NaN/Inf, an unknown key, a shape that differs from the store's) is rejected
whole and logged, and the round goes on with the others.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedamole.types import ClientUpdate, StateDict

logger = logging.getLogger("fedamole.aggregation")


@dataclass(frozen=True)
class RejectedUpdate:
    """An update left out of the average, and why."""

    client_id: int
    reason: str


def _problem(update: ClientUpdate, store: StateDict, weighted: bool) -> str | None:
    """Why this update cannot be averaged in, or None if it can."""
    if weighted and update.num_examples <= 0:
        return f"num_examples={update.num_examples}, cannot weight by it"
    for key, value in update.weights.items():
        if key not in store:
            return f"unknown key {key!r}"
        if tuple(value.shape) != tuple(store[key].shape):
            return (
                f"{key!r} has shape {tuple(value.shape)}, the server's is {tuple(store[key].shape)}"
            )
        if not torch.isfinite(value).all():
            return f"{key!r} contains NaN or Inf"
    return None


def _screen(
    store: StateDict, updates: Sequence[ClientUpdate], weighted: bool
) -> tuple[list[ClientUpdate], list[RejectedUpdate]]:
    """Split updates into accepted and rejected (with reasons, logged as warnings)."""
    accepted: list[ClientUpdate] = []
    rejected: list[RejectedUpdate] = []
    seen: set[int] = set()
    for update in updates:
        reason = _problem(update, store, weighted)
        if reason is None and update.client_id in seen:
            reason = "a second update from this client in the same round"
        if reason is None:
            accepted.append(update)
            seen.add(update.client_id)
            continue
        logger.warning("rejected update from client %d: %s", update.client_id, reason)
        rejected.append(RejectedUpdate(update.client_id, reason))
    return accepted, rejected


def aggregate(
    store: StateDict, updates: Sequence[ClientUpdate], weighted: bool = False
) -> tuple[StateDict, list[RejectedUpdate]]:
    """New server state and the rejected updates; the input store is not modified.

    Unweighted by default (as in the paper); weighted=True weights by num_examples. Sums run in
    at least float32 and are cast back to the store's dtype and device. Keys no accepted update
    contains keep their previous tensor (shared, not copied).
    """
    accepted, rejected = _screen(store, updates, weighted)
    totals: dict[str, Tensor] = {}
    mass: dict[str, float] = {}
    for update in accepted:
        weight = float(update.num_examples) if weighted else 1.0
        for key, value in update.weights.items():
            old = store[key]
            if key not in totals:
                dtype = torch.promote_types(old.dtype, torch.float32)
                totals[key] = torch.zeros(old.shape, dtype=dtype, device=old.device)
                mass[key] = 0.0
            totals[key] += value.to(device=old.device, dtype=totals[key].dtype) * weight
            mass[key] += weight
    new_state = dict(store)
    for key, total in totals.items():
        new_state[key] = (total / mass[key]).to(store[key].dtype)
    return new_state, rejected
