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
from pathlib import Path

from rich.console import Console

from fedamole.config import ConfigError
from fedamole.http_server import serve_http
from fedamole.serving.api import KeyRing, create_app, readable_by_others
from fedamole.serving.pool import ExportPool, ModelPool, RunPool
from fedamole.serving.scheduler import BatchScheduler
from fedamole.serving.settings import ServeSettings

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_settings(settings: ServeSettings) -> None:
    """Refuse an open server before any model loads."""
    http = settings.http
    if settings.api_keys is None and not is_loopback(http.host):
        raise ConfigError(
            f"--host {http.host}: without --api-keys the server binds only to loopback "
            "(127.0.0.1, ::1 or localhost); give --api-keys FILE to serve other machines"
        )
    try:  # before the models load and before anything says it is serving
        socket.create_server((http.host, http.port)).close()
    except OSError as exc:
        raise ConfigError(
            f"--host {http.host} --port {http.port}: cannot listen there "
            f"({exc.strerror}); choose another --port, or stop what holds it"
        ) from None
    if (http.ssl_certfile is None) != (http.ssl_keyfile is None):
        raise ConfigError("--ssl-certfile and --ssl-keyfile go together")
    for path in (http.ssl_certfile, http.ssl_keyfile):
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
    settings: ServeSettings,
    run_dir: Path | None,
    clients: list[int] | None,
    models: list[Path],
    device: str | None,
) -> ModelPool:
    """A run's clients (``clients``: all when None) or exported folders, as ``fedamole serve``
    serves them."""
    if run_dir is not None:
        return RunPool(run_dir, clients, device, settings.max_loaded)
    return ExportPool(models, device or "auto", settings.max_loaded)


def run_server(
    settings: ServeSettings,
    run_dir: Path | None,
    clients: list[int] | None,
    models: list[Path],
    device: str | None,
    console: Console,
) -> None:
    check_settings(settings)
    pool = build_pool(settings, run_dir, clients, models, device)
    keys = None if settings.api_keys is None else KeyRing.load(settings.api_keys, pool.names())
    http = settings.http
    if keys is None:
        console.print(f"no --api-keys: serving on loopback only ({http.host}), no key needed")
    scheduler = BatchScheduler(pool, settings)
    app = create_app(pool, scheduler, keys, settings)
    scheme = "https" if http.ssl_certfile else "http"
    mode = (
        "clients decoded together, continuous batching"
        if pool.continuous_batch() is not None
        else "one model at a time, batched within it"
    )
    loaded = "" if settings.max_loaded is None else f", at most {settings.max_loaded} loaded"
    console.print(
        f"serving {', '.join(pool.names())} at {scheme}://{http.host}:{http.port}/v1 "
        f"({mode}; up to {settings.max_batch} rows{loaded})"
    )
    scheduler.start()
    try:
        serve_http(app, http)
    finally:
        scheduler.stop()
