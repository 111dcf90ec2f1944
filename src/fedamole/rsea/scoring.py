"""Server side of RSEA (SPEC 4): turn the clients' embeddings into expert preferences and those
into next round's per-client architectures.

Per module m: eps_bar_e = mean of eps_{e,c} over the clients c that reported expert e,
Lambda = Eps_bar T^T / sqrt(r) (N_e x N_c, row c of T is client c's data embedding t_c), and
P = softmax of Lambda along the client axis, so every expert's row is a distribution over clients.

Missing data, by design:
- A client that did not report this round should be passed with its last known embeddings by
  the caller (the server keeps them); this module only sees one mapping.
- A client index with no embeddings at all (or none for a module) gets a zero data embedding,
  i.e. the same logit 0 from every expert: no expert prefers or avoids it.
- An expert nobody reported gets a uniform row, so it goes wherever the constraints need it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from fedamole.types import ClientEmbeddings


def _matrix(vectors: list[Tensor], rank: int, where: Callable[[int], str]) -> np.ndarray:
    """The vectors as one float64 (n, r) array, converted at once (one conversion per vector
    cost seconds at 1,000 clients x 300 experts), each checked to have length r."""
    shape = (rank,)
    rows = list(vectors)
    for index, vector in enumerate(vectors):
        if vector.shape == shape:
            continue
        if vector.numel() != rank:
            raise ValueError(
                f"{where(index)}: expected an embedding of length r={rank}, "
                f"got {tuple(vector.shape)}"
            )
        rows[index] = vector.reshape(-1)
    if not rows:
        return np.zeros((0, rank))
    with torch.no_grad():
        return torch.stack(rows).to("cpu", torch.float64).numpy()


def _module_embeddings(
    embeddings: Mapping[int, ClientEmbeddings],
    module: str,
    num_experts: int,
    num_clients: int,
    rank: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T (N_c, r), sum of eps per expert (N_e, r), reporters per expert (N_e,)) of one module."""
    rows: list[int] = []  # clients with a data embedding, and those embeddings
    data_vectors: list[Tensor] = []
    reporters: list[tuple[int, int]] = []  # (client, expert) of each expert embedding
    eps_vectors: list[Tensor] = []
    for client, emb in embeddings.items():
        if not 0 <= client < num_clients:
            raise ValueError(f"client index {client} outside 0..{num_clients - 1}")
        if module in emb.data:
            rows.append(client)
            data_vectors.append(emb.data[module])
        for expert, eps in emb.experts.get(module, {}).items():
            if not 0 <= expert < num_experts:
                raise ValueError(
                    f"client {client}, {module}: expert id {expert} outside 0..{num_experts - 1}"
                )
            reporters.append((client, expert))
            eps_vectors.append(eps)
    data = np.zeros((num_clients, rank))
    data[rows] = _matrix(data_vectors, rank, lambda i: f"client {rows[i]}, {module}, data")
    experts = [expert for _, expert in reporters]
    sums = np.zeros((num_experts, rank))
    np.add.at(  # in the clients' order, as a running sum would
        sums,
        experts,
        _matrix(
            eps_vectors,
            rank,
            lambda i: f"client {reporters[i][0]}, {module}, expert {reporters[i][1]}",
        ),
    )
    counts = np.bincount(np.asarray(experts, dtype=np.int64), minlength=num_experts)
    return data, sums, counts


def expert_preferences(
    embeddings: Mapping[int, ClientEmbeddings],
    modules: Sequence[str],
    num_experts: int,
    num_clients: int,
    rank: int,
) -> np.ndarray:
    """P (n_modules, N_e, N_c): each expert's softmax preference over clients, per module."""
    prefs = np.empty((len(modules), num_experts, num_clients))
    for index, module in enumerate(modules):
        data, sums, counts = _module_embeddings(embeddings, module, num_experts, num_clients, rank)
        eps_bar = sums / np.maximum(counts, 1)[:, None]
        logits = eps_bar @ data.T / math.sqrt(rank)
        logits -= logits.max(axis=1, keepdims=True)
        weights = np.exp(logits)
        prefs[index] = weights / weights.sum(axis=1, keepdims=True)
        prefs[index, counts == 0] = 1.0 / num_clients
    return prefs


def held_mask(
    modules: Sequence[str],
    num_experts: int,
    clients: Sequence[int],
    holders: Mapping[int, Mapping[str, Sequence[int]]],
) -> np.ndarray:
    """H (n_modules, N_e, len(clients)): 1 where the client held (and trained) the expert in the
    module this round; clients absent from ``holders`` hold nothing."""
    held = np.zeros((len(modules), num_experts, len(clients)))
    for col, client in enumerate(clients):
        architecture = holders.get(client, {})
        for m, module in enumerate(modules):
            held[m, list(architecture.get(module, [])), col] = 1.0
    return held


def with_continuity(prefs: np.ndarray, held: np.ndarray) -> np.ndarray:
    """The FedAMoLE-C objective (an ablation, not the paper's RSEA): P plus, on the pairs held
    this round, a bonus of one standard deviation of the expert's own row of P.

    The solver maximises a sum of P, so without it an expert moves to whichever client scores
    marginally higher, however small the difference against the row's spread. With it, an expert
    leaves the clients that trained it only for a client whose score beats theirs by more than
    the typical difference its row shows; when its preferences are sharp (one client far above
    the rest) the bonus is small beside them and it still moves. The weight comes from the scores
    themselves, so no constant is tuned.
    """
    spread = prefs.std(axis=-1, keepdims=True)
    return prefs + spread * held
