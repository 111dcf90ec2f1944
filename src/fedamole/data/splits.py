"""Per-client train / aux / validation / test splits (SPEC section 6), group-aware and seeded."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedamole.config import DataConfig
from fedamole.data.example import DataError, Example
from fedamole.data.partition import group_units

CLASSIFICATION_TEST_CAP = 200
GENERATION_TEST_CAP = 50
_HELD_OUT = ("test", "val", "aux")  # filled first, in this order; train takes the rest


@dataclass
class ClientSplits:
    """train: local training; aux: RSEA embeddings only; val: model selection; test: reporting."""

    train: list[Example]
    aux: list[Example]
    val: list[Example]
    test: list[Example]


def held_out_targets(n: int, cfg: DataConfig, is_classification: bool) -> dict[str, int]:
    """Rows wanted in each held-out split: the configured fraction (at least 1), capped.

    Rows beyond a cap go to train rather than being discarded.
    """
    default_cap = CLASSIFICATION_TEST_CAP if is_classification else GENERATION_TEST_CAP
    fracs = {"test": cfg.test_frac, "val": cfg.val_frac, "aux": cfg.aux_frac}
    caps = {
        "test": cfg.test_cap or default_cap,
        "val": cfg.val_cap or default_cap,
        "aux": cfg.aux_cap,
    }
    return {name: min(caps[name], max(1, round(n * fracs[name]))) for name in _HELD_OUT}


def split_client(
    examples: Sequence[Example],
    cfg: DataConfig,
    seed: int,
    is_classification: bool,
    name: str = "client",
) -> ClientSplits:
    """Split one client's examples; whole groups go to one split.

    Units (groups or single rows) are shuffled and each goes to the first held-out split it fits
    in without passing that split's target (an empty split always takes it, so a split exceeds
    its cap only when a single group is larger than the cap); the rest is train.
    """
    targets = held_out_targets(len(examples), cfg, is_classification)
    units = group_units(examples)
    order = np.random.default_rng(seed).permutation(len(units))
    parts: dict[str, list[Example]] = {split: [] for split in (*_HELD_OUT, "train")}
    for u in order:
        rows = [examples[i] for i in units[u]]
        split = next(
            (s for s in _HELD_OUT if not parts[s] or len(parts[s]) + len(rows) <= targets[s]),
            "train",
        )
        parts[split].extend(rows)
    empty = [split for split, rows in parts.items() if not rows]
    if empty:
        raise DataError(
            f"{name}: {len(examples)} examples in {len(units)} groups cannot fill every split "
            f"(empty: {', '.join(empty)}); raise data.min_client_size (each client needs at "
            "least 4 examples, or 4 groups)"
        )
    return ClientSplits(**parts)
