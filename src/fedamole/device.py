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


CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # /proc/cpuinfo names


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere: no claim is made)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def resolve_dtype(setting: str, device: torch.device) -> tuple[str, str]:
    """The backbone's dtype and why: ``auto`` -> bf16 where the device computes it natively (a
    CUDA device that supports it; a CPU with AVX512-BF16 or AMX), float32 elsewhere, where bf16
    would be emulated and slower."""
    if setting != "auto":
        return setting, "model.dtype"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bfloat16", f"auto: {torch.cuda.get_device_name(device)} computes bf16"
        return "float32", f"auto: {torch.cuda.get_device_name(device)} has no native bf16"
    if device.type == "cpu":
        native = sorted(cpu_flags() & CPU_BF16_FLAGS)
        if native:
            return "bfloat16", f"auto: the CPU has {', '.join(native)}"
        return "float32", "auto: the CPU has no native bf16 (no avx512_bf16 or amx_bf16 flag)"
    return "float32", f"auto: no native bf16 known for {device.type}"


def autocast(device: torch.device, mixed_precision: MixedPrecision) -> AbstractContextManager:
    """``torch.autocast`` for the configured mixed precision, or a no-op for ``no``."""
    if mixed_precision == "no":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[mixed_precision])


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's parameters (and therefore its inputs) live."""
    return next(model.parameters()).device
