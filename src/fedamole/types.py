"""What crosses the wire between server and clients: plain dataclasses of tensors and numbers.

The bottom floor of the package: every other module may import it, it imports nothing of
fedamole. Both transports move these objects; only the Flower transport turns them into records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

StateDict = dict[str, Tensor]
Architecture = dict[str, list[int]]  # adapted module name -> sorted global expert ids
Metrics = dict[str, float]  # "val_rougeL", "test_accuracy", "train_loss", ...
ExampleScores = dict[str, list[float]]  # "test_rougeL" -> one value per example of that split
WireDtype = Literal["float32", "bfloat16"]

WIRE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# What evaluating a split yields; every other metric of a client's round (train_loss, bytes,
# embedding norms) belongs to the round, not to a split.
SPLIT_METRICS = frozenset({"accuracy", "rougeL", "exact_match", "num_examples"})


@dataclass
class ClientEmbeddings:
    """RSEA embeddings of one client (SPEC 4): per module, t_c^m and eps_{e,c}^m, each of length r."""

    data: dict[str, Tensor]
    experts: dict[str, dict[int, Tensor]]


@dataclass
class ClientPayload:
    """Server -> client for one round: its architecture (empty without experts), the current
    weights it needs and the learning rate."""

    round: int
    architecture: Architecture
    weights: StateDict
    lr: float


@dataclass
class ClientUpdate:
    """Client -> server after local training. ``personal_model`` is set in the last round when
    the locally trained model is the client's personalised model (it never counts as traffic)."""

    client_id: int
    weights: StateDict
    num_examples: int
    embeddings: ClientEmbeddings | None = None
    metrics: Metrics = field(default_factory=dict)
    example_scores: ExampleScores = field(default_factory=dict)
    personal_model: StateDict | None = None


@dataclass
class ClientEvaluation:
    """Client -> server: the client's model after aggregation on its own val and test splits."""

    client_id: int
    metrics: Metrics
    example_scores: ExampleScores = field(default_factory=dict)
    personal_model: StateDict | None = None


def to_wire(state: StateDict, dtype: WireDtype) -> StateDict:
    """The tensors as they travel: floating point ones in the wire dtype, on the CPU."""
    target = WIRE_DTYPES[dtype]
    return {
        key: value.detach().to(device="cpu", dtype=target if value.is_floating_point() else None)
        for key, value in state.items()
    }


def state_nbytes(state: StateDict) -> int:
    """Bytes of a state on the wire (raw tensor data), counted the same way by every transport."""
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
