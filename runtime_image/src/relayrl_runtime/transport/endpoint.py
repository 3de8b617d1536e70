"""The ZMQ endpoint remote environments connect to (`environment.remote`).

A ROUTER socket served by one thread the process owns (`start`/`stop`), in one receive
loop (a blocking receive with a timeout, so a request costs no poller). Each wake-up
drains every waiting message; consecutive REQUEST_ACTION messages from different clients
are answered with one batched `request_action` (one forward pass), so many simulators
cost one inference each tick. A lone well-formed REQUEST_ACTION (the common case for one
client) takes a short path on this thread: arrays decoded as views of the received
bytes, the request's header reused as the reply's, and the reply sent as soon as the
actions are chosen, before the step is recorded. Every message is validated on its own:
a malformed, oversized or otherwise bad message gets an error reply and a counter, and
the other clients' messages in the same batch are served as usual (a batch that fails is
answered request by request). Format and socket calls: `wire`.

Clients that create actors own them, known by their ZMQ routing id (`client` sets its
own, so a reconnect keeps it). A client that sends nothing for `client_idle_seconds` is
considered gone (it crashed, or disconnected without calling REMOVE_ACTORS): its actors
are removed, which flushes their partial trajectories.
"""

from __future__ import annotations

import logging
import secrets
import struct
import threading
import time
from typing import Any, Final

import numpy as np
import zmq

from relayrl_runtime import agent as agent_mod
from relayrl_runtime import errors
from relayrl_runtime.transport import wire

log = logging.getLogger(__name__)

_DRAIN_MAX: Final = 512
_POLL_MS: Final = 50
_VERSION: Final = struct.Struct("<q")
_COUNT: Final = struct.Struct("<I")
_REQUEST_ID: Final = struct.Struct("<I")
# Frames up to this size (or four times the message bound) are taken in and answered
# `too_large`; past it ZMQ ends the connection without holding the frame in memory.
_UNREAD_FRAME_FLOOR: Final = 16 << 20
_MAGIC_VERSION: Final = wire.MAGIC + bytes([wire.VERSION])
_OPS: Final = frozenset(int(o) for o in wire.Op)
# The first 8 header bytes of a REQUEST_ACTION without flags: its reply header is the
# request's header unchanged.
_ACTION_HEAD: Final = wire.header(wire.Op.REQUEST_ACTION, 0)[:8]
# Actor id frames decoded already (simulators send the same ids every step), for frames
# of at most `_IDS_CACHE_BYTES`, at most `_IDS_CACHE` of them.
_IDS_CACHE: Final = 1024
# Actors remote clients may hold at once (all clients together): a NEW_ACTORS count is
# any u32, and each actor's trajectory buffer is allocated at once.
MAX_REMOTE_ACTORS: Final = 65_536
# Remote clients' actors in the pod of index p get ids from the range [p << 32,
# (p + 1) << 32), so no two pods of an Agent give out the same id. Each process starts
# at a random point of the range's lower half (`first_remote_id`) and counts up, never
# reusing an id and never past the range (NEW_ACTORS is refused there): a restarted pod
# does not hand out its predecessor's ids again, so a client still stepping those gets
# `unknown_actor` rather than another client's new actors.
REMOTE_ID_BITS: Final = 32
_IDS_CACHE_BYTES: Final = 1024


class _Request:
    __slots__ = ("frames", "identity", "ids", "mask", "obs", "op", "request_id", "reward")

    def __init__(self, identity: bytes, op: int, request_id: int, frames: list[bytes]) -> None:
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
        max_actors: int = 65_536,
        client_idle_seconds: float = 60.0,
        first_actor_id: int = 0,
    ) -> None:
        self.agent = agent
        self.bind = bind
        self.max_frame_bytes = max_frame_bytes
        self.max_clients = max_clients
        self.max_actors = min(max_actors, MAX_REMOTE_ACTORS)
        self.client_idle_seconds = client_idle_seconds
        self.metrics = agent.metrics
        self._owners: dict[bytes, set[int]] = {}
        self._owner_of: dict[int, bytes] = {}
        # The one owner of an actor id frame's actors, for frames seen already (of at
        # most `_IDS_CACHE_BYTES`); frames of several owners' actors are not kept.
        self._frame_owner: dict[bytes, bytes] = {}
        self._next_actor_id = first_actor_id
        # The end of the pod's range that holds first_actor_id.
        self._actor_id_end = ((first_actor_id >> REMOTE_ID_BITS) + 1) << REMOTE_ID_BITS
        self._last_seen: dict[bytes, float] = {}
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._headers: dict[tuple[int, int], bytes] = {}
        self._served_actions = self.metrics.remote_requests.labels("request_action")
        # REQUEST_ACTION messages served since the counter was last updated: counted
        # here and added to the (locking) Prometheus counter once per sweep.
        self._actions_pending = 0
        self._sock: zmq.Socket[bytes] | None = None
        self._ids_cache: dict[bytes, Any] = {}
        # The short path's reply (identity, header) until `_reply_action` sends it.
        self._owed: tuple[bytes, bytes] | None = None
        self._on_result = self._reply_action
        self._version = -1
        self._version_frame = b""
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
    def stopping(self) -> bool:
        """Whether `stop` was called (the thread then ends on purpose)."""
        return self._stop.is_set()

    @property
    def alive(self) -> bool:
        """Whether the serving thread runs."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def clients(self) -> int:
        """Remote clients holding actors."""
        return len(self._owners)

    def _serve(self) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # A client reconnecting under its routing id (client.py) takes the id over,
        # even while its old connection is not yet known to be dead (half-open after
        # a network partition): else the new connection would be refused.
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        # ZMQ takes in a whole message before it is handed over: a frame past this ends
        # its connection instead (one below it, past the bound, gets `too_large`).
        sock.setsockopt(zmq.MAXMSGSIZE, unread_frame_bytes(self.max_frame_bytes))
        if "[" in self.bind:
            sock.setsockopt(zmq.IPV6, 1)
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
        # A blocking receive that gives up after _POLL_MS to look at the stop flag and
        # the idle clients: one call per request (no poller).
        sock.setsockopt(zmq.RCVTIMEO, _POLL_MS)
        self._sock = sock
        recv, send, waiting = wire.recv_frames, wire.send_frames, wire.waiting
        monotonic = time.monotonic
        stop = self._stop
        sweep_every = min(1.0, self.client_idle_seconds / 4)
        next_sweep = monotonic() + sweep_every
        try:
            while not stop.is_set():
                try:
                    first: list[bytes] | None = recv(sock)
                except zmq.Again:
                    first = None
                now = monotonic()
                if first is not None:
                    # With one client (one request in flight) there is nothing to batch
                    # with: no need to ask the socket what else is waiting.
                    if len(self._last_seen) <= 1 or not waiting(sock):
                        # The short path (it may send the reply itself, before the
                        # step is recorded).
                        reply = self._handle_one(first, now)
                        if reply is not None:
                            send(sock, reply)
                    else:
                        batch = [first]
                        while len(batch) < _DRAIN_MAX and waiting(sock):
                            batch.append(recv(sock))
                        try:
                            replies = self._handle(batch, now)
                        except Exception as err:  # a bug must not end the endpoint
                            log.exception("remote endpoint: %d messages not served", len(batch))
                            self.metrics.remote_errors.labels("internal").inc()
                            replies = [_internal_error(m, err) for m in batch]
                        for reply in replies:
                            send(sock, reply)
                if now >= next_sweep:
                    next_sweep = now + sweep_every
                    self._sweep(now)
        finally:
            if self._actions_pending:
                self._served_actions.inc(self._actions_pending)
                self._actions_pending = 0
            self._sock = None
            sock.close()

    # ------------------------------------------------------------------ clients

    def _sweep(self, now: float) -> None:
        """Update counters; remove the actors of clients idle over `client_idle_seconds`."""
        if self._actions_pending:
            self._served_actions.inc(self._actions_pending)
            self._actions_pending = 0
        limit = now - self.client_idle_seconds
        gone = [c for c, seen in self._last_seen.items() if seen < limit]
        for identity in gone:
            del self._last_seen[identity]
            owned = self._owners.pop(identity, None)
            if not owned:
                continue
            removed = 0
            for actor_id in sorted(owned):
                self._owner_of.pop(actor_id, None)
                try:
                    self.agent.remove_actor(actor_id)
                    removed += 1
                except errors.UnknownActorError:
                    pass  # removed another way meanwhile
                except errors.AgentClosedError:
                    return
            self.metrics.remote_idle_clients.inc()
            log.warning(
                "remote client %s idle for over %.0fs: removed its %d actors",
                identity.hex(),
                self.client_idle_seconds,
                removed,
                extra={"removed_actors": removed},
            )
        self.metrics.remote_clients.set(len(self._owners))

    # ------------------------------------------------------------------ requests

    def _header(self, op: int, request_id: int) -> bytes:
        key = (op, request_id)
        head = self._headers.get(key)
        if head is None:
            if len(self._headers) >= 4096:
                self._headers.clear()
            head = self._headers[key] = wire.header(op, request_id)
        return head

    def _handle_one(self, msg: list[bytes], now: float) -> list[bytes] | None:
        """Serve one message; returns the reply, or None when it was sent already."""
        identity = msg[0]
        self._last_seen[identity] = now
        if len(msg) != 6 or self._sock is None:
            return self._handle_parsed(identity, msg, now)
        head = msg[1]
        if (
            len(head) != wire.HEADER.size
            or head[:8] != _ACTION_HEAD
            or len(head) + len(msg[2]) + len(msg[3]) + len(msg[4]) + len(msg[5])
            > self.max_frame_bytes
        ):
            return self._handle_parsed(identity, msg, now)
        # A well-formed REQUEST_ACTION: answered from `request_action`'s callback.
        self._actions_pending += 1
        self._owed = (identity, head)
        try:
            ids = self._ids_cache.get(msg[2])
            if ids is None:
                ids = self._cache_ids(msg[2])
            if self._frame_owner.get(msg[2]) != identity:
                self._touch_owners(identity, msg[2], ids, now)
            obs = wire.unpack_array(msg[3], "obs")
            self._count_nonfinite(obs)
            frame = msg[4]
            reward: Any = 0.0
            if frame:
                reward = wire.unpack_array(frame, "reward").astype(np.float64, copy=False)
            frame = msg[5]
            mask = wire.unpack_array(frame, "mask") if frame else None
            self.agent.request_action(ids, obs, mask, reward, self._on_result)
        except Exception as err:  # a bug must not kill the endpoint for every client
            return self._action_failed(identity, head, err)
        return None

    def _reply_action(self, result: agent_mod.ActionResult) -> None:
        """`request_action`'s callback on the short path: send the owed reply."""
        owed, self._owed = self._owed, None
        if owed is None or self._sock is None:
            return
        version = result.version
        if version != self._version:
            self._version, self._version_frame = version, _VERSION.pack(version)
        wire.send_frames(
            self._sock,
            [
                owed[0],
                owed[1],  # the request's header: same op and id, no flags
                wire.pack_array(result.actions),
                wire.pack_array(result.logp),
                self._version_frame,
            ],
        )

    def _action_failed(self, identity: bytes, head: bytes, err: Exception) -> list[bytes] | None:
        """The error reply to a short-path request, or None when its reply left already."""
        owed, self._owed = self._owed, None
        kind = err.kind if isinstance(err, errors.RelayRLError) else "internal"
        if not isinstance(err, errors.RelayRLError):
            log.error("remote endpoint: request_action failed", exc_info=err)
        elif owed is None:  # the step failed after the actions were sent
            log.error("remote endpoint: request_action failed after its reply: %s", err)
        self.metrics.remote_errors.labels(kind).inc()
        if owed is None:
            return None
        message = str(err) if isinstance(err, errors.RelayRLError) else repr(err)
        (request_id,) = _REQUEST_ID.unpack_from(head, 8)
        return [identity, *wire.error_frames(wire.Op.REQUEST_ACTION, request_id, kind, message)]

    def _touch_owners(self, identity: bytes, frame: bytes, ids: Any, now: float) -> None:
        """A client stepping another client's actors (a pool of workers stepping actors
        one socket created) keeps their owner from being taken for gone."""
        owner = self._frame_owner.get(frame)
        if owner is None:
            owners = {self._owner_of.get(i) for i in ids.tolist()}
            if len(owners) == 1:
                owner = owners.pop()
                if owner is not None and len(frame) <= _IDS_CACHE_BYTES:
                    if len(self._frame_owner) >= _IDS_CACHE:
                        self._frame_owner.clear()
                    self._frame_owner[frame] = owner
            else:
                for other in owners:
                    if other is not None and other != identity and other in self._last_seen:
                        self._last_seen[other] = now
                return
        if owner is not None and owner != identity and owner in self._last_seen:
            self._last_seen[owner] = now

    def _cache_ids(self, frame: bytes) -> Any:
        ids = _ids(frame)
        if len(frame) <= _IDS_CACHE_BYTES:
            if len(self._ids_cache) >= _IDS_CACHE:
                self._ids_cache.clear()
            self._ids_cache[frame] = ids
        return ids

    def _handle_parsed(self, identity: bytes, msg: list[bytes], now: float) -> list[bytes]:
        """Serve one message of any kind through the general parser."""
        req = self._parse(identity, msg[1:], now)
        if isinstance(req, list):
            return req
        if req.op == wire.Op.REQUEST_ACTION:
            self._actions_pending += 1
        return self._one(req)

    def _handle(self, raw: list[list[bytes]], now: float) -> list[list[bytes]]:
        replies: list[list[bytes]] = []
        run: list[_Request] = []
        for msg in raw:
            identity = msg[0]
            self._last_seen[identity] = now
            req_or_reply = self._parse(identity, msg[1:], now)
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

    def _parse(self, identity: bytes, frames: list[bytes], now: float) -> _Request | list[bytes]:
        request_id = 0
        op = 0
        try:
            if not frames:
                raise wire.WireError("message: expected a header frame, got none")
            head = frames[0]
            if len(head) == wire.HEADER.size:
                op, request_id = head[5], _REQUEST_ID.unpack_from(head, 8)[0]
            size = 0
            for f in frames:
                size += len(f)
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
            if len(head) != wire.HEADER.size or not head.startswith(_MAGIC_VERSION):
                wire.parse_header(head)  # raises the precise error
            if op not in _OPS:
                raise wire.WireError(
                    f"header.op: expected one of {[int(o) for o in wire.Op]}, got {op}"
                )
            req = _Request(identity, op, request_id, frames[1:])
            if op == wire.Op.REQUEST_ACTION:
                self._decode_request_action(req)
                if self._frame_owner.get(req.frames[0]) != identity:
                    self._touch_owners(identity, req.frames[0], req.ids, now)
            return req
        except errors.RelayRLError as err:
            self.metrics.remote_errors.labels(err.kind).inc()
            return [identity, *wire.error_frames(op, request_id, err.kind, str(err))]
        except Exception as err:  # a bug must not end the endpoint for every client
            log.exception("remote endpoint: a message could not be read")
            self.metrics.remote_errors.labels("internal").inc()
            return [identity, *wire.error_frames(op, request_id, "internal", repr(err))]

    def _decode_request_action(self, req: _Request) -> None:
        # Dtypes, the rest of the shapes and the actor ids are checked by
        # `request_action` itself (a batch that fails is retried request by request,
        # so a bad one fails alone). The row counts are checked here: concatenated
        # into a batch, one request's extra row would make up another's missing one.
        if len(req.frames) != 4:
            raise wire.WireError(
                f"REQUEST_ACTION: expected 4 payload frames (ids, obs, reward, mask), "
                f"got {len(req.frames)}"
            )
        req.ids = ids = _ids(req.frames[0])
        n = len(ids)
        req.obs = obs = wire.unpack_array(req.frames[1], "obs")
        if obs.ndim == 0 or obs.shape[0] != n:
            raise errors.InvalidArgumentError.mismatch(
                "obs.shape", f"[{n}, ...] (a row per actor id)", list(obs.shape)
            )
        self._count_nonfinite(obs)
        reward = wire.optional_array(req.frames[2], "reward")
        if reward is not None and reward.shape not in ((), (n,)):
            raise errors.InvalidArgumentError.mismatch(
                "reward.shape", f"scalar or [{n}]", list(reward.shape)
            )
        req.reward = 0.0 if reward is None else reward.astype(np.float64, copy=False)
        req.mask = mask = wire.optional_array(req.frames[3], "mask")
        if mask is not None and (mask.ndim == 0 or mask.shape[0] != n):
            raise errors.InvalidArgumentError.mismatch(
                "mask.shape", f"[{n}, ...] (a row per actor id)", list(mask.shape)
            )

    def _count_nonfinite(self, obs: Any) -> None:
        """Count observation rows holding NaN or infinity (acted on as given, as the
        environment driver's are)."""
        if obs.dtype.kind != "f" or np.isfinite(obs).all():
            return
        rows = obs.reshape(len(obs), -1) if obs.ndim else obs.reshape(1, 1)
        self.agent.metrics.nonfinite_observations.inc(int((~np.isfinite(rows).all(axis=1)).sum()))

    def _request_actions(self, run: list[_Request]) -> list[list[bytes]]:
        self._actions_pending += len(run)
        if len(run) > 1:
            try:
                return self._batched(run)
            except (errors.RelayRLError, ValueError):
                pass  # isolate the bad request: answer each on its own below
            except Exception:  # e.g. the inference backend's own errors
                log.exception("remote endpoint: a batch of %d requests failed", len(run))
        return [self._one(req) for req in run]

    def _batched(self, run: list[_Request]) -> list[list[bytes]]:
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
        version = _VERSION.pack(result.version)
        for r in run:
            end = start + len(r.ids)
            replies.append(
                [
                    r.identity,
                    self._header(r.op, r.request_id),
                    wire.pack_array(result.actions[start:end]),
                    wire.pack_array(logp[start:end]),
                    version,
                ]
            )
            start = end
        return replies

    def _one(self, req: _Request) -> list[bytes]:
        try:
            payload = self._dispatch(req)
        except errors.RelayRLError as err:
            self.metrics.remote_errors.labels(err.kind).inc()
            return [req.identity, *wire.error_frames(req.op, req.request_id, err.kind, str(err))]
        except Exception as err:  # a bug must not kill the endpoint for every client
            log.exception("remote endpoint: op %d failed", req.op)
            self.metrics.remote_errors.labels("internal").inc()
            return [req.identity, *wire.error_frames(req.op, req.request_id, "internal", repr(err))]
        return [req.identity, self._header(req.op, req.request_id), *payload]

    def _dispatch(self, req: _Request) -> list[bytes]:
        agent = self.agent
        op = req.op
        if op == wire.Op.REQUEST_ACTION:
            result = agent.request_action(req.ids, req.obs, req.mask, req.reward)
            return [
                wire.pack_array(result.actions),
                wire.pack_array(result.logp),
                _VERSION.pack(result.version),
            ]
        self.metrics.remote_requests.labels(wire.Op(op).name.lower()).inc()
        if op == wire.Op.NEW_ACTORS:
            _expect(req, 1)
            if len(req.frames[0]) != 4:
                raise wire.WireError(
                    f"NEW_ACTORS.count: expected 4 bytes, got {len(req.frames[0])}"
                )
            (count,) = _COUNT.unpack(req.frames[0])
            held = sum(len(owned) for owned in self._owners.values())
            if held + count > self.max_actors:
                raise errors.InvalidArgumentError.mismatch(
                    "NEW_ACTORS.count",
                    f"at most {self.max_actors - held} more actors "
                    f"({self.max_actors} for all remote clients, environment.remote."
                    f"maxActors; {held} held)",
                    count,
                )
            left = self._actor_id_end - self._next_actor_id
            if count > left:
                raise errors.InvalidArgumentError.mismatch(
                    "NEW_ACTORS.count",
                    f"at most {left} more actors: this process has given out all but"
                    f" {left} of its actor ids (a restarted pod has new ones)",
                    count,
                )
            if req.identity not in self._owners and len(self._owners) >= self.max_clients:
                raise errors.InvalidArgumentError.mismatch(
                    "clients", f"at most {self.max_clients} remote clients", len(self._owners) + 1
                )
            if count == 0:  # nothing to own: the client is not held as one
                return [wire.pack_array(np.zeros(0, dtype=np.int64))]
            ids = agent.new_actors(count, range(self._next_actor_id, self._next_actor_id + count))
            self._next_actor_id += count
            for actor_id in ids:
                self._owner_of[actor_id] = req.identity
            self._owners.setdefault(req.identity, set()).update(ids)
            self.metrics.remote_clients.set(len(self._owners))
            return [wire.pack_array(np.asarray(ids, dtype=np.int64))]
        if op == wire.Op.REMOVE_ACTORS:
            _expect(req, 1)
            ids = _ids(req.frames[0])
            wanted = ids.tolist()
            if len(set(wanted)) != len(wanted):
                raise errors.InvalidArgumentError.mismatch(
                    "REMOVE_ACTORS.ids", "each actor at most once", wanted
                )
            if not agent.has_actors(ids):
                raise errors.UnknownActorError([i for i in wanted if not agent.has_actors([i])])
            owned = self._owners.get(req.identity, set())
            others = [i for i in wanted if i not in owned]
            if others:
                # A client owns what it created; another's actors are its own to remove.
                raise errors.InvalidArgumentError.mismatch(
                    "REMOVE_ACTORS.ids", "actors this client created", others
                )
            try:
                for actor_id in wanted:
                    agent.remove_actor(actor_id)
                    owned.discard(actor_id)
                    self._owner_of.pop(actor_id, None)
            finally:
                if not owned:
                    self._owners.pop(req.identity, None)
                self.metrics.remote_clients.set(len(self._owners))
            return []
        if op == wire.Op.FLAG_LAST_ACTION:
            _expect(req, 4)
            ids = _ids(req.frames[0])
            self._touch_owners(req.identity, req.frames[0], ids, time.monotonic())
            n = len(ids)
            reward = _vector(req.frames[1], "reward", n, np.float64)
            term = _vector(req.frames[2], "terminated", n, np.bool_)
            trunc = _vector(req.frames[3], "truncated", n, np.bool_)
            done = agent.flag_last_action(ids, reward, term, trunc)
            return [_COUNT.pack(done)]
        _expect(req, 0)
        return [_VERSION.pack(agent.get_model_version())]


def first_remote_id(pod_index: int) -> int:
    """The first remote actor id of a new process in the pod of `pod_index`: a random
    point of the lower half of the pod's range, so that at least 2**31 ids follow it.
    A process's ids meet the ones its predecessor gave out with a chance of about
    (ids both gave out) / 2**31: one in 2**21 for a thousand each."""
    return (pod_index << REMOTE_ID_BITS) + secrets.randbelow(1 << (REMOTE_ID_BITS - 1))


def tcp_address(host: str, port: int) -> str:
    """A ZMQ bind address for a listen host ("0.0.0.0", "::" and "*" mean every interface)."""
    if host in ("", "*", "0.0.0.0"):
        return f"tcp://*:{port}"
    if ":" in host:
        return f"tcp://[{host}]:{port}"
    return f"tcp://{host}:{port}"


def unread_frame_bytes(max_frame_bytes: int) -> int:
    """The frame size past which ZMQ drops the connection rather than take it in."""
    return max(_UNREAD_FRAME_FLOOR, 4 * max_frame_bytes)


def _internal_error(msg: list[bytes], err: Exception) -> list[bytes]:
    """An "internal" error reply to a message, to its op and request id when its header
    says them."""
    head = msg[1] if len(msg) > 1 else b""
    op = request_id = 0
    if len(head) == wire.HEADER.size:
        op, request_id = head[5], _REQUEST_ID.unpack_from(head, 8)[0]
    return [msg[0], *wire.error_frames(op, request_id, "internal", repr(err))]


def _expect(req: _Request, frames: int) -> None:
    if len(req.frames) != frames:
        raise wire.WireError(
            f"{wire.Op(req.op).name}: expected {frames} payload frames, got {len(req.frames)}"
        )


def _ids(frame: bytes) -> Any:
    ids = wire.unpack_array(frame, "actor_ids")
    if ids.ndim != 1 or ids.dtype != np.int64:
        raise wire.WireError(f"actor_ids: expected a 1-d int64 array, got {ids.ndim}-d {ids.dtype}")
    return ids


def _vector(frame: bytes, field: str, n: int, dtype: Any) -> Any:
    arr = wire.unpack_array(frame, field)
    if arr.shape != (n,):
        raise wire.WireError(f"{field}.shape: expected [{n}], got {list(arr.shape)}")
    return arr.astype(dtype)
