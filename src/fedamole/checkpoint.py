"""The round checkpoint as one safetensors file: the server state (store, embeddings, assignment,
round, learning rate, participants), the private states of clients that live in the same process,
and a few run figures. :class:`fedamole.reporting.RunDir` writes it atomically after each round,
so a run killed at any moment resumes from its last complete round."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from fedamole.files import atomic_save_tensors
from fedamole.types import Architecture, ClientEmbeddings, ServerState, StateDict

STORE, EMBEDDINGS, PRIVATE = "store/", "emb/", "private/"


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
    atomic_save_tensors(path, tensors, metadata)


def _with_prefix(tensors: StateDict, prefix: str) -> StateDict:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def read_checkpoint(path: Path) -> Checkpoint:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - not a dict
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
