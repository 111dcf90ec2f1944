"""The round checkpoint as one safetensors file: the server state (store, embeddings, assignment,
round, learning rate, participants), the private states of clients that live in the same process,
and a few run figures. :class:`fedamole.reporting.RunDir` writes it atomically after each round,
so a run killed at any moment resumes from its last complete round. Its metadata carries a
SHA-256 of every tensor and every other metadata field, checked on reading, so a damaged or
edited checkpoint is refused instead of trained on."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from fedamole.errors import UserError
from fedamole.files import atomic_save_tensors
from fedamole.types import Architecture, ClientEmbeddings, ServerState, StateDict

STORE, EMBEDDINGS, PRIVATE = "store/", "emb/", "private/"
DIGEST = "sha256"


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be trusted; the message names the file and what to do."""


def digest(tensors: StateDict, metadata: dict[str, str]) -> str:
    """SHA-256 over the metadata and every tensor's name, dtype, shape and bytes, in key order."""
    sha = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    for key in sorted(tensors):
        value = tensors[key].detach().cpu().contiguous()
        sha.update(f"{key}|{value.dtype}|{tuple(value.shape)}".encode())
        sha.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


@dataclass
class Checkpoint:
    state: ServerState
    client_states: dict[int, StateDict]  # private tensors of in-process clients
    wall_time_s: float


def _embedding_tensors(embeddings: dict[int, ClientEmbeddings]) -> StateDict:
    return {
        f"{cid}/{key}": vec
        for cid, emb in embeddings.items()
        for key, vec in emb.to_tensors().items()
    }


def _embeddings_from(tensors: StateDict) -> dict[int, ClientEmbeddings]:
    by_client: dict[int, StateDict] = {}
    for key, vec in tensors.items():
        cid, name = key.split("/", 1)
        by_client.setdefault(int(cid), {})[name] = vec
    return {cid: ClientEmbeddings.from_tensors(t) for cid, t in by_client.items()}


def _private_tensors(client_states: dict[int, StateDict]) -> StateDict:
    return {
        f"{PRIVATE}{cid}/{key}": value
        for cid, tensors in client_states.items()
        for key, value in tensors.items()
    }


def _private_from(tensors: StateDict) -> dict[int, StateDict]:
    out: dict[int, StateDict] = {}
    for key, value in tensors.items():
        cid, name = key.split("/", 1)
        out.setdefault(int(cid), {})[name] = value
    return out


def write_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Write to a temporary file, then rename: the old checkpoint stays whole until the new one is."""
    state = checkpoint.state
    tensors = {f"{STORE}{k}": v for k, v in state.store.items()}
    tensors.update({EMBEDDINGS + k: v for k, v in _embedding_tensors(state.embeddings).items()})
    tensors.update(_private_tensors(checkpoint.client_states))
    metadata = {
        "round": str(state.round),
        "lr": repr(state.lr),
        "participants": json.dumps(state.participants),
        "architectures": json.dumps({str(c): a for c, a in state.architectures.items()}),
        "wall_time_s": repr(checkpoint.wall_time_s),
    }
    metadata[DIGEST] = digest(tensors, metadata)
    atomic_save_tensors(path, tensors, metadata)


def _with_prefix(tensors: StateDict, prefix: str) -> StateDict:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def _read_verified(path: Path) -> tuple[StateDict, dict[str, str]]:
    damaged = (
        f"{path} is damaged ({{}}): it cannot be resumed from. Restore it from a copy, or start "
        "the run again in another folder"
    )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(damaged.format(f"not a readable safetensors file: {exc}")) from None
    stored = metadata.pop(DIGEST, None)
    if stored is None:
        raise CheckpointError(damaged.format("it carries no checksum"))
    if digest(tensors, metadata) != stored:
        raise CheckpointError(damaged.format("its checksum does not match its contents"))
    return tensors, metadata


def verify_checkpoint(path: Path) -> None:
    """Refuse a checkpoint whose bytes are not the ones written (before anything expensive)."""
    _read_verified(path)


def read_checkpoint(path: Path) -> Checkpoint:
    tensors, metadata = _read_verified(path)
    architectures: dict[str, Architecture] = json.loads(metadata["architectures"])
    state = ServerState(
        round=int(metadata["round"]),
        store=_with_prefix(tensors, STORE),
        lr=float(metadata["lr"]),
        participants=json.loads(metadata["participants"]),
        architectures={int(c): a for c, a in architectures.items()},
        embeddings=_embeddings_from(_with_prefix(tensors, EMBEDDINGS)),
    )
    return Checkpoint(
        state, _private_from(_with_prefix(tensors, PRIVATE)), float(metadata["wall_time_s"])
    )
