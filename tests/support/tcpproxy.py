"""A TCP forwarder on a free loopback port, to break connections the way a network does.

`cut()` drops every client-side connection; with `keep_upstream` the server-side ones
stay open and silent, as a half-open connection after a partition looks to the server.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class TcpProxy:
    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._kept: list[socket.socket] = []
        self._socks: list[socket.socket] = [self._listener]  # closed by close()
        self.accepted = 0
        threading.Thread(target=self._accept, name="tcp-proxy", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                up = socket.create_connection(self.target, timeout=5)
            except OSError:
                down.close()
                continue
            up.settimeout(None)
            with self._lock:
                self._pairs.append((down, up))
                self._socks += [down, up]
                self.accepted += 1
            for src, dst in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
            except OSError:
                break
        with self._lock:
            kept = dst in self._kept or src in self._kept
        if not kept:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self, keep_upstream: bool = False) -> None:
        """Drop the client sides of every connection so far (and the server sides too,
        unless `keep_upstream`)."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
            if keep_upstream:
                self._kept += [up for _, up in pairs]
        for down, up in pairs:
            for s in (down,) if keep_upstream else (down, up):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()
