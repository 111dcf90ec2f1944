"""RSEA assignment: our exact min-cost-flow solver against the paper's CVXPY + SCIP MILP.

Times one round's assignment (every module) for the paper's setting (10 clients, 30 experts,
60 modules, k_c = 2, k_min = 2, M = 8) and a large one (1,000 clients, 300 experts, 60 modules,
k_c = 10, k_min = 2, M = 8) on random softmax scores with a fixed seed. CVXPY + SCIP solves the
whole 10-client round and one module of the large one; the objectives must agree to 1e-6
(relative). Last line: `assignment speedup vs cvxpy+scip: X.X` (10-client round, wall time of
building and solving, both sides).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedamole.rsea.solver import solve_assignments


@dataclass(frozen=True)
class Setting:
    name: str
    num_clients: int
    num_experts: int
    modules: int
    clients_per_expert: int
    min_experts: int
    max_experts: int

    def describe(self) -> str:
        return (
            f"N_c={self.num_clients} N_e={self.num_experts} modules={self.modules} "
            f"k_c={self.clients_per_expert} k_min={self.min_experts} M={self.max_experts}"
        )

    def bounds(self) -> tuple[int, int, int]:
        return self.clients_per_expert, self.min_experts, self.max_experts


PAPER = Setting("paper round", 10, 30, 60, 2, 2, 8)
LARGE = Setting("large round", 1000, 300, 60, 10, 2, 8)


def softmax_scores(setting: Setting, seed: int, rank: int | None = None) -> np.ndarray:
    """Random (n_modules, N_e, N_c) preferences, softmax over clients like RSEA's P.

    rank=None: i.i.d. normal logits. rank=r: logits Eps T^T / sqrt(r) from normal embeddings,
    the low-rank structure real RSEA scores have.
    """
    rng = np.random.default_rng(seed)
    shape = (setting.modules, setting.num_experts, setting.num_clients)
    if rank is None:
        logits = rng.normal(size=shape)
    else:
        eps = rng.normal(size=(setting.modules, setting.num_experts, rank))
        data = rng.normal(size=(setting.modules, rank, setting.num_clients))
        logits = eps @ data / np.sqrt(rank)
    weights = np.exp(logits - logits.max(axis=2, keepdims=True))
    return weights / weights.sum(axis=2, keepdims=True)


def cvxpy_scip(scores: np.ndarray, k_c: int, k_min: int, m_max: int) -> np.ndarray:
    """The paper's formulation: boolean X, maximise sum P*X under the three constraints."""
    import cvxpy as cp

    x = cp.Variable(scores.shape, boolean=True)
    constraints = [cp.sum(x, axis=1) == k_c, cp.sum(x, axis=0) >= k_min]
    constraints.append(cp.sum(x, axis=0) <= m_max)
    problem = cp.Problem(cp.Maximize(cp.sum(cp.multiply(scores, x))), constraints)
    problem.solve(solver=cp.SCIP)
    if problem.status != cp.OPTIMAL:
        raise RuntimeError(f"SCIP ended with status {problem.status}")
    return np.round(x.value).astype(bool)


@dataclass(frozen=True)
class Timing:
    wall: float  # median seconds of wall time
    cpu: float  # median seconds of this process's CPU time

    def show(self, scale: float = 1.0, unit: str = "s") -> str:
        return f"{self.wall * scale:.2f} {unit} wall, {self.cpu * scale:.2f} {unit} CPU"


def timed(fn: Callable[[], np.ndarray], repeats: int) -> tuple[np.ndarray, Timing]:
    """Result and median wall / CPU time over repeats (CPU time is less hurt by a busy machine)."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return result, Timing(statistics.median(walls), statistics.median(cpus))


def objectives(scores: np.ndarray, x: np.ndarray) -> np.ndarray:
    return (scores * x).sum(axis=(-2, -1))


def check_same_objective(ours: np.ndarray, scip: np.ndarray, what: str) -> float:
    """Largest relative difference; fails the run above 1e-6."""
    rel = float(np.max(np.abs(ours - scip) / np.maximum(np.abs(scip), 1e-12)))
    status = "OK" if rel <= 1e-6 else "MISMATCH"
    print(f"  objective check ({what}): max relative difference {rel:.2e} [{status}]")
    if rel > 1e-6:
        raise SystemExit(f"objectives differ for {what}")
    return rel


def scip_available() -> bool:
    # CVXPY warns about every solver that fails to import while probing them at import time;
    # highspy does once OR-Tools (which bundles its own HiGHS) is loaded. Only SCIP matters.
    logging.getLogger("__cvxpy__").addFilter(lambda r: "importing solver" not in r.getMessage())
    try:
        import cvxpy as cp
        import pyscipopt  # noqa: F401
    except ImportError:
        return False
    return cp.SCIP in cp.installed_solvers()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of our solver")
    args = parser.parse_args()
    if not scip_available():
        print(
            "cvxpy with SCIP is needed for the comparison: pip install -e '.[bench]' "
            "(installs cvxpy and pyscipopt)",
            file=sys.stderr,
        )
        return 2

    print(
        f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print(f"scores: random softmax over clients, seed {args.seed}; ours: median of {args.repeats}")

    print(f"{PAPER.name}: {PAPER.describe()}")
    scores = softmax_scores(PAPER, args.seed)
    ours_x, ours = timed(lambda: solve_assignments(scores, *PAPER.bounds()), args.repeats)
    scip_x, scip = timed(lambda: np.stack([cvxpy_scip(s, *PAPER.bounds()) for s in scores]), 1)
    check_same_objective(objectives(scores, ours_x), objectives(scores, scip_x), PAPER.name)
    print(f"  ours (min-cost flow, all {PAPER.modules} modules): {ours.show(1e3, 'ms')}")
    print(f"  cvxpy+scip (all {PAPER.modules} modules): {scip.show(1e3, 'ms')}")
    speedup = scip.wall / ours.wall

    print(f"{LARGE.name}: {LARGE.describe()}")
    scores = softmax_scores(LARGE, args.seed)
    ours_x, ours = timed(lambda: solve_assignments(scores, *LARGE.bounds()), args.repeats)
    print(f"  ours (all {LARGE.modules} modules, 1 process): {ours.show()}")
    scip_x, scip = timed(lambda: cvxpy_scip(scores[0], *LARGE.bounds()), 1)
    check_same_objective(
        objectives(scores[0], ours_x[0]), objectives(scores[0], scip_x), "module 0"
    )
    print(f"  cvxpy+scip (module 0 only): {scip.show()}")
    print(f"  ours per module: {ours.wall / LARGE.modules:.3f} s wall")

    low_rank = softmax_scores(LARGE, args.seed, rank=8)
    _, low = timed(lambda: solve_assignments(low_rank, *LARGE.bounds()), 1)
    print(f"  ours on rank-8 softmax scores (all modules, 1 process, 1 run): {low.show()}")

    print(f"assignment speedup vs cvxpy+scip: {speedup:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
