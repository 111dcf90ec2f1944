"""The hierarchical bootstrap: point estimates, degenerate intervals, pairing and coverage."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedamole.stats import Estimate, bootstrap_difference, bootstrap_mean


def _scores(rng: np.random.Generator, seeds: int = 3, clients: int = 6, examples: int = 20):
    """Per-example scores in [0, 1] with real spread between clients and examples."""
    return {
        seed: [rng.uniform(0.0, 1.0, size=examples) for _ in range(clients)]
        for seed in range(seeds)
    }


def _plain_mean(scores) -> float:
    """Mean over seeds of the mean over clients of each client's mean, with the stdlib."""
    per_seed = [
        math.fsum(math.fsum(c) / len(c) for c in clients) / len(clients)
        for clients in scores.values()
    ]
    return math.fsum(per_seed) / len(per_seed)


def test_point_estimate_is_the_plain_mean_and_lies_inside_the_interval():
    scores = _scores(np.random.default_rng(0))
    estimate = bootstrap_mean(scores, replicates=2000)
    assert estimate.mean == pytest.approx(_plain_mean(scores), abs=1e-12)
    assert estimate.low < estimate.mean < estimate.high
    assert (estimate.level, estimate.replicates) == (0.95, 2000)


def test_ragged_clients_weigh_equally_whatever_their_size():
    scores = {7: [[1.0], [0.0, 0.0, 0.0, 0.0], [0.5, 0.25]]}
    estimate = bootstrap_mean(scores, replicates=500)
    assert estimate.mean == pytest.approx((1.0 + 0.0 + 0.375) / 3)
    assert 0.0 <= estimate.low < estimate.high <= 1.0


def test_constant_scores_collapse_the_interval_to_the_point():
    scores = {seed: [np.full(n, 0.5) for n in (3, 8, 5)] for seed in (1, 2)}
    estimate = bootstrap_mean(scores, replicates=500)
    assert estimate.mean == estimate.low == estimate.high == 0.5


def test_a_method_minus_itself_is_exactly_zero():
    scores = _scores(np.random.default_rng(1))
    difference = bootstrap_difference(scores, scores, replicates=500)
    assert difference.mean == difference.low == difference.high == 0.0
    assert difference.includes_zero


def test_pairing_removes_the_noise_that_both_methods_share():
    """A beats B by 0.1 on every example: paired, the gap is 0.1 with no width, although each
    method's own interval is wide enough that the two unpaired intervals overlap."""
    b = _scores(np.random.default_rng(2), seeds=1, clients=5, examples=8)
    a = {seed: [client + 0.1 for client in clients] for seed, clients in b.items()}
    difference = bootstrap_difference(a, b, replicates=2000)
    assert difference.mean == pytest.approx(0.1, abs=1e-12)
    assert difference.high - difference.low == pytest.approx(0.0, abs=1e-12)
    assert not difference.includes_zero
    alone_a, alone_b = bootstrap_mean(a, replicates=2000), bootstrap_mean(b, replicates=2000)
    assert alone_a.low < alone_b.high


def test_difference_mean_is_the_difference_of_means():
    rng = np.random.default_rng(3)
    a, b = _scores(rng), _scores(rng)
    difference = bootstrap_difference(a, b, replicates=500)
    assert difference.mean == pytest.approx(_plain_mean(a) - _plain_mean(b), abs=1e-12)


def test_the_same_seed_gives_the_same_interval():
    scores = _scores(np.random.default_rng(4))
    assert bootstrap_mean(scores, seed=5) == bootstrap_mean(scores, seed=5)
    assert bootstrap_mean(scores, seed=5) != bootstrap_mean(scores, seed=6)


def test_includes_zero():
    assert Estimate(0.1, -0.01, 0.2, 0.95, 10).includes_zero
    assert Estimate(0.0, 0.0, 0.0, 0.95, 10).includes_zero
    assert not Estimate(0.1, 0.01, 0.2, 0.95, 10).includes_zero
    assert not Estimate(-0.1, -0.2, -0.01, 0.95, 10).includes_zero


def test_intervals_cover_the_true_mean_about_95_percent_of_the_time():
    """200 synthetic comparisons drawn from a known model (client effects plus example noise,
    3 seeds, 8 ragged clients). Coverage must lie within 3 binomial standard deviations of the
    nominal 95 %; the generator and bootstrap seeds are fixed, so the test is deterministic."""
    true_mean, datasets = 0.5, 200
    rng = np.random.default_rng(2024)
    covered = 0
    for k in range(datasets):
        scores = {
            seed: [
                rng.normal(rng.normal(true_mean, 0.3), 1.0, size=rng.integers(15, 31))
                for _ in range(8)
            ]
            for seed in range(3)
        }
        estimate = bootstrap_mean(scores, replicates=1000, seed=k)
        covered += estimate.low <= true_mean <= estimate.high
    sd = math.sqrt(0.95 * 0.05 / datasets)
    assert 0.95 - 3 * sd <= covered / datasets <= 0.95 + 3 * sd


def test_mismatched_example_counts_name_the_seed_and_client():
    a = {42: [[0.1, 0.2], [0.3, 0.4, 0.5]], 62: [[0.1], [0.2]]}
    b = {42: [[0.1, 0.2], [0.3, 0.4]], 62: [[0.1], [0.2]]}
    with pytest.raises(ValueError, match=r"seed 42, client 1 has 3 vs 2 test examples"):
        bootstrap_difference(a, b)


def test_mismatched_clients_or_seeds_are_named():
    a = {42: [[0.1], [0.2]]}
    with pytest.raises(ValueError, match=r"seed 42 has 2 vs 1 clients"):
        bootstrap_difference(a, {42: [[0.1]]})
    with pytest.raises(ValueError, match=r"seeds differ \(\[42\] vs \[62\]\)"):
        bootstrap_difference(a, {62: [[0.1], [0.2]]})


@pytest.mark.parametrize(
    ("scores", "message"),
    [
        ({}, "no seeds"),
        ({1: []}, "seed 1 has no clients"),
        ({1: [[0.5], []]}, "seed 1, client 1: no test examples"),
        ({1: [[0.5, float("nan")]]}, "seed 1, client 0: scores must be finite"),
        ({1: [[[0.5]]]}, r"seed 1, client 0: expected one score per example \(1-D\)"),
    ],
)
def test_bad_scores_are_named(scores, message):
    with pytest.raises(ValueError, match=message):
        bootstrap_mean(scores)


@pytest.mark.parametrize(("replicates", "level"), [(0, 0.95), (100, 1.0), (100, 0.0)])
def test_bad_settings_are_refused(replicates, level):
    with pytest.raises(ValueError, match="replicates|level"):
        bootstrap_mean({1: [[0.5]]}, replicates=replicates, level=level)
