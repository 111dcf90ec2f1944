"""``fedamole serve``: the pool, the decoding thread and the API, run by uvicorn.

Without ``--api-keys`` the server binds only to a loopback address (anyone who can reach it can
use every model); with keys, each organisation's key sees and uses only its own models. No
connection may hold the server without sending: request headers must arrive within
``header_timeout_s`` of the connection opening (or of the previous response), an idle kept-alive
connection closes after ``idle_timeout_s``, and a body that pauses longer is refused.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from fedamole.config import ConfigError
from fedamole.http_server import serve_http
from fedamole.serving.api import KeyRing, Limits, create_app, readable_by_others
from fedamole.serving.pool import ExportPool, ModelPool, RunPool
from fedamole.serving.scheduler import BatchScheduler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: Path | None = None
    max_batch: int = 16
    max_queue: int = 64
    max_new_tokens: int = 256
    batch_window_s: float = 0.01
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    max_body_bytes: int = 1 << 20
    header_timeout_s: float = 10.0
    idle_timeout_s: float = 5.0

    def limits(self) -> Limits:
        return Limits(self.max_new_tokens, self.max_body_bytes, self.idle_timeout_s)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_settings(settings: ServerSettings) -> None:
    """Refuse an open server before any model loads."""
    if settings.api_keys is None and not is_loopback(settings.host):
        raise ConfigError(
            f"--host {settings.host}: without --api-keys the server binds only to loopback "
            "(127.0.0.1, ::1 or localhost); give --api-keys FILE to serve other machines"
        )
    try:  # before the models load and before anything says it is serving
        socket.create_server((settings.host, settings.port)).close()
    except OSError as exc:
        raise ConfigError(
            f"--host {settings.host} --port {settings.port}: cannot listen there "
            f"({exc.strerror}); choose another --port, or stop what holds it"
        ) from None
    if (settings.ssl_certfile is None) != (settings.ssl_keyfile is None):
        raise ConfigError("--ssl-certfile and --ssl-keyfile go together")
    for path in (settings.ssl_certfile, settings.ssl_keyfile):
        if path is not None and not path.is_file():
            raise ConfigError(f"{path}: no such file")
    if settings.api_keys is not None:
        KeyRing.read(settings.api_keys)
        if readable_by_others(settings.api_keys):
            log.warning(
                "--api-keys %s can be read by other users of this machine: "
                "restrict it with `chmod 600 %s`",
                settings.api_keys,
                settings.api_keys,
            )


def build_pool(
    run_dir: Path | None, clients: list[int] | None, models: list[Path], device: str | None
) -> ModelPool:
    if run_dir is not None:
        return RunPool(run_dir, clients, device)
    return ExportPool(models, device or "auto")


def run_server(
    settings: ServerSettings,
    run_dir: Path | None,
    clients: list[int] | None,
    models: list[Path],
    device: str | None,
    console: Console,
) -> None:
    check_settings(settings)
    pool = build_pool(run_dir, clients, models, device)
    keys = None if settings.api_keys is None else KeyRing.load(settings.api_keys, pool.names())
    if keys is None:
        console.print(f"no --api-keys: serving on loopback only ({settings.host}), no key needed")
    scheduler = BatchScheduler(
        pool, settings.max_batch, settings.max_queue, settings.batch_window_s
    )
    app = create_app(pool, scheduler, keys, settings.limits())
    scheme = "https" if settings.ssl_certfile else "http"
    mode = (
        "clients decoded together, continuous batching"
        if pool.continuous_batch() is not None
        else "one model at a time, batched within it"
    )
    console.print(
        f"serving {', '.join(pool.names())} at {scheme}://{settings.host}:{settings.port}/v1 "
        f"({mode}; up to {settings.max_batch} rows)"
    )
    scheduler.start()
    try:
        serve_http(
            app,
            settings.host,
            settings.port,
            settings.ssl_certfile,
            settings.ssl_keyfile,
            settings.header_timeout_s,
            settings.idle_timeout_s,
        )
    finally:
        scheduler.stop()
