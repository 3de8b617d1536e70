"""The remote-environment client library: what a simulator outside the pod imports.

    client = RemoteClient("tcp://actor-0.cartpole:5555")
    ids = client.new_actors(4)
    result = client.request_action(ids, obs)          # obs: (4, *obs_shape)
    client.flag_last_action(ids[:1], reward=[1.0])

Synchronous, one request in flight per client (a DEALER socket); speaks `wire`.
Errors from the runtime arrive as `errors.RemoteError` with the runtime's kind
(`err.kind`, e.g. "unknown_actor"). A request with no reply within `timeout` raises
`TimeoutError`, and the socket is made anew with the same routing id, so the request
is not sent later (say, once a restarted runtime is back); it may have run already,
though, if the runtime was only slow.
A simulator steps in a tight loop, so `request_action` keeps its own Python small: the
ids and scalar-reward frames are packed once and reused while they stay the same, and
frames go through `wire`'s direct socket calls.
"""

from __future__ import annotations

import dataclasses
import itertools
import secrets
import socket
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import zmq

from relayrl_runtime import errors
from relayrl_runtime.transport import wire

_REWARD_HEAD = struct.Struct("<BBI")  # float64 code, 1 dim, length
# Routing ids ZMQ makes itself start with a zero byte; ours never do.
ROUTING_ID_PREFIX = b"relayrl:"
_VERSION = struct.Struct("<q")


def wants_ipv6(address: str) -> bool:
    """Whether to connect with ZMQ's IPv6 option: to an IPv6 address, or a name that
    has IPv6 addresses only (a Service in an IPv6 cluster).

    Without the option ZMQ takes a connect to an IPv6 address and never sends a byte.
    With it ZMQ tries a name's IPv6 address first, and "localhost" (::1 first in many
    images) would then miss a runtime listening on IPv4 only: so only when needed.
    """
    if not address.startswith("tcp://"):
        return False
    host = address.removeprefix("tcp://").rsplit(":", 1)[0]
    if host.startswith("["):
        return True
    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False  # not resolvable yet: ZMQ retries the name itself
    return bool(found) and all(family == socket.AF_INET6 for family, *_ in found)


def _one_each(value: Any, dtype: Any, n: int, field: str) -> npt.NDArray[Any]:
    """`value` as one `dtype` value for each of `n` actors: an array of n, or one value
    for all; anything else names `field`."""
    values = np.asarray(value, dtype=dtype)
    if values.shape == (n,):
        return values
    if values.size != 1:
        raise errors.InvalidArgumentError.mismatch(
            f"{field}.shape", f"[{n}] or one value for all", list(values.shape)
        )
    return np.broadcast_to(values.reshape(()), (n,))


@dataclasses.dataclass(frozen=True)
class RemoteActionResult:
    """Actions (request order), their log-probabilities and the policy version."""

    actions: npt.NDArray[Any]
    logp: npt.NDArray[np.float32]
    version: int


class RemoteClient:
    """A connection to one runtime's remote endpoint."""

    def __init__(self, address: str, timeout: float = 10.0) -> None:
        self.address = address
        self.timeout_ms = int(timeout * 1000)
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        # The endpoint knows a client (and the actors it owns) by its routing id. Left
        # to ZMQ, a reconnect (a network blip) gets a new one: the old id then goes
        # quiet, and its actors are removed after the idle timeout while still in use.
        self.routing_id = ROUTING_ID_PREFIX + secrets.token_bytes(8)
        self._ipv6 = wants_ipv6(address)
        self._sock = self._socket()
        self._ids = itertools.count(1)
        # Simulators send the same ids (and often the same scalar reward) every step:
        # their frames are packed once, and kept with what they were packed from.
        self._ids_key: object = None
        self._ids_frame = b""
        self._ids_count = 0
        self._reward_key: tuple[float, int] | None = None
        self._reward_frame = b""

    def _socket(self) -> zmq.Socket[bytes]:
        sock = self._ctx.socket(zmq.DEALER)
        # Closing drops what is still queued: a timed-out request is never sent later.
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, self.routing_id)
        # A blocking receive with a timeout: one call per reply instead of poll + recv.
        sock.setsockopt(zmq.RCVTIMEO, self.timeout_ms)
        if self._ipv6:
            sock.setsockopt(zmq.IPV6, 1)
        sock.connect(self.address)
        return sock

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()

    def __enter__(self) -> RemoteClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, op: int, payload: Sequence[bytes]) -> list[bytes]:
        """Send one request and wait for its reply payload (raises on an error reply)."""
        request_id = next(self._ids) & 0xFFFFFFFF
        head = wire.HEADER.pack(wire.MAGIC, wire.VERSION, op, 0, request_id)
        wire.send_frames(self._sock, [head, *payload])
        while True:
            try:
                frames = wire.recv_frames(self._sock)
            except zmq.Again:
                # ZMQ would send a request queued while the runtime was away once it
                # is back, and then every retry of it too: a new socket drops it. The
                # endpoint hands the routing id (and its actors) over to the new one.
                self._sock.close()
                self._sock = self._socket()
                raise TimeoutError(
                    f"{self.address}: no reply to op {op} within {self.timeout_ms} ms"
                ) from None
            if frames[0] == head:  # a reply without flags carries the request's header
                del frames[0]
                return frames
            _, flags, reply_id = wire.parse_header(frames[0])
            if reply_id != request_id:
                continue  # a late reply to a request that timed out
            if flags & wire.FLAG_ERROR:
                raise wire.parse_error(frames)
            return frames[1:]

    def new_actors(self, count: int) -> list[int]:
        """Create actors in the runtime; returns their ids."""
        if not 0 <= count <= 0xFFFFFFFF:
            raise errors.InvalidArgumentError.mismatch("count", "0 to 2**32 - 1", count)
        (frame,) = self.call(wire.Op.NEW_ACTORS, [struct.pack("<I", count)])
        return [int(i) for i in wire.unpack_array(frame, "ids")]

    def remove_actors(self, actor_ids: Sequence[int]) -> None:
        """Remove actors (their partial trajectories are flushed)."""
        self.call(wire.Op.REMOVE_ACTORS, [wire.pack_array(np.asarray(actor_ids, np.int64))])

    def request_action(
        self,
        actor_ids: Sequence[int] | npt.NDArray[Any],
        obs: npt.NDArray[Any],
        mask: npt.NDArray[Any] | None = None,
        reward: float | Sequence[float] | npt.NDArray[Any] = 0.0,
    ) -> RemoteActionResult:
        """Actions for these actors; `reward` is for each actor's previous action."""
        ids_frame, n = self._pack_ids(actor_ids)
        if type(reward) is float or type(reward) is int:
            # A scalar reward for every actor: the frame is built without an array.
            if self._reward_key != (reward, n):
                self._reward_key = (reward, n)
                self._reward_frame = _REWARD_HEAD.pack(2, 1, n) + struct.pack(
                    f"<{n}d", *([reward] * n)
                )
            reward_frame = self._reward_frame
        else:
            reward_frame = wire.pack_array(_one_each(reward, np.float64, n, "reward"))
        payload = [
            ids_frame,
            wire.pack_array(obs),
            reward_frame,
            b"" if mask is None else wire.pack_array(np.asarray(mask, dtype=np.bool_)),
        ]
        actions, logp, version = self.call(wire.Op.REQUEST_ACTION, payload)
        return RemoteActionResult(
            wire.unpack_array(actions, "actions"),
            wire.unpack_array(logp, "logp"),
            _VERSION.unpack(version)[0],
        )

    def _pack_ids(self, actor_ids: Sequence[int] | npt.NDArray[Any]) -> tuple[bytes, int]:
        """The ids frame and the id count, packed again only when the ids change."""
        if type(actor_ids) is list:
            key: object = tuple(actor_ids)  # a list may change: compare its contents
        else:
            ids = np.asarray(actor_ids, dtype=np.int64)
            key = ids.tobytes()
        if key != self._ids_key:
            ids = np.asarray(actor_ids, dtype=np.int64)
            self._ids_key, self._ids_frame, self._ids_count = key, wire.pack_array(ids), len(ids)
        return self._ids_frame, self._ids_count

    def flag_last_action(
        self,
        actor_ids: Sequence[int] | npt.NDArray[Any],
        reward: float | Sequence[float] | npt.NDArray[Any] = 0.0,
        terminated: bool | Sequence[bool] | npt.NDArray[Any] = True,
        truncated: bool | Sequence[bool] | npt.NDArray[Any] = False,
    ) -> int:
        """End these actors' episodes; returns the trajectories finished."""
        ids = np.asarray(actor_ids, dtype=np.int64)

        def vec(value: Any, dtype: Any, field: str) -> bytes:
            return wire.pack_array(_one_each(value, dtype, len(ids), field))

        (frame,) = self.call(
            wire.Op.FLAG_LAST_ACTION,
            [
                wire.pack_array(ids),
                vec(reward, np.float64, "reward"),
                vec(terminated, np.bool_, "terminated"),
                vec(truncated, np.bool_, "truncated"),
            ],
        )
        return int(struct.unpack("<I", frame)[0])

    def get_model_version(self) -> int:
        """Policy version the runtime answers with."""
        (frame,) = self.call(wire.Op.MODEL_VERSION, [])
        return int(struct.unpack("<q", frame)[0])
