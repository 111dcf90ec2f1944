"""What crosses the wire between server and clients: plain dataclasses of tensors and numbers.

Both runners move these; only the Flower runner turns them into Flower records.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

StateDict = dict[str, Tensor]
Architecture = dict[str, list[int]]  # adapted module name -> sorted global expert ids


@dataclass
class ClientEmbeddings:
    """RSEA embeddings of one client (SPEC 4): per module, t_c^m and eps_{e,c}^m, each of length r."""

    data: dict[str, Tensor]
    experts: dict[str, dict[int, Tensor]]


@dataclass
class ClientPayload:
    """Server -> client for one round: its architecture and the current weights it needs."""

    round: int
    architecture: Architecture
    weights: StateDict
    lr: float


@dataclass
class ClientUpdate:
    """Client -> server after local training."""

    client_id: int
    weights: StateDict
    num_examples: int
    embeddings: ClientEmbeddings | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def state_nbytes(state: StateDict) -> int:
    """Bytes of a state on the wire (raw tensor data), counted the same way by every runner."""
    return sum(t.numel() * t.element_size() for t in state.values())


def embeddings_nbytes(emb: ClientEmbeddings | None) -> int:
    if emb is None:
        return 0
    vectors = list(emb.data.values()) + [v for ex in emb.experts.values() for v in ex.values()]
    return sum(v.numel() * v.element_size() for v in vectors)


def payload_nbytes(payload: ClientPayload) -> int:
    return state_nbytes(payload.weights)


def update_nbytes(update: ClientUpdate) -> int:
    return state_nbytes(update.weights) + embeddings_nbytes(update.embeddings)
