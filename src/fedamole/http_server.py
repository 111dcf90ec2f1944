"""How fedamole's HTTP servers (``fedamole serve``, ``fedamole fleet-gateway``) run uvicorn:
with a deadline for each request's headers, so that a connection that sends nothing, or trickles
its headers a byte at a time, cannot hold a server's connection slots for ever (uvicorn only
times out idle kept-alive connections, after a response), and an idle timeout."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol


class _HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol, which waits for request headers forever, given a deadline: from
    the moment a connection opens or finishes a response until the next request's headers are
    complete; a connection that sends nothing or trickles its headers is closed then."""

    header_timeout_s = 10.0
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        waiting = self.cycle
        super().data_received(data)
        if self.cycle is not waiting:  # a new request's headers are in
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self._deadline = self.loop.call_later(self.header_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        busy = self.cycle is not None and not self.cycle.response_complete
        if not busy:
            self.transport.close()


def _header_deadline_protocol(timeout_s: float) -> type[H11Protocol]:
    """The protocol class uvicorn instantiates per connection, with this server's deadline."""
    return type("HeaderDeadline", (_HeaderDeadline,), {"header_timeout_s": timeout_s})


@dataclass(frozen=True)
class HTTPSettings:
    """Where a server listens, its TLS (uvicorn's, when both files are given), and how long a
    connection may hold it: each request's headers are due within ``header_timeout_s`` and an
    idle kept-alive connection closes after ``idle_timeout_s`` (both servers' one default)."""

    host: str
    port: int
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    header_timeout_s: float = 10.0
    idle_timeout_s: float = 5.0


def serve_http(app: ASGIApp, http: HTTPSettings) -> None:
    """Serve ``app`` until interrupted, as ``http`` says."""
    uvicorn.run(
        app,
        host=http.host,
        port=http.port,
        log_level="warning",
        ssl_certfile=http.ssl_certfile,
        ssl_keyfile=http.ssl_keyfile,
        http=_header_deadline_protocol(http.header_timeout_s),
        timeout_keep_alive=http.idle_timeout_s,  # type: ignore[arg-type]  # a float works
    )
