"""A SuperNode's own data: `data-path` replaces its partition of the shared source."""

from __future__ import annotations

import json

from fedamole.config import load_config
from fedamole.transports.flower.node import local_splits


def test_own_file_is_split_like_a_partition_and_reproducibly(tmp_path):
    path = tmp_path / "ours.jsonl"
    rows = [{"instruction": f"Repeat {i}", "output": str(i), "category": "echo"} for i in range(40)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = load_config(None)  # the run's source is synthetic: the file is read as JSONL

    task = local_splits(cfg, path, client_id=2)
    assert not task.classification  # decided on the whole file: no example has choices
    splits = task.splits
    parts = (splits.train, splits.aux, splits.val, splits.test)
    assert sorted(ex.output for part in parts for ex in part) == sorted(str(i) for i in range(40))
    assert all(part for part in parts)
    assert local_splits(cfg, path, client_id=2) == task
    assert local_splits(cfg, path, client_id=1) != task  # seeded per client, like partitions
