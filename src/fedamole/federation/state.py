"""The server's state between rounds, checkpointed after each round by the run directory."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedamole.types import Architecture, ClientEmbeddings, StateDict


@dataclass
class ServerState:
    """Everything the server carries from one round to the next.

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
