"""Federated fine-tuning methods, by name, all behind one interface
(:class:`fedamole.federation.method.FederatedMethod`) so the round engine drives them alike.

FedAMoLE and its ablations (``fedamole``, ``fedamole-r``, ``fedamole-h``, ``fedamole-c``), the paper's baselines
(``fedit``, ``fedit-ft``, ``fedprompt``, ``fedptuning``, ``fdlora``) and others users would pick
(``local``, ``ffa-lora``, ``feddpa``), the newer rivals (``fedsa-lora``, ``fedalt``, ``fedlease``) and FedIT at FedAMoLE's
capacity (``fedit-wide``), all on the same data pipeline, seeds, training loop and
budget (see :mod:`fedamole.methods.lora`).
"""

from __future__ import annotations

from collections.abc import Callable

from fedamole.config import Config, ConfigError
from fedamole.federation.method import FederatedMethod
from fedamole.methods.fdlora import FDLoRA
from fedamole.methods.fedalt import FedALT
from fedamole.methods.fedamole import FedAMoLE
from fedamole.methods.feddpa import FedDPA
from fedamole.methods.fedit_wide import fedit_wide
from fedamole.methods.fedlease import FedLEASE
from fedamole.methods.fedprompt import FedPrompt
from fedamole.methods.fedptuning import fedptuning
from fedamole.methods.fedsa_lora import fedsa_lora
from fedamole.methods.lora import fedit, fedit_ft, ffa_lora, local
from fedamole.methods.peft_method import PeftMethod

METHODS: dict[str, Callable[[], FederatedMethod]] = {
    "local": local,
    "fedit": fedit,
    "fedit-ft": fedit_ft,
    "fedit-wide": fedit_wide,
    "fedsa-lora": fedsa_lora,
    "ffa-lora": ffa_lora,
    "feddpa": FedDPA,
    "fedprompt": FedPrompt,
    "fedptuning": fedptuning,
    "fdlora": FDLoRA,
    "fedalt": FedALT,
    "fedlease": FedLEASE,
    "fedamole": lambda: FedAMoLE("fedamole"),
    "fedamole-r": lambda: FedAMoLE("fedamole-r"),
    "fedamole-h": lambda: FedAMoLE("fedamole-h"),
    "fedamole-c": lambda: FedAMoLE("fedamole-c"),
}
FEDAMOLE_VARIANTS = tuple(FedAMoLE.MODES)


class UnknownMethodError(ConfigError):
    """A method name that is not registered; the message lists the known ones."""


def get_method(name: str) -> FederatedMethod:
    """A fresh instance of the named method (one per run: methods keep their build state)."""
    if name not in METHODS:
        raise UnknownMethodError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]()


def resolve_method(name: str | None, cfg: Config) -> FederatedMethod:
    """A method from its name; None means FedAMoLE as the config's ``rsea.mode`` says."""
    return FedAMoLE.for_config(cfg) if name is None else get_method(name)


__all__ = [
    "FEDAMOLE_VARIANTS",
    "METHODS",
    "FDLoRA",
    "FedAMoLE",
    "FedDPA",
    "FedPrompt",
    "FederatedMethod",
    "PeftMethod",
    "UnknownMethodError",
    "get_method",
    "resolve_method",
]
