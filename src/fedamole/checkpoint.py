"""The round checkpoint as one safetensors file: the server state (store, embeddings, assignment,
round, learning rate, participants), the private states of clients that live in the same process,
and a few run figures. :class:`fedamole.reporting.RunDir` writes it atomically after each round,
so a run killed at any moment resumes from its last complete round."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from fedamole.federation.state import ServerState
from fedamole.types import Architecture, ClientEmbeddings, StateDict

STORE, EMBEDDINGS, PRIVATE = "store/", "emb/", "private/"


@dataclass
class Checkpoint:
    state: ServerState
    client_states: dict[int, StateDict]  # private tensors of in-process clients
    wall_time_s: float


def _embedding_tensors(embeddings: dict[int, ClientEmbeddings]) -> StateDict:
    out = {}
    for cid, emb in embeddings.items():
        for module, vec in emb.data.items():
            out[f"{cid}/data/{module}"] = vec
        for module, experts in emb.experts.items():
            for e, vec in experts.items():
                out[f"{cid}/expert{e}/{module}"] = vec
    return out


def _embeddings_from(tensors: StateDict) -> dict[int, ClientEmbeddings]:
    out: dict[int, ClientEmbeddings] = {}
    for key, vec in tensors.items():
        cid, kind, module = key.split("/", 2)
        emb = out.setdefault(int(cid), ClientEmbeddings(data={}, experts={}))
        if kind == "data":
            emb.data[module] = vec
        else:
            emb.experts.setdefault(module, {})[int(kind.removeprefix("expert"))] = vec
    return out


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
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata)
    os.replace(tmp, path)


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
