"""Device and precision, decided once from the config and followed everywhere else.

``model.device`` picks where the backbone and every batch live; ``model.dtype`` the backbone's
dtype; ``optim.mixed_precision`` whether forward passes run under ``torch.autocast``. Adapter
master weights stay float32 whatever the backbone's dtype. Server-side state (expert store,
aggregation, checkpoints) always stays on the CPU.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import torch

from fedamole.errors import UserError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}

MixedPrecision = Literal["no", "bf16", "fp16"]


class DeviceError(UserError, RuntimeError):
    """The configured device is not available here; the message names ``model.device``."""


def resolve_device(setting: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; an explicit CUDA device must exist."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"model.device={setting}: CUDA is not available on this machine (torch "
                f"{torch.__version__}, built for CUDA {torch.version.cuda}); use model.device=cpu "
                "or auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"model.device={setting}: only {torch.cuda.device_count()} CUDA device(s) here "
                f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"model.device={setting}: MPS is not available; use cpu or auto")
    return device


def autocast(device: torch.device, mixed_precision: MixedPrecision) -> AbstractContextManager:
    """``torch.autocast`` for the configured mixed precision, or a no-op for ``no``."""
    if mixed_precision == "no":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[mixed_precision])


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's parameters (and therefore its inputs) live."""
    return next(model.parameters()).device
