"""Remote environment clients in separate processes against the real runtime process."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from integration.runtime import helpers

from relayrl_runtime import errors
from relayrl_runtime.transport import client, wire
from support import tcpproxy

CLIENT = Path(__file__).with_name("remote_client.py")


@pytest.fixture
def remote_runtime(models: dict[str, Path], tmp_path: Path):  # type: ignore[no-untyped-def]
    zport = helpers.free_port()
    cfg = {
        "agent": "remote",
        "actors": 0,
        "podIndex": 1,
        "model": {"uri": str(models["onnx"]), "format": "onnx"},
        "environment": {"remote": {"port": zport, "maxFrameBytes": 4096, "maxClients": 8}},
        "localSink": {"path": str(tmp_path / "out")},
    }
    proc = helpers.RuntimeProcess(tmp_path, cfg)
    try:
        proc.wait_ready()
        # By name: a runtime listening on IPv4 only is reached at "localhost" too.
        yield proc, f"tcp://localhost:{zport}", tmp_path / "out"
    finally:
        proc.kill()


def test_clients_in_separate_processes(remote_runtime, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    proc, address, out = remote_runtime
    results = [tmp_path / f"client{i}.json" for i in range(3)]
    children = [
        subprocess.Popen([sys.executable, str(CLIENT), address, "300", str(r)]) for r in results
    ]
    for child in children:
        assert child.wait(120) == 0
    summaries = [json.loads(r.read_text()) for r in results]
    assert all(s["versions"] == [1] for s in summaries)
    text = proc.metrics()
    assert helpers.metric(text, "relayrl_runtime_actions_total") == 3 * 300 * 2
    assert helpers.metric(text, "relayrl_runtime_trajectory_buffer_bytes") > 0
    assert proc.terminate() == 0, proc.logs()
    table = helpers.written(out)
    assert table.num_rows == 3 * 300 * 2
    # Pod 1 gives out actor ids in its range [1 << 32, 2 << 32), apart from every other
    # pod's, in order from a random point of the range's lower half.
    given = sorted(i for s in summaries for i in s["ids"])
    first = given[0]
    assert 1 << 32 <= first < (1 << 32) + (1 << 31)
    assert given == list(range(first, first + 6))
    assert set(table["actor_id"].to_pylist()) == set(given)


def test_bad_frames_get_error_replies_and_others_are_served(remote_runtime) -> None:  # type: ignore[no-untyped-def]
    proc, address, _ = remote_runtime
    good = client.RemoteClient(address, timeout=10)
    ids = good.new_actors(1)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(address)
    try:
        cases = [
            ([b"garbage"], "malformed"),
            ([wire.header(wire.Op.REQUEST_ACTION, 1), b"\x03\x01"], "malformed"),
            ([wire.header(wire.Op.REQUEST_ACTION, 2), b"x" * 10_000], "too_large"),
            ([wire.header(77, 3)], "malformed"),
        ]
        for frames, kind in cases:
            raw.send_multipart(frames)
            assert raw.poll(10_000), f"no reply to {frames[:1]!r}"
            reply = raw.recv_multipart()
            _, flags, _ = wire.parse_header(reply[0])
            assert flags & wire.FLAG_ERROR
            assert json.loads(reply[1])["kind"] == kind
            # The well-behaved client is unaffected.
            result = good.request_action(ids, np.zeros((1, 4), np.float32))
            assert result.actions.shape == (1,)
        with pytest.raises(errors.RemoteError, match=r"obs.shape: expected \[1, 4\], got \[1, 3\]"):
            good.request_action(ids, np.zeros((1, 3), np.float32))
        with pytest.raises(errors.RemoteError, match="unknown_actor"):
            good.request_action([999], np.zeros((1, 4), np.float32))
        assert good.get_model_version() == 1
        text = proc.metrics()
        assert helpers.metric(text, 'relayrl_runtime_remote_errors_total{reason="malformed"}') == 3
        assert helpers.metric(text, 'relayrl_runtime_remote_errors_total{reason="too_large"}') == 1
    finally:
        raw.close()
        good.close()
    assert proc.terminate() == 0, proc.logs()


def _quick_idle_config(models: dict[str, Path], out: Path, zport: int) -> dict[str, object]:
    """A remote-endpoint runtime that takes a client quiet for 1 s as gone."""
    return {
        "agent": "remote",
        "actors": 0,
        "model": {"uri": str(models["onnx"]), "format": "onnx"},
        "environment": {"remote": {"port": zport}},
        "localSink": {"path": str(out)},
        "limits": {"remoteClientIdleSeconds": 1},
    }


def test_idle_client_actors_are_removed_and_flushed(
    models: dict[str, Path], tmp_path: Path
) -> None:
    zport = helpers.free_port()
    out = tmp_path / "out"
    cfg = _quick_idle_config(models, out, zport)
    proc = helpers.RuntimeProcess(tmp_path, cfg)
    try:
        proc.wait_ready()
        result = tmp_path / "client.json"
        address = f"tcp://127.0.0.1:{zport}"
        child = subprocess.Popen(
            [sys.executable, str(CLIENT), address, "40", str(result), "--abandon"]
        )
        assert child.wait(120) == 0
        # The client is gone without REMOVE_ACTORS: after the idle timeout its actors go.
        helpers.wait_for(
            "the idle client's actors removed",
            lambda: (
                helpers.metric(proc.metrics(), "relayrl_runtime_remote_idle_clients_total") == 1
            ),
        )
        text = proc.metrics()
        assert helpers.metric(text, "relayrl_runtime_actors") == 0
        assert helpers.metric(text, "relayrl_runtime_remote_clients") == 0
        assert proc.terminate() == 0, proc.logs()
    finally:
        proc.kill()
    assert "idle for over 1s: removed its 2 actors" in proc.logs()
    summary = json.loads(result.read_text())
    table = helpers.written(out)
    # Every step the client took was written: the partial trajectories were flushed (cut)
    # when the actors were removed.
    assert table.num_rows == 40 * 2
    assert set(table["actor_id"].to_pylist()) == set(summary["ids"])
    trajectories = helpers.trajectories(table)
    assert all(t[-1]["terminated"] or t[-1]["truncated"] for t in trajectories.values())


def test_a_client_that_reconnects_keeps_its_actors(models: dict[str, Path], tmp_path: Path) -> None:
    """A network blip between a simulator and the pod: the client's socket reconnects.

    Under a new ZMQ identity its old one went quiet, and the idle sweep removed the
    actors it was still stepping. The connection is cut half-open (the pod's side stays
    open and silent, as after a partition), so the reconnect must also take the id over.
    """
    zport = helpers.free_port()
    cfg = _quick_idle_config(models, tmp_path / "out", zport)
    proc = helpers.RuntimeProcess(tmp_path, cfg)
    proxy = tcpproxy.TcpProxy("127.0.0.1", zport)
    try:
        proc.wait_ready()
        with client.RemoteClient(f"tcp://127.0.0.1:{proxy.port}", timeout=5) as c:
            ids = c.new_actors(2)
            obs = np.zeros((2, 4), np.float32)
            for _ in range(5):
                c.request_action(ids, obs, reward=np.zeros(2))
            proxy.cut(keep_upstream=True)
            # The socket reconnects by itself; a request sent before it notices the cut
            # would go down the dead connection (and time out).
            helpers.wait_for("the client's reconnect", lambda: proxy.accepted == 2)
            deadline = time.monotonic() + 3.0  # three idle timeouts
            steps = 0
            while time.monotonic() < deadline:
                c.request_action(ids, obs, reward=np.ones(2))
                steps += 1
                time.sleep(0.05)
            assert proxy.accepted == 2  # no further reconnect
            text = proc.metrics()
            assert helpers.metric(text, "relayrl_runtime_remote_idle_clients_total") == 0
            assert helpers.metric(text, "relayrl_runtime_actors") == 2
            c.remove_actors(ids)
        assert proc.terminate() == 0, proc.logs()
    finally:
        proxy.close()
        proc.kill()
    assert steps > 10
