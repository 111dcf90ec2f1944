"""Server-side RSEA scoring: Lambda = Eps_bar T^T / sqrt(r), softmax over clients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedamole.rsea.diagnostics import holder_preference
from fedamole.rsea.scoring import expert_preferences, held_mask, with_continuity
from fedamole.rsea.solver import architectures_from_assignment, solve_assignments
from fedamole.types import ClientEmbeddings


def _emb(
    data: dict[str, list[float]], experts: dict[str, dict[int, list[float]]]
) -> ClientEmbeddings:
    return ClientEmbeddings(
        data={m: torch.tensor(v) for m, v in data.items()},
        experts={m: {e: torch.tensor(v) for e, v in es.items()} for m, es in experts.items()},
    )


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def test_two_experts_two_clients_by_hand() -> None:
    """eps_bar_0 = mean([2, 0], [0, 0]) = [1, 0], eps_bar_1 = [0, 4]; t_0 = [1, 0], t_1 = [0, 1].
    Lambda = [[1, 0], [0, 4]] / sqrt(2); a two-way softmax is a sigmoid of the difference."""
    embeddings = {
        0: _emb({"q": [1.0, 0.0]}, {"q": {0: [2.0, 0.0]}}),
        1: _emb({"q": [0.0, 1.0]}, {"q": {0: [0.0, 0.0], 1: [0.0, 4.0]}}),
    }
    prefs = expert_preferences(embeddings, ["q"], num_experts=2, num_clients=2, rank=2)
    root2 = math.sqrt(2.0)
    expected = [
        [_sigmoid(1 / root2), _sigmoid(-1 / root2)],
        [_sigmoid(-4 / root2), _sigmoid(4 / root2)],
    ]
    np.testing.assert_allclose(prefs[0], expected, rtol=1e-12)


def test_rows_are_distributions_over_clients() -> None:
    gen = torch.Generator().manual_seed(0)
    modules = ["a", "b", "c"]
    embeddings = {
        c: ClientEmbeddings(
            data={m: torch.randn(4, generator=gen) * 3 for m in modules},
            experts={
                m: {e: torch.randn(4, generator=gen) for e in range(c, 6, 2)} for m in modules
            },
        )
        for c in range(5)
    }
    prefs = expert_preferences(embeddings, modules, num_experts=6, num_clients=5, rank=4)
    assert prefs.shape == (3, 6, 5)
    assert (prefs > 0).all()
    np.testing.assert_allclose(prefs.sum(axis=2), 1.0, rtol=1e-12)


def test_expert_nobody_reported_gets_a_uniform_row() -> None:
    embeddings = {
        0: _emb({"q": [5.0, 0.0]}, {"q": {0: [1.0, 0.0]}}),
        1: _emb({"q": [-5.0, 0.0]}, {"q": {0: [1.0, 0.0]}}),
        2: _emb({"q": [0.0, 3.0]}, {}),
    }
    prefs = expert_preferences(embeddings, ["q"], num_experts=2, num_clients=3, rank=2)
    np.testing.assert_allclose(prefs[0, 1], [1 / 3, 1 / 3, 1 / 3])
    assert prefs[0, 0].argmax() == 0


def test_client_without_embeddings_gets_zero_logits() -> None:
    """Client 1 never reported: its logit is 0 for every expert, between 0's +1 and 2's -1."""
    embeddings = {
        0: _emb({"q": [1.0]}, {"q": {0: [1.0]}}),
        2: _emb({"q": [-1.0]}, {"q": {0: [1.0]}}),
    }
    prefs = expert_preferences(embeddings, ["q"], num_experts=1, num_clients=3, rank=1)
    weights = np.exp([1.0, 0.0, -1.0])
    np.testing.assert_allclose(prefs[0, 0], weights / weights.sum(), rtol=1e-12)


@pytest.mark.parametrize(
    ("embeddings", "message"),
    [
        ({0: _emb({"q": [1.0, 2.0, 3.0]}, {})}, "length r=2"),
        ({5: _emb({"q": [1.0, 2.0]}, {})}, "client index 5"),
        ({0: _emb({"q": [1.0, 2.0]}, {"q": {9: [1.0, 0.0]}})}, "expert id 9"),
    ],
)
def test_malformed_embeddings_are_rejected(
    embeddings: dict[int, ClientEmbeddings], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        expert_preferences(embeddings, ["q"], num_experts=2, num_clients=2, rank=2)


def test_assignment_follows_clear_preferences() -> None:
    """Expert 0 only likes client 0, expert 1 only client 1: each holds its favourite."""
    embeddings = {
        0: _emb({"q": [10.0, 0.0]}, {"q": {0: [10.0, 0.0], 1: [0.0, 10.0]}}),
        1: _emb({"q": [0.0, 10.0]}, {"q": {0: [10.0, 0.0], 1: [0.0, 10.0]}}),
    }
    prefs = expert_preferences(embeddings, ["q"], num_experts=2, num_clients=2, rank=2)
    assignment = solve_assignments(prefs, clients_per_expert=1, min_experts=1, max_experts=1)
    archs = architectures_from_assignment(assignment, ["q"])
    assert archs == [{"q": [0]}, {"q": [1]}]


def test_holder_preference_is_one_when_holders_are_the_favourites_and_zero_at_chance():
    clients = [0, 1, 2, 3]
    holders = {0: {"m": [0]}, 1: {"m": [0, 1]}, 2: {"m": [1]}, 3: {"m": []}}
    favourites = np.array([[[0.4, 0.4, 0.1, 0.1], [0.1, 0.4, 0.4, 0.1]]])
    assert holder_preference(favourites, ["m"], clients, holders) == pytest.approx(1.0)
    away = np.array([[[0.1, 0.1, 0.4, 0.4], [0.4, 0.1, 0.1, 0.4]]])
    assert holder_preference(away, ["m"], clients, holders) == pytest.approx(-1.0)
    chance = np.array([[[0.3, 0.2, 0.3, 0.2], [0.3, 0.2, 0.3, 0.2]]])  # holders avg = others avg
    assert holder_preference(chance, ["m"], clients, holders) == pytest.approx(0.0)


def test_held_mask_marks_each_clients_experts_in_its_column() -> None:
    holders = {7: {"q": [0, 2]}, 3: {"q": [1], "v": [2]}}
    held = held_mask(["q", "v"], 3, [3, 7, 9], holders)
    assert held.shape == (2, 3, 3)
    assert held[0].tolist() == [[0, 1, 0], [1, 0, 0], [0, 1, 0]]
    assert held[1].tolist() == [[0, 0, 0], [0, 0, 0], [1, 0, 0]]  # client 9 held nothing


def _solve_one_expert_row(row: list[float], holder: int) -> int:
    """Where one expert (k_c=1, no per-client floor) goes under the continuity objective."""
    prefs = np.array([[row]])
    held = np.zeros_like(prefs)
    held[0, 0, holder] = 1.0
    x = solve_assignments(with_continuity(prefs, held), 1, 0, 1)
    return int(np.flatnonzero(x[0, 0])[0])


def test_continuity_moves_an_expert_only_past_one_standard_deviation_of_its_row() -> None:
    for lead in np.linspace(0.0, 0.08, 17):  # how far client 0 beats the holder, client 1
        row = [0.25 + lead, 0.25, 0.20, 0.25]
        moves = lead > np.std(row)
        assert _solve_one_expert_row(row, holder=1) == (0 if moves else 1), (lead, np.std(row))
    assert solve_assignments(np.array([[[0.26, 0.25, 0.20, 0.25]]]), 1, 0, 1)[0, 0, 0]  # RSEA


def test_continuity_keeps_more_holders_than_rsea_on_near_uniform_scores() -> None:
    rng = np.random.default_rng(0)
    n_e, n_c = 30, 10
    prefs = 0.1 + 1e-3 * rng.standard_normal((4, n_e, n_c))
    prefs /= prefs.sum(axis=-1, keepdims=True)
    before = solve_assignments(rng.random((4, n_e, n_c)), 2, 2, 8)
    plain = solve_assignments(prefs, 2, 2, 8)
    sticky = solve_assignments(with_continuity(prefs, before.astype(float)), 2, 2, 8)
    assert (sticky & before).sum() > 2 * (plain & before).sum()
