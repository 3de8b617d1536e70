"""The ZMQ endpoint remote environments connect to (`environment.remote`).

A ROUTER socket served by one thread the process owns (`start`/`stop`). Each poll
drains every waiting frame; consecutive REQUEST_ACTION frames from different clients are
answered with one batched `request_action` (one forward pass), so many simulators cost
one inference each tick. Every frame is validated on its own first: a malformed,
oversized or otherwise bad frame gets an error reply and a counter, and the other
clients' frames in the same batch are served as usual. Format: `wire`.
"""

from __future__ import annotations

import logging
import struct
import threading
from typing import Any

import numpy as np
import zmq

from relayrl_runtime import agent as agent_mod
from relayrl_runtime import errors
from relayrl_runtime.transport import wire

log = logging.getLogger(__name__)

_DRAIN_MAX = 512
_POLL_MS = 50


class _Request:
    __slots__ = ("frames", "identity", "ids", "mask", "obs", "op", "request_id", "reward")

    def __init__(self, identity: bytes, op: int, request_id: int, frames: list[Any]) -> None:
        self.identity = identity
        self.op = op
        self.request_id = request_id
        self.frames = frames
        self.ids: Any = None
        self.obs: Any = None
        self.reward: Any = 0.0
        self.mask: Any = None


class RemoteEndpoint:
    """Serves the wire protocol for one agent."""

    def __init__(
        self,
        agent: agent_mod.Agent,
        bind: str,
        *,
        max_frame_bytes: int = 1 << 20,
        max_clients: int = 1024,
    ) -> None:
        self.agent = agent
        self.bind = bind
        self.max_frame_bytes = max_frame_bytes
        self.max_clients = max_clients
        self.metrics = agent.metrics
        self._owners: dict[bytes, set[int]] = {}
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.address = ""

    def start(self) -> str:
        """Bind and serve in a thread; returns the bound address (tcp://host:port)."""
        self._thread = threading.Thread(target=self._serve, name="relayrl-remote", daemon=True)
        self._thread.start()
        self._bound.wait()
        if self._error is not None:
            raise errors.InvalidArgumentError(
                f"environment.remote: cannot bind {self.bind}: {self._error}"
            )
        return self.address

    def stop(self) -> None:
        """Stop serving and join the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def alive(self) -> bool:
        """Whether the serving thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def _serve(self) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(self.bind)
            self.address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError as err:
            self._error = err
            self._bound.set()
            sock.close()
            return
        self._bound.set()
        log.info("remote endpoint listening on %s", self.address)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(_POLL_MS):
                    continue
                batch = []
                for _ in range(_DRAIN_MAX):
                    try:
                        batch.append(sock.recv_multipart(zmq.NOBLOCK, copy=False))
                    except zmq.Again:
                        break
                for reply in self._handle(batch):
                    sock.send_multipart(reply, copy=False)
        finally:
            sock.close()

    # ------------------------------------------------------------------ requests

    def _handle(self, raw: list[list[Any]]) -> list[list[Any]]:
        replies: list[list[Any]] = []
        run: list[_Request] = []
        for msg in raw:
            identity = bytes(msg[0].buffer)
            req_or_reply = self._parse(identity, msg[1:])
            if isinstance(req_or_reply, list):
                replies.append(req_or_reply)
                continue
            req = req_or_reply
            if req.op == wire.Op.REQUEST_ACTION and not any(r.identity == identity for r in run):
                run.append(req)
                continue
            if run:
                replies += self._request_actions(run)
                run = []
            if req.op == wire.Op.REQUEST_ACTION:
                run.append(req)
            else:
                replies.append(self._one(req))
        if run:
            replies += self._request_actions(run)
        return replies

    def _parse(self, identity: bytes, frames: list[Any]) -> _Request | list[Any]:
        size = sum(len(f.buffer) for f in frames)
        request_id = 0
        op = 0
        try:
            if not frames:
                raise wire.WireError("message: expected a header frame, got none")
            head = bytes(frames[0].buffer)
            if len(head) == wire.HEADER.size:
                op, request_id = head[5], struct.unpack_from("<I", head, 8)[0]
            if size > self.max_frame_bytes:
                self.metrics.remote_errors.labels("too_large").inc()
                return [
                    identity,
                    *wire.error_frames(
                        op,
                        request_id,
                        "too_large",
                        f"message: expected at most {self.max_frame_bytes} bytes, got {size}",
                    ),
                ]
            op, _, request_id = wire.parse_header(head)
            if op not in wire.Op.__members__.values():
                raise wire.WireError(
                    f"header.op: expected one of {[int(o) for o in wire.Op]}, got {op}"
                )
            req = _Request(identity, op, request_id, [f.buffer for f in frames[1:]])
            if op == wire.Op.REQUEST_ACTION:
                self._decode_request_action(req)
            return req
        except errors.RelayRLError as err:
            self.metrics.remote_errors.labels(err.kind).inc()
            return [identity, *wire.error_frames(op, request_id, err.kind, str(err))]

    def _decode_request_action(self, req: _Request) -> None:
        if len(req.frames) != 4:
            raise wire.WireError(
                f"REQUEST_ACTION: expected 4 payload frames (ids, obs, reward, mask), "
                f"got {len(req.frames)}"
            )
        req.ids = _ids(req.frames[0])
        req.obs = wire.unpack_array(req.frames[1], "obs")
        reward = wire.optional_array(req.frames[2], "reward")
        req.reward = 0.0 if reward is None else reward.astype(np.float64)
        req.mask = wire.optional_array(req.frames[3], "mask")
        pol = self.agent.current_policy
        pol.check_obs(req.obs, len(req.ids))
        if req.mask is not None:
            pol.check_mask(req.mask, len(req.ids))
        if not self.agent.has_actors(req.ids):
            missing = [i for i in req.ids.tolist() if not self.agent.has_actors([i])]
            raise errors.UnknownActorError(missing)

    def _request_actions(self, run: list[_Request]) -> list[list[Any]]:
        self.metrics.remote_requests.labels("request_action").inc(len(run))
        if len(run) > 1:
            try:
                return self._batched(run)
            except errors.RelayRLError:
                pass  # isolate the bad request: answer each on its own below
        return [self._one(req) for req in run]

    def _batched(self, run: list[_Request]) -> list[list[Any]]:
        ids = np.concatenate([r.ids for r in run])
        obs = np.concatenate([r.obs for r in run])
        rewards = np.concatenate(
            [np.broadcast_to(np.asarray(r.reward, np.float64), (len(r.ids),)) for r in run]
        )
        mask = None
        if any(r.mask is not None for r in run):
            size = self.agent.layout.action_size
            mask = np.concatenate(
                [
                    r.mask.astype(bool) if r.mask is not None else np.ones((len(r.ids), size), bool)
                    for r in run
                ]
            )
        result = self.agent.request_action(ids, obs, mask, rewards)
        replies, start = [], 0
        logp = result.logp
        version = struct.pack("<q", result.version)
        for r in run:
            end = start + len(r.ids)
            replies.append(
                [
                    r.identity,
                    wire.header(r.op, r.request_id),
                    wire.pack_array(result.actions[start:end]),
                    wire.pack_array(logp[start:end]),
                    version,
                ]
            )
            start = end
        return replies

    def _one(self, req: _Request) -> list[Any]:
        try:
            payload = self._dispatch(req)
        except errors.RelayRLError as err:
            self.metrics.remote_errors.labels(err.kind).inc()
            return [req.identity, *wire.error_frames(req.op, req.request_id, err.kind, str(err))]
        return [req.identity, wire.header(req.op, req.request_id), *payload]

    def _dispatch(self, req: _Request) -> list[bytes]:
        agent = self.agent
        op = req.op
        if op == wire.Op.REQUEST_ACTION:
            result = agent.request_action(req.ids, req.obs, req.mask, req.reward)
            return [
                wire.pack_array(result.actions),
                wire.pack_array(result.logp),
                struct.pack("<q", result.version),
            ]
        self.metrics.remote_requests.labels(wire.Op(op).name.lower()).inc()
        if op == wire.Op.NEW_ACTORS:
            _expect(req, 1)
            if len(req.frames[0]) != 4:
                raise wire.WireError(
                    f"NEW_ACTORS.count: expected 4 bytes, got {len(req.frames[0])}"
                )
            (count,) = struct.unpack("<I", req.frames[0])
            if req.identity not in self._owners and len(self._owners) >= self.max_clients:
                raise errors.InvalidArgumentError.mismatch(
                    "clients", f"at most {self.max_clients} remote clients", len(self._owners) + 1
                )
            ids = agent.new_actors(count)
            self._owners.setdefault(req.identity, set()).update(ids)
            self.metrics.remote_clients.set(len(self._owners))
            return [wire.pack_array(np.asarray(ids, dtype=np.int64))]
        if op == wire.Op.REMOVE_ACTORS:
            _expect(req, 1)
            ids = _ids(req.frames[0])
            if not agent.has_actors(ids):
                raise errors.UnknownActorError(
                    [i for i in ids.tolist() if not agent.has_actors([i])]
                )
            for actor_id in ids.tolist():
                agent.remove_actor(actor_id)
            owned = self._owners.get(req.identity)
            if owned is not None:
                owned.difference_update(ids.tolist())
                if not owned:
                    del self._owners[req.identity]
            self.metrics.remote_clients.set(len(self._owners))
            return []
        if op == wire.Op.FLAG_LAST_ACTION:
            _expect(req, 4)
            ids = _ids(req.frames[0])
            n = len(ids)
            reward = _vector(req.frames[1], "reward", n, np.float64)
            term = _vector(req.frames[2], "terminated", n, np.bool_)
            trunc = _vector(req.frames[3], "truncated", n, np.bool_)
            done = agent.flag_last_action(ids, reward, term, trunc)
            return [struct.pack("<I", done)]
        _expect(req, 0)
        return [struct.pack("<q", agent.get_model_version())]


def _expect(req: _Request, frames: int) -> None:
    if len(req.frames) != frames:
        raise wire.WireError(
            f"{wire.Op(req.op).name}: expected {frames} payload frames, got {len(req.frames)}"
        )


def _ids(frame: Any) -> Any:
    ids = wire.unpack_array(frame, "actor_ids")
    if ids.ndim != 1 or ids.dtype != np.int64:
        raise wire.WireError(f"actor_ids: expected a 1-d int64 array, got {ids.ndim}-d {ids.dtype}")
    return ids


def _vector(frame: Any, field: str, n: int, dtype: Any) -> Any:
    arr = wire.unpack_array(frame, field)
    if arr.shape != (n,):
        raise wire.WireError(f"{field}.shape: expected [{n}], got {list(arr.shape)}")
    return arr.astype(dtype)
