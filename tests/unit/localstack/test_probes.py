"""Probes reach a pod's loopback address directly, whatever the user's proxy settings."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from relayrl_localstack import probes, procs


@pytest.fixture
def pod_server() -> Iterator[tuple[str, int]]:
    """An HTTP server on a pod address (127.1.x.y), as a process-node pod's would be."""
    server = http.server.ThreadingHTTPServer(
        ("127.1.0.250", 0), http.server.SimpleHTTPRequestHandler
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield "127.1.0.250", int(server.server_address[1])
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.mark.timeout(30)
def test_an_http_probe_of_a_pod_ip_ignores_the_users_proxy(
    pod_server: tuple[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    ip, port = pod_server
    # A proxy nothing listens on, and the usual no_proxy that does not cover pod IPs.
    proxy = f"http://127.0.0.1:{procs.free_port()}"
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(name, proxy)
    monkeypatch.setenv("no_proxy", "localhost,127.0.0.1")
    spec = {"httpGet": {"path": "/", "port": port}, "timeoutSeconds": 2}
    assert probes.run_probe(spec, {}, {}, Path("/"), ip) is True
