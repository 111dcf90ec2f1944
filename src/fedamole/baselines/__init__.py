"""Federated fine-tuning methods the in-process runner can drive, by name.

FedAMoLE and its ablations (``fedamole``, ``fedamole-r``, ``fedamole-h``) and the baselines users
would otherwise pick (``local``, ``fedit``, ``fedit-ft``, ``ffa-lora``, ``feddpa``), all on the same
data pipeline, seeds, training loop and budget (see :mod:`fedamole.baselines.lora`).
"""

from __future__ import annotations

from collections.abc import Callable

from fedamole.baselines.feddpa import FedDPA
from fedamole.baselines.lora import LoraMethod, fedit, fedit_ft, ffa_lora, local
from fedamole.baselines.method import FedAMoLE, FederatedMethod

METHODS: dict[str, Callable[[], FederatedMethod]] = {
    "local": local,
    "fedit": fedit,
    "fedit-ft": fedit_ft,
    "ffa-lora": ffa_lora,
    "feddpa": FedDPA,
    "fedamole": lambda: FedAMoLE("fedamole"),
    "fedamole-r": lambda: FedAMoLE("fedamole-r"),
    "fedamole-h": lambda: FedAMoLE("fedamole-h"),
}
FEDAMOLE_VARIANTS = ("fedamole", "fedamole-r", "fedamole-h")


def get_method(name: str) -> FederatedMethod:
    """A fresh instance of the named method (one per run: methods keep their build state)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]()


__all__ = [
    "FEDAMOLE_VARIANTS",
    "METHODS",
    "FedAMoLE",
    "FedDPA",
    "FederatedMethod",
    "LoraMethod",
    "get_method",
]
