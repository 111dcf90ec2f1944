"""The Fleet gateway: the only port of a fedamole deployment that other organisations reach.

Flower 1.41 serves the Fleet API (SuperNodes), the Control API (``flwr`` CLI: register nodes,
submit and stop runs, read logs) and the Runtime API (the ServerApp) on one HTTP port, and in
open-source Flower the Control API has no authentication. So the SuperLink listens on loopback
only, where the operator's ``flwr`` CLI and the ServerApp reach it, and this gateway is what
listens on the public address: it terminates TLS with the SuperLink's certificate and forwards
``POST /v1/fleet/*``, streaming both ways and leaving every header a SuperNode signs intact;
any other path is answered 404 without touching the SuperLink. SuperNode authentication stays
the SuperLink's: only keys the operator registered are let in.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from fedamole.config import ConfigError
from fedamole.http_server import HTTPSettings, serve_http

log = logging.getLogger(__name__)

FLEET_PATHS = "/v1/fleet/{rpc:path}"
# Headers that describe one connection, not the message (RFC 9110 7.6.1), and the ones each
# hop's server sets for itself.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "date",
        "server",
    }
)


@dataclass(frozen=True)
class GatewaySettings:
    """Where the gateway listens, where the SuperLink is, and the TLS on each side."""

    superlink: str  # host:port of the SuperLink, normally 127.0.0.1:<port>
    host: str = "0.0.0.0"
    port: int = 9092
    ssl_certfile: Path | None = None  # what SuperNodes verify (the SuperLink's certificate)
    ssl_keyfile: Path | None = None
    superlink_ca: Path | None = None  # the SuperLink speaks TLS; verify it with this CA
    insecure: bool = False  # plain HTTP outside: local try-outs only

    def check(self) -> None:
        """Refuse a gateway without TLS outside unless asked for, and missing files."""
        if self.insecure == (self.ssl_certfile is not None):
            raise ConfigError(
                "give --ssl-certfile and --ssl-keyfile (SuperNodes verify them against the CA), "
                "or --insecure for a local try-out, not both"
            )
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ConfigError("--ssl-certfile and --ssl-keyfile go together")
        for path in (self.ssl_certfile, self.ssl_keyfile, self.superlink_ca):
            if path is not None and not path.is_file():
                raise ConfigError(f"{path}: no such file")

    def http(self) -> HTTPSettings:
        """Where it listens, with TLS outside; connection timeouts as every fedamole server."""
        return HTTPSettings(self.host, self.port, self.ssl_certfile, self.ssl_keyfile)

    def upstream_url(self) -> str:
        return f"{'https' if self.superlink_ca else 'http'}://{self.superlink}"

    def upstream_verify(self) -> ssl.SSLContext | bool:
        if self.superlink_ca is None:
            return False
        return ssl.create_default_context(cafile=str(self.superlink_ca))


def _message_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in headers if k.decode("latin-1").lower() not in _HOP_BY_HOP]


def create_gateway(upstream: httpx.AsyncClient) -> Starlette:
    """The gateway app over a client whose base URL is the SuperLink."""

    async def forward(request: Request) -> Response:
        outgoing = upstream.build_request(
            "POST",
            request.url.path,
            params=request.url.query or None,
            headers=_message_headers(request.headers.raw),
            content=request.stream(),
        )
        try:
            reply = await upstream.send(outgoing, stream=True)
        except httpx.HTTPError as exc:
            log.warning("SuperLink unreachable for %s: %s", request.url.path, exc)
            return PlainTextResponse("SuperLink unavailable", status_code=502)
        response = StreamingResponse(
            reply.aiter_raw(),
            status_code=reply.status_code,
            background=BackgroundTask(reply.aclose),
        )
        response.raw_headers = _message_headers(reply.headers.raw)  # as sent, repeats kept
        return response

    async def refused(_request: Request, _exc: Exception) -> Response:
        return PlainTextResponse("Not Found", status_code=404)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        async with upstream:
            yield

    return Starlette(
        routes=[Route(FLEET_PATHS, forward, methods=["POST"])],
        exception_handlers={404: refused, 405: refused},
        lifespan=lifespan,
    )


def run_gateway(settings: GatewaySettings) -> None:
    """Serve the gateway until interrupted (uvicorn)."""
    settings.check()
    upstream = httpx.AsyncClient(
        base_url=settings.upstream_url(),
        verify=settings.upstream_verify(),
        timeout=httpx.Timeout(None, connect=10.0),  # Flower's own clients bound their calls
    )
    log.info(
        "Fleet gateway on %s:%d -> %s (only /v1/fleet/)",
        settings.host,
        settings.port,
        settings.upstream_url(),
    )
    serve_http(create_gateway(upstream), settings.http())
