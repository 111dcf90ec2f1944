"""Exact solver for the RSEA expert-to-client assignment problem (SPEC 4).

Per module: maximise sum P[e, c] X[e, c] over X in {0, 1}^(N_e x N_c) such that every expert
(row) picks exactly k_c clients and every client (column) gets between k_min and M experts.

This is a bipartite b-matching, i.e. a min-cost flow problem: expert e supplies k_c units, arc
e -> c has capacity 1 and cost -P[e, c], client c must absorb k_min units and may pass up to
M - k_min more on to a sink T. Network flow problems with integer data have integral optima, so
the flow solver returns the exact 0/1 optimum that the paper obtains with a MILP (CVXPY + SCIP).

Speed on large instances comes from column generation on a sparse candidate graph: solve on the
arcs each expert and each client prefers most, then read node potentials (LP duals) off the
residual graph and check the reduced cost of *every* arc left out. If none is negative, the
potentials prove that the sparse optimum is optimal on the full graph; otherwise the best few
left-out arcs of every node with a negative one are added and the flow is solved again. The
result is exact, never heuristic. Small modules are solved whole, many at once.

Scores are turned into int64 costs with 2**40 steps over each module's score range (per-row
shifts do not change the optimum since each row has exactly k_c ones), so the objective returned
is within N_e * k_c * range / 2**40 of the real-valued optimum: about 1e-12 of the score range
per assigned pair, far below what an LP solver's tolerances (~1e-7) guarantee.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from ortools.graph.python import min_cost_flow

from fedamole.errors import UserError

# Modules solved as one flow problem hold at most this many scores: batching saves per-call
# overhead on small modules, but a flow problem costs more than linearly in its size, so a
# 1,000-client x 300-expert module is best solved alone (60 such modules of rank-8 scores, as in
# benchmarks/assignment.py: 1.8 s, against 2.4 s in batches of 4,000,000 scores; 2 CPUs).
_CHUNK_ENTRIES = 300_000
# candidate arcs, in units of k_c per expert and of max(k_min, 1) per client (tuned by benchmark)
_INITIAL_PER_EXPERT, _INITIAL_PER_CLIENT = 3, 8
_ADDED_PER_EXPERT, _ADDED_PER_CLIENT = 1, 2
_FLOOR = np.iinfo(np.int64).min // 2  # reduced gain marking arcs already in the flow problem


class InfeasibleAssignmentError(UserError, ValueError):
    """No assignment satisfies the RSEA constraints; the message says which setting to change."""


def _nearest(key: str, value: int, lo: float, hi: float) -> str | None:
    """`key=v` for the valid integer v in [lo, hi] closest to value, or None if there is none."""
    lo_i = math.ceil(lo)
    hi_i = math.floor(hi) if math.isfinite(hi) else max(value, lo_i)
    if lo_i > hi_i:
        return None
    return f"{key}={min(max(value, lo_i), hi_i)}"


def _suggest(n_c: int, n_e: int, k_c: int, k_min: int, m_max: int) -> list[str]:
    """One-key changes after which every feasibility inequality holds."""
    fits_c = k_c <= n_c
    options = [
        _nearest("hmole.num_experts", n_e, max(1, n_c * k_min / k_c), n_c * m_max / k_c)
        if fits_c
        else None,
        _nearest(
            "rsea.clients_per_expert", k_c, max(1, n_c * k_min / n_e), min(n_c, n_c * m_max / n_e)
        ),
        _nearest("rsea.min_experts", k_min, 1, min(m_max, n_e * k_c / n_c))
        if fits_c and n_e * k_c <= n_c * m_max
        else None,
        _nearest("rsea.max_experts", m_max, max(1, n_e * k_c / n_c), math.inf)
        if fits_c and n_c * k_min <= n_e * k_c
        else None,
        _nearest(
            "federation.num_clients",
            n_c,
            max(k_c, n_e * k_c / m_max),
            n_e * k_c / k_min if k_min > 0 else math.inf,
        ),
    ]
    return [o for o in options if o is not None]


def check_feasibility(
    num_clients: int, num_experts: int, clients_per_expert: int, min_experts: int, max_experts: int
) -> None:
    """Reject settings with no valid assignment, before any training starts (SPEC 4).

    Feasible iff N_c * k_min <= N_e * k_c <= N_c * M and k_c <= N_c (a round-robin assignment
    proves sufficiency). The error names the failing inequality and one-key fixes.
    """
    n_c, n_e, k_c, k_min, m_max = (
        num_clients,
        num_experts,
        clients_per_expert,
        min_experts,
        max_experts,
    )
    if n_c < 1 or n_e < 1 or k_c < 1 or k_min < 0 or m_max < 1:
        raise InfeasibleAssignmentError(
            "RSEA needs federation.num_clients, hmole.num_experts, rsea.clients_per_expert and "
            f"rsea.max_experts >= 1 and rsea.min_experts >= 0, got {n_c}, {n_e}, {k_c}, "
            f"{m_max} and {k_min}"
        )
    failures = []
    if k_c > n_c:
        failures.append(
            f"rsea.clients_per_expert <= federation.num_clients fails: {k_c} > {n_c} "
            "(an expert cannot pick more clients than exist)"
        )
    if n_c * k_min > n_e * k_c:
        failures.append(
            "federation.num_clients * rsea.min_experts <= hmole.num_experts * "
            f"rsea.clients_per_expert fails: {n_c} * {k_min} = {n_c * k_min} > "
            f"{n_e} * {k_c} = {n_e * k_c} (too few expert slots to give every client k_min)"
        )
    if n_e * k_c > n_c * m_max:
        failures.append(
            "hmole.num_experts * rsea.clients_per_expert <= federation.num_clients * "
            f"rsea.max_experts fails: {n_e} * {k_c} = {n_e * k_c} > {n_c} * {m_max} = "
            f"{n_c * m_max} (too many expert slots for clients capped at M experts)"
        )
    if not failures:
        return
    fixes = _suggest(n_c, n_e, k_c, k_min, m_max)
    hint = (
        "Any one of these fixes it: " + ", ".join(fixes)
        if fixes
        else "No single-key change fixes it; change several of the keys above"
    )
    raise InfeasibleAssignmentError(
        "infeasible RSEA expert assignment: "
        + "; ".join(failures)
        + f". {hint} (rsea.min_experts defaults to hmole.top_k)"
    )


def homogeneous_bounds(
    num_experts: int, num_clients: int, clients_per_expert: int, min_experts: int = 1
) -> tuple[int, int]:
    """(k_min, M) for FedAMoLE-H: every client holds exactly n = N_e * k_c / N_c experts.

    Raises when N_e * k_c is not divisible by N_c, when k_c > N_c, or when n < min_experts (the
    router's top-k needs that many), naming settings that would work.
    """
    n_e, n_c, k_c = num_experts, num_clients, clients_per_expert
    if n_e < 1 or n_c < 1 or k_c < 1 or k_c > n_c:
        raise InfeasibleAssignmentError(
            f"homogeneous RSEA needs 1 <= rsea.clients_per_expert ({k_c}) <= "
            f"federation.num_clients ({n_c}) and hmole.num_experts ({n_e}) >= 1"
        )
    step_e = n_c // math.gcd(n_c, k_c)  # N_e must be a multiple of this
    if (n_e * k_c) % n_c:
        step_k = n_c // math.gcd(n_c, n_e)  # k_c must be a multiple of this (it divides N_c)
        below_e = max(step_e, n_e // step_e * step_e)
        near_k = min(max(step_k, round(k_c / step_k) * step_k), n_c)
        divisors = [d for d in range(k_c, n_e * k_c + 1) if (n_e * k_c) % d == 0]
        near_c = min(divisors, key=lambda d: (abs(d - n_c), d))
        raise InfeasibleAssignmentError(
            "homogeneous RSEA (rsea.mode=homogeneous) needs hmole.num_experts * "
            "rsea.clients_per_expert divisible by federation.num_clients, got "
            f"{n_e} * {k_c} = {n_e * k_c} not divisible by {n_c}. Any one of these fixes it: "
            f"hmole.num_experts={below_e} or {below_e + step_e}, "
            f"rsea.clients_per_expert={near_k}, federation.num_clients={near_c}"
        )
    n = n_e * k_c // n_c
    if n < min_experts:
        enough_e = -(-math.ceil(min_experts * n_c / k_c) // step_e) * step_e
        raise InfeasibleAssignmentError(
            f"homogeneous RSEA gives every client {n_e} * {k_c} / {n_c} = {n} experts, fewer "
            f"than the required {min_experts} (rsea.min_experts, default hmole.top_k): set "
            f"hmole.num_experts={enough_e} or lower rsea.min_experts / hmole.top_k"
        )
    return n, n


def validate_assignment(x: np.ndarray, k_c: int, k_min: int, m_max: int) -> None:
    """Assert that x (..., N_e, N_c) is 0/1 and meets every RSEA constraint."""
    values = np.asarray(x)
    if values.dtype != bool and not ((values == 0) | (values == 1)).all():
        raise AssertionError("assignment is not 0/1 valued")
    rows = values.sum(axis=-1)
    cols = values.sum(axis=-2)
    if (rows != k_c).any():
        bad = np.argwhere(rows != k_c)[0]
        raise AssertionError(
            f"expert {tuple(bad)} picks {rows[tuple(bad)]} clients, expected exactly {k_c}"
        )
    if ((cols < k_min) | (cols > m_max)).any():
        bad = np.argwhere((cols < k_min) | (cols > m_max))[0]
        raise AssertionError(
            f"client {tuple(bad)} gets {cols[tuple(bad)]} experts, expected {k_min}..{m_max}"
        )


def _integer_costs(scores: np.ndarray) -> np.ndarray:
    """Scores (n, N_e, N_c) -> int64 gains in [0, steps] per module (row shifts are free).

    steps is 2**40 unless the flow graph is so large that OR-Tools' internal cost scaling by
    (nodes + 1) could overflow int64.
    """
    n, n_e, n_c = scores.shape
    steps = float(min(2**40, 2**62 // (n * (n_e + n_c + 1) + 1)))
    gains = scores - scores.min(axis=2, keepdims=True)
    span = gains.max(axis=(1, 2), keepdims=True)
    span[span == 0] = 1.0
    return np.rint(gains * (steps / span)).astype(np.int64)


def _round_robin(n_e: int, n_c: int, k_c: int) -> np.ndarray:
    """A feasible assignment: slot e*k_c + j goes to client (e*k_c + j) mod N_c.

    Every client gets floor or ceil of N_e k_c / N_c experts, inside [k_min, M] when feasible.
    Adding it to the candidates guarantees the sparse problem is feasible.
    """
    x = np.zeros((n_e, n_c), dtype=bool)
    slots = np.arange(n_e * k_c)
    x[slots // k_c, slots % n_c] = True
    return x


def _top(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries along the last axis (in no particular order)."""
    size = values.shape[-1]
    return np.argpartition(values, size - k, axis=-1)[..., size - k :]


def _candidates(scores: np.ndarray, k_c: int, k_min: int) -> np.ndarray | None:
    """Initial arcs, or None for "all arcs" (small modules, where sparsity does not pay).

    Each expert keeps its best clients. Each client keeps the experts that lose least by taking
    it instead of their own last kept client (raw scores would favour experts with peaked rows).
    The round-robin assignment keeps the sparse problem feasible.
    """
    _, n_e, n_c = scores.shape
    per_row = min(n_c, _INITIAL_PER_EXPERT * k_c)
    per_col = min(n_e, _INITIAL_PER_CLIENT * max(k_min, 1))
    if 2 * (n_e * per_row + n_c * per_col) >= n_e * n_c:
        return None
    mask = np.zeros(scores.shape, dtype=bool)
    mask |= _round_robin(n_e, n_c, k_c)
    top = _top(scores, per_row)
    np.put_along_axis(mask, top, True, axis=2)
    threshold = np.take_along_axis(scores, top, axis=2).min(axis=2, keepdims=True)
    by_client = np.ascontiguousarray((scores - threshold).transpose(0, 2, 1))
    np.put_along_axis(mask, _top(by_client, per_col).transpose(0, 2, 1), True, axis=1)
    return mask


def _arcs_to_add(gain: np.ndarray, k_c: int, k_min: int) -> np.ndarray:
    """Arcs for the next round: every expert or client with an improving arc left out gets its
    few best arcs left out, improving or not.

    Taking the near misses too anticipates the dual shift the new arcs cause; taking only a few
    per node keeps the next flow problem small. gain is the reduced gain, _FLOOR on arcs
    already in.
    """
    _, n_e, n_c = gain.shape
    improving = gain > 0
    added = np.zeros(gain.shape, dtype=bool)
    mod, exp = np.nonzero(improving.any(axis=2))
    rows = gain[mod, exp]
    top = _top(rows, min(n_c, _ADDED_PER_EXPERT * k_c))
    added[mod[:, None], exp[:, None], top] = np.take_along_axis(rows, top, axis=1) > _FLOOR
    mod, cli = np.nonzero(improving.any(axis=1))
    cols = gain[mod, :, cli]
    top = _top(cols, min(n_e, _ADDED_PER_CLIENT * max(k_min, 1)))
    added[mod[:, None], top, cli[:, None]] |= np.take_along_axis(cols, top, axis=1) > _FLOOR
    return added


def _solve_flow(
    costs: np.ndarray, arcs: tuple[np.ndarray, ...], k_c: int, k_min: int, m_max: int
) -> np.ndarray:
    """Max-gain flow on the given arcs (m, e, c) of n disjoint modules; returns arc flows."""
    n, n_e, n_c = costs.shape
    mod, exp, cli = arcs
    expert_node = mod * n_e + exp
    client_node = n * n_e + mod * n_c + cli
    sink = n * (n_e + n_c) + np.arange(n)
    tails, heads = [expert_node], [client_node]
    caps, unit_costs = [np.ones(len(mod), np.int64)], [-costs[mod, exp, cli]]
    if m_max > k_min:
        tails.append(n * n_e + np.arange(n * n_c))
        heads.append(np.repeat(sink, n_c))
        caps.append(np.full(n * n_c, m_max - k_min, np.int64))
        unit_costs.append(np.zeros(n * n_c, np.int64))
    flow = min_cost_flow.SimpleMinCostFlow()
    flow.add_arcs_with_capacity_and_unit_cost(
        np.concatenate(tails),
        np.concatenate(heads),
        np.concatenate(caps),
        np.concatenate(unit_costs),
    )
    supplies = np.concatenate(
        [
            np.full(n * n_e, k_c, np.int64),
            np.full(n * n_c, -k_min, np.int64),
            np.full(n, -(n_e * k_c - n_c * k_min), np.int64),
        ]
    )
    flow.set_nodes_supplies(np.arange(len(supplies)), supplies)
    status = flow.solve()
    if status != flow.OPTIMAL:
        raise RuntimeError(f"min-cost flow failed with status {status} on a feasible problem")
    return flow.flows(np.arange(len(mod))).astype(bool)


def _potentials(
    costs: np.ndarray,
    arcs: tuple[np.ndarray, ...],
    used: np.ndarray,
    k_c: int,
    k_min: int,
    m_max: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Shortest-path distances in the residual graph of an optimal flow (Bellman-Ford).

    They are dual-feasible node potentials: every residual arc u -> v has
    cost + d[u] - d[v] >= 0. Returns (d_expert (n, N_e), d_client (n, N_c)).
    """
    n, n_e, n_c = costs.shape
    mod, exp, cli = arcs
    free = ~used
    f_tail = mod[free] * n_e + exp[free]
    f_head = mod[free] * n_c + cli[free]
    order = np.argsort(f_head, kind="stable")
    f_tail, f_head = f_tail[order], f_head[order]
    f_cost = -costs.reshape(n * n_e, n_c)[f_tail, f_head % n_c]
    heads, starts = np.unique(f_head, return_index=True)
    # used arcs sorted by (module, expert): exactly k_c per expert
    b_cli = cli[used].reshape(n, n_e, k_c)
    b_cost = np.take_along_axis(costs, b_cli, axis=2)
    b_flat = np.arange(n)[:, None, None] * n_c + b_cli
    load = np.zeros((n, n_c), np.int64)
    np.add.at(load, (mod[used], cli[used]), 1)
    to_sink, from_sink = load < m_max, load > k_min
    d_exp = np.zeros((n, n_e), np.int64)
    d_cli = np.zeros(n * n_c, np.int64)
    d_sink = np.zeros(n, np.int64)
    big = np.iinfo(np.int64).max // 4
    for _ in range(n_e + n_c + 2):
        before = (d_exp.copy(), d_cli.copy(), d_sink.copy())
        if len(heads):
            reach = np.minimum.reduceat(d_exp.reshape(-1)[f_tail] + f_cost, starts)
            d_cli[heads] = np.minimum(d_cli[heads], reach)
        grid = d_cli.reshape(n, n_c)
        d_sink = np.minimum(d_sink, np.where(to_sink, grid, big).min(axis=1))
        grid[:] = np.where(from_sink, np.minimum(grid, d_sink[:, None]), grid)
        d_exp = np.minimum(d_exp, (d_cli[b_flat] + b_cost).min(axis=2))
        if all(np.array_equal(a, b) for a, b in zip(before, (d_exp, d_cli, d_sink), strict=True)):
            return d_exp, d_cli.reshape(n, n_c)
    raise RuntimeError("negative cycle in the residual graph: the flow is not optimal")


def _arcs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(module, expert, client) index arrays of the arcs in mask, in C order."""
    _, n_e, n_c = mask.shape
    row, cli = np.divmod(np.flatnonzero(mask), n_c)
    mod, exp = np.divmod(row, n_e)
    return mod, exp, cli


def _solve_chunk(scores: np.ndarray, k_c: int, k_min: int, m_max: int) -> np.ndarray:
    """Exact optimum for a batch of modules by column generation with a dual certificate."""
    costs = _integer_costs(scores)
    mask = _candidates(scores, k_c, k_min)
    if mask is None:
        arcs = _arcs(np.ones(scores.shape, dtype=bool))
        x = np.zeros(scores.shape, dtype=bool)
        x[tuple(a[_solve_flow(costs, arcs, k_c, k_min, m_max)] for a in arcs)] = True
        return x
    result = np.zeros(scores.shape, dtype=bool)
    active = np.arange(len(scores))
    while len(active):
        sub_costs, sub_mask = costs[active], mask[active]
        arcs = _arcs(sub_mask)
        used = _solve_flow(sub_costs, arcs, k_c, k_min, m_max)
        x = np.zeros(sub_mask.shape, dtype=bool)
        x[tuple(a[used] for a in arcs)] = True
        result[active] = x
        d_exp, d_cli = _potentials(sub_costs, arcs, used, k_c, k_min, m_max)
        # reduced gain of arc e -> c; the flow is optimal on all arcs iff none left out is > 0
        gain = sub_costs - d_exp[:, :, None]
        gain += d_cli[:, None, :]
        gain[sub_mask] = _FLOOR
        added = _arcs_to_add(gain, k_c, k_min)
        mask[active] |= added
        active = active[added.any(axis=(1, 2))]
    return result


def solve_assignments(
    scores: np.ndarray, clients_per_expert: int, min_experts: int, max_experts: int
) -> np.ndarray:
    """Exact optimum for every module of a round: scores (n_modules, N_e, N_c) -> bool X.

    Modules are independent; they are solved in batches of at most _CHUNK_ENTRIES scores, each
    batch as one flow problem (this saves per-call overhead on many small modules).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 3:
        raise ValueError(f"scores must be (n_modules, N_e, N_c), got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or Inf")
    n, n_e, n_c = scores.shape
    k_c, k_min, m_max = clients_per_expert, min_experts, max_experts
    check_feasibility(n_c, n_e, k_c, k_min, m_max)
    result = np.zeros(scores.shape, dtype=bool)
    step = max(1, _CHUNK_ENTRIES // (n_e * n_c))
    for start in range(0, n, step):
        result[start : start + step] = _solve_chunk(scores[start : start + step], k_c, k_min, m_max)
    validate_assignment(result, k_c, k_min, m_max)
    return result


def random_assignment(
    n_modules: int,
    num_experts: int,
    num_clients: int,
    clients_per_expert: int,
    min_experts: int,
    max_experts: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Round-0 (and FedAMoLE-R) assignment: the same solver on uniform random scores."""
    scores = rng.random((n_modules, num_experts, num_clients))
    return solve_assignments(scores, clients_per_expert, min_experts, max_experts)


def architectures_from_assignment(
    x: np.ndarray, modules: Sequence[str]
) -> list[dict[str, list[int]]]:
    """X (n_modules, N_e, N_c) -> per client: module -> sorted expert ids it holds."""
    x = np.asarray(x, dtype=bool)
    if x.ndim != 3 or x.shape[0] != len(modules):
        raise ValueError(f"expected X of shape ({len(modules)}, N_e, N_c), got {x.shape}")
    by_client = x.transpose(2, 0, 1)  # (N_c, n_modules, N_e): nonzero walks it client-major
    experts = np.nonzero(by_client)[2].tolist()
    ends = np.cumsum(by_client.sum(axis=2), axis=None).tolist()
    starts = [0, *ends[:-1]]
    n = len(modules)
    return [
        {module: experts[starts[c * n + m] : ends[c * n + m]] for m, module in enumerate(modules)}
        for c in range(x.shape[2])
    ]
