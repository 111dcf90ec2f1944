"""Atomic round checkpoints of the server state: one safetensors file, written then renamed, so a
run killed at any moment resumes from the last complete round."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file

from fedamole.federation.server import ServerState
from fedamole.federation.types import ClientEmbeddings

CHECKPOINT = "checkpoint.safetensors"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _embedding_tensors(embeddings: dict[int, ClientEmbeddings]) -> dict:
    out = {}
    for cid, emb in embeddings.items():
        for module, vec in emb.data.items():
            out[f"emb/{cid}/data/{module}"] = vec
        for module, experts in emb.experts.items():
            for e, vec in experts.items():
                out[f"emb/{cid}/expert{e}/{module}"] = vec
    return out


def _embeddings_from(tensors: dict) -> dict[int, ClientEmbeddings]:
    out: dict[int, ClientEmbeddings] = {}
    for key, vec in tensors.items():
        if not key.startswith("emb/"):
            continue
        _, cid, kind, module = key.split("/", 3)
        emb = out.setdefault(int(cid), ClientEmbeddings(data={}, experts={}))
        if kind == "data":
            emb.data[module] = vec
        else:
            emb.experts.setdefault(module, {})[int(kind.removeprefix("expert"))] = vec
    return out


def save_checkpoint(run_dir: Path, state: ServerState, extra: dict | None = None) -> None:
    """Write the server state after a completed round (``state.round`` = next round to run)."""
    tensors = {f"store/{k}": v.contiguous() for k, v in state.store.items()}
    tensors.update(_embedding_tensors(state.embeddings))
    metadata = {
        "round": str(state.round),
        "lr": repr(state.lr),
        "architectures": json.dumps(state.architectures),
        "extra": json.dumps(extra or {}),
    }
    tmp = run_dir / (CHECKPOINT + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, run_dir / CHECKPOINT)


def load_checkpoint(run_dir: Path) -> tuple[ServerState, dict]:
    from safetensors import safe_open

    path = run_dir / CHECKPOINT
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    store = {k.removeprefix("store/"): v for k, v in tensors.items() if k.startswith("store/")}
    state = ServerState(
        round=int(metadata["round"]),
        store=store,
        architectures=json.loads(metadata["architectures"]),
        lr=float(metadata["lr"]),
        embeddings=_embeddings_from(tensors),
    )
    return state, json.loads(metadata["extra"])
