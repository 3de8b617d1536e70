"""The remote endpoint and client in one process, over loopback TCP: the short path for a
lone REQUEST_ACTION, its error replies, batches from several clients, and the client's
reused frames."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zmq

from relayrl_runtime import agent as agent_mod
from relayrl_runtime import errors, metrics
from relayrl_runtime.sinks import local
from relayrl_runtime.transport import client, endpoint, wire

OBS = np.zeros((1, 4), np.float32)


@pytest.fixture
def served(models: dict[str, Path]) -> Iterator[tuple[agent_mod.Agent, str]]:
    a = agent_mod.Agent(models["onnx"], actor_count=0, seed=0)
    ep = endpoint.RemoteEndpoint(a, "tcp://127.0.0.1:0", max_frame_bytes=4096)
    address = ep.start()
    try:
        yield a, address
    finally:
        ep.stop()
        a.shutdown()


@pytest.fixture
def raw() -> Iterator[Callable[[str], zmq.Socket[bytes]]]:
    """DEALER sockets that speak the wire format by hand."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    socks: list[zmq.Socket[bytes]] = []

    def connect(address: str) -> zmq.Socket[bytes]:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 10_000)
        sock.connect(address)
        socks.append(sock)
        return sock

    yield connect
    for sock in socks:
        sock.close()


def _action_request(request_id: int, ids: list[int], obs: np.ndarray) -> list[bytes]:
    return [
        wire.header(wire.Op.REQUEST_ACTION, request_id),
        wire.pack_array(np.asarray(ids, np.int64)),
        wire.pack_array(obs),
        b"",
        b"",
    ]


def _errors(a: agent_mod.Agent, kind: str) -> float:
    value = a.metrics.registry.get_sample_value(
        "relayrl_runtime_remote_errors_total", {"reason": kind}
    )
    return value or 0.0


def test_lone_requests_get_replies_and_bad_ones_errors(
    served: tuple[agent_mod.Agent, str], raw: Callable[[str], zmq.Socket[bytes]]
) -> None:
    a, address = served
    with client.RemoteClient(address, timeout=10) as good:
        ids = good.new_actors(1)
        result = good.request_action(ids, OBS, reward=1.0)
        assert result.actions.shape == (1,)
        assert result.logp.shape == (1,)
        assert result.version == 1
        bad = raw(address)
        ok_header = wire.header(wire.Op.REQUEST_ACTION, 7)
        cases = [
            # Well-formed header and frame count (the short path), bad payloads.
            (_action_request(1, ids, np.zeros((1, 3), np.float32)), "invalid_argument"),
            (_action_request(2, [999], OBS), "unknown_actor"),
            ([ok_header, b"\x03", wire.pack_array(OBS), b"", b""], "malformed"),
            ([ok_header, wire.pack_array(np.zeros((1, 1), np.int64)), b"", b"", b""], "malformed"),
            ([ok_header, wire.pack_array(np.asarray(ids)), b"x" * 5000, b"", b""], "too_large"),
            # The general parser.
            ([ok_header, wire.pack_array(np.asarray(ids)), wire.pack_array(OBS)], "malformed"),
            ([b"garbage"], "malformed"),
        ]
        for request_id, (frames, kind) in enumerate(cases, start=1):
            before = _errors(a, kind)
            bad.send_multipart(frames)
            reply = bad.recv_multipart()
            op, flags, _ = wire.parse_header(reply[0])
            assert op == frames[0][5] if len(frames[0]) == wire.HEADER.size else op == 0
            assert flags & wire.FLAG_ERROR, (request_id, kind)
            assert json.loads(reply[1])["kind"] == kind
            assert _errors(a, kind) == before + 1
            # The well-behaved client is unaffected.
            assert good.request_action(ids, OBS).actions.shape == (1,)
        # A request with header flags set goes through the general parser, and is served.
        flagged = _action_request(9, ids, OBS)
        flagged[0] = wire.header(wire.Op.REQUEST_ACTION, 9, flags=2)
        bad.send_multipart(flagged)
        reply = bad.recv_multipart()
        assert wire.parse_header(reply[0]) == (wire.Op.REQUEST_ACTION, 0, 9)
        assert wire.unpack_array(reply[1], "actions").shape == (1,)
        with pytest.raises(errors.RemoteError, match="unknown_actor"):
            good.request_action([999], OBS)
        # An array with no elements and dims numpy cannot index, through the general
        # parser (flags set): once, it ended the endpoint for every client.
        empty = bytes([wire.CODES[np.dtype(np.float32)], 3]) + struct.pack(
            "<III", 2**32 - 1, 2**32 - 1, 0
        )
        flagged[0] = wire.header(wire.Op.REQUEST_ACTION, 10, flags=2)
        bad.send_multipart([flagged[0], wire.pack_array(np.asarray(ids)), empty, b"", b""])
        reply = bad.recv_multipart()
        assert json.loads(reply[1])["kind"] == "malformed"
        assert "obs.shape" in json.loads(reply[1])["message"]
        assert good.request_action(ids, OBS).actions.shape == (1,)
        # A frame past what ZMQ takes in: its connection ends, unread; others go on.
        huge = raw(address)
        huge.setsockopt(zmq.RCVTIMEO, 500)
        huge.send_multipart(
            [
                ok_header,
                wire.pack_array(np.asarray(ids)),
                b"x" * (endpoint.unread_frame_bytes(4096) + 1),
                b"",
                b"",
            ]
        )
        with pytest.raises(zmq.Again):
            huge.recv_multipart()
        assert good.request_action(ids, OBS).actions.shape == (1,)


def test_requests_whose_rows_do_not_match_their_ids_are_refused_each(
    served: tuple[agent_mod.Agent, str], raw: Callable[[str], zmq.Socket[bytes]]
) -> None:
    """One request's extra row must not make up another's missing one in a batch."""
    _, address = served
    with client.RemoteClient(address, timeout=10) as owner:
        ids = owner.new_actors(3)
        two_rows, no_rows = raw(address), raw(address)
        for step in range(20):
            two_rows.send_multipart(
                _action_request(2 * step, [ids[0]], np.zeros((2, 4), np.float32))
            )
            no_rows.send_multipart(
                _action_request(2 * step + 1, [ids[1]], np.zeros((0, 4), np.float32))
            )
            for sock in (two_rows, no_rows):
                reply = sock.recv_multipart()
                assert wire.parse_header(reply[0])[1] & wire.FLAG_ERROR
                body = json.loads(reply[1])
                assert body["kind"] == "invalid_argument"
                assert "obs.shape" in body["message"]
        # A reward of one value for two actors, and a mask of one row for two.
        frames = _action_request(99, ids[1:], np.zeros((2, 4), np.float32))
        frames[0] = wire.header(wire.Op.REQUEST_ACTION, 99, flags=2)  # the general parser
        for i, field, value in (
            (3, "reward.shape", np.ones(1)),
            (4, "mask.shape", np.ones((1, 2), bool)),
        ):
            sent = list(frames)
            sent[i] = wire.pack_array(value)
            no_rows.send_multipart(sent)
            body = json.loads(no_rows.recv_multipart()[1])
            assert (body["kind"], field in body["message"]) == ("invalid_argument", True), body
        assert owner.request_action(ids, np.zeros((3, 4), np.float32)).actions.shape == (3,)


def test_requests_of_several_clients_are_each_answered(
    served: tuple[agent_mod.Agent, str], raw: Callable[[str], zmq.Socket[bytes]]
) -> None:
    a, address = served
    with client.RemoteClient(address, timeout=10) as owner:
        ids = owner.new_actors(6)
    socks = [raw(address) for _ in range(6)]
    for step in range(20):
        # All at once, so the endpoint finds several waiting (one batched forward pass),
        # one of them bad: it gets its error, the others their actions.
        for i, sock in enumerate(socks):
            obs = OBS if i != 3 or step % 2 else np.zeros((1, 5), np.float32)
            sock.send_multipart(_action_request(100 * step + i, [ids[i]], obs))
        for i, sock in enumerate(socks):
            reply = sock.recv_multipart()
            op, flags, request_id = wire.parse_header(reply[0])
            assert (op, request_id) == (wire.Op.REQUEST_ACTION, 100 * step + i)
            if i == 3 and step % 2 == 0:
                assert flags & wire.FLAG_ERROR
                assert json.loads(reply[1])["kind"] == "invalid_argument"
            else:
                assert flags == 0
                assert wire.unpack_array(reply[1], "actions").shape == (1,)
                assert int.from_bytes(reply[3], "little", signed=True) == 1
    actions = a.metrics.registry.get_sample_value("relayrl_runtime_actions_total")
    assert actions == 6 * 20 - 10


class _FailsAfterReply:
    """An agent whose step fails after the actions went out (in the reply callback)."""

    def __init__(self) -> None:
        self.metrics = metrics.RuntimeMetrics()

    def request_action(
        self, ids: Any, obs: Any, mask: Any, reward: Any, on_result: Any = None
    ) -> None:
        result = agent_mod.ActionResult.__new__(agent_mod.ActionResult)
        result.actions = np.zeros(len(ids), np.int64)
        result._logp = np.zeros(len(ids), np.float32)
        result.version = 5
        on_result(result)
        raise RuntimeError("bookkeeping failed")

    def get_model_version(self) -> int:
        return 5


def test_a_step_that_fails_after_its_reply_gets_no_second_reply(
    raw: Callable[[str], zmq.Socket[bytes]],
) -> None:
    fake: Any = _FailsAfterReply()
    ep = endpoint.RemoteEndpoint(fake, "tcp://127.0.0.1:0")
    sock = raw(ep.start())
    try:
        sock.send_multipart(_action_request(1, [0], OBS))
        reply = sock.recv_multipart()
        assert wire.parse_header(reply[0]) == (wire.Op.REQUEST_ACTION, 0, 1)
        sock.send_multipart([wire.header(wire.Op.MODEL_VERSION, 2)])
        reply = sock.recv_multipart()  # the next reply is this one's, not an error
        assert wire.parse_header(reply[0]) == (wire.Op.MODEL_VERSION, 0, 2)
        sample = ("relayrl_runtime_remote_errors_total", {"reason": "internal"})
        assert fake.metrics.registry.get_sample_value(*sample) == 1
    finally:
        ep.stop()


class _BackendFails(_FailsAfterReply):
    """An agent whose inference backend raises its own error type (not a RelayRLError)."""

    def request_action(
        self, ids: Any, obs: Any, mask: Any, reward: Any, on_result: Any = None
    ) -> None:
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Gather: indices out of range")


def test_a_backend_error_in_a_batch_answers_errors_and_keeps_serving(
    raw: Callable[[str], zmq.Socket[bytes]],
) -> None:
    fake: Any = _BackendFails()
    ep = endpoint.RemoteEndpoint(fake, "tcp://127.0.0.1:0")
    address = ep.start()
    socks = [raw(address) for _ in range(6)]
    try:
        for step in range(20):
            # All at once: the endpoint finds several waiting and serves them as a batch.
            for i, sock in enumerate(socks):
                sock.send_multipart(_action_request(100 * step + i, [i], OBS))
            for i, sock in enumerate(socks):
                reply = sock.recv_multipart()
                op, flags, request_id = wire.parse_header(reply[0])
                assert (op, request_id) == (wire.Op.REQUEST_ACTION, 100 * step + i)
                assert flags & wire.FLAG_ERROR
                assert json.loads(reply[1])["kind"] == "internal"
        assert ep.alive
    finally:
        ep.stop()


def test_new_actors_beyond_the_bound_are_refused_by_name(
    served: tuple[agent_mod.Agent, str], raw: Callable[[str], zmq.Socket[bytes]]
) -> None:
    a, address = served
    sock = raw(address)
    sock.send_multipart([wire.header(wire.Op.NEW_ACTORS, 7), (2**32 - 1).to_bytes(4, "little")])
    reply = sock.recv_multipart()
    assert wire.parse_header(reply[0])[1] & wire.FLAG_ERROR
    error = json.loads(reply[1])
    assert error["kind"] == "invalid_argument"
    assert "NEW_ACTORS.count: expected at most 65536 more actors" in error["message"]
    assert a.actor_count == 0


def test_actor_ids_come_from_the_pods_range_and_are_not_given_out_twice(
    models: dict[str, Path],
) -> None:
    a = agent_mod.Agent(models["onnx"], actor_count=0, seed=0)
    first = 5 << endpoint.REMOTE_ID_BITS
    ep = endpoint.RemoteEndpoint(a, "tcp://127.0.0.1:0", first_actor_id=first)
    address = ep.start()
    try:
        with client.RemoteClient(address, timeout=10) as c, client.RemoteClient(address) as d:
            assert c.new_actors(2) == [first, first + 1]
            assert d.new_actors(1) == [first + 2]
            # A client removes its own actors only; the refusal removes nothing.
            with pytest.raises(errors.RemoteError, match=r"REMOVE_ACTORS.ids: expected actors"):
                d.remove_actors([first, first + 2])
            assert sorted(a.get_actor_ids()) == [first, first + 1, first + 2]
            c.remove_actors([first, first + 1])
            assert c.new_actors(1) == [first + 3]
            assert sorted(a.get_actor_ids()) == [first + 2, first + 3]
            # The range's end: the last id is given out, nothing past it.
            end = (6 << endpoint.REMOTE_ID_BITS) - 1
            assert ep._actor_id_end == end + 1
            ep._next_actor_id = end
            with pytest.raises(errors.RemoteError, match=r"NEW_ACTORS.count: expected at most 1"):
                c.new_actors(2)
            assert c.new_actors(1) == [end]
            with pytest.raises(errors.RemoteError, match=r"at most 0 more actors"):
                c.new_actors(1)
    finally:
        ep.stop()
        a.shutdown()


def test_a_new_process_starts_at_a_random_point_of_the_pods_range() -> None:
    # A restarted pod must not hand out its predecessor's ids: a client still stepping
    # those would step another client's new actors.
    half = 1 << (endpoint.REMOTE_ID_BITS - 1)
    firsts = {endpoint.first_remote_id(7) for _ in range(64)}
    assert len(firsts) > 60
    assert all(
        7 << endpoint.REMOTE_ID_BITS <= f < (7 << endpoint.REMOTE_ID_BITS) + half for f in firsts
    )


def test_client_packs_changed_ids_and_rewards_again(
    models: dict[str, Path], tmp_path: Path
) -> None:
    sink = local.LocalFileSink(tmp_path / "out")
    a = agent_mod.Agent(models["onnx"], actor_count=0, sink=sink, seed=0)
    ep = endpoint.RemoteEndpoint(a, "tcp://127.0.0.1:0")
    address = ep.start()
    try:
        with client.RemoteClient(address, timeout=10) as c:
            first, second = c.new_actors(2)
            ids = [first]
            # Each reward is for the previous step: 1.5 and 2 for steps 0 and 1.
            for reward in (0.0, 1.5, 2):
                c.request_action(ids, OBS, reward=reward)
            ids[0] = second  # the same list object, changed: the frame follows it
            c.request_action(ids, OBS, reward=7.0)
            c.request_action(np.asarray([first]), OBS, reward=2.5)
            c.flag_last_action([first, second], reward=[4.0, 8.0])
            ids[0] = 999
            with pytest.raises(errors.RemoteError, match="unknown_actor"):
                c.request_action(ids, OBS)
    finally:
        ep.stop()
        a.shutdown()
    table = pa.concat_tables([pq.read_table(f) for f in sink.files])
    rows = sorted(
        (r["actor_id"], r["step"], r["reward"])
        for r in table.select(["actor_id", "step", "reward"]).to_pylist()
    )
    assert rows == [
        (first, 0, 1.5),
        (first, 1, 2.0),
        (first, 2, 2.5),
        (first, 3, 4.0),
        (second, 0, 8.0),
    ]


def test_observations_with_nan_or_infinity_are_counted(
    served: tuple[agent_mod.Agent, str], raw: Callable[[str], zmq.Socket[bytes]]
) -> None:
    a, address = served

    def counted() -> float:
        name = "relayrl_runtime_nonfinite_observations_total"
        return a.metrics.registry.get_sample_value(name) or 0.0

    with client.RemoteClient(address, timeout=10) as c:
        ids = c.new_actors(3)
        obs = np.zeros((3, 4), np.float32)
        obs[0, 1], obs[2, 3] = np.nan, np.inf
        c.request_action(ids, obs)  # the short path
        assert counted() == 2
        frames = _action_request(5, ids, obs)
        frames[0] = wire.header(wire.Op.REQUEST_ACTION, 5, flags=2)  # the general parser
        sock = raw(address)
        sock.send_multipart(frames)
        assert not wire.parse_header(sock.recv_multipart()[0])[1] & wire.FLAG_ERROR
        assert counted() == 4
        c.request_action(ids, np.zeros((3, 4), np.float32))
        assert counted() == 4


def test_a_remote_request_a_model_fails_on_holds_nothing(models: dict[str, Path]) -> None:
    """The version the runtime started with fails on a client's request (4 rows), with
    none before it: the client gets a `model_run` error, others are answered, and the
    version is not held as failed (one client cannot tell its request's fault from the
    version's)."""
    a = agent_mod.Agent(models["failing_v2"], actor_count=0, seed=0)
    ep = endpoint.RemoteEndpoint(a, "tcp://127.0.0.1:0")
    address = ep.start()
    remote = client.RemoteClient(address, timeout=10.0)
    try:
        ids = remote.new_actors(4)
        with pytest.raises(errors.RemoteError, match=r"^model_run: model version 2 ") as err:
            remote.request_action(ids, np.zeros((4, 4), np.float32))
        assert err.value.remote_kind == "model_run"
        assert remote.request_action(ids[:3], np.zeros((3, 4), np.float32)).version == 2
        assert a.stalled is None
        assert a.run_failure(2) is None
    finally:
        remote.close()
        ep.stop()
        a.shutdown()


def test_a_failed_new_actors_leaves_nothing_behind(
    served: tuple[agent_mod.Agent, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, address = served
    from relayrl_runtime.actors import pool

    real = pool.ActorPool._alloc

    def alloc(self: pool.ActorPool, rows: int, horizon: int) -> None:
        if rows > 8:
            raise MemoryError(f"{rows} rows")
        real(self, rows, horizon)

    monkeypatch.setattr(pool.ActorPool, "_alloc", alloc)
    with client.RemoteClient(address, timeout=10) as c:
        with pytest.raises(errors.RemoteError, match="MemoryError"):
            c.new_actors(16)
        assert a.actor_count == 0
        # The ids were not taken: the next request gets them.
        assert c.new_actors(8) == list(range(8))
        assert a.actor_count == 8


def test_remove_actors_refuses_an_id_given_twice_and_removes_nothing(
    served: tuple[agent_mod.Agent, str],
) -> None:
    a, address = served
    with client.RemoteClient(address, timeout=10) as c:
        ids = c.new_actors(3)
        with pytest.raises(errors.RemoteError, match=r"REMOVE_ACTORS.ids: expected each actor"):
            c.remove_actors([ids[0], ids[0]])
        assert sorted(a.get_actor_ids()) == ids
        c.remove_actors(ids)
        assert a.actor_count == 0


def test_new_actors_of_none_holds_no_client_slot(models: dict[str, Path]) -> None:
    a = agent_mod.Agent(models["onnx"], actor_count=0, seed=0)
    ep = endpoint.RemoteEndpoint(a, "tcp://127.0.0.1:0", max_clients=1)
    address = ep.start()
    try:
        with client.RemoteClient(address, timeout=10) as c, client.RemoteClient(address) as d:
            assert c.new_actors(0) == []
            assert ep.clients == 0
            assert d.new_actors(1) == [0]
            assert ep.clients == 1
    finally:
        ep.stop()
        a.shutdown()


def test_a_worker_stepping_anothers_actors_keeps_their_owner(models: dict[str, Path]) -> None:
    """A pool of workers may step actors one socket created (docs/wire-format.md): the
    creator is not taken for gone while they are stepped, and is once they are not."""
    import time

    a = agent_mod.Agent(models["onnx"], actor_count=0, seed=0)
    ep = endpoint.RemoteEndpoint(a, "tcp://127.0.0.1:0", client_idle_seconds=0.4)
    address = ep.start()
    try:
        with client.RemoteClient(address, timeout=10) as owner:
            ids = owner.new_actors(2)
            with client.RemoteClient(address, timeout=10) as worker:
                obs = np.zeros((2, 4), np.float32)
                end = time.monotonic() + 1.5
                while time.monotonic() < end:
                    worker.request_action(ids, obs)
                    time.sleep(0.02)
                # One actor alone: a frame of other ids, the same owner.
                worker.request_action(ids[:1], obs[:1])
                worker.flag_last_action(ids, [1.0, 1.0], [True, True], [False, False])
                assert sorted(a.get_actor_ids()) == ids
                assert ep.clients == 1
                time.sleep(1.2)  # no one steps them: the owner is gone
                assert a.actor_count == 0
                assert ep.clients == 0
    finally:
        ep.stop()
        a.shutdown()


def _serve_on(models: dict[str, Path], address: str) -> tuple[agent_mod.Agent, Any, str]:
    a = agent_mod.Agent(models["onnx"], actor_count=0, seed=0)
    ep = endpoint.RemoteEndpoint(a, address, first_actor_id=endpoint.first_remote_id(0))
    return a, ep, ep.start()


def test_a_timed_out_request_is_not_sent_once_the_runtime_is_back(
    models: dict[str, Path],
) -> None:
    """ZMQ keeps what a socket could not send, and sends it on reconnect: a NEW_ACTORS
    that timed out while the runtime was away would make actors nobody holds."""
    a, ep, address = _serve_on(models, "tcp://127.0.0.1:0")
    ep.stop()
    a.shutdown()
    with client.RemoteClient(address, timeout=0.3) as c:
        for _ in range(2):
            with pytest.raises(TimeoutError, match="no reply to op 1 within 300 ms"):
                c.new_actors(4)
        a, ep, _ = _serve_on(models, address)
        try:
            c.timeout_ms = 10_000
            ids = c.new_actors(1)
            assert sorted(a.get_actor_ids()) == ids
        finally:
            ep.stop()
            a.shutdown()


def test_a_client_still_stepping_a_restarted_runtimes_ids_gets_unknown_actor(
    models: dict[str, Path],
) -> None:
    a, ep, address = _serve_on(models, "tcp://127.0.0.1:0")
    with client.RemoteClient(address, timeout=10) as old:
        stale = old.new_actors(2)
        ep.stop()
        a.shutdown()
        a, ep, _ = _serve_on(models, address)
        try:
            with client.RemoteClient(address, timeout=10) as new:
                assert not set(new.new_actors(2)) & set(stale)
            with pytest.raises(errors.RemoteError) as err:
                old.request_action(stale, np.zeros((2, 4), np.float32))
            assert err.value.kind == "unknown_actor"
        finally:
            ep.stop()
            a.shutdown()


def test_the_client_names_the_argument_that_does_not_fit(
    served: tuple[agent_mod.Agent, str],
) -> None:
    _, address = served
    with client.RemoteClient(address, timeout=10) as c:
        with pytest.raises(errors.InvalidArgumentError, match=r"^count: expected 0 to"):
            c.new_actors(-1)
        ids = c.new_actors(2)
        obs = np.zeros((2, 4), np.float32)
        with pytest.raises(errors.InvalidArgumentError, match=r"reward.shape: expected \[2\]"):
            c.request_action(ids, obs, reward=[1.0, 2.0, 3.0])
        with pytest.raises(errors.InvalidArgumentError, match=r"terminated.shape: expected"):
            c.flag_last_action(ids, terminated=[True, False, True])
        c.request_action(ids, obs, reward=np.asarray([0.5]))  # one value for all
        assert c.flag_last_action(ids, reward=[1.0, 2.0]) == 2


def test_the_pods_remote_actors_are_bounded_by_max_actors(models: dict[str, Path]) -> None:
    """environment.remote.maxActors: the actors all clients of a pod hold together (each
    has a trajectory buffer), so that a client cannot take the pod's memory."""
    a = agent_mod.Agent(models["onnx"], actor_count=0, seed=0)
    ep = endpoint.RemoteEndpoint(a, "tcp://127.0.0.1:0", max_actors=6)
    address = ep.start()
    try:
        with client.RemoteClient(address, timeout=10) as c, client.RemoteClient(address) as d:
            held = c.new_actors(4)
            with pytest.raises(errors.RemoteError, match=r"expected at most 2 more actors") as e:
                d.new_actors(3)
            assert "environment.remote.maxActors" in str(e.value)
            assert len(d.new_actors(2)) == 2
            c.remove_actors(held)
            assert len(d.new_actors(4)) == 4
    finally:
        ep.stop()
        a.shutdown()
