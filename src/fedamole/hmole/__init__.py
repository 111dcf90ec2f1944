"""HMoLE: heterogeneous mixture of LoRA experts (SPEC 2)."""

from fedamole.hmole.adapter import HMoLEAdapter, inject_hmole, resolve_targets
from fedamole.hmole.layer import HMoLELinear, load_balancing_loss

__all__ = ["HMoLEAdapter", "HMoLELinear", "inject_hmole", "load_balancing_loss", "resolve_targets"]
