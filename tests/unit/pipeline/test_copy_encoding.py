"""The Postgres sink's binary COPY encoder: the numpy fast path equals the per-row path."""

from __future__ import annotations

import struct

import pyarrow as pa
import pytest

from relayrl_runtime.sinks import postgres
from support import trajectories


def test_fast_path_matches_the_general_path_byte_for_byte() -> None:
    table = pa.Table.from_batches([trajectories.batch(1, 3)])
    for namespace in ("fleet-a", ""):
        fast = postgres.encode_copy(table, seq=42, schema_version=1, namespace=namespace)
        slow = postgres._encode_slow(table, 42, 1, namespace)
        assert fast == slow
        # Each tuple starts with its field count: stream_seq, schema_version, namespace,
        # the columns; the namespace follows the two numbers' fields.
        assert struct.unpack("!h", fast[:2])[0] == 3 + table.num_columns
        at = 2 + (4 + 8) + (4 + 2)
        assert bytes(fast[at : at + 4 + len(namespace)]) == (
            struct.pack("!i", len(namespace)) + namespace.encode()
        )


def test_variable_width_text_and_nulls_take_the_general_path() -> None:
    table = pa.table(
        {
            "agent": pa.array(["a", "bbb", None]),
            "reward": pa.array([1.0, None, 3.0]),
            "obs": pa.array([[1.0, 2.0], None, [3.0, None]], pa.list_(pa.float32(), 2)),
        }
    )
    out = bytes(postgres.encode_copy(table, seq=1, schema_version=1))
    assert out == postgres._encode_slow(table, 1, 1)
    assert b"\xff\xff\xff\xff" in out  # NULLs


def test_layouts_that_alternate_each_get_their_own_constant_bytes() -> None:
    """The fast path copies each row from a template of the layout's constant bytes
    (lengths, array headers), made once per layout: tables whose text width, list width
    or columns differ, encoded in turn, each come out as the general path writes them."""

    def table(agent: str, width: int, extra: bool) -> pa.Table:
        columns = {
            "agent": pa.DictionaryArray.from_arrays(
                pa.array([0, 0, 0], pa.int32()), pa.array([agent], pa.utf8())
            ),
            "step": pa.array([7, 8, 9], pa.int64()),
            "obs": pa.array(
                [[float(i + j) for j in range(width)] for i in range(3)],
                pa.list_(pa.float32(), width),
            ),
        }
        if extra:
            columns["done"] = pa.array([False, True, False])
        return pa.table(columns)

    tables = [table("a", 4, False), table("bbbb", 4, False), table("a", 2, True)]
    for seq, t in enumerate([*tables, *tables, tables[2].slice(1)], start=1):
        fast = postgres.encode_copy(t, seq=seq, schema_version=1)
        assert bytes(fast) == postgres._encode_slow(t, seq, 1)


def test_columns_the_fast_path_writes_as_their_values() -> None:
    """A dictionary of numbers is written as numbers (its column is a number column); a
    dictionary value that is null is NULL; plain text of one width takes the fast path."""
    numbers = pa.DictionaryArray.from_arrays(pa.array([0, 1, 0], pa.int32()), pa.array([10, 20]))
    table = pa.table({"n": numbers, "s": pa.array(["ab", "cd", "ab"])})
    fast = bytes(postgres.encode_copy(table, seq=3, schema_version=1))
    assert fast == postgres._encode_slow(table, 3, 1)
    assert struct.pack("!iq", 8, 20) in fast

    holes = pa.DictionaryArray.from_arrays(pa.array([0, 1], pa.int32()), pa.array(["ab", None]))
    table = pa.table({"agent": holes})
    out = bytes(postgres.encode_copy(table, seq=1, schema_version=1))
    assert out == postgres._encode_slow(table, 1, 1)
    assert b"None" not in out
    assert b"\xff\xff\xff\xff" in out


@pytest.mark.parametrize(
    ("arrow", "sql"),
    [
        (pa.dictionary(pa.int32(), pa.utf8()), "text"),
        (pa.int64(), "bigint"),
        (pa.float32(), "real"),
        (pa.list_(pa.float32(), 4), "real[]"),
        (pa.list_(pa.bool_(), 2), "boolean[]"),
        (pa.timestamp("us", tz="UTC"), "timestamptz"),
    ],
)
def test_column_types(arrow: pa.DataType, sql: str) -> None:
    assert postgres.sql_type(arrow) == sql


def test_dsn_sources(tmp_path: pytest.TempPathFactory) -> None:
    secret = tmp_path / "dsn"  # type: ignore[operator]
    secret.write_text("host=db user=x\n")
    assert postgres.read_dsn(None, {postgres.ENV_DSN_FILE: str(secret)}) == "host=db user=x"
    assert postgres.read_dsn(None, {postgres.ENV_DSN: "host=env"}) == "host=env"
    assert postgres.read_dsn("host=flag", {}) == "host=flag"
    with pytest.raises(Exception, match="no DSN"):
        postgres.read_dsn(None, {})
    # An empty Secret: libpq would take "" as its defaults, another database perhaps.
    secret.write_text("\n")
    with pytest.raises(OSError, match="empty, expected a DSN"):
        postgres.read_dsn(None, {postgres.ENV_DSN_FILE: str(secret)})
