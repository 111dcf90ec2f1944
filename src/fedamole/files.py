"""Atomic file writes: write a temporary file beside the target, then rename it over the target,
so a process killed at any moment leaves either the old file or the new one, never half. And
reading a user's text file as UTF-8, with the line of a bad byte named."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from fedamole.errors import UserError

if TYPE_CHECKING:  # torch loads in seconds; reading a config file must not wait for it
    from torch import Tensor


class TextFileError(UserError, ValueError):
    """A text file that is not UTF-8; the message names the file, the line and the byte."""


def read_utf8(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 are an error naming the file and line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise TextFileError(
            f"{path}, line {line}: not UTF-8 text (byte {data[exc.start]:#04x}); save the file "
            "as UTF-8"
        ) from None


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
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    flat = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    save_file(flat, str(tmp), metadata)
    os.replace(tmp, path)
