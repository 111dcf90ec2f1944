"""The RSEA assignment solver is exact: it matches brute force / a MILP on random instances."""

from __future__ import annotations

import itertools
import math
import re
from unittest.mock import patch

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import Bounds, LinearConstraint, milp

from fedamole.rsea import solver
from fedamole.rsea.solver import (
    InfeasibleAssignmentError,
    architectures_from_assignment,
    check_feasibility,
    homogeneous_bounds,
    random_assignment,
    solve_assignments,
    validate_assignment,
)


def solve_one(scores: np.ndarray, k_c: int, k_min: int, m_max: int) -> np.ndarray:
    """The solver on one module: scores (N_e, N_c) -> bool X (N_e, N_c)."""
    return solve_assignments(np.asarray(scores)[None], k_c, k_min, m_max)[0]


def _brute_force(scores: np.ndarray, k_c: int, k_min: int, m_max: int) -> float:
    """Best objective over every X whose rows pick exactly k_c clients."""
    n_e, n_c = scores.shape
    rows = [np.isin(np.arange(n_c), combo) for combo in itertools.combinations(range(n_c), k_c)]
    best = -math.inf
    for pick in itertools.product(range(len(rows)), repeat=n_e):
        x = np.array([rows[i] for i in pick])
        loads = x.sum(axis=0)
        if loads.min() >= k_min and loads.max() <= m_max:
            best = max(best, float((scores * x).sum()))
    return best


def _milp(scores: np.ndarray, k_c: int, k_min: int, m_max: int) -> float:
    """The paper's formulation with integrality, solved by HiGHS branch and bound.

    Scores are scaled up so that HiGHS' absolute tolerances (1e-7) do not hide small differences.
    """
    n_e, n_c = scores.shape
    rows = np.kron(np.eye(n_e), np.ones((1, n_c)))
    cols = np.kron(np.ones((1, n_e)), np.eye(n_c))
    scale = 1e6 / max(float(np.abs(scores).max()), 1e-300)
    result = milp(
        -scale * scores.ravel(),
        constraints=[LinearConstraint(rows, k_c, k_c), LinearConstraint(cols, k_min, m_max)],
        integrality=np.ones(n_e * n_c),
        bounds=Bounds(0, 1),
        options={"mip_rel_gap": 0.0},
    )
    assert result.success, result.message
    return float((scores.ravel() * np.round(result.x)).sum())


def _optimum(scores: np.ndarray, k_c: int, k_min: int, m_max: int) -> float:
    n_e, n_c = scores.shape
    if math.comb(n_c, k_c) ** n_e <= 5000:
        return _brute_force(scores, k_c, k_min, m_max)
    return _milp(scores, k_c, k_min, m_max)


@st.composite
def instances(draw: st.DrawFn) -> tuple[np.ndarray, int, int, int]:
    """A feasible (scores, k_c, k_min, M); scores on a coarse grid so that ties are common."""
    n_c = draw(st.integers(2, 5))
    n_e = draw(st.integers(2, 6))
    k_c = draw(st.integers(1, n_c))
    k_min = draw(st.integers(0, n_e * k_c // n_c))
    m_max = draw(st.integers(max(1, k_min, -(-n_e * k_c // n_c)), n_e + 1))
    grid = draw(st.sampled_from([4, 1000]))
    values = draw(st.lists(st.integers(0, grid), min_size=n_e * n_c, max_size=n_e * n_c))
    return np.array(values, dtype=float).reshape(n_e, n_c) / grid, k_c, k_min, m_max


@settings(max_examples=60, deadline=None)
@given(instances())
def test_objective_is_optimal(instance: tuple[np.ndarray, int, int, int]) -> None:
    scores, k_c, k_min, m_max = instance
    x = solve_one(scores, k_c, k_min, m_max)
    assert x.dtype == bool and x.shape == scores.shape
    validate_assignment(x, k_c, k_min, m_max)
    assert (scores * x).sum() == pytest.approx(_optimum(scores, k_c, k_min, m_max), abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(instances())
def test_column_generation_from_a_poor_start_is_optimal(
    instance: tuple[np.ndarray, int, int, int],
) -> None:
    """Start from the round-robin arcs only, so every optimum must come from the certificate."""
    scores, k_c, k_min, m_max = instance
    n_e, n_c = scores.shape
    poor = solver._round_robin(n_e, n_c, k_c)

    def poor_start(batch: np.ndarray, *_: int) -> np.ndarray:
        return np.broadcast_to(poor, batch.shape).copy()

    with patch.object(solver, "_candidates", poor_start):
        x = solve_one(scores, k_c, k_min, m_max)
    validate_assignment(x, k_c, k_min, m_max)
    assert (scores * x).sum() == pytest.approx(_optimum(scores, k_c, k_min, m_max), abs=1e-9)


@pytest.mark.parametrize("sharpness", [0.1, 1.0, 4.0])
def test_sparse_path_matches_milp_on_larger_low_rank_scores(sharpness: float) -> None:
    """40 experts x 120 clients takes the sparse candidate path; low-rank softmax scores are what
    RSEA produces and need several certificate rounds."""
    rng = np.random.default_rng(7)
    logits = sharpness * rng.normal(size=(2, 40, 4)) @ rng.normal(size=(2, 4, 120))
    scores = np.exp(logits - logits.max(axis=2, keepdims=True))
    scores /= scores.sum(axis=2, keepdims=True)
    assert solver._candidates(scores, 3, 1) is not None
    x = solve_assignments(scores, 3, 1, 4)
    validate_assignment(x, 3, 1, 4)
    for module in range(2):
        expected = _milp(scores[module], 3, 1, 4)
        assert (scores[module] * x[module]).sum() == pytest.approx(expected, rel=1e-9)


def test_modules_are_solved_independently() -> None:
    rng = np.random.default_rng(3)
    scores = rng.random((5, 6, 4))
    batch = solve_assignments(scores, 2, 2, 4)
    for module in range(5):
        single = solve_one(scores[module], 2, 2, 4)
        assert (scores[module] * batch[module]).sum() == pytest.approx(
            (scores[module] * single).sum(), abs=1e-12
        )


def test_every_expert_takes_its_favourites_when_unconstrained() -> None:
    scores = np.array([[0.9, 0.1, 0.0], [0.0, 0.2, 0.8]])
    x = solve_one(scores, 1, 0, 2)
    np.testing.assert_array_equal(x, [[True, False, False], [False, False, True]])


def test_lower_bound_forces_a_client_in() -> None:
    """Both experts prefer client 0, but client 1 must get one expert: the cheaper move wins."""
    scores = np.array([[0.9, 0.1], [0.6, 0.5]])
    x = solve_one(scores, 1, 1, 1)
    np.testing.assert_array_equal(x, [[True, False], [False, True]])


_KEYS = (
    "federation.num_clients",
    "hmole.num_experts",
    "rsea.clients_per_expert",
    "rsea.min_experts",
    "rsea.max_experts",
)
_FIX = re.compile(r"(federation\.num_clients|hmole\.num_experts|rsea\.\w+)=(\d+)")


def _suggested_settings(message: str, args: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Every `key=value` fix in an error message, applied to args (in check_feasibility order)."""
    fixes = []
    for key, value in _FIX.findall(message):
        settings_ = dict(zip(_KEYS, args, strict=True)) | {key: int(value)}
        fixes.append(tuple(settings_.values()))
    return fixes


@pytest.mark.parametrize(
    ("args", "inequality", "fix"),
    [
        ((10, 8, 2, 2, 8), "10 * 2 = 20 > 8 * 2 = 16", "hmole.num_experts=10"),
        ((4, 30, 2, 2, 8), "30 * 2 = 60 > 4 * 8 = 32", "rsea.max_experts=15"),
        ((3, 8, 5, 2, 8), "5 > 3", "rsea.clients_per_expert=3"),
    ],
)
def test_infeasible_settings_name_the_inequality_and_a_fix(
    args: tuple[int, ...], inequality: str, fix: str
) -> None:
    with pytest.raises(InfeasibleAssignmentError) as info:
        check_feasibility(*args)
    assert inequality in str(info.value)
    assert fix in str(info.value)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 12), st.integers(1, 12), st.integers(1, 6), st.integers(0, 6), st.integers(1, 9)
)
def test_feasibility_check_matches_the_solver_and_fixes_work(
    n_c: int, n_e: int, k_c: int, k_min: int, m_max: int
) -> None:
    """Settings pass the check iff an assignment exists; every suggested fix really works."""
    args = (n_c, n_e, k_c, k_min, m_max)
    scores = np.zeros((n_e, n_c))
    if k_c <= n_c and n_c * k_min <= n_e * k_c <= n_c * m_max:
        check_feasibility(*args)
        validate_assignment(solve_one(scores, k_c, k_min, m_max), k_c, k_min, m_max)
        return
    with pytest.raises(InfeasibleAssignmentError) as info:
        check_feasibility(*args)
    with pytest.raises(InfeasibleAssignmentError):
        solve_one(scores, k_c, k_min, m_max)
    for fixed in _suggested_settings(str(info.value), args):
        check_feasibility(*fixed)


def test_random_assignment_is_reproducible_from_the_seed() -> None:
    first = random_assignment(3, 8, 5, 2, 2, 4, np.random.default_rng(11))
    again = random_assignment(3, 8, 5, 2, 2, 4, np.random.default_rng(11))
    other = random_assignment(3, 8, 5, 2, 2, 4, np.random.default_rng(12))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    validate_assignment(first, 2, 2, 4)


def test_homogeneous_gives_every_client_the_same_number_of_experts() -> None:
    k_min, m_max = homogeneous_bounds(30, 10, 2, min_experts=2)
    assert (k_min, m_max) == (6, 6)
    x = random_assignment(4, 30, 10, 2, k_min, m_max, np.random.default_rng(0))
    assert (x.sum(axis=1) == 6).all()


def test_homogeneous_rejects_indivisible_settings_with_working_fixes() -> None:
    with pytest.raises(InfeasibleAssignmentError) as info:
        homogeneous_bounds(30, 7, 2)
    message = str(info.value)
    assert "30 * 2 = 60 not divisible by 7" in message
    assert "hmole.num_experts=28 or 35" in message
    assert "rsea.clients_per_expert=7" in message
    assert "federation.num_clients=6" in message
    assert homogeneous_bounds(28, 7, 2) == (8, 8)
    assert homogeneous_bounds(30, 7, 7) == (30, 30)
    assert homogeneous_bounds(30, 6, 2) == (10, 10)


def test_homogeneous_rejects_too_few_experts_per_client() -> None:
    with pytest.raises(InfeasibleAssignmentError, match="hmole.num_experts=10"):
        homogeneous_bounds(5, 10, 2, min_experts=2)
    assert homogeneous_bounds(10, 10, 2, min_experts=2) == (2, 2)


@pytest.mark.parametrize(
    ("x", "message"),
    [
        ([[1, 1, 0], [0, 1, 0]], "expert"),
        ([[1, 0, 0], [1, 0, 0]], "client"),
        ([[0.5, 0.5, 0], [0, 1, 0]], "0/1"),
    ],
)
def test_validate_assignment_rejects_broken_assignments(x: list, message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        validate_assignment(np.array(x), 1, 0, 1)


def test_scores_with_nan_are_rejected() -> None:
    with pytest.raises(ValueError, match="NaN"):
        solve_one(np.array([[np.nan, 0.0], [0.0, 1.0]]), 1, 0, 2)


def test_architectures_list_sorted_experts_per_client_and_module() -> None:
    x = np.zeros((2, 3, 2), dtype=bool)
    x[0, 2, 0] = x[0, 0, 0] = x[0, 1, 1] = True
    x[1, 1, 0] = x[1, 2, 1] = True
    assert architectures_from_assignment(x, ["q", "v"]) == [
        {"q": [0, 2], "v": [1]},
        {"q": [1], "v": [2]},
    ]
