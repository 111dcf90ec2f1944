"""Synthetic tasks: enough families, seeded, unique inputs and answers correct by recomputation."""

from __future__ import annotations

import datetime
from collections import Counter

import pytest

from fedamole.data.example import DataError, Example
from fedamole.data.synthetic import TASKS, generate_synthetic

UNIT_FACTORS = {
    ("km", "m"): 1000,
    ("kg", "g"): 1000,
    ("m", "cm"): 100,
    ("h", "min"): 60,
    ("L", "mL"): 1000,
}


def _by_family(examples: list[Example]) -> dict[str, list[Example]]:
    families: dict[str, list[Example]] = {}
    for ex in examples:
        families.setdefault(ex.label, []).append(ex)
    return families


@pytest.fixture(scope="module")
def families() -> dict[str, list[Example]]:
    return _by_family(generate_synthetic(per_task=60, seed=3))


def test_at_least_six_families_with_requested_size(families) -> None:
    assert len(families) >= 6 and set(families) == set(TASKS)
    assert {len(rows) for rows in families.values()} == {60}


def test_inputs_unique_within_family(families) -> None:
    assert all(len({ex.input for ex in rows}) == len(rows) for rows in families.values())


def test_deterministic_per_seed_and_independent_of_other_families() -> None:
    first = generate_synthetic(10, seed=7)
    assert first == generate_synthetic(10, seed=7)
    assert first != generate_synthetic(10, seed=8)
    alone = generate_synthetic(10, seed=7, tasks=["date_format"])
    assert alone == [ex for ex in first if ex.label == "date_format"]


def test_arithmetic_answers(families) -> None:
    for ex in families["arithmetic"]:
        a, op, b = ex.input.split()
        assert int(ex.output) == (int(a) + int(b) if op == "+" else int(a) - int(b))


def test_sort_answers(families) -> None:
    for ex in families["sort_list"]:
        assert ex.output.split(", ") == [str(n) for n in sorted(map(int, ex.input.split(", ")))]


def test_unit_conversion_answers(families) -> None:
    for ex in families["unit_conversion"]:
        value, unit = ex.input.split()
        result, target = ex.output.split()
        assert int(result) == int(value) * UNIT_FACTORS[unit, target]


def test_date_answers(families) -> None:
    for ex in families["date_format"]:
        day = datetime.date.fromisoformat(ex.input)
        assert ex.output == f"{day.day:02d}/{day.month:02d}/{day.year}"


def test_string_answers(families) -> None:
    assert all(ex.output == ex.input[::-1] for ex in families["reverse_word"])
    assert all(ex.output == ex.input.upper() for ex in families["uppercase"])


def test_classification_families_have_choices(families) -> None:
    assert all(ex.output == ("even", "odd")[int(ex.input) % 2] for ex in families["parity"])
    topics = families["keyword_classification"]
    assert all(ex.choices and ex.output in ex.choices for ex in topics)
    assert len(Counter(ex.output for ex in topics)) == 3
    assert all(ex.choices is None for ex in families["arithmetic"])


def test_answers_are_short(families) -> None:
    assert max(len(ex.output.split()) for rows in families.values() for ex in rows) <= 4


def test_unknown_task_and_exhausted_pool_are_errors() -> None:
    with pytest.raises(DataError, match="unknown synthetic task"):
        generate_synthetic(5, seed=0, tasks=["poetry"])
    with pytest.raises(DataError, match="lower data.synthetic_per_task"):
        generate_synthetic(1000, seed=0, tasks=["parity"])  # only 999 distinct numbers
