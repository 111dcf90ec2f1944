"""Atomic file writes: write a temporary file beside the target, then rename it over the target,
so a process killed at any moment leaves either the old file or the new one, never half."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_save_tensors(
    path: Path, tensors: Mapping[str, Tensor], metadata: dict[str, str] | None = None
) -> None:
    """A safetensors file of detached, contiguous CPU copies, written then renamed."""
    tmp = path.with_name(path.name + ".tmp")
    flat = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    save_file(flat, str(tmp), metadata)
    os.replace(tmp, path)
