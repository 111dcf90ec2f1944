"""What RSEA did in a round, as a few numbers the run records (metrics.jsonl, one server record
per round) and plots: how peaked the experts' preferences P are, how much of the assignment
changed, and, where clients carry a known group, whether same-group clients share more experts.

A uniform P (max/min ratio 1, normalised entropy 1) means the experts have no preference and the
solver is ranking noise-level differences; a high churn means clients keep receiving experts that
others trained.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np

from fedamole.types import Architecture


def score_diagnostics(scores: np.ndarray) -> dict[str, float]:
    """Spread of P (n_modules, N_e, N_c) along the client axis, summarised over every row."""
    rows = scores.reshape(-1, scores.shape[-1])
    n_c = rows.shape[1]
    ratio = rows.max(axis=1) / np.maximum(rows.min(axis=1), np.finfo(float).tiny)
    entropy = -(rows * np.log(np.maximum(rows, np.finfo(float).tiny))).sum(axis=1)
    return {
        "rsea_p_max_over_min_median": float(np.median(ratio)),
        "rsea_p_max_over_min_p90": float(np.percentile(ratio, 90)),
        "rsea_p_entropy_norm_mean": float(entropy.mean() / math.log(n_c)) if n_c > 1 else 0.0,
        "rsea_p_max_median": float(np.median(rows.max(axis=1))),
        "rsea_p_uniform": 1.0 / n_c,
    }


def holder_preference(
    scores: np.ndarray,
    modules: Sequence[str],
    clients: Sequence[int],
    holders: Mapping[int, Architecture],
) -> float:
    """How much each expert prefers the clients that held (and trained) it this round over the
    other clients, scaled by the spread of its row of P and averaged over experts: 1 = its holders
    are its favourites, 0 = no more than any other client (nothing keeps an expert with the
    clients that trained it, so the next assignment can move it anywhere), < 0 = it moves away."""
    column = {client: i for i, client in enumerate(clients)}
    gaps = []
    for m, module in enumerate(modules):
        for e, row in enumerate(scores[m]):
            held = [column[c] for c, a in holders.items() if c in column and e in a.get(module, [])]
            others = np.setdiff1d(np.arange(len(clients)), held)
            spread = row.max() - row.min()
            if held and others.size and spread > 0:
                gaps.append((row[held].mean() - row[others].mean()) / spread)
    return float(np.mean(gaps)) if gaps else math.nan


def _slots(arch: Architecture) -> set[tuple[str, int]]:
    return {(module, e) for module, experts in arch.items() for e in experts}


def assignment_change(
    before: Mapping[int, Architecture], after: Mapping[int, Architecture]
) -> float:
    """Share of the (module, expert) slots held after that were not held before, over the
    clients present in both rounds (0 = nothing changed, 1 = every expert replaced)."""
    common = sorted(set(before) & set(after))
    new = sum(len(_slots(after[c]) - _slots(before[c])) for c in common)
    total = sum(len(_slots(after[c])) for c in common)
    return new / total if total else 0.0


def common_experts(a: Architecture, b: Architecture) -> float:
    """Experts two clients share, averaged over modules."""
    return float(np.mean([len(set(a[m]) & set(b.get(m, []))) for m in a]))


def group_overlap(
    architectures: Mapping[int, Architecture], groups: Sequence[int]
) -> tuple[float, float]:
    """(mean common experts of same-group pairs, of different-group pairs); NaN when a kind of
    pair does not occur among these clients."""
    within, across = [], []
    for a, b in itertools.combinations(sorted(architectures), 2):
        shared = common_experts(architectures[a], architectures[b])
        (within if groups[a] == groups[b] else across).append(shared)
    return (
        float(np.mean(within)) if within else math.nan,
        float(np.mean(across)) if across else math.nan,
    )


def assignment_diagnostics(
    before: Mapping[int, Architecture],
    after: Mapping[int, Architecture],
    groups: Sequence[int] | None,
) -> dict[str, float]:
    """Churn of the assignment and, with known client groups, overlap within vs across groups."""
    out = {"rsea_assignment_change": assignment_change(before, after)}
    if groups is not None:
        within, across = group_overlap(after, groups)
        pairs = {"rsea_common_experts_within_groups": within, "rsea_common_experts_across": across}
        out |= {name: value for name, value in pairs.items() if not math.isnan(value)}
    return out
