"""Client partitions: disjoint and complete, sizes respected, skew follows alpha, balancing,
client groups with disjoint tasks, iid keeps groups of examples whole."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest

from fedamole.config import DataConfig
from fedamole.data.example import UNLABELLED, DataError, Example
from fedamole.data.partition import (
    client_groups,
    dirichlet_partition,
    groups_partition,
    iid_partition,
    partition_examples,
    task_partition,
)
from fedamole.data.sources import load_snli
from fedamole.data.synthetic import TASKS, generate_synthetic

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


def _snli_labels(shared_data: Path) -> list[str]:
    return [ex.label for ex in load_snli(shared_data / "snli" / "snli_sample.jsonl")]


def _snli_client_labels(
    shared_data: Path, num_clients: int, alpha: float, seed: int
) -> list[list[str]]:
    """Labels of each client's examples, through the same entry point the pipeline uses."""
    examples = load_snli(shared_data / "snli" / "snli_sample.jsonl")
    cfg = DataConfig(source="snli", dirichlet_alpha=alpha, min_client_size=20)
    clients = partition_examples(examples, cfg, num_clients, seed)
    return [[ex.label for ex in client] for client in clients]


@pytest.mark.parametrize("num_clients", [3, 5])
def test_snli_small_alpha_gives_mostly_single_label_clients(shared_data, num_clients) -> None:
    """Per-example cuts: at alpha=0.1 most clients hold >= 80 % of one label (pooled over seeds,
    so no single draw decides). Grouping by premise made every client's shares ~1/3 each."""
    top_shares = [
        max(Counter(client).values()) / len(client)
        for seed in range(10)
        for client in _snli_client_labels(shared_data, num_clients, 0.1, seed)
    ]
    assert sum(share >= 0.8 for share in top_shares) > len(top_shares) / 2


def test_snli_large_alpha_gives_near_uniform_label_shares(shared_data) -> None:
    """Dirichlet(100) over 5 clients: a client's fraction of one label has sd
    sqrt(0.2 * 0.8 / 501) = 0.018 around 0.2, i.e. 9 % relative noise per label, so a label's
    share of a client (~1/3) has sd about 1/3 * 0.09 * sqrt(2/3) = 0.025; 0.1 is 4 sd."""
    labels = _snli_labels(shared_data)
    overall = {label: count / len(labels) for label, count in Counter(labels).items()}
    for seed in range(3):
        for client in _snli_client_labels(shared_data, 5, 100.0, seed):
            counts = Counter(client)
            for label, share in overall.items():
                assert abs(counts[label] / len(client) - share) < 0.1


@pytest.mark.parametrize("alpha", [0.1, 0.5])
def test_balancing_caps_clients_at_a_fair_share_plus_one_cut(shared_data, alpha) -> None:
    """A client only receives a label's cut while it holds fewer than N / clients examples, and
    labels are cut in sorted order: so before the cut of the last label it holds, it held fewer
    than N / clients, i.e. size - (its count of that label) < N / clients."""
    synthetic = [f"label{i % 7}" for i in range(700)]
    for labels, num_clients in ((_snli_labels(shared_data), 5), (synthetic, 6)):
        fair_share = len(labels) / num_clients
        for seed in range(5):
            for part in dirichlet_partition(labels, num_clients, alpha, min_size=5, seed=seed):
                counts = Counter(labels[i] for i in part)
                assert len(part) - counts[max(counts)] < fair_share


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


def _owners(clients: list[list[Example]]) -> dict[str, set[int]]:
    owners: dict[str, set[int]] = {}
    for client_id, client in enumerate(clients):
        for ex in client:
            owners.setdefault(ex.group, set()).add(client_id)
    return owners


def test_iid_keeps_groups_on_one_client() -> None:
    examples = _grouped_examples()
    clients = partition_examples(examples, DataConfig(partition="iid", min_client_size=6), 3, 0)
    assert all(len(owners) == 1 for owners in _owners(clients).values())
    assert sorted(ex.input for client in clients for ex in client) == sorted(
        ex.input for ex in examples
    )


@pytest.mark.parametrize("partition", ["dirichlet", "task"])
def test_label_partitions_assign_examples_by_their_own_label(partition: str) -> None:
    """Every group holds one example of each label, so per-label cuts must spread groups."""
    examples = _grouped_examples()
    cfg = DataConfig(partition=partition, dirichlet_alpha=0.1, min_client_size=6)
    clients = partition_examples(examples, cfg, num_clients=3, seed=0)
    assert sum(len(client) for client in clients) == len(examples)
    assert any(len(owners) > 1 for owners in _owners(clients).values())
    if partition == "task":
        assert [{ex.label for ex in client} for client in clients] == [
            {"label0"},
            {"label1"},
            {"label2"},
        ]


def test_task_partition_of_examples_gives_one_label_per_client() -> None:
    examples = [Example("i", str(i), "o", f"task{i % 4}") for i in range(80)]
    clients = partition_examples(examples, DataConfig(partition="task", min_client_size=5), 4, 0)
    assert [{ex.label for ex in client} for client in clients] == [{f"task{i}"} for i in range(4)]


def test_client_below_min_size_is_an_error() -> None:
    examples = [Example("i", str(i), "o", "x") for i in range(30)]
    with pytest.raises(DataError, match=r"client \d got 10 examples .*data\.min_client_size=20"):
        partition_examples(examples, DataConfig(partition="iid", min_client_size=20), 3, 0)


@pytest.mark.parametrize("partition", ["dirichlet", "task", "groups"])
def test_label_partitions_reject_unlabelled_data(partition: str) -> None:
    examples = [Example("i", str(i), "o", UNLABELLED) for i in range(40)]
    cfg = DataConfig(source="jsonl", partition=partition, min_client_size=5)
    with pytest.raises(DataError, match=r"data\.columns\.label.*data\.partition=iid"):
        partition_examples(examples, cfg, 2, 0)
    assert len(partition_examples(examples, cfg.model_copy(update={"partition": "iid"}), 2, 0)) == 2


def _synthetic_groups(seed: int) -> tuple[list[list[Example]], list[int] | None]:
    examples = generate_synthetic(per_task=20, seed=0)
    cfg = DataConfig(partition="groups", num_groups=2, min_client_size=20)
    return partition_examples(examples, cfg, 4, seed), client_groups(cfg, 4)


def test_client_groups_share_a_task_set_disjoint_from_other_groups() -> None:
    clients, groups = _synthetic_groups(seed=0)
    assert groups == [0, 1, 0, 1]  # round-robin: client c is in group c % 2
    label_sets = [{ex.label for ex in client} for client in clients]
    assert label_sets[0] == label_sets[2] and label_sets[1] == label_sets[3]
    assert not label_sets[0] & label_sets[1]
    assert label_sets[0] | label_sets[1] == set(TASKS)
    assert min(len(client) for client in clients) >= 20
    for client in clients:  # 20 examples of a task cut over the group's 2 clients
        assert set(Counter(ex.label for ex in client).values()) == {10}


def test_client_groups_deterministic_per_seed() -> None:
    assert _synthetic_groups(seed=1) == _synthetic_groups(seed=1)
    assert _synthetic_groups(seed=1)[0] != _synthetic_groups(seed=2)[0]


def test_groups_partition_tasks_dealt_round_robin_in_sorted_order() -> None:
    labels = ["d", "b", "a", "c", "e", "a"]
    parts = groups_partition(labels, num_clients=2, num_groups=2, seed=0)
    assert [sorted({labels[i] for i in part}) for part in parts] == [["a", "c", "e"], ["b", "d"]]


def test_groups_partition_needs_a_task_per_group_and_a_client_per_group() -> None:
    with pytest.raises(DataError, match=r"2 tasks \(labels\) for data\.num_groups=3"):
        groups_partition(["a", "b"] * 10, num_clients=3, num_groups=3, seed=0)
    with pytest.raises(DataError, match=r"data\.num_groups=3 exceeds federation\.num_clients=2"):
        groups_partition(["a", "b", "c"] * 10, num_clients=2, num_groups=3, seed=0)


def test_client_groups_only_for_the_groups_partition() -> None:
    assert client_groups(DataConfig(partition="dirichlet"), 4) is None
    assert client_groups(DataConfig(partition="groups", num_groups=3), 7) == [0, 1, 2, 0, 1, 2, 0]
