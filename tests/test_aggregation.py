"""Aggregation (SPEC 3.5): experts over holders, shared/router over all, bad updates rejected."""

from __future__ import annotations

import logging

import pytest
import torch

from fedamole.aggregation import RejectedUpdate, aggregate
from fedamole.hmole.keys import expert_key, router_key, shared_key
from fedamole.types import ClientUpdate, StateDict

E0A, E1A = expert_key("q", 0, "A"), expert_key("q", 1, "A")
SHARED, ROUTER = shared_key("q", "A"), router_key("q")


def _store() -> StateDict:
    return {
        E0A: torch.zeros(2, 3),
        E1A: torch.full((2, 3), 7.0),
        SHARED: torch.zeros(2, 3),
        ROUTER: torch.zeros(2, 3),
    }


def _update(client: int, value: float, experts: list[str], num_examples: int = 1) -> ClientUpdate:
    keys = [*experts, SHARED, ROUTER]
    return ClientUpdate(client, {k: torch.full((2, 3), value) for k in keys}, num_examples)


def test_unweighted_mean_over_holders_and_over_all() -> None:
    """Client 0 (value 1) holds expert 0; clients 1 (3) and 2 (8) hold expert 1."""
    updates = [_update(0, 1.0, [E0A]), _update(1, 3.0, [E1A]), _update(2, 8.0, [E1A])]
    state, rejected = aggregate(_store(), updates)
    assert rejected == []
    torch.testing.assert_close(state[E0A], torch.full((2, 3), 1.0))
    torch.testing.assert_close(state[E1A], torch.full((2, 3), 5.5))
    torch.testing.assert_close(state[SHARED], torch.full((2, 3), 4.0))
    torch.testing.assert_close(state[ROUTER], torch.full((2, 3), 4.0))


def test_weighted_mean_uses_example_counts() -> None:
    updates = [_update(0, 1.0, [E1A], 1), _update(1, 4.0, [E1A], 3)]
    state, _ = aggregate(_store(), updates, weighted=True)
    torch.testing.assert_close(state[E1A], torch.full((2, 3), (1.0 + 12.0) / 4))
    torch.testing.assert_close(state[SHARED], torch.full((2, 3), 13.0 / 4))
    unweighted, _ = aggregate(_store(), updates)
    torch.testing.assert_close(unweighted[E1A], torch.full((2, 3), 2.5))


def test_expert_nobody_held_keeps_its_weights() -> None:
    state, _ = aggregate(_store(), [_update(0, 2.0, [E0A])])
    torch.testing.assert_close(state[E1A], torch.full((2, 3), 7.0))


def test_nan_update_is_rejected_logged_and_the_rest_aggregated(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bad = _update(1, 5.0, [E1A])
    bad.weights[E1A][0, 0] = float("nan")
    with caplog.at_level(logging.WARNING, logger="fedamole.aggregation"):
        state, rejected = aggregate(_store(), [_update(0, 2.0, [E0A]), bad, _update(2, 4.0, [])])
    assert [r.client_id for r in rejected] == [1]
    assert "NaN" in rejected[0].reason
    assert any("client 1" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(state[SHARED], torch.full((2, 3), 3.0))
    torch.testing.assert_close(state[E1A], torch.full((2, 3), 7.0))


@pytest.mark.parametrize(
    ("weights", "reason"),
    [
        ({E0A: torch.ones(3, 2)}, "shape"),
        ({"q.experts.9.lora_A": torch.ones(2, 3)}, "unknown key"),
        ({SHARED: torch.tensor([[float("inf")] * 3] * 2)}, "Inf"),
    ],
)
def test_broken_updates_are_rejected_whole(weights: StateDict, reason: str) -> None:
    broken = ClientUpdate(3, {ROUTER: torch.full((2, 3), 100.0), **weights}, 1)
    state, rejected = aggregate(_store(), [_update(0, 2.0, []), broken])
    assert len(rejected) == 1 and rejected[0].client_id == 3 and reason in rejected[0].reason
    torch.testing.assert_close(state[ROUTER], torch.full((2, 3), 2.0))


def test_zero_examples_rejected_only_when_weighting() -> None:
    updates = [_update(0, 2.0, [], 0), _update(1, 4.0, [], 2)]
    state, rejected = aggregate(_store(), updates, weighted=True)
    assert rejected == [RejectedUpdate(0, "num_examples=0, cannot weight by it")]
    torch.testing.assert_close(state[SHARED], torch.full((2, 3), 4.0))
    _, rejected = aggregate(_store(), updates)
    assert rejected == []


def test_second_update_from_the_same_client_is_rejected() -> None:
    state, rejected = aggregate(_store(), [_update(0, 2.0, []), _update(0, 9.0, [])])
    assert [r.client_id for r in rejected] == [0]
    torch.testing.assert_close(state[SHARED], torch.full((2, 3), 2.0))


def test_input_store_and_updates_are_not_mutated() -> None:
    store = _store()
    before = {k: v.clone() for k, v in store.items()}
    updates = [_update(0, 1.0, [E0A]), _update(1, 3.0, [E1A])]
    sent = {k: v.clone() for k, v in updates[0].weights.items()}
    state, _ = aggregate(store, updates)
    assert state is not store
    for key, value in before.items():
        torch.testing.assert_close(store[key], value)
    for key, value in sent.items():
        torch.testing.assert_close(updates[0].weights[key], value)


def test_low_precision_store_is_averaged_in_float32_and_cast_back() -> None:
    """Summed in bf16, 256 + 1 + 1 would give 256 (its step there is 2) and a mean of 85.5."""
    store = {SHARED: torch.ones(4, dtype=torch.bfloat16)}
    updates = [
        ClientUpdate(i, {SHARED: torch.full((4,), v, dtype=torch.bfloat16)}, 1)
        for i, v in enumerate([256.0, 1.0, 1.0])
    ]
    state, _ = aggregate(store, updates)
    assert state[SHARED].dtype == torch.bfloat16
    torch.testing.assert_close(state[SHARED], torch.full((4,), 86.0, dtype=torch.bfloat16))
