"""Every setting of ``fedamole serve``, with its default, in one place: the command line's options
default to :class:`ServeSettings`' fields, and the server, its decoding thread and its API read
the one object they are handed. Light on purpose (no model code): the command line imports it
to show the defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedamole.http_server import HTTPSettings


@dataclass(frozen=True)
class ServeSettings:
    """How ``fedamole serve`` listens (``http``), who may use which model (``api_keys``: None
    serves loopback only), how requests are batched and bounded, and how many clients' adapters
    may be on the device at once (``max_loaded``, vLLM's ``max_loras``; None: every client)."""

    http: HTTPSettings = field(default_factory=lambda: HTTPSettings("127.0.0.1", 8000))
    api_keys: Path | None = None
    max_batch: int = 16  # rows decoded together
    max_queue: int = 64  # requests waiting before the API answers 429
    max_new_tokens: int = 256  # the largest max_tokens a request may ask for
    batch_window_s: float = 0.01  # how long an idle server gathers a batch
    max_body_bytes: int = 1 << 20  # larger request bodies get 413 before they are read
    max_loaded: int | None = None
