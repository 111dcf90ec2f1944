"""Client partitions: disjoint and complete, sizes respected, skew follows alpha, groups intact."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from fedamole.config import DataConfig
from fedamole.data.example import DataError, Example
from fedamole.data.partition import (
    dirichlet_partition,
    iid_partition,
    partition_examples,
    task_partition,
)

LABELS = [f"label{i % 5}" for i in range(1000)]


def _assert_disjoint_cover(parts: list[list[int]], n: int) -> None:
    flat = [i for part in parts for i in part]
    assert len(flat) == n and set(flat) == set(range(n))


def _mean_label_entropy(parts: list[list[int]], labels: list[str]) -> float:
    def entropy(part: list[int]) -> float:
        counts = Counter(labels[i] for i in part).values()
        return -sum(c / len(part) * math.log(c / len(part)) for c in counts)

    return sum(entropy(part) for part in parts) / len(parts)


def _grouped_examples(n_groups: int = 60) -> list[Example]:
    """Three rows per group with mixed labels, like SNLI's hypotheses of one premise."""
    return [
        Example("i", f"{g}-{k}", "o", f"label{(g + k) % 3}", group=f"g{g}")
        for g in range(n_groups)
        for k in range(3)
    ]


def test_dirichlet_is_a_disjoint_cover_with_min_size() -> None:
    parts = dirichlet_partition(LABELS, num_clients=10, alpha=0.1, min_size=20, seed=0)
    _assert_disjoint_cover(parts, len(LABELS))
    assert min(len(part) for part in parts) >= 20


def test_small_alpha_is_more_skewed_than_large_alpha() -> None:
    skewed = dirichlet_partition(LABELS, 10, alpha=0.1, min_size=5, seed=0)
    uniform = dirichlet_partition(LABELS, 10, alpha=100.0, min_size=5, seed=0)
    assert _mean_label_entropy(skewed, LABELS) < 0.6 * _mean_label_entropy(uniform, LABELS)
    assert _mean_label_entropy(uniform, LABELS) > 0.95 * math.log(5)


def test_dirichlet_deterministic_per_seed() -> None:
    assert dirichlet_partition(LABELS, 4, 0.5, 10, seed=1) == dirichlet_partition(
        LABELS, 4, 0.5, 10, seed=1
    )
    assert dirichlet_partition(LABELS, 4, 0.5, 10, seed=1) != dirichlet_partition(
        LABELS, 4, 0.5, 10, seed=2
    )


def test_dirichlet_impossible_min_size_names_settings() -> None:
    with pytest.raises(DataError, match="data.min_client_size"):
        dirichlet_partition(LABELS[:100], 10, alpha=1.0, min_size=11, seed=0)  # 100 < 10 * 11
    two_labels = ["a", "b"] * 200
    with pytest.raises(DataError, match=r"no Dirichlet\(alpha=0.01\).*data\.dirichlet_alpha"):
        dirichlet_partition(two_labels, 10, alpha=0.01, min_size=30, seed=0)


def test_dirichlet_min_size_counts_group_sizes() -> None:
    parts = dirichlet_partition(["a"] * 10, 2, alpha=100.0, min_size=12, seed=0, sizes=[3] * 10)
    assert min(3 * len(part) for part in parts) >= 12


def test_task_partition_one_task_per_client() -> None:
    labels = ["c", "a", "b", "a", "d", "c"]
    parts = task_partition(labels, 3)
    assert parts == [[1, 3], [2], [0, 5]]  # tasks a, b, c in sorted order; d unused
    with pytest.raises(DataError, match="4 tasks for 5 clients"):
        task_partition(labels, 5)


def test_iid_partition_balanced_and_disjoint() -> None:
    parts = iid_partition(103, 4, seed=0)
    _assert_disjoint_cover(parts, 103)
    assert {len(part) for part in parts} == {25, 26}


@pytest.mark.parametrize("partition", ["dirichlet", "task", "iid"])
def test_groups_never_split_across_clients(partition: str) -> None:
    examples = _grouped_examples()
    cfg = DataConfig(partition=partition, dirichlet_alpha=0.5, min_client_size=6)
    clients = partition_examples(examples, cfg, num_clients=3, seed=0)
    owner: dict[str, int] = {}
    for client_id, client in enumerate(clients):
        for ex in client:
            assert owner.setdefault(ex.group, client_id) == client_id
    if partition != "task":  # the task partition may leave tasks unused; here it uses all 3
        assert sum(len(client) for client in clients) == len(examples)


def test_task_partition_of_examples_gives_one_label_per_client() -> None:
    examples = [Example("i", str(i), "o", f"task{i % 4}") for i in range(80)]
    clients = partition_examples(examples, DataConfig(partition="task", min_client_size=5), 4, 0)
    assert [{ex.label for ex in client} for client in clients] == [{f"task{i}"} for i in range(4)]


def test_client_below_min_size_is_an_error() -> None:
    examples = [Example("i", str(i), "o", "x") for i in range(30)]
    with pytest.raises(DataError, match=r"client \d got 10 examples .*data\.min_client_size=20"):
        partition_examples(examples, DataConfig(partition="iid", min_client_size=20), 3, 0)
