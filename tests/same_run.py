"""Two runs of the same settings over different transports must agree: records, summary,
assignments, checkpoint and client models (tensors bit-exactly)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def records_of(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return sorted(
        (json.loads(line) for line in lines),
        key=lambda r: (r["round"], r.get("client", -1), r["split"]),
    )


def _without_time(summary_file: Path) -> dict:
    summary = json.loads(summary_file.read_text())
    summary.pop("wall_time_s")
    return summary


def assert_same_run(out: Path, reference: Path, rounds: int, clients: int) -> None:
    """Per client and round: metrics, bytes up/down; the summary; assignments and manifests; the
    checkpoint and every client's model, tensors bit-exactly."""
    assert records_of(out) == records_of(reference)
    assert _without_time(out / "summary.json") == _without_time(reference / "summary.json")
    for name in (f"round_{r:03d}.json" for r in range(rounds)):
        if (reference / "assignments" / name).exists():
            assert (out / "assignments" / name).read_text() == (
                reference / "assignments" / name
            ).read_text()
        manifest = f"manifests/{name}"  # what crossed the wire: the same on every transport
        assert (out / manifest).read_text() == (reference / manifest).read_text(), manifest
    for tensors in (
        "checkpoint.safetensors",
        *(f"clients/{c}/adapter.safetensors" for c in range(clients)),
    ):
        ours, theirs = load_file(str(out / tensors)), load_file(str(reference / tensors))
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), tensors


def wait_for(condition, what: str, timeout: float = 300, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)
