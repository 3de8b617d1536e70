"""The remote wire format (no sockets)."""

from __future__ import annotations

import numpy as np
import pytest

from relayrl_runtime.transport import wire


def test_array_frames_round_trip() -> None:
    for arr in (
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.array([1, 2, 3], dtype=np.int64),
        np.ones((2, 2), dtype=bool),
        np.float64(3.5) * np.ones(()),
    ):
        back = wire.unpack_array(wire.pack_array(arr), "x")
        assert back.dtype == arr.dtype
        np.testing.assert_array_equal(back, arr)


def test_header_round_trip_and_errors() -> None:
    assert wire.parse_header(wire.header(wire.Op.REQUEST_ACTION, 42)) == (3, 0, 42)
    with pytest.raises(wire.WireError, match="magic"):
        wire.parse_header(b"XXXX" + wire.header(1, 1)[4:])
    with pytest.raises(wire.WireError, match="expected 12 bytes"):
        wire.parse_header(b"short")


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (b"", "expected an array frame"),
        (bytes([99, 1, 1, 0, 0, 0]), "dtype"),
        (bytes([1, 1, 4, 0, 0, 0]) + b"\x00" * 3, "needs 16 bytes, got 3"),
        (bytes([1, 9]), "ndim"),
    ],
)
def test_malformed_arrays_name_the_problem(frame: bytes, message: str) -> None:
    with pytest.raises(wire.WireError, match=message):
        wire.unpack_array(frame, "obs")
