"""Splitting examples over clients: per-label Dirichlet (non-IID), one task per client, or IID.

Partitions operate on *units*: the groups of examples that must stay together (e.g. all pairs
of one SNLI premise), or single examples when there are no groups. A unit's label is the
majority label of its examples.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

import numpy as np

from fedamole.config import DataConfig
from fedamole.data.example import DataError, Example

log = logging.getLogger("fedamole.data")

MAX_DIRICHLET_TRIES = 1000


def _dirichlet_draw(
    labels: Sequence[str], num_clients: int, alpha: float, rng: np.random.Generator
) -> list[list[int]]:
    """One draw: each label's indices are cut among clients by Dirichlet(alpha) proportions."""
    clients: list[list[int]] = [[] for _ in range(num_clients)]
    by_label: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    for label in sorted(by_label):
        indices = rng.permutation(by_label[label])
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(indices)).astype(int)
        for client, part in zip(clients, np.split(indices, cuts), strict=True):
            client.extend(int(i) for i in part)
    return [sorted(client) for client in clients]


def dirichlet_partition(
    labels: Sequence[str],
    num_clients: int,
    alpha: float,
    min_size: int,
    seed: int,
    sizes: Sequence[int] | None = None,
) -> list[list[int]]:
    """Per-label Dirichlet split (the standard non-IID FL recipe), redrawn until every client
    holds at least `min_size` examples. Small alpha = skewed label mixes, large = near IID.

    `sizes[i]` is how many examples index i stands for (a group); default 1 each.
    """
    weights = np.ones(len(labels), dtype=int) if sizes is None else np.asarray(sizes)
    advice = (
        "lower data.min_client_size, raise data.dirichlet_alpha or use fewer clients "
        "(federation.num_clients)"
    )
    if weights.sum() < num_clients * min_size:
        raise DataError(
            f"{weights.sum()} examples cannot give {num_clients} clients {min_size} each; {advice}"
        )
    rng = np.random.default_rng(seed)
    for _ in range(MAX_DIRICHLET_TRIES):
        clients = _dirichlet_draw(labels, num_clients, alpha, rng)
        if min(int(weights[client].sum()) for client in clients) >= min_size:
            return clients
    raise DataError(
        f"no Dirichlet(alpha={alpha}) split in {MAX_DIRICHLET_TRIES} draws gave all "
        f"{num_clients} clients at least {min_size} examples; {advice}"
    )


def task_partition(labels: Sequence[str], num_clients: int) -> list[list[int]]:
    """One task per client: client i gets the i-th task in sorted order; other tasks are unused."""
    tasks = sorted(set(labels))
    if len(tasks) < num_clients:
        raise DataError(
            f"data.partition=task needs at least one task per client, but there are "
            f"{len(tasks)} tasks for {num_clients} clients; lower federation.num_clients or "
            "use data.partition=dirichlet"
        )
    if len(tasks) > num_clients:
        log.info("task partition: %d of %d tasks unused", len(tasks) - num_clients, len(tasks))
    return [[i for i, label in enumerate(labels) if label == task] for task in tasks[:num_clients]]


def iid_partition(n: int, num_clients: int, seed: int) -> list[list[int]]:
    """A seeded shuffle cut into near-equal parts."""
    order = np.random.default_rng(seed).permutation(n)
    return [sorted(int(i) for i in part) for part in np.array_split(order, num_clients)]


def group_units(examples: Sequence[Example]) -> list[list[int]]:
    """Indices of examples that must stay together, in order of first appearance."""
    units: dict[object, list[int]] = {}
    for index, example in enumerate(examples):
        key = ("group", example.group) if example.group is not None else ("row", index)
        units.setdefault(key, []).append(index)
    return list(units.values())


def _unit_label(examples: Sequence[Example], unit: list[int]) -> str:
    """Majority label of a unit (ties: the label seen first)."""
    return Counter(examples[i].label for i in unit).most_common(1)[0][0]


def partition_examples(
    examples: Sequence[Example], cfg: DataConfig, num_clients: int, seed: int
) -> list[list[Example]]:
    """Examples per client as configured by `data.partition`; no group crosses clients."""
    units = group_units(examples)
    labels = [_unit_label(examples, unit) for unit in units]
    if cfg.partition == "dirichlet":
        parts = dirichlet_partition(
            labels,
            num_clients,
            cfg.dirichlet_alpha,
            cfg.min_client_size,
            seed,
            [len(unit) for unit in units],
        )
    elif cfg.partition == "task":
        parts = task_partition(labels, num_clients)
    else:
        parts = iid_partition(len(units), num_clients, seed)
    clients = [[examples[i] for u in part for i in units[u]] for part in parts]
    for client_id, client in enumerate(clients):
        if len(client) < cfg.min_client_size:
            raise DataError(
                f"client {client_id} got {len(client)} examples (data.partition="
                f"{cfg.partition}), fewer than data.min_client_size={cfg.min_client_size}; "
                "use fewer clients or more data, or lower data.min_client_size"
            )
    return clients


def client_groups(cfg: DataConfig, num_clients: int) -> list[int] | None:
    """The known group of each client, for partitions that give clients one (None otherwise)."""
    return None
