"""The mechanism RSEA rests on, checked without an expensive evaluation: clients that share a task
mixture get more experts in common under RSEA than under FedAMoLE-R's random assignment.

Clients come in 2 groups with disjoint synthetic task families (data.partition=groups). An expert
scores every client by <mean A_e x of its holders, mean W_tok x of the client> and picks its k_c
best: clients of one group have nearly the same data embedding, so an expert that picks one of
them tends to pick another of the same group. The auxiliary split is enlarged (20 %) so that the
embeddings are means over enough tokens; with the default 4 % these tiny clients would embed a
single example (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from fedamole.config import load_config
from fedamole.transports.in_process import run_in_process

GROUPED = [
    "model.name=tiny-random-llama",
    "model.dtype=float32",
    "model.max_length=512",
    "data.synthetic_per_task=30",
    "data.train_frac=0.6",
    "data.aux_frac=0.2",
    "data.min_client_size=8",
    "data.partition=groups",
    "data.num_groups=2",
    "federation.num_clients=6",
    "federation.rounds=1",
    "federation.local_steps=2",
    "federation.batch_size=2",
    "hmole.num_experts=12",
    "hmole.target_modules=all-linear",
    "eval.max_new_tokens=1",
]


def _overlap(out: Path, method: str, seed: int) -> tuple[float, float]:
    """(common experts within groups, across groups) of the assignment made after round 0."""
    cfg = load_config(None, [*GROUPED, f"seed={seed}", f"output.dir={out / method}"])
    run_in_process(cfg, console=Console(file=io.StringIO()), method=method)
    lines = (out / method / "metrics.jsonl").read_text().splitlines()
    server = next(r for r in map(json.loads, lines) if r["split"] == "server")
    return server["rsea_common_experts_within_groups"], server["rsea_common_experts_across"]


@pytest.mark.parametrize("seed", [1, 2])
def test_rsea_gives_same_group_clients_more_common_experts_than_random(tmp_path, seed):
    rsea_within, rsea_across = _overlap(tmp_path, "fedamole", seed)
    random_within, random_across = _overlap(tmp_path, "fedamole-r", seed)
    assert rsea_within > rsea_across
    assert rsea_within > random_within
    assert rsea_within - rsea_across > random_within - random_across
