"""What crosses the wire between server and clients: plain dataclasses of tensors and numbers.

The bottom floor of the package: every other module may import it, it imports nothing of
fedamole. Both transports move these objects; only the Flower transport turns them into records.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import torch
from torch import Tensor

StateDict = dict[str, Tensor]
Architecture = dict[str, list[int]]  # adapted module name -> sorted global expert ids
Metrics = dict[str, float]  # "val_rougeL", "test_accuracy", "train_loss", ...
ExampleScores = dict[str, list[float]]  # "test_rougeL" -> one value per example of that split
V = TypeVar("V")
WireDtype = Literal["float32", "bfloat16"]

WIRE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# The metric names, spelled once. Evaluating a split yields these (as "<split>_<name>" in a
# round's metrics); every other metric of a client's round (train_loss, bytes, embedding norms)
# belongs to the round, not to a split.
ACCURACY, ROUGE_L, EXACT_MATCH, NUM_EXAMPLES = "accuracy", "rougeL", "exact_match", "num_examples"
PRIMARY_METRICS = (ACCURACY, ROUGE_L)  # what model selection uses: classification, generation
SPLIT_METRICS = frozenset({ACCURACY, ROUGE_L, EXACT_MATCH, NUM_EXAMPLES})


def split_metric(split: str, name: str) -> str:
    """The key of a split's metric in a round's metrics, e.g. ``test_accuracy``."""
    return f"{split}_{name}"


def of_split(values: Mapping[str, V], split: str) -> dict[str, V]:
    """One split's entries without its prefix: ``{"test_accuracy": x} -> {"accuracy": x}``."""
    prefix = split_metric(split, "")
    return {k.removeprefix(prefix): v for k, v in values.items() if k.startswith(prefix)}


def primary_metric(metrics: Iterable[str]) -> str:
    """The metric model selection uses among those a split reports."""
    names = set(metrics)
    return next(m for m in PRIMARY_METRICS if m in names)


@dataclass
class ClientEmbeddings:
    """RSEA embeddings of one client (SPEC 4): per module, t_c^m and eps_{e,c}^m, each of length r.

    On disk (checkpoints) and on the wire (Flower records) they are one flat tensor dict,
    :meth:`to_tensors`: ``data/<module>`` and ``expert/<e>/<module>``.
    """

    data: dict[str, Tensor]
    experts: dict[str, dict[int, Tensor]]

    def to_tensors(self) -> StateDict:
        out = {f"data/{module}": vec for module, vec in self.data.items()}
        for module, by_expert in self.experts.items():
            out |= {f"expert/{e}/{module}": vec for e, vec in by_expert.items()}
        return out

    @classmethod
    def from_tensors(cls, tensors: StateDict) -> ClientEmbeddings:
        emb = cls(data={}, experts={})
        for key, vec in tensors.items():
            kind, rest = key.split("/", 1)
            if kind == "data":
                emb.data[rest] = vec
            else:
                expert, module = rest.split("/", 1)
                emb.experts.setdefault(module, {})[int(expert)] = vec
        return emb


@dataclass
class ServerState:
    """Everything the server carries from one round to the next (checkpointed after each round).

    ``store`` (every shared tensor: for FedAMoLE all N_e experts of every module, shared experts
    and routers) is the single source of truth for weights. ``participants`` are the clients that
    take part in ``round``; ``architectures`` (FedAMoLE only) their expert sets for that round;
    ``embeddings`` every client's latest RSEA embeddings.
    """

    round: int
    store: StateDict
    lr: float
    participants: list[int]
    architectures: dict[int, Architecture] = field(default_factory=dict)
    embeddings: dict[int, ClientEmbeddings] = field(default_factory=dict)


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
    # where the client's own machine keeps its personalised model when it does not send it
    kept_at: str | None = None


@dataclass
class ClientEvaluation:
    """Client -> server: the client's model after aggregation on its own val and test splits."""

    client_id: int
    metrics: Metrics
    example_scores: ExampleScores = field(default_factory=dict)
    personal_model: StateDict | None = None
    kept_at: str | None = None


def to_wire(state: StateDict, dtype: WireDtype) -> StateDict:
    """The tensors as they travel: floating point ones in the wire dtype, on the CPU."""
    target = WIRE_DTYPES[dtype]
    return {
        key: value.detach().to(device="cpu", dtype=target if value.is_floating_point() else None)
        for key, value in state.items()
    }


def tensor_nbytes(tensor: Tensor) -> int:
    """Bytes of one tensor on the wire (its raw data)."""
    return tensor.numel() * tensor.element_size()


def state_nbytes(state: StateDict) -> int:
    """Bytes of a state on the wire (raw tensor data), counted the same way by every transport."""
    return sum(tensor_nbytes(t) for t in state.values())


def embeddings_nbytes(emb: ClientEmbeddings | None) -> int:
    if emb is None:
        return 0
    vectors = list(emb.data.values()) + [v for ex in emb.experts.values() for v in ex.values()]
    return sum(tensor_nbytes(v) for v in vectors)


def payload_nbytes(payload: ClientPayload) -> int:
    return state_nbytes(payload.weights)


def update_nbytes(update: ClientUpdate) -> int:
    return state_nbytes(update.weights) + embeddings_nbytes(update.embeddings)
