"""The process's HTTP endpoints: /metrics, /healthz, /readyz (a tiny asyncio server).

Owned by `app`; kept dependency-free (no web framework) because it serves three GET
routes. /healthz is 200 while the process is not failing; /readyz is 200 once the model
is loaded and the sinks are connected, 503 otherwise (with the reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)

Probe = Callable[[], tuple[bool, str]]

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class HttpServer:
    """Serves the three routes until `close`."""

    def __init__(
        self, metrics: Callable[[], bytes], healthy: Probe, ready: Probe, host: str, port: int
    ) -> None:
        self._metrics = metrics
        self._healthy = healthy
        self._ready = ready
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        """Listen; returns the bound port (useful with port 0)."""
        if self.host.strip("[]") == "::":
            # asyncio makes its IPv6 sockets IPv6-only; "::" (every address of an IPv6
            # pod) should also take IPv4, as `kubectl port-forward` may connect to
            # 127.0.0.1. One dual-stack socket, so that port 0 gives one port.
            self._server = await asyncio.start_server(self._handle, sock=_dual_stack(self.port))
        else:
            self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        """Stop listening and wait for open connections."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), timeout=10)
            while (await asyncio.wait_for(reader.readline(), timeout=10)) not in (b"\r\n", b""):
                pass
            parts = request.decode("latin-1").split()
            status, ctype, body = self._route(parts)
            head = (
                f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _route(self, parts: list[str]) -> tuple[int, str, bytes]:
        if len(parts) < 2:
            return 405, "text/plain", b"bad request\n"
        method, path = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"GET only\n"
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4; charset=utf-8", self._metrics()
        if path in ("/healthz", "/readyz"):
            ok, why = (self._healthy if path == "/healthz" else self._ready)()
            return (200 if ok else 503), "text/plain", (why + "\n").encode()
        return 404, "text/plain", b"not found\n"


def _dual_stack(port: int) -> socket.socket:
    """A listening socket on every IPv6 and (where the kernel maps them) IPv4 address."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with contextlib.suppress(OSError):  # a kernel without IPv4 mapping: IPv6 only
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
