"""What left each organisation's machine, and what reached it, in one round: every tensor's
name, shape, dtype and bytes, and whether metric-DP noise was on it, so that an organisation's
privacy officer can read exactly what was shared.

It is built from the very tensors the engine hands the transport and gets back (so for every
method and transport alike), and it counts bytes as ``metrics.jsonl``'s ``bytes_up`` and
``bytes_down`` do: its totals are those figures.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fedamole.types import ClientPayload, ClientUpdate, StateDict, tensor_nbytes

Entry = dict[str, Any]


def tensor_entry(name: str, tensor: Tensor, dp_noise: bool = False) -> Entry:
    return {
        "name": name,
        "shape": list(tensor.shape),
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "bytes": tensor_nbytes(tensor),
        "dp_noise": dp_noise,
    }


def _entries(state: StateDict) -> list[Entry]:
    return [tensor_entry(name, state[name]) for name in sorted(state)]


def _total(entries: list[Entry]) -> int:
    return sum(e["bytes"] for e in entries)


def client_manifest(
    payload: ClientPayload,
    eval_payload: ClientPayload | None,
    update: ClientUpdate | None,
    embeddings_noised: bool,
) -> dict[str, Any]:
    """One client's round: what it was sent (to train, and to evaluate the aggregated model) and
    what it sent back (weights, and RSEA embeddings with DP noise when the run adds it)."""
    down = {"train": _entries(payload.weights)}
    if eval_payload is not None:
        down["evaluate"] = _entries(eval_payload.weights)
    up: dict[str, list[Entry]] = {"weights": [], "embeddings": []}
    if update is not None:
        up["weights"] = _entries(update.weights)
        if update.embeddings is not None:
            vectors = update.embeddings.to_tensors()
            up["embeddings"] = [
                tensor_entry(f"embedding/{k}", vectors[k], embeddings_noised)
                for k in sorted(vectors)
            ]
    return {
        "answered": update is not None,
        "downloaded": down,
        "uploaded": up,
        "bytes_down": sum(_total(entries) for entries in down.values()),
        "bytes_up": sum(_total(entries) for entries in up.values()),
    }


def round_manifest(
    payloads: dict[int, ClientPayload],
    eval_payloads: dict[int, ClientPayload],
    updates: dict[int, ClientUpdate],
    embeddings_noised: bool,
) -> dict[str, dict[str, Any]]:
    """Every client sent a payload this round, by client id (as a string: JSON keys)."""
    return {
        str(c): client_manifest(
            payloads[c], eval_payloads.get(c), updates.get(c), embeddings_noised
        )
        for c in sorted(payloads)
    }
