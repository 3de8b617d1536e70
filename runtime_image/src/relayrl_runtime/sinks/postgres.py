"""The Postgres sink: trajectory messages from JetStream to PostgreSQL rows, one row a step.

Run by `relayrl-sink postgres` (one process per Agent) around `sinks.service.SinkService`.
Rows go in with binary COPY, encoded column-wise with numpy (no Python per row for the
fixed-width layouts the runtime produces; a general per-row path for the rest).

Exactly once (issue 4): each commit is one transaction that locks the sink's offset row,
checks it still holds the sequence this process last committed, COPYs the rows and moves
the offset to the last stream sequence of the batch; only after COMMIT are the messages
acked. If the connection dies after the server committed but before the client heard,
the retry finds the offset already moved and does not write twice. On start the sink
resumes after the stored offset.

The sink creates and migrates its own tables (versioned, under an advisory lock): the
bookkeeping tables and the fixed columns come from `MIGRATIONS`; the layout's own
columns (obs, action, mask, aux_*) are added when a batch first carries them. The DSN
comes from the command line, RELAYRL_PG_DSN, or a mounted Secret file
(RELAYRL_PG_DSN_FILE, re-read on every reconnect so a rotated password is picked up).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import hashlib
import logging
import os
import struct
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar

import numpy as np
import numpy.typing as npt
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
from psycopg import conninfo, sql

from relayrl_runtime.sinks import message_ids, service

log = logging.getLogger(__name__)

ENV_DSN: Final = "RELAYRL_PG_DSN"
ENV_DSN_FILE: Final = "RELAYRL_PG_DSN_FILE"

# Advisory lock key for migrations ("relayrl" in ASCII, fits a bigint).
_MIGRATION_LOCK: Final = 0x72656C6179726C
_PG_EPOCH_US: Final = 946_684_800_000_000  # 2000-01-01 in Unix microseconds
# Postgres's first timestamp, 4713-11-24 BC 00:00 UTC, in Unix microseconds.
_PG_FIRST_US: Final = -210_866_803_200_000_000
# The bytes of a name Postgres keeps (NAMEDATALEN - 1).
_NAME_BYTES: Final = 63
_COPY_HEADER: Final = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
_COPY_TRAILER: Final = struct.pack("!h", -1)
_BIGINT_MAX: Final = 2**63 - 1

_T = TypeVar("_T")


@dataclasses.dataclass(frozen=True)
class Migration:
    """One schema version: statements run in one transaction, recorded when done.

    A migration of the steps table (`per_table`) is recorded per table, in
    `{schema}.table_migrations`: Agents writing to one database schema may each have a
    table of their own, and each gets every table migration. Their statements must be
    safe to run on a table that has them already (IF NOT EXISTS): databases migrated
    before that record existed run them once more.
    """

    version: int
    description: str
    statements: tuple[str, ...]
    per_table: bool = False


# {schema} and {table} are quoted identifiers. Append only; never edit a released one.
MIGRATIONS: Final = (
    Migration(
        1,
        "bookkeeping: committed stream sequence per stream and consumer",
        (
            """CREATE TABLE IF NOT EXISTS {schema}.sink_offsets (
                stream text NOT NULL,
                consumer text NOT NULL,
                last_seq bigint NOT NULL,
                updated_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (stream, consumer))""",
        ),
    ),
    Migration(
        2,
        "steps table with the layout-independent columns of trajectory schema 1",
        (
            """CREATE TABLE IF NOT EXISTS {schema}.{table} (
                stream_seq bigint NOT NULL,
                schema_version smallint NOT NULL,
                agent text NOT NULL,
                actor_id bigint NOT NULL,
                episode_id bigint NOT NULL,
                segment integer NOT NULL,
                step bigint NOT NULL,
                reward double precision NOT NULL,
                terminated boolean NOT NULL,
                truncated boolean NOT NULL,
                cut boolean NOT NULL,
                policy_version bigint NOT NULL,
                obs_time timestamptz NOT NULL,
                action_time timestamptz NOT NULL,
                logp real NOT NULL)""",
            "COMMENT ON TABLE {schema}.{table} IS "
            "'RelayRL trajectory steps; one row per step, see trajectory-schema.md'",
        ),
        per_table=True,
    ),
    Migration(
        3,
        "the stream (name@created) each offset counts in, to tell a stream made anew",
        ("ALTER TABLE {schema}.sink_offsets ADD COLUMN IF NOT EXISTS stream_origin text",),
    ),
    Migration(
        4,
        "message ids written per producer, to skip a copy JetStream stored twice",
        (
            """CREATE TABLE IF NOT EXISTS {schema}.sink_message_ids (
                stream text NOT NULL,
                consumer text NOT NULL,
                producer text NOT NULL,
                runs bigint[] NOT NULL,
                last_stored timestamptz NOT NULL,
                PRIMARY KEY (stream, consumer, producer))""",
            "COMMENT ON TABLE {schema}.sink_message_ids IS "
            "'Nats-Msg-Id numbers written per producer: [start, end, start, end, ...]'",
        ),
    ),
    Migration(
        5,
        "the Agent's namespace in each row: Agents of one name in two namespaces apart",
        (
            # Rows written before have none (NULL).
            "ALTER TABLE {schema}.{table} ADD COLUMN IF NOT EXISTS namespace text",
        ),
        per_table=True,
    ),
)


class DsnError(ValueError):
    """A DSN that cannot be used as written; its text is never shown (it holds the
    password). Retried: the Secret may be fixed."""


def checked_dsn(dsn: str) -> dict[str, Any]:
    """The DSN's parts, or DsnError. libpq's own messages quote the part they could not
    parse, often the password; these say what to fix without it."""
    try:
        parts = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        raise DsnError(
            "postgres: the DSN cannot be parsed (not shown: it holds the password):"
            " in the URL form percent-encode the password's '%', '@', '/', ':' and '?'"
            " (as %25, %40, %2F, %3A, %3F); in the key=value form quote values with"
            " spaces (password='...')"
        ) from None
    if any("@" in str(parts.get(name) or "") for name in ("host", "port", "dbname")):
        raise DsnError(
            "postgres: the DSN's host, port or database name holds '@' (not shown: the"
            " password's end may be in it): percent-encode '@' in the password as %40"
            " and '/' as %2F"
        )
    if not all(p.strip().isdigit() for p in str(parts.get("port") or "5432").split(",")):
        raise DsnError(
            "postgres: the DSN's port is not a number (not shown: it may be part of the"
            " password): percent-encode the password's '/', ':' and '@' (%2F, %3A, %40)"
        )
    return parts


def read_dsn_file(path: Path, source: str) -> str:
    """The DSN in a file; one that cannot be read is an OSError naming `source` and it."""
    try:
        dsn = path.read_text().strip()
    except OSError as err:
        raise OSError(f"{source} {path}: {err.strerror or err}") from err
    if not dsn:
        # libpq would take an empty DSN as "the defaults": another database, perhaps.
        raise OSError(f"{source} {path}: empty, expected a DSN (postgresql://...)")
    return dsn


def read_dsn(dsn: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The DSN: given, else $RELAYRL_PG_DSN, else the file at $RELAYRL_PG_DSN_FILE."""
    env = os.environ if environ is None else environ
    if dsn:
        return dsn
    if env.get(ENV_DSN):
        return env[ENV_DSN]
    path = env.get(ENV_DSN_FILE)
    if path:
        return read_dsn_file(Path(path), ENV_DSN_FILE)
    raise service.PermanentError(
        f"postgres: no DSN; pass --dsn-file, set {ENV_DSN}, "
        f"or mount a Secret and set {ENV_DSN_FILE}"
    )


# ------------------------------------------------------------------ type mapping


@dataclasses.dataclass(frozen=True)
class _Scalar:
    sql: str
    oid: int
    np: str  # big-endian numpy dtype of the binary value


_SCALARS: Final = {
    pa.int8(): _Scalar("smallint", 21, ">i2"),
    pa.uint8(): _Scalar("smallint", 21, ">i2"),
    pa.int16(): _Scalar("smallint", 21, ">i2"),
    pa.uint16(): _Scalar("integer", 23, ">i4"),
    pa.int32(): _Scalar("integer", 23, ">i4"),
    pa.uint32(): _Scalar("bigint", 20, ">i8"),
    pa.int64(): _Scalar("bigint", 20, ">i8"),
    pa.uint64(): _Scalar("bigint", 20, ">i8"),
    pa.float16(): _Scalar("real", 700, ">f4"),
    pa.float32(): _Scalar("real", 700, ">f4"),
    pa.float64(): _Scalar("double precision", 701, ">f8"),
    pa.bool_(): _Scalar("boolean", 16, ">u1"),
}


# struct formats of the binary values (numpy's own codes differ in size: "l" is 8 bytes
# in numpy and 4 in struct's standard sizes).
_STRUCT: Final = {">i2": "!h", ">i4": "!i", ">i8": "!q", ">f4": "!f", ">f8": "!d", ">u1": "!B"}


def _is_text(t: pa.DataType) -> bool:
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t))


def sql_type(t: pa.DataType) -> str:
    """The Postgres column type of an Arrow type of the trajectory schema."""
    if pa.types.is_dictionary(t):
        return sql_type(t.value_type)
    if _is_text(t):
        return "text"
    if pa.types.is_timestamp(t):
        return "timestamptz" if t.tz else "timestamp"
    if pa.types.is_fixed_size_list(t) or pa.types.is_list(t):
        return sql_type(t.value_type) + "[]"
    scalar = _SCALARS.get(t)
    if scalar is None:
        raise service.PermanentError(f"postgres: no column type for Arrow type {t}")
    return scalar.sql


_FORMAT_TYPE_NAMES: Final = {
    "timestamptz": "timestamp with time zone",
    "timestamp": "timestamp without time zone",
}


def _canonical(typ: str) -> str:
    """A type as Postgres's format_type spells it (sql_type writes timestamptz)."""
    base, brackets = (typ[:-2], "[]") if typ.endswith("[]") else (typ, "")
    return _FORMAT_TYPE_NAMES.get(base, base) + brackets


class _Slow(Exception):
    """The fast encoder cannot handle this table (nulls, variable-width text)."""


# numpy types of the fixed-width Arrow types, as Arrow lays them out (little-endian).
_NATIVE: Final[dict[pa.DataType, np.dtype[Any]]] = {
    pa.int8(): np.dtype("<i1"),
    pa.uint8(): np.dtype("<u1"),
    pa.int16(): np.dtype("<i2"),
    pa.uint16(): np.dtype("<u2"),
    pa.int32(): np.dtype("<i4"),
    pa.uint32(): np.dtype("<u4"),
    pa.int64(): np.dtype("<i8"),
    pa.uint64(): np.dtype("<u8"),
    pa.float16(): np.dtype("<f2"),
    pa.float32(): np.dtype("<f4"),
    pa.float64(): np.dtype("<f8"),
}


def _to_numpy(col: pa.ChunkedArray | pa.Array) -> npt.NDArray[Any]:
    """The values of a fixed-width column without nulls, read from its data buffer.

    Not pyarrow's `to_numpy`: that imports pandas when it is installed (a second or more
    of the sink's time, holding the GIL, on its first batch).
    """
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if arr.null_count:
        raise _Slow("nulls")
    data = arr.buffers()[1]
    if pa.types.is_boolean(arr.type):
        if data is None or not len(arr):
            return np.zeros(0, np.bool_)
        bits = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
        return bits[arr.offset : arr.offset + len(arr)].view(np.bool_)
    dtype = _NATIVE.get(arr.type)
    if dtype is None:
        raise _Slow(f"type {arr.type}")
    if data is None or not len(arr):
        return np.zeros(0, dtype)
    return np.frombuffer(data, dtype, count=len(arr), offset=arr.offset * dtype.itemsize)


def _fixed_width_text(col: pa.ChunkedArray) -> npt.NDArray[Any]:
    """utf-8 bytes of a text column as an "S<w>" array, if every value has the same width.

    Dictionary columns (the agent name) encode each distinct value once and index.
    """
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if arr.null_count:
        raise _Slow("nulls")
    if pa.types.is_dictionary(arr.type):
        if arr.dictionary.null_count:
            raise _Slow("nulls in the dictionary")
        values = [str(v).encode() for v in arr.dictionary.to_pylist()]
        indices = _to_numpy(arr.indices)
    else:
        distinct = pc.unique(arr)
        values = [str(v).encode() for v in distinct.to_pylist()]
        indices = _to_numpy(pc.index_in(arr, value_set=distinct))
    widths = {len(v) for v in values}
    if len(widths) != 1 or 0 in widths:
        raise _Slow("variable-width or empty text")
    table = np.array(values, dtype=f"S{widths.pop()}")
    return table[indices] if len(indices) else table[:0]


# A column's constant bytes, the same in every row: (field path, value) pairs.
_Consts = tuple[tuple[tuple[str, ...], Any], ...]
# A column's binary layout: its structured dtype and constant bytes.
_Layout = tuple[np.dtype[Any], _Consts]


def _field(col: pa.ChunkedArray) -> tuple[_Layout, Callable[[npt.NDArray[Any]], None]]:
    """One column's binary field (length + value): its layout, and a filler of its values."""
    t = col.type
    if pa.types.is_dictionary(t) and not _is_text(t.value_type):
        return _field(col.cast(t.value_type))  # written as its values' type
    if pa.types.is_dictionary(t) or pa.types.is_string(t):
        encoded = _fixed_width_text(col)
        width = encoded.dtype.itemsize
        dtype = np.dtype([("len", ">i4"), ("v", f"S{width}")])

        def fill_text(out: npt.NDArray[Any]) -> None:
            out["v"] = encoded

        return (dtype, ((("len",), width),)), fill_text
    if pa.types.is_timestamp(t):
        micros = _to_numpy(col.cast(pa.timestamp("us", tz=t.tz)).cast(pa.int64()))

        def fill_time(out: npt.NDArray[Any]) -> None:
            out["v"] = micros - _PG_EPOCH_US

        return (np.dtype([("len", ">i4"), ("v", ">i8")]), ((("len",), 8),)), fill_time
    if pa.types.is_fixed_size_list(t):
        scalar = _SCALARS.get(t.value_type)
        if scalar is None:
            raise _Slow(f"list of {t.value_type}")
        width = t.list_size
        arr = col.combine_chunks()
        if arr.null_count or arr.values.null_count:
            raise _Slow("nulls")
        flat = _to_numpy(arr.values.slice(arr.offset * width, len(arr) * width)).reshape(
            len(arr), width
        )
        size = np.dtype(scalar.np).itemsize
        elem = np.dtype([("len", ">i4"), ("v", scalar.np)])
        dtype = np.dtype([("len", ">i4"), ("hdr", ">i4", (5,)), ("e", elem, (width,))])
        consts = (
            (("len",), 20 + width * (4 + size)),
            (("hdr",), (1, 0, scalar.oid, width, 1)),
            (("e", "len"), size),
        )

        def fill_array(out: npt.NDArray[Any]) -> None:
            out["e"]["v"] = flat

        return (dtype, consts), fill_array
    scalar = _SCALARS.get(t)
    if scalar is None:
        raise _Slow(f"type {t}")
    return _scalar_field(_to_numpy(col), scalar)


def _scalar_field(
    values: npt.NDArray[Any] | int, scalar: _Scalar
) -> tuple[_Layout, Callable[[npt.NDArray[Any]], None]]:
    """A number column's binary field: values, or one value for every row."""

    def fill_scalar(out: npt.NDArray[Any]) -> None:
        out["v"] = values

    dtype = np.dtype([("len", ">i4"), ("v", scalar.np)])
    return (dtype, ((("len",), dtype["v"].itemsize),)), fill_scalar


def _constant_text(value: bytes) -> tuple[_Layout, Callable[[npt.NDArray[Any]], None]]:
    """A text field with one value in every row: all of it in the template."""

    def fill_nothing(out: npt.NDArray[Any]) -> None:
        pass

    if not value:
        return (np.dtype([("len", ">i4")]), ((("len",), 0),)), fill_nothing
    dtype = np.dtype([("len", ">i4"), ("v", f"S{len(value)}")])
    return (dtype, ((("len",), len(value)), (("v",), value))), fill_nothing


@functools.lru_cache(maxsize=64)
def _row_template(layouts: tuple[_Layout, ...]) -> npt.NDArray[Any]:
    """One binary COPY tuple of these columns with every constant byte in place: the
    field count, each value's length, array headers. Only the values differ by row."""
    row = np.dtype([("count", ">i2")] + [(f"c{i}", d) for i, (d, _) in enumerate(layouts)])
    template = np.zeros(1, dtype=row)
    template["count"] = len(layouts)
    for i, (_, consts) in enumerate(layouts):
        for path, value in consts:
            target = template[f"c{i}"]
            for name in path[:-1]:
                target = target[name]
            target[path[-1]] = value
    return template


def encode_copy(table: pa.Table, seq: int, schema_version: int, namespace: str = "") -> memoryview:
    """Rows of `table`, prefixed by (stream_seq, schema_version, namespace), as binary
    COPY tuples.

    No header or trailer: the caller frames one COPY from many of these. The rows start
    as copies of a template holding every constant byte; only the values are written.
    """
    n = table.num_rows
    try:
        fields = [
            _scalar_field(seq, _SCALARS[pa.int64()]),
            _scalar_field(schema_version, _SCALARS[pa.int16()]),
            _constant_text(namespace.encode()),
            *(_field(c) for c in table.columns),
        ]
    except _Slow as why:
        log.debug("slow COPY path: %s", why)
        return memoryview(_encode_slow(table, seq, schema_version, namespace))
    out = np.repeat(_row_template(tuple(layout for layout, _ in fields)), n)
    for i, (_, fill) in enumerate(fields):
        fill(out[f"c{i}"])
    return out.view(np.uint8).data


def _encode_slow(table: pa.Table, seq: int, schema_version: int, namespace: str = "") -> bytes:
    """The general path, one value at a time: nulls and variable-width text."""
    columns: list[list[bytes | None]] = [
        [struct.pack("!q", seq)] * table.num_rows,
        [struct.pack("!h", schema_version)] * table.num_rows,
        [namespace.encode()] * table.num_rows,
    ]
    for col in table.columns:
        columns.append(_encode_column_slow(col))
    out = bytearray()
    count = struct.pack("!h", len(columns))
    for values in zip(*columns, strict=True):
        out += count
        for v in values:
            if v is None:
                out += b"\xff\xff\xff\xff"
            else:
                out += struct.pack("!i", len(v))
                out += v
    return bytes(out)


def _encode_column_slow(col: pa.ChunkedArray) -> list[bytes | None]:
    t = col.type
    if pa.types.is_dictionary(t):
        return _encode_column_slow(col.cast(t.value_type))
    if _is_text(t):
        return [None if v is None else v.encode() for v in col.to_pylist()]
    if pa.types.is_timestamp(t):
        micros = col.cast(pa.timestamp("us", tz=t.tz)).cast(pa.int64()).to_pylist()
        return [None if v is None else struct.pack("!q", v - _PG_EPOCH_US) for v in micros]
    if pa.types.is_fixed_size_list(t) or pa.types.is_list(t):
        scalar = _SCALARS.get(t.value_type)
        if scalar is None:
            raise service.PermanentError(f"postgres: no column type for Arrow type {t}")
        fmt = _STRUCT[scalar.np]
        size = np.dtype(scalar.np).itemsize
        out: list[bytes | None] = []
        for items in col.to_pylist():
            if items is None:
                out.append(None)
                continue
            has_null = int(any(x is None for x in items))
            buf = bytearray(struct.pack("!iiiii", 1, has_null, scalar.oid, len(items), 1))
            for x in items:
                if x is None:
                    buf += b"\xff\xff\xff\xff"
                else:
                    buf += struct.pack("!i", size) + struct.pack(fmt, x)
            out.append(bytes(buf))
        return out
    scalar = _SCALARS.get(t)
    if scalar is None:
        raise service.PermanentError(f"postgres: no column type for Arrow type {t}")
    fmt = _STRUCT[scalar.np]
    return [None if v is None else struct.pack(fmt, v) for v in col.to_pylist()]


@functools.lru_cache(maxsize=64)
def _column_types(schema: pa.Schema) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """Each column's Postgres type (as format_type spells it), and the uint64 columns
    (or lists of them), whose values a bigint holds only up to 2**63 - 1.

    Per schema, not per message: every message of a layout has the same.
    """
    types = []
    unsigned = []
    for f in schema:
        try:
            types.append((f.name, _canonical(sql_type(f.type))))
        except service.PermanentError as err:
            raise service.InvalidMessageError(
                service.DeadLetterReason.SCHEMA_MISMATCH, f"column {f.name}: {err}"
            ) from err
        leaf = f.type
        while pa.types.is_fixed_size_list(leaf) or pa.types.is_list(leaf):
            leaf = leaf.value_type
        if pa.types.is_dictionary(leaf):
            leaf = leaf.value_type
        if leaf == pa.uint64():
            unsigned.append(f.name)
    return tuple(types), tuple(unsigned)


def _beyond_bigint(col: pa.ChunkedArray) -> int | None:
    """The largest value of a uint64 column (or list of them) if a bigint cannot hold it."""
    while pa.types.is_fixed_size_list(col.type) or pa.types.is_list(col.type):
        col = pc.list_flatten(col)
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    top = pc.max(col).as_py() if len(col) else None
    return top if top is not None and top > _BIGINT_MAX else None


def _check_times(table: pa.Table) -> None:
    """Refuse timestamps COPY's encoder cannot turn into microseconds without loss (a
    nanosecond part, a year past 294,000) and times before Postgres's first (4713 BC):
    found on any row, not just the first."""
    for f in table.schema:
        t = f.type.value_type if pa.types.is_dictionary(f.type) else f.type
        if not pa.types.is_timestamp(t):
            continue
        col = table.column(f.name)
        try:
            col = col.cast(t) if col.type != t else col
            micros = col.cast(pa.timestamp("us", tz=t.tz)).cast(pa.int64())
        except pa.ArrowInvalid as err:
            raise service.InvalidMessageError(
                service.DeadLetterReason.SCHEMA_MISMATCH,
                f"column {f.name}: {err}; Postgres keeps microseconds",
            ) from err
        first = pc.min(micros).as_py() if len(micros) else None
        if first is not None and first < _PG_FIRST_US:
            raise service.InvalidMessageError(
                service.DeadLetterReason.SCHEMA_MISMATCH,
                f"column {f.name} holds {first} µs since 1970, before 4713 BC,"
                f" the first time Postgres takes",
            )


def _check_text(table: pa.Table) -> None:
    """Refuse text with a NUL character, which Postgres text cannot hold."""
    for f in table.schema:
        col = table.column(f.name)
        if pa.types.is_dictionary(f.type):
            if not _is_text(f.type.value_type):
                continue
            values = [chunk.dictionary for chunk in col.chunks]
        elif _is_text(f.type):
            values = col.chunks
        else:
            continue
        if any(pc.any(pc.match_substring(v, "\x00")).as_py() for v in values if len(v)):
            raise service.InvalidMessageError(
                service.DeadLetterReason.SCHEMA_MISMATCH,
                f"column {f.name} holds text with a NUL character, which Postgres text cannot hold",
            )


async def _encoded(seq: int, encoding: concurrent.futures.Future[memoryview]) -> memoryview:
    """A message's COPY rows, encoded on the pool. An encoding that failed fails the
    same way every time it is awaited: retrying the commit cannot help, so the sink
    stops (exit 2) with the reason, and the message comes again after the restart."""
    try:
        return await asyncio.wrap_future(encoding)
    except asyncio.CancelledError:
        raise
    except Exception as err:
        raise service.PermanentError(
            f"postgres: encoding the rows of message {seq} failed: {type(err).__name__}: {err}"
        ) from err


# The columns the sink writes itself, ahead of a message's own.
OWN_COLUMNS: Final = ("stream_seq", "schema_version", "namespace")


def column_name(name: str) -> str:
    """The table column an Arrow column goes to: its name, or for a name past the 63
    bytes Postgres keeps (it would cut it, and two names could cut to one), its start
    and a hash of all of it."""
    raw = name.encode()
    if len(raw) <= _NAME_BYTES:
        return name
    head = raw[: _NAME_BYTES - 9].decode(errors="ignore")  # whole characters
    return f"{head}_{hashlib.sha256(raw).hexdigest()[:8]}"


def with_column_names(table: pa.Table) -> pa.Table:
    """`table` with its columns named as the table's (`column_name`); no copy."""
    names = table.schema.names
    columns = [column_name(n) for n in names]
    return table if columns == names else table.rename_columns(columns)


def copy_columns(schema: pa.Schema) -> list[str]:
    """Column names a COPY of this schema writes, in order."""
    return [*OWN_COLUMNS, *schema.names]


# ----------------------------------------------------------------------- writer


_Encoding = tuple[int, "concurrent.futures.Future[memoryview]"]  # a message's seq, its rows


@dataclasses.dataclass(frozen=True)
class _Sealed:
    """One transaction's worth of rows and the offset they move to.

    The rows come in groups of one column list each (one COPY per group): messages
    whose schema differs (a new aux output, say) share the transaction.
    """

    ticket: int
    groups: list[tuple[pa.Schema, list[_Encoding]]]
    last_seq: int
    # (stream sequence, Nats-Msg-Id, stream time) of its messages that carry an id.
    msg_ids: list[tuple[int, str, float]]
    rows: dict[int, int]  # rows of each message, by stream sequence

    def without(self, seqs: set[int]) -> None:
        """Leave out the messages `seqs` (refused by Postgres, dead-lettered)."""
        for _, encodings in self.groups:
            encodings[:] = [e for e in encodings if e[0] not in seqs]
        self.msg_ids[:] = [m for m in self.msg_ids if m[0] not in seqs]


class PostgresWriter:
    """`service.Writer` for PostgreSQL."""

    kind = "postgres"
    pipelined = True

    @property
    def hold_seconds(self) -> float:
        return self.linger_seconds

    def __init__(
        self,
        dsn: Callable[[], str],
        *,
        stream: str,
        consumer: str,
        namespace: str = "",
        schema_name: str = "relayrl",
        table: str = "steps",
        batch_rows: int = 10_000,
        linger_seconds: float = 0.2,
        connect_timeout: float = 5.0,
    ) -> None:
        self.dsn = dsn
        self.stream = stream
        self.namespace = namespace  # the Agent's, written in every row
        self.consumer = consumer
        self.schema_name = schema_name
        self.table = table
        self.batch_rows = batch_rows
        self.linger_seconds = linger_seconds
        self.connect_timeout = connect_timeout
        self._conn: psycopg.Connection[Any] | None = None
        self._committed = 0
        self._columns: dict[str, str] = {}  # the table's columns and their types
        # Column types messages accepted since the table was read will give it: a column
        # is created with the type of the first message that has it.
        self._expected: dict[str, str] = {}
        # Schemas whose rows COPY's encoder was seen to write (messages nearly always
        # share one): each new one is tried on a row first.
        self._encodable: set[pa.Schema] = set()
        self._groups: list[tuple[pa.Schema, list[_Encoding]]] = []
        self._msg_ids: list[tuple[int, str, float]] = []
        self._rows_of: dict[int, int] = {}  # rows of each message added, by sequence
        self.committed_ids = message_ids.MessageIds()
        self._rows = 0
        self._since = 0.0
        self._last_added = 0
        # Sealed batches commit strictly in order (offset checks rely on it).
        self._ticket = 0
        self._done_ticket = 0
        self._order = asyncio.Condition()
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="pg-sink")
        self._db = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pg-sink-db")

    @property
    def pending(self) -> bool:
        return bool(self._groups)

    # -------------------------------------------------------------- protocol

    async def open(self) -> int:
        self._committed = await self._in_db(self._open)
        return self._committed

    async def origin(self) -> str | None:
        """The stream the stored offset counts in (sink_offsets.stream_origin)."""
        row = await self._offsets(
            "SELECT stream_origin FROM {schema}.sink_offsets WHERE stream = %s AND consumer = %s"
        )
        return None if row is None or row[0] is None else str(row[0])

    async def set_origin(self, origin: str) -> None:
        """Record the stream the offset counts in."""
        await self._offsets(
            "UPDATE {schema}.sink_offsets SET stream_origin = %s "
            "WHERE stream = %s AND consumer = %s",
            origin,
        )

    async def restart(self, stale: int) -> int:
        """Set this stream's offset back to 0 (its rows stay); resume from the start.

        The offset is matched against what this writer committed, not `stale` (the last
        sequence the service took): messages after the last commit that were only
        dead-lettered moved the one but not the other.
        """
        await self._offsets(
            "UPDATE {schema}.sink_offsets SET last_seq = 0, updated_at = now() "
            "WHERE stream = %s AND consumer = %s AND last_seq = %s",
            after=(self._committed,),
        )
        log.warning(
            "postgres: offset of %s/%s reset from %d to 0 (sequences taken up to %d)",
            self.stream,
            self.consumer,
            self._committed,
            stale,
        )
        self._committed = 0
        return 0

    def check(self, table: pa.Table) -> None:
        """Refuse a message whose columns the table has (or will have) in another type.

        COPY would fail on it every time, holding up every message after it; so it
        would on a column named like the sink's own ones, or without a name.
        """
        clash = [n for n in table.schema.names if n in OWN_COLUMNS or not n or "\x00" in n]
        if clash:
            raise service.InvalidMessageError(
                service.DeadLetterReason.SCHEMA_MISMATCH,
                f"column names {clash} are the sink's own, empty or hold a NUL",
            )
        table = with_column_names(table)
        if len(set(table.schema.names)) != table.num_columns:
            raise service.InvalidMessageError(
                service.DeadLetterReason.SCHEMA_MISMATCH,
                f"column names {table.schema.names} name one table column twice",
            )
        wanted, unsigned = _column_types(table.schema)
        for name in unsigned:
            too_big = _beyond_bigint(table.column(name))
            if too_big is not None:
                raise service.InvalidMessageError(
                    service.DeadLetterReason.SCHEMA_MISMATCH,
                    f"column {name} holds {too_big}, more than a bigint takes",
                )
        known = {**self._expected, **self._columns}
        for name, typ in wanted:
            have = known.get(name)
            if have is not None and have != typ:
                raise service.InvalidMessageError(
                    service.DeadLetterReason.SCHEMA_MISMATCH,
                    f"column {name} is {typ} in this message, {have} in "
                    f"{self.schema_name}.{self.table}",
                )
        self._check_encodable(table)
        _check_times(table)
        _check_text(table)
        for name, typ in wanted:
            self._expected.setdefault(name, typ)

    def _check_encodable(self, table: pa.Table) -> None:
        """Encode one row of a schema not seen before: a column type the COPY encoder
        cannot write (a list of strings, a dictionary of lists) fails there, once,
        instead of failing its commit every time after each restart."""
        if table.schema in self._encodable:
            return
        try:
            encode_copy(table.slice(0, 1), 0, 0, self.namespace)
        except MemoryError:
            raise
        except (service.PermanentError, pa.ArrowException, ValueError, TypeError, KeyError,
                struct.error, OverflowError) as err:  # fmt: skip
            raise service.InvalidMessageError(
                service.DeadLetterReason.SCHEMA_MISMATCH,
                f"COPY cannot write its columns: {type(err).__name__}: {err}",
            ) from err
        if len(self._encodable) >= 64:
            self._encodable.clear()
        self._encodable.add(table.schema)

    async def add(self, delivery: service.Delivery) -> None:
        table = with_column_names(delivery.table)
        if not self._groups:
            self._since = time.monotonic()
        if not self._groups or not table.schema.equals(self._groups[-1][0], check_metadata=False):
            # One COPY has one column list: a new schema starts a new group.
            self._groups.append((table.schema, []))
        self._groups[-1][1].append(
            (
                delivery.seq,
                self._pool.submit(
                    encode_copy, table, delivery.seq, delivery.schema_version, self.namespace
                ),
            )
        )
        self._rows += table.num_rows
        self._rows_of[delivery.seq] = table.num_rows
        self._last_added = delivery.seq
        if delivery.msg_id is not None:
            self._msg_ids.append((delivery.seq, delivery.msg_id, delivery.time.timestamp()))

    def due(self, now: float) -> bool:
        return bool(self._groups) and (
            self._rows >= self.batch_rows or now - self._since >= self.linger_seconds
        )

    def seal(self, last_seq: int) -> object:
        """Take everything added so far as one transaction; later adds start the next."""
        self._ticket += 1
        sealed = _Sealed(self._ticket, self._groups, last_seq, self._msg_ids, self._rows_of)
        self._groups, self._rows, self._msg_ids, self._rows_of = [], 0, [], {}
        return sealed

    async def commit(self, sealed: object) -> None:
        """COPY one sealed batch and move the offset, in one transaction, in seal order.

        The service retries this with the same `sealed` after a failure, and runs it
        while the next batch is being fetched and encoded (pipelined).
        """
        assert isinstance(sealed, _Sealed)
        async with self._order:
            await self._order.wait_for(lambda: self._done_ticket == sealed.ticket - 1)
        groups = [
            (schema, [(seq, await _encoded(seq, f)) for seq, f in encodings])
            for schema, encodings in sealed.groups
        ]
        msg_ids = [(msg_id, at) for _, msg_id, at in sealed.msg_ids]
        try:
            await self._in_db(lambda: self._commit(groups, sealed.last_seq, msg_ids))
        except service.RowsRefused as refused:
            # Left out once the service has dead-lettered them; committed without them.
            seqs = {seq for seq, _ in refused.messages}
            refused.rows = {seq: sealed.rows.get(seq, 0) for seq in seqs}
            refused.leave_out = lambda: sealed.without(seqs)
            raise
        self._committed = sealed.last_seq
        async with self._order:
            self._done_ticket = sealed.ticket
            self._order.notify_all()

    async def probe(self) -> None:
        """A round trip on the sink's connection (made again if it was lost)."""
        await self._in_db(self._ping)

    def _ping(self) -> None:
        try:
            self._connect().execute("SELECT 1")
        except (psycopg.OperationalError, psycopg.InterfaceError):
            self._disconnect()
            raise

    async def close(self) -> None:
        self._groups, self._msg_ids, self._rows_of = [], [], {}
        await self._in_db(self._disconnect)
        self._pool.shutdown(wait=True)
        self._db.shutdown(wait=True)

    # -------------------------------------------------------------------- db

    async def _in_db(self, fn: Callable[[], _T]) -> _T:
        return await asyncio.wrap_future(self._db.submit(fn))

    async def _offsets(
        self, query: str, *before: object, after: tuple[object, ...] = ()
    ) -> tuple[Any, ...] | None:
        """One statement on this stream's sink_offsets row, in a transaction: `before`,
        then (stream, consumer), then `after` fill its placeholders. Its row, if any."""

        def run() -> tuple[Any, ...] | None:
            conn = self._connect()
            try:
                with conn.transaction():
                    cur = conn.execute(
                        sql.SQL(query).format(**self._ids()),
                        (*before, self.stream, self.consumer, *after),
                    )
                    return cur.fetchone() if cur.description else None
            except (psycopg.OperationalError, psycopg.InterfaceError):
                self._disconnect()
                raise

        return await self._in_db(run)

    def _connect(self) -> psycopg.Connection[Any]:
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        self._disconnect()
        dsn = self.dsn()
        password = checked_dsn(dsn).get("password") or ""
        try:
            self._conn = psycopg.connect(
                dsn,
                autocommit=True,
                connect_timeout=max(1, int(self.connect_timeout)),
                application_name=f"relayrl-sink-{self.kind}",
            )
        except psycopg.OperationalError as err:
            said = str(err)
            if len(password) >= 4 and password in said:
                # libpq quotes what it could not use; the sink logs what it raises.
                raise psycopg.OperationalError(said.replace(password, "***")) from None
            if "authentication failed" in said or "does not exist" in said:
                # Still retried (a Secret may be fixed), but said plainly.
                log.error("postgres: %s", err)
            raise
        return self._conn

    def _disconnect(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def _ids(self) -> dict[str, sql.Composable]:
        return {
            "schema": sql.Identifier(self.schema_name),
            "table": sql.Identifier(self.table),
            "idx_seq": sql.Identifier(f"{self.table}_stream_seq_idx"),
        }

    def _open(self) -> int:
        conn = self._connect()
        try:
            self._migrate(conn)
            with conn.transaction():
                conn.execute(
                    sql.SQL(
                        "INSERT INTO {schema}.sink_offsets (stream, consumer, last_seq) "
                        "VALUES (%s, %s, 0) ON CONFLICT DO NOTHING"
                    ).format(**self._ids()),
                    (self.stream, self.consumer),
                )
                row = conn.execute(
                    sql.SQL(
                        "SELECT last_seq FROM {schema}.sink_offsets "
                        "WHERE stream = %s AND consumer = %s"
                    ).format(**self._ids()),
                    (self.stream, self.consumer),
                ).fetchone()
                self._columns = self._table_columns(conn)
                written = conn.execute(
                    sql.SQL(
                        "SELECT producer, runs, extract(epoch FROM last_stored) "
                        "FROM {schema}.sink_message_ids WHERE stream = %s AND consumer = %s"
                    ).format(**self._ids()),
                    (self.stream, self.consumer),
                ).fetchall()
        except BaseException:
            self._disconnect()
            raise
        assert row is not None
        self.committed_ids = message_ids.MessageIds.from_rows(
            (str(p), list(runs), float(stored)) for p, runs, stored in written
        )
        log.info("postgres: message ids of %d producer(s) read", len(self.committed_ids))
        return int(row[0])

    def _migrate(self, conn: psycopg.Connection[Any]) -> None:
        ids = self._ids()
        with conn.transaction():
            # One sink migrates at a time; the others wait here, then find nothing to do.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {schema}").format(**ids))
            conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {schema}.schema_migrations ("
                    "version integer PRIMARY KEY, description text NOT NULL, "
                    "applied_at timestamptz NOT NULL DEFAULT now())"
                ).format(**ids)
            )
            conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {schema}.table_migrations ("
                    "table_name text NOT NULL, version integer NOT NULL, "
                    "description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now(), "
                    "PRIMARY KEY (table_name, version))"
                ).format(**ids)
            )
            done = {
                int(r[0])
                for r in conn.execute(
                    sql.SQL("SELECT version FROM {schema}.schema_migrations").format(**ids)
                )
            }
            table_done = {
                int(r[0])
                for r in conn.execute(
                    sql.SQL(
                        "SELECT version FROM {schema}.table_migrations WHERE table_name = %s"
                    ).format(**ids),
                    (self.table,),
                )
            }
            for m in MIGRATIONS:
                if m.version in (table_done if m.per_table else done):
                    continue
                for statement in m.statements:
                    conn.execute(sql.SQL(statement).format(**ids))
                if m.per_table:
                    conn.execute(
                        sql.SQL(
                            "INSERT INTO {schema}.table_migrations "
                            "(table_name, version, description) VALUES (%s, %s, %s)"
                        ).format(**ids),
                        (self.table, m.version, m.description),
                    )
                    log.info(
                        "postgres: applied migration %d to %s: %s",
                        m.version,
                        self.table,
                        m.description,
                    )
                    continue
                conn.execute(
                    sql.SQL(
                        "INSERT INTO {schema}.schema_migrations (version, description) "
                        "VALUES (%s, %s)"
                    ).format(**ids),
                    (m.version, m.description),
                )
                log.info("postgres: applied migration %d: %s", m.version, m.description)

    def _table_columns(self, conn: psycopg.Connection[Any]) -> dict[str, str]:
        rows = conn.execute(
            "SELECT attname, format_type(atttypid, NULL) FROM pg_attribute "
            "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
            (f"{self.schema_name}.{self.table}",),
        ).fetchall()
        return {str(r[0]): str(r[1]) for r in rows}

    def _add_columns(self, conn: psycopg.Connection[Any], schema: pa.Schema) -> None:
        for f in schema:
            if f.name in self._columns:
                continue
            conn.execute(
                sql.SQL("ALTER TABLE {schema}.{table} ADD COLUMN IF NOT EXISTS {col} {typ}").format(
                    col=sql.Identifier(f.name),
                    typ=sql.SQL(sql_type(f.type)),
                    **self._ids(),
                )
            )
            log.info("postgres: added column %s %s", f.name, sql_type(f.type))

    def _commit(
        self,
        groups: list[tuple[pa.Schema, list[tuple[int, memoryview]]]],
        last_seq: int,
        msg_ids: list[tuple[str, float]],
    ) -> None:
        conn = self._connect()
        ids = self._ids()
        # Added to a copy, kept once the transaction that stores them has committed.
        written, touched, forgotten = self.committed_ids.merged(msg_ids)
        try:
            with conn.transaction():
                row = conn.execute(
                    sql.SQL(
                        "SELECT last_seq FROM {schema}.sink_offsets "
                        "WHERE stream = %s AND consumer = %s FOR UPDATE"
                    ).format(**ids),
                    (self.stream, self.consumer),
                ).fetchone()
                stored = int(row[0]) if row is not None else -1
                if stored >= last_seq:
                    # An earlier attempt committed but its answer was lost: done already.
                    log.info("postgres: batch up to %d was already committed", last_seq)
                    self.committed_ids = written
                    return
                if stored != self._committed:
                    raise service.PermanentError(
                        f"postgres: offset of {self.stream}/{self.consumer} is {stored}, "
                        f"expected {self._committed}: is another sink writing?"
                    )
                for schema, payloads in groups:
                    self._copy(conn, schema, [p for _, p in payloads])
                self._store_ids(conn, written, touched, forgotten)
                conn.execute(
                    sql.SQL(
                        "UPDATE {schema}.sink_offsets SET last_seq = %s, updated_at = now() "
                        "WHERE stream = %s AND consumer = %s"
                    ).format(**ids),
                    (last_seq, self.stream, self.consumer),
                )
            self.committed_ids = written
        except (psycopg.OperationalError, psycopg.InterfaceError):
            self._disconnect()
            self._columns = {}  # an ALTER may have been rolled back: read the table again
            raise
        except (psycopg.errors.DataError, psycopg.errors.IntegrityError) as err:
            # Rows the table refuses (a value out of range, a constraint an operator
            # added): which messages hold them, each tried on its own.
            self._columns = {}
            refused = self._refused(conn, groups)
            if not refused:
                raise service.PermanentError(f"postgres: COPY failed: {err}") from err
            raise service.RowsRefused(refused) from err
        except psycopg.Error as err:
            # Not the connection: the data (say, a column another sink made in another
            # type since this one read the table). Retrying the same COPY cannot work; a
            # restart reads the table again and dead-letters what it cannot take.
            self._columns = {}
            raise service.PermanentError(f"postgres: COPY failed: {err}") from err

    def _copy(
        self, conn: psycopg.Connection[Any], schema: pa.Schema, payloads: list[memoryview]
    ) -> None:
        """COPY rows of one column list (the columns added first if the table lacks any)."""
        if not set(schema.names) <= self._columns.keys():
            # Read first (forgotten after a lost connection): ALTER takes an exclusive
            # lock on the table even for a column it has.
            self._columns = self._table_columns(conn)
        if not set(schema.names) <= self._columns.keys():
            self._add_columns(conn, schema)
            self._columns = self._table_columns(conn)
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in copy_columns(schema))
        stmt = sql.SQL("COPY {schema}.{table} ({cols}) FROM STDIN (FORMAT BINARY)").format(
            cols=cols, **self._ids()
        )
        with conn.cursor() as cur, cur.copy(stmt) as copy:
            copy.write(_COPY_HEADER)
            for p in payloads:
                copy.write(p)
            copy.write(_COPY_TRAILER)

    def _refused(
        self,
        conn: psycopg.Connection[Any],
        groups: list[tuple[pa.Schema, list[tuple[int, memoryview]]]],
    ) -> list[tuple[int, str]]:
        """The messages whose rows the table refuses, and why: each COPY'd on its own
        under a savepoint, in a transaction rolled back after."""
        refused: list[tuple[int, str]] = []
        try:
            with conn.transaction(force_rollback=True):
                for schema, payloads in groups:
                    for seq, payload in payloads:
                        try:
                            with conn.transaction():
                                self._copy(conn, schema, [payload])
                        except (psycopg.errors.DataError, psycopg.errors.IntegrityError) as err:
                            refused.append((seq, f"Postgres refused its rows: {err}"))
        except (psycopg.OperationalError, psycopg.InterfaceError):
            self._disconnect()
            raise
        finally:
            self._columns = {}  # the ALTERs were rolled back
        return refused

    def _store_ids(
        self,
        conn: psycopg.Connection[Any],
        written: message_ids.MessageIds,
        touched: set[str],
        forgotten: list[str],
    ) -> None:
        """Write the changed producers' message ids (inside the commit's transaction)."""
        ids = self._ids()
        if touched:
            with conn.cursor() as cur:
                cur.executemany(
                    sql.SQL(
                        "INSERT INTO {schema}.sink_message_ids "
                        "(stream, consumer, producer, runs, last_stored) "
                        "VALUES (%s, %s, %s, %s, to_timestamp(%s)) "
                        "ON CONFLICT (stream, consumer, producer) DO UPDATE "
                        "SET runs = EXCLUDED.runs, last_stored = EXCLUDED.last_stored"
                    ).format(**ids),
                    [
                        (self.stream, self.consumer, producer, runs, stored)
                        for producer, runs, stored in written.rows(sorted(touched))
                    ],
                )
        if forgotten:
            conn.execute(
                sql.SQL(
                    "DELETE FROM {schema}.sink_message_ids "
                    "WHERE stream = %s AND consumer = %s AND producer = ANY(%s)"
                ).format(**ids),
                (self.stream, self.consumer, forgotten),
            )
