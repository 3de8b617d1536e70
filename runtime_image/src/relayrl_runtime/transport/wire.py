"""The remote-environment wire format (version 1): ZMQ multipart frames, little-endian.

Shared by `endpoint` (server) and `client`. A request is `[header, *payload]` sent on a
DEALER socket; the reply is `[header, *payload]` with the same op and request id, and
flag bit 0 set for an error (payload: one UTF-8 JSON frame `{"kind", "message"}`).

header  = struct "<4sBBHI": magic b"RLRW", wire version 1, op, flags, request id
array   = struct "<BB" dtype code, ndim; then ndim x "<I" dims; then the raw C-order data
empty   = a zero-length frame (an omitted optional argument)

ops (request payload -> reply payload):
  1 NEW_ACTORS        u32 count                         -> array int64 ids
  2 REMOVE_ACTORS     array int64 ids                   -> (none)
  3 REQUEST_ACTION    ids, obs, reward|empty, mask|empty -> actions, logp f32, i64 version
  4 FLAG_LAST_ACTION  ids, reward, terminated bool, truncated bool -> u32 trajectories
  5 MODEL_VERSION     (none)                            -> i64 version
"""

from __future__ import annotations

import enum
import json
import math
import struct
from collections.abc import Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import zmq
import zmq.backend

from relayrl_runtime import errors

MAGIC: Final = b"RLRW"
VERSION: Final = 1
HEADER: Final = struct.Struct("<4sBBHI")
FLAG_ERROR: Final = 1
MAX_NDIM: Final = 8

DTYPES: Final[dict[int, np.dtype[Any]]] = {
    1: np.dtype("<f4"),
    2: np.dtype("<f8"),
    3: np.dtype("<i8"),
    4: np.dtype("<i4"),
    5: np.dtype("u1"),
    6: np.dtype("?"),
    7: np.dtype("<f2"),
}
CODES: Final = {dt: code for code, dt in DTYPES.items()}
# Precompiled formats of the array header and its dims, by ndim.
_ARRAY_HEADS: Final = tuple(struct.Struct(f"<BB{n}I") for n in range(MAX_NDIM + 1))
_DIMS: Final = tuple(f"<{n}I" for n in range(MAX_NDIM + 1))
# Codes by dtype string, for arrays already little-endian (or byte-sized).
_FAST_CODES: Final = {dt.str: code for dt, code in CODES.items()}
# Array layouts already decoded, by the frame's leading code, ndim and dims bytes:
# (dtype, shape, data offset, data bytes). Peers send the same few shapes every step.
_LAYOUTS: dict[bytes, tuple[np.dtype[Any], tuple[int, ...], int, int]] = {}
_LAYOUTS_MAX: Final = 1024
# Array headers already packed, by (dtype string, shape).
_HEADS: dict[tuple[str, tuple[int, ...]], bytes] = {}
_HEADS_MAX: Final = 1024
# The socket methods underneath pyzmq's Python wrappers: a frame costs one call each.
_send: Final = zmq.backend.Socket.send
_recv: Final = zmq.backend.Socket.recv
_get: Final = zmq.backend.Socket.get
_SNDMORE: Final = int(zmq.SNDMORE)
_EVENTS: Final = int(zmq.EVENTS)
_POLLIN: Final = int(zmq.POLLIN)


class Op(enum.IntEnum):
    """Request kinds."""

    NEW_ACTORS = 1
    REMOVE_ACTORS = 2
    REQUEST_ACTION = 3
    FLAG_LAST_ACTION = 4
    MODEL_VERSION = 5


class WireError(errors.RelayRLError):
    """A frame that does not follow the wire format."""

    kind = "malformed"


def header(op: int, request_id: int, flags: int = 0) -> bytes:
    """Pack a header frame."""
    return HEADER.pack(MAGIC, VERSION, op, flags, request_id)


def parse_header(frame: bytes) -> tuple[int, int, int]:
    """(op, flags, request id) of a header frame."""
    if len(frame) != HEADER.size:
        raise WireError(f"header: expected {HEADER.size} bytes, got {len(frame)}")
    magic, version, op, flags, request_id = HEADER.unpack(frame)
    if magic != MAGIC:
        raise WireError(f"header.magic: expected {MAGIC!r}, got {magic!r}")
    if version != VERSION:
        raise WireError(f"header.version: expected {VERSION}, got {version}")
    return op, flags, request_id


def pack_array(arr: npt.NDArray[Any]) -> bytes:
    """Encode an array frame."""
    key = (arr.dtype.str, arr.shape)
    head = _HEADS.get(key)
    if head is not None and arr.flags.c_contiguous:
        return head + arr.tobytes()  # the common case: a known shape, one copy
    ndim = arr.ndim
    if ndim <= MAX_NDIM and arr.flags.c_contiguous:
        code = _FAST_CODES.get(arr.dtype.str)
        if code is not None:
            head = _ARRAY_HEADS[ndim].pack(code, ndim, *arr.shape)
            if len(_HEADS) >= _HEADS_MAX:
                _HEADS.clear()
            _HEADS[key] = head
            return head + arr.tobytes()
    dt = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
    code = CODES.get(np.dtype(dt))
    if code is None:
        raise errors.InvalidArgumentError.mismatch(
            "array dtype", sorted(str(d) for d in CODES), arr.dtype
        )
    if arr.ndim > MAX_NDIM:
        raise errors.InvalidArgumentError.mismatch("array ndim", f"<= {MAX_NDIM}", arr.ndim)
    head = _ARRAY_HEADS[arr.ndim].pack(code, arr.ndim, *arr.shape)
    return head + np.ascontiguousarray(arr, dtype=dt).tobytes()


def unpack_array(frame: bytes, field: str) -> npt.NDArray[Any]:
    """Decode an array frame (a read-only view of the frame's bytes)."""
    size = len(frame)
    if size >= 2:
        start = 2 + 4 * frame[1]
        layout = _LAYOUTS.get(frame[:start])
        if layout is not None and size - start == layout[3]:
            return np.ndarray(layout[1], layout[0], frame, layout[2])
    arr = _unpack_array(frame, field)
    if len(_LAYOUTS) >= _LAYOUTS_MAX:
        _LAYOUTS.clear()
    start = 2 + 4 * arr.ndim
    _LAYOUTS[frame[:start]] = (arr.dtype, arr.shape, start, arr.nbytes)
    return arr


def _unpack_array(frame: bytes, field: str) -> npt.NDArray[Any]:
    if len(frame) < 2:
        raise WireError(f"{field}: expected an array frame, got {len(frame)} bytes")
    code, ndim = frame[0], frame[1]
    dtype = DTYPES.get(code)
    if dtype is None:
        raise WireError(f"{field}.dtype: expected a code in {sorted(DTYPES)}, got {code}")
    if ndim > MAX_NDIM:
        raise WireError(f"{field}.ndim: expected <= {MAX_NDIM}, got {ndim}")
    start = 2 + 4 * ndim
    if len(frame) < start:
        raise WireError(f"{field}: frame too short for {ndim} dims")
    shape = struct.unpack_from(_DIMS[ndim], frame, 2)
    count = math.prod(shape)
    if len(frame) - start != count * dtype.itemsize:
        raise WireError(
            f"{field}: shape {list(shape)} {dtype} needs {count * dtype.itemsize} bytes, "
            f"got {len(frame) - start}"
        )
    try:
        return np.frombuffer(frame, dtype=dtype, count=count, offset=start).reshape(shape)
    except ValueError as err:  # e.g. an empty array with dims past what numpy indexes
        raise WireError(f"{field}.shape: {list(shape)} is no array numpy can make") from err


def optional_array(frame: bytes, field: str) -> npt.NDArray[Any] | None:
    """An array frame, or None for an empty frame."""
    return None if len(frame) == 0 else unpack_array(frame, field)


def send_frames(sock: zmq.Socket[bytes], frames: Sequence[bytes]) -> None:
    """`send_multipart` of bytes frames, without pyzmq's per-frame Python wrappers."""
    last = len(frames) - 1
    for i in range(last):
        _send(sock, frames[i], _SNDMORE)
    _send(sock, frames[last], 0)


def recv_frames(sock: zmq.Socket[bytes]) -> list[bytes]:
    """`recv_multipart` (copied into bytes), without pyzmq's Python wrappers.

    Blocks up to the socket's RCVTIMEO (`zmq.Again` after it). Each part comes as a
    `zmq.Frame`, which knows whether more follow (asking the socket costs a Python-level
    option lookup per part); a multipart message is delivered whole.
    """
    frame: zmq.Frame = _recv(sock, 0, False)
    frames = [frame.bytes]
    while frame.more:
        frame = _recv(sock, 0, False)
        frames.append(frame.bytes)
    return frames


def waiting(sock: zmq.Socket[bytes]) -> bool:
    """Whether a message is waiting to be received (without receiving it)."""
    events: int = _get(sock, _EVENTS)  # type: ignore[assignment]
    return bool(events & _POLLIN)


def error_frames(op: int, request_id: int, kind: str, message: str) -> list[bytes]:
    """An error reply."""
    body = json.dumps({"kind": kind, "message": message}).encode()
    return [header(op, request_id, FLAG_ERROR), body]


def parse_error(frames: Sequence[bytes]) -> errors.RemoteError:
    """The error of an error reply."""
    try:
        body = json.loads(bytes(frames[1]))
        return errors.RemoteError(str(body["kind"]), str(body["message"]))
    except (IndexError, ValueError, KeyError, TypeError):
        return errors.RemoteError("malformed", "unreadable error reply")
