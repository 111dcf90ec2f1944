"""Splitting examples over clients: per-label Dirichlet (non-IID), one task per client, client
groups with disjoint tasks, or IID.

The label-defined partitions (dirichlet, task, groups) assign single examples by their label,
as the paper's code does: an SNLI premise carries one hypothesis per label, so keeping a
premise's examples together would make every unit a tie of labels and the split label-IID.
A group of examples (`Example.group`) may therefore span clients; within one client it still
stays in one split (see `split_client`). The iid partition keeps groups whole, which costs
nothing there and keeps a premise's pairs off different clients.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from fedamole.config import DataConfig
from fedamole.data.example import UNLABELLED, DataError, Example

log = logging.getLogger("fedamole.data")

MAX_DIRICHLET_TRIES = 1000
LABEL_PARTITIONS = ("dirichlet", "task", "groups")


def _indices_by_label(labels: Sequence[str]) -> dict[str, list[int]]:
    by_label: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    return by_label


def _dirichlet_draw(
    labels: Sequence[str], num_clients: int, alpha: float, rng: np.random.Generator
) -> list[list[int]] | None:
    """One draw of the NIID-Bench recipe: each label's shuffled indices (labels in sorted order)
    are cut among clients by Dirichlet(alpha) proportions, except that a client already holding
    at least N / num_clients examples gets no more (its proportion is zeroed, the rest
    renormalised). None when every open client drew a zero proportion (underflow at tiny alpha).
    """
    fair_share = len(labels) / num_clients
    clients: list[list[int]] = [[] for _ in range(num_clients)]
    by_label = _indices_by_label(labels)
    for label in sorted(by_label):
        indices = rng.permutation(by_label[label])
        open_clients = np.array([len(client) < fair_share for client in clients])
        shares = rng.dirichlet(np.full(num_clients, alpha)) * open_clients
        if shares.sum() == 0:
            return None
        # Rounded, not floored: a floored 0.99999 * n would hand a zeroed last client one example.
        cuts = np.rint(np.cumsum(shares / shares.sum())[:-1] * len(indices)).astype(int)
        for client, part in zip(clients, np.split(indices, cuts), strict=True):
            client.extend(int(i) for i in part)
    return [sorted(client) for client in clients]


def dirichlet_partition(
    labels: Sequence[str], num_clients: int, alpha: float, min_size: int, seed: int
) -> list[list[int]]:
    """Per-label Dirichlet split with balancing (see `_dirichlet_draw`), redrawn until every
    client holds at least `min_size` examples. Small alpha = near single-label clients, large
    alpha = near IID. A client ends below N / num_clients plus its share of the last label it
    received (in sorted label order), since it was below N / num_clients before that cut.
    """
    advice = (
        "lower data.min_client_size, raise data.dirichlet_alpha or use fewer clients "
        "(federation.num_clients)"
    )
    if len(labels) < num_clients * min_size:
        raise DataError(
            f"{len(labels)} examples cannot give {num_clients} clients {min_size} each; {advice}"
        )
    rng = np.random.default_rng(seed)
    for _ in range(MAX_DIRICHLET_TRIES):
        clients = _dirichlet_draw(labels, num_clients, alpha, rng)
        if clients is not None and min(len(client) for client in clients) >= min_size:
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
    by_label = _indices_by_label(labels)
    return [by_label[task] for task in tasks[:num_clients]]


def group_of_client(client: int, num_groups: int) -> int:
    """Clients are dealt to groups round-robin: client c is in group c % num_groups."""
    return client % num_groups


def client_groups(cfg: DataConfig, num_clients: int) -> list[int] | None:
    """The client group (0 .. data.num_groups - 1) of each client under data.partition=groups,
    None for other partitions: the known structure that RSEA's expert assignment should find.

    A function of the configuration alone, so any part of a run can ask without the data.
    """
    if cfg.partition != "groups":
        return None
    return [group_of_client(client, cfg.num_groups) for client in range(num_clients)]


def tasks_of_groups(labels: Sequence[str], num_groups: int) -> list[list[str]]:
    """Disjoint task sets: the sorted tasks dealt round-robin, group g gets tasks[g::num_groups]."""
    tasks = sorted(set(labels))
    if len(tasks) < num_groups:
        raise DataError(
            f"data.partition=groups gives each client group its own tasks, but there are "
            f"{len(tasks)} tasks (labels) for data.num_groups={num_groups}; lower data.num_groups"
        )
    return [tasks[group::num_groups] for group in range(num_groups)]


def groups_partition(
    labels: Sequence[str], num_clients: int, num_groups: int, seed: int
) -> list[list[int]]:
    """Clients in `num_groups` groups (round-robin) with disjoint tasks (`tasks_of_groups`); each
    task's shuffled examples are cut into near-equal parts over its group's clients, so clients
    of one group share one task mixture (the same label set when every task has at least as
    many examples as the group has clients)."""
    if num_groups > num_clients:
        raise DataError(
            f"data.num_groups={num_groups} exceeds federation.num_clients={num_clients}; "
            "every group needs a client"
        )
    rng = np.random.default_rng(seed)
    by_label = _indices_by_label(labels)
    clients: list[list[int]] = [[] for _ in range(num_clients)]
    for group, tasks in enumerate(tasks_of_groups(labels, num_groups)):
        members = [c for c in range(num_clients) if group_of_client(c, num_groups) == group]
        for task in tasks:
            parts = np.array_split(rng.permutation(by_label[task]), len(members))
            for member, part in zip(members, parts, strict=True):
                clients[member].extend(int(i) for i in part)
    return [sorted(client) for client in clients]


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


def _require_labels(examples: Sequence[Example], cfg: DataConfig) -> None:
    """Label-defined partitions are meaningless when the source gave no labels at all."""
    if cfg.partition in LABEL_PARTITIONS and all(ex.label == UNLABELLED for ex in examples):
        raise DataError(
            f"data.partition={cfg.partition} splits clients by label, but no example of "
            f"data.source={cfg.source} has a label (category); name a label column with "
            "data.columns.label (a JSONL field or data-set column), or use data.partition=iid"
        )


def _iid_of_units(examples: Sequence[Example], num_clients: int, seed: int) -> list[list[int]]:
    """IID over groups kept whole (an SNLI premise's pairs stay on one client)."""
    units = group_units(examples)
    return [
        [i for u in part for i in units[u]] for part in iid_partition(len(units), num_clients, seed)
    ]


def partition_indices(
    examples: Sequence[Example], cfg: DataConfig, num_clients: int, seed: int
) -> list[list[int]]:
    """Example indices per client as configured by `data.partition`."""
    _require_labels(examples, cfg)
    labels = [ex.label for ex in examples]
    if cfg.partition == "dirichlet":
        return dirichlet_partition(
            labels, num_clients, cfg.dirichlet_alpha, cfg.min_client_size, seed
        )
    if cfg.partition == "task":
        return task_partition(labels, num_clients)
    if cfg.partition == "groups":
        return groups_partition(labels, num_clients, cfg.num_groups, seed)
    return _iid_of_units(examples, num_clients, seed)


def partition_examples(
    examples: Sequence[Example], cfg: DataConfig, num_clients: int, seed: int
) -> list[list[Example]]:
    """Examples per client as configured by `data.partition`, each client at least
    `data.min_client_size`; `client_groups` gives the client groups of data.partition=groups."""
    clients = [
        [examples[i] for i in part] for part in partition_indices(examples, cfg, num_clients, seed)
    ]
    for client_id, client in enumerate(clients):
        if len(client) < cfg.min_client_size:
            raise DataError(
                f"client {client_id} got {len(client)} examples (data.partition="
                f"{cfg.partition}), fewer than data.min_client_size={cfg.min_client_size}; "
                "use fewer clients or more data, or lower data.min_client_size"
            )
    return clients
