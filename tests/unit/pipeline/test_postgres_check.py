"""The Postgres writer refuses, before COPY, a message whose column types the table cannot take."""

from __future__ import annotations

import concurrent.futures
import traceback

import pyarrow as pa
import pytest

from relayrl_runtime.sinks import postgres, service
from support import trajectories


def writer(columns: dict[str, str]) -> postgres.PostgresWriter:
    w = postgres.PostgresWriter(lambda: "", stream="S", consumer="c")
    w._columns = columns  # as read from the table
    return w


def table(obs_type: pa.DataType | None = None) -> pa.Table:
    t = pa.Table.from_batches([trajectories.batch(1, 0)])
    if obs_type is not None:
        i = t.schema.get_field_index("obs")
        t = t.set_column(i, "obs", t.column(i).cast(obs_type))
    return t


def test_a_message_matching_the_table_passes() -> None:
    good = table()
    w = writer({"reward": "double precision", "obs_time": "timestamp with time zone"})
    w.check(good)


def test_a_column_of_another_type_than_the_tables_is_refused() -> None:
    good = table()
    width = good.schema.field("obs").type.list_size
    w = writer({"obs": "real[]"})
    with pytest.raises(service.InvalidMessageError, match="column obs is double precision"):
        w.check(table(pa.list_(pa.float64(), width)))


def test_the_first_accepted_message_fixes_a_new_columns_type() -> None:
    """Two layouts in flight before the column exists: the second would fail its COPY."""
    good = table()
    width = good.schema.field("obs").type.list_size
    w = writer({})
    w.check(good)
    with pytest.raises(service.InvalidMessageError) as err:
        w.check(table(pa.list_(pa.float64(), width)))
    assert err.value.reason == "schema-mismatch"


def test_a_uint64_beyond_bigint_is_refused_by_name() -> None:
    w = writer({})
    w.check(pa.table({"big": pa.array([2**63 - 1], pa.uint64())}))
    for column in (
        pa.array([1, 2**63 + 5], pa.uint64()),
        pa.array([[1, 2**64 - 1]], pa.list_(pa.uint64(), 2)),
    ):
        with pytest.raises(service.InvalidMessageError, match=r"column big holds \d+, more than"):
            w.check(pa.table({"big": column}))


@pytest.mark.parametrize("name", ["stream_seq", "schema_version", ""])
def test_a_column_named_like_the_sinks_own_or_unnamed_is_refused(name: str) -> None:
    good = table()
    odd = good.append_column(name, pa.array([1] * good.num_rows, pa.int64()))
    with pytest.raises(service.InvalidMessageError, match="the sink's own, empty") as err:
        writer({}).check(odd)
    assert err.value.reason == service.DeadLetterReason.SCHEMA_MISMATCH


@pytest.mark.parametrize(
    "column",
    [
        pa.array([["a", "b"]], pa.list_(pa.string())),
        pa.array([[[1.0], [2.0]]], pa.list_(pa.list_(pa.float32()))),
        pa.DictionaryArray.from_arrays(
            pa.array([0], pa.int32()), pa.array([[1.5]], pa.list_(pa.float32()))
        ),
    ],
    ids=["list of strings", "list of lists", "dictionary of lists"],
)
def test_a_column_type_copy_cannot_write_is_refused_before_the_commit(column: pa.Array) -> None:
    """Else its COPY fails every time: a crash loop, or a commit retried forever."""
    with pytest.raises(service.InvalidMessageError, match="COPY cannot write its columns") as err:
        writer({}).check(table().slice(0, 1).append_column("aux_odd", pa.chunked_array([column])))
    assert err.value.reason == "schema-mismatch"


def test_a_timestamp_microseconds_cannot_hold_is_refused_on_any_row() -> None:
    """COPY writes microseconds: a nanosecond part on row 3 would fail the encoding at
    commit, after the one-row probe passed, every time."""
    w = writer({})
    ns = pa.timestamp("ns", tz="UTC")
    w.check(pa.table({"aux_at": pa.array([1_000, 2_000, 3_000], ns)}))
    for column in (
        pa.array([1_000, 2_000, 3_001], ns),
        pa.array([1_000, 2_000, 3_001], ns).dictionary_encode(),
    ):
        with pytest.raises(service.InvalidMessageError, match=r"column aux_at: .*microseconds"):
            w.check(pa.table({"aux_at": column}))


async def test_an_encoding_that_failed_stops_the_commit_for_good() -> None:
    """Awaited again on every retry, it fails again: the sink exits, it never spins."""
    failed: concurrent.futures.Future[memoryview] = concurrent.futures.Future()
    failed.set_exception(OverflowError("too big"))
    with pytest.raises(service.PermanentError, match="message 42 failed: OverflowError"):
        await postgres._encoded(42, failed)


def test_text_with_a_nul_is_refused_in_values_and_names() -> None:
    good = table()
    n = good.num_rows
    w = writer({})
    w.check(good.append_column("aux_note", pa.array(["fine"] * n)))
    for column in (pa.array(["a\x00b"] * n), pa.array(["a\x00b"] * n).dictionary_encode()):
        with pytest.raises(service.InvalidMessageError, match="column aux_note holds text with"):
            w.check(good.append_column("aux_note", column))
    with pytest.raises(service.InvalidMessageError, match="hold a NUL"):
        w.check(good.append_column("aux_\x00", pa.array([1.0] * n)))


def test_a_time_before_postgres_first_is_refused() -> None:
    good = table()
    i = good.schema.get_field_index("obs_time")
    early = good.column(i).cast(pa.int64()).to_pylist()
    early[-1] = -(2**62)  # on the last row: the first would pass
    column = pa.array(early, pa.int64()).cast(good.schema.field(i).type)
    with pytest.raises(service.InvalidMessageError, match=r"obs_time holds .* before 4713 BC"):
        writer({}).check(good.set_column(i, good.schema.field(i), column))


def test_names_past_63_bytes_go_to_their_own_columns() -> None:
    long_a, long_b = "aux_" + "x" * 60 + "a", "aux_" + "x" * 60 + "b"
    assert postgres.column_name("aux_short") == "aux_short"
    a, b = postgres.column_name(long_a), postgres.column_name(long_b)
    assert a != b
    assert len(a.encode()) == len(b.encode()) == 63
    assert postgres.column_name(long_a) == a  # the same every time
    wide = "aux_" + "\u00e9" * 40  # 84 bytes: cut on a whole character
    assert len(postgres.column_name(wide).encode()) <= 63
    good = table()
    n = good.num_rows
    both = good.append_column(long_a, pa.array([1.0] * n)).append_column(
        long_b, pa.array([2.0] * n)
    )
    w = writer({})
    w.check(both)
    assert postgres.with_column_names(both).schema.names[-2:] == [a, b]


@pytest.mark.parametrize(
    ("dsn", "secret", "said"),
    [
        ("postgresql://relay:Pa%ssw0rdSECRET@127.0.0.1:1/db", "ssw0rdSECRET", "cannot be parsed"),
        ("postgresql://relay:Pa@ssw0rdSECRET@127.0.0.1:1/db", "ssw0rdSECRET", "holds '@'"),
        ("host=127.0.0.1 password=my SECRETpass", "SECRETpass", "cannot be parsed"),
        ("postgresql://relay:S3cr/etPassw0rd@127.0.0.1:5432/app", "etPassw0rd", "holds '@'"),
        ("postgresql://relay:S3cr/x@127.0.0.1/app", "S3cr/x", "holds '@'"),
        ("postgresql://127.0.0.1:S3cr3t/app", "S3cr3t", "port is not a number"),
    ],
)
def test_a_dsn_that_cannot_be_used_is_said_without_its_password(
    dsn: str, secret: str, said: str
) -> None:
    """libpq quotes the part it could not parse, often the password; the sink logs what
    `_connect` raises at every retry."""
    w = postgres.PostgresWriter(lambda: dsn, stream="S", consumer="c")
    with pytest.raises(postgres.DsnError) as err:
        w._connect()
    assert said in str(err.value)
    # Nor in a traceback of it (the parse error is not chained).
    assert secret not in "".join(traceback.format_exception(err.value))


def test_a_password_quoted_in_a_connect_error_is_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(dsn: str, **kwargs: object) -> None:
        raise postgres.psycopg.OperationalError('server said "hunter2-long" is wrong')

    monkeypatch.setattr(postgres.psycopg, "connect", refuse)
    w = postgres.PostgresWriter(
        lambda: "postgresql://relay:hunter2-long@127.0.0.1:1/db", stream="S", consumer="c"
    )
    with pytest.raises(postgres.psycopg.OperationalError) as err:
        w._connect()
    assert "hunter2-long" not in str(err.value)
    assert '"***"' in str(err.value)
