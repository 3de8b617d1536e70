"""A sink started while NATS is away: alive (its heartbeat moves), not ready, and a
SIGTERM ends it at once with exit 0, not after the watchdog."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from relayrl_runtime import streams
from relayrl_runtime.sinks import arrow_stream, service
from support import pipeline


def _closed_port_url() -> str:
    return f"nats://127.0.0.1:{pipeline.free_port()}"  # nothing listens there


async def test_the_heartbeat_moves_while_nats_is_away_and_a_stop_ends_the_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "CONNECT_ATTEMPT_SECONDS", 0.3)
    svc = service.SinkService(
        arrow_stream.ArrowStreamWriter(tmp_path, "cartpole"),
        streams.ConnectOptions(servers=(_closed_port_url(),)),
        service.ServiceConfig(namespace="ml", agent="cartpole", http_port=None),
    )
    run = asyncio.create_task(svc.run())
    started = svc.heartbeat
    await asyncio.sleep(1.5)
    assert not run.done()
    assert svc.heartbeat > started + 0.5, "the heartbeat stood still while connecting"
    assert not svc.ready
    svc.stopping.set()
    await asyncio.wait_for(run, timeout=3)  # a clean stop: no exception


def test_a_sigterm_while_nats_is_away_exits_0_at_once(tmp_path: Path) -> None:
    sink = pipeline.Sink(
        "arrow", _closed_port_url(), tmp_path, ["--path", str(tmp_path / "out")], dict(os.environ)
    )
    sink.start()
    try:
        pipeline.wait_until("/healthz", lambda: sink.get("/healthz")[0] == 200, 30)
        status, body = sink.get("/readyz")
        assert status == 503, body
        started = time.monotonic()
        assert sink.terminate(timeout=20) == 0, sink.logs()
        # One connect attempt at most (5 s), not the 55 s watchdog.
        assert time.monotonic() - started < 10, sink.logs()
        assert "Traceback" not in sink.logs()
    finally:
        sink.stop()


def test_a_sigterm_while_postgres_is_away_exits_0_without_a_traceback(tmp_path: Path) -> None:
    """Stopped while the writer's open is being retried: a clean stop, not the
    connection error's traceback and exit 1."""
    env = {**os.environ, "RELAYRL_PG_DSN": f"postgresql://127.0.0.1:{pipeline.free_port()}/x"}
    sink = pipeline.Sink("postgres", _closed_port_url(), tmp_path, [], env)
    sink.start()
    try:
        pipeline.wait_until("a failed open", lambda: "open failed (attempt 2)" in sink.logs(), 30)
        assert sink.terminate(timeout=20) == 0, sink.logs()
        assert "Traceback" not in sink.logs()
    finally:
        sink.stop()


def test_an_idle_http_connection_is_dropped_with_its_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection that never sends a request (half-open after a node failure, a TCP
    check holding it) must not keep a thread of the sink for good."""
    monkeypatch.setattr(service, "HTTP_IDLE_SECONDS", 3.0)
    svc = service.SinkService(
        arrow_stream.ArrowStreamWriter(tmp_path, "cartpole"),
        streams.ConnectOptions(servers=(_closed_port_url(),)),
        service.ServiceConfig(namespace="ml", agent="cartpole", http_port=None),
    )
    server = service.serve_http(svc, "127.0.0.1", 0)

    def handlers() -> int:
        """The server's threads serving a connection (other tests' threads aside)."""
        return sum("process_request_thread" in t.name for t in threading.enumerate())

    try:
        port = server.server_address[1]
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        try:
            deadline = time.monotonic() + 10
            while handlers() == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert handlers() > 0  # held by the idle connections, at first
            # The connections stay open; their threads end all the same.
            deadline = time.monotonic() + 15
            while handlers() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert handlers() == 0
        finally:
            for sock in idle:
                sock.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
            assert answer.status == 200
    finally:
        server.shutdown()
        server.server_close()
