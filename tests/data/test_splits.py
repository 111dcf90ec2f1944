"""Per-client splits: SPEC ratios, caps, groups kept whole, determinism, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedamole.config import DataConfig
from fedamole.data.example import DataError, Example
from fedamole.data.partition import partition_examples
from fedamole.data.sources import load_snli
from fedamole.data.splits import ClientSplits, split_client

UNCAPPED = DataConfig(test_cap=10**6, val_cap=10**6, aux_cap=10**6)


def _rows(n: int) -> list[Example]:
    return [Example("i", str(i), "o", "x") for i in range(n)]


def _sizes(splits: ClientSplits) -> tuple[int, int, int, int]:
    return len(splits.train), len(splits.aux), len(splits.val), len(splits.test)


def _all(splits: ClientSplits) -> list[Example]:
    return splits.train + splits.aux + splits.val + splits.test


def test_spec_ratios_without_caps() -> None:
    splits = split_client(_rows(1000), UNCAPPED, seed=0, is_classification=False)
    assert _sizes(splits) == (760, 40, 100, 100)
    assert sorted(_all(splits), key=lambda ex: int(ex.input)) == _rows(1000)


def test_ratios_within_rounding_for_odd_sizes() -> None:
    for n in (37, 101, 555):
        train, aux, val, test = _sizes(split_client(_rows(n), UNCAPPED, 0, False))
        assert train + aux + val + test == n
        for size, frac in ((aux, 0.04), (val, 0.10), (test, 0.10)):
            assert abs(size - frac * n) <= 1


@pytest.mark.parametrize(("is_classification", "cap"), [(True, 200), (False, 50)])
def test_default_caps(is_classification: bool, cap: int) -> None:
    train, aux, val, test = _sizes(split_client(_rows(6000), DataConfig(), 0, is_classification))
    assert (aux, val, test) == (200, cap, cap)  # 4 % of 6000 = 240 > aux_cap 200
    assert train == 6000 - 200 - 2 * cap


def test_configured_caps() -> None:
    cfg = DataConfig(test_cap=7, val_cap=5, aux_cap=3)
    assert _sizes(split_client(_rows(500), cfg, 0, True))[1:] == (3, 5, 7)


def _assert_groups_in_one_split(splits: ClientSplits) -> None:
    owners: dict[str | None, str] = {}
    for name in ("train", "aux", "val", "test"):
        for ex in getattr(splits, name):
            assert owners.setdefault(ex.group, name) == name


def test_groups_stay_in_one_split(shared_data: Path) -> None:
    examples = load_snli(shared_data / "snli" / "snli_sample.jsonl")
    splits = split_client(examples, UNCAPPED, seed=0, is_classification=True)
    _assert_groups_in_one_split(splits)
    assert len(_all(splits)) == len(examples)
    assert abs(len(splits.test) - 62) <= 3  # within one group of the 10 % target


@pytest.mark.parametrize("alpha", [0.1, 1.0])
def test_groups_spread_over_clients_stay_in_one_split_of_each(shared_data: Path, alpha) -> None:
    """Label partitions cut premises over clients; within each client a premise's pairs still
    share one split, so no premise is both trained on and tested by a client."""
    examples = load_snli(shared_data / "snli" / "snli_sample.jsonl")
    cfg = DataConfig(source="snli", dirichlet_alpha=alpha, min_client_size=20)
    for client_id, client in enumerate(partition_examples(examples, cfg, 5, seed=42)):
        splits = split_client(client, cfg, 42 + client_id, is_classification=True)
        _assert_groups_in_one_split(splits)
        assert sorted(_all(splits), key=examples.index) == client


def test_deterministic_per_seed() -> None:
    cfg = DataConfig()
    assert split_client(_rows(200), cfg, 5, False) == split_client(_rows(200), cfg, 5, False)
    assert split_client(_rows(200), cfg, 5, False) != split_client(_rows(200), cfg, 6, False)


def test_four_examples_give_one_per_split() -> None:
    assert _sizes(split_client(_rows(4), DataConfig(), 0, False)) == (1, 1, 1, 1)


@pytest.mark.parametrize(
    "examples",
    [
        _rows(3),
        [Example("i", str(i), "o", "x", group=str(i % 2)) for i in range(8)],  # 8 rows, 2 groups
    ],
)
def test_too_small_client_names_client_and_setting(examples: list[Example]) -> None:
    with pytest.raises(DataError, match=r"client 3: .*data\.min_client_size"):
        split_client(examples, DataConfig(), 0, False, name="client 3")
