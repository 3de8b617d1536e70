"""Both sinks end to end: producer process -> nats-server -> relayrl-sink processes.

What a user sees: the Arrow output reads as a dataset in pyarrow, pandas, polars and
duckdb; the Postgres rows equal what was produced; bad messages land on the dead-letter
subject with a reason while good ones keep flowing; /metrics, /healthz and /readyz work.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import logging
import signal
import urllib.request
from pathlib import Path
from typing import Any

import duckdb
import nats
import polars as pl
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from nats.aio.msg import Msg

from relayrl_runtime import streams
from relayrl_runtime.sinks import arrow_stream, service
from relayrl_runtime.sinks import postgres as pg_sink
from support import natsserver, pipeline, postgres, trajectories

SUBJECT = streams.trajectories_subject(pipeline.NAMESPACE, pipeline.AGENT)


def _ipc(table: pa.Table) -> bytes:
    out = pa.BufferOutputStream()
    with pa.ipc.new_stream(out, table.schema) as w:
        w.write_table(table)
    return bytes(out.getvalue().to_pybytes())


def _both_sinks(p: pipeline.Pipeline) -> tuple[pipeline.Sink, pipeline.Sink]:
    """An Arrow sink committing every second and a Postgres sink, started and ready."""
    arrow = p.arrow_sink("--rotate-seconds", "1")
    pgsink = p.postgres_sink()
    pipeline.start_ready(arrow, pgsink)
    return arrow, pgsink


async def _dead_letters(
    js: nats.js.JetStreamContext, want: int, agent: str = pipeline.AGENT, tries: int = 30
) -> list[Msg]:
    """The first `want` dead letters of an Agent, fetching for up to `tries` seconds."""
    subject = streams.deadletter_subject(pipeline.NAMESPACE, agent)
    sub = await js.pull_subscribe(subject, durable=None)
    dead: list[Msg] = []
    for _ in range(tries):
        with contextlib.suppress(nats.errors.TimeoutError):
            dead += await sub.fetch(want - len(dead), timeout=1)
        if len(dead) >= want:
            break
    return dead


def test_arrow_sink_writes_a_partitioned_dataset(arrow_pipeline: pipeline.Pipeline) -> None:
    producer = arrow_pipeline.producer(1, "--count", "60")
    producer.start()
    sink = arrow_pipeline.arrow_sink("--rotate-bytes", "300000", "--rotate-seconds", "1")
    sink.start()
    sink.wait_ready()
    report = producer.result()
    want = trajectories.expected({1: report["batches"]})
    root = arrow_pipeline.arrow_dir
    pipeline.wait_until("all rows", lambda: pipeline.arrow_rows(root) == want.num_rows)
    assert sink.terminate() == 0, sink.logs()

    pipeline.assert_same(pipeline.read_arrow(root), want, "arrow sink")
    files = arrow_stream.committed_files(root)
    assert len(files) > 1, "rotation by size"
    # The committed files cover the stream sequences once each, in order.
    for (_, last, _), (first, _, _) in itertools.pairwise(files):
        assert first == last + 1
    assert not list(root.rglob(".*")), "no temporary files left"
    assert all(p.parent.parent.name == f"agent={pipeline.AGENT}" for _, _, p in files)
    assert all(p.parent.name.startswith("date=") for _, _, p in files)

    # Readable by the tools users reach for.
    glob = str(root / "**" / "*.parquet")
    frame = pl.scan_parquet(glob, hive_partitioning=True).collect()
    assert frame.height == want.num_rows
    assert frame["agent"].unique().to_list() == [pipeline.AGENT]
    con = duckdb.connect()
    n, steps = con.execute(
        f"SELECT count(*), count(DISTINCT (episode_id, step)) "
        f"FROM read_parquet('{glob}', hive_partitioning = true)"
    ).fetchone() or (0, 0)
    assert n == steps == want.num_rows
    df = pipeline.read_arrow(root).to_pandas()
    assert len(df) == want.num_rows
    assert df["reward"].sum() == want.num_rows


def test_arrow_sink_ipc_format(arrow_pipeline: pipeline.Pipeline) -> None:
    producer = arrow_pipeline.producer(2, "--count", "20")
    producer.start()
    sink = arrow_pipeline.arrow_sink("--format", "arrow", "--rotate-seconds", "1")
    sink.start()
    report = producer.result()
    want = trajectories.expected({2: report["batches"]})
    root = arrow_pipeline.arrow_dir

    def rows() -> int:
        return sum(
            len(pa.ipc.open_file(p).read_all()) for _, _, p in arrow_stream.committed_files(root)
        )

    pipeline.wait_until("all rows", lambda: rows() == want.num_rows)
    sink.terminate()
    pipeline.assert_same(pipeline.read_arrow(root, "arrow"), want, "arrow sink (ipc)")


def test_postgres_sink_writes_rows_once_and_migrates(
    pg_pipeline: pipeline.Pipeline, pg: postgres.PostgresServer
) -> None:
    producer = pg_pipeline.producer(3, "--count", "60")
    producer.start()
    sink = pg_pipeline.postgres_sink("--batch-rows", "5000")
    sink.start()
    sink.wait_ready()
    report = producer.result()
    want = trajectories.expected({3: report["batches"]})
    pipeline.wait_until("all rows", lambda: pipeline.postgres_rows(pg.dsn) == want.num_rows)
    assert sink.terminate() == 0, sink.logs()
    pipeline.assert_same(pipeline.read_postgres(pg.dsn), want, "postgres sink")

    with psycopg.connect(pg.dsn) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM relayrl.schema_migrations")]
        table_versions = conn.execute(
            "SELECT table_name, version FROM relayrl.table_migrations"
        ).fetchall()
        offsets = conn.execute(
            "SELECT stream, consumer, last_seq FROM relayrl.sink_offsets"
        ).fetchall()
        seqs = conn.execute(
            "SELECT count(DISTINCT stream_seq), max(stream_seq) FROM relayrl.steps"
        ).fetchone()
        ids = conn.execute("SELECT producer, runs FROM relayrl.sink_message_ids").fetchall()
        # Each row names its Agent's namespace (Agents of one name in two namespaces).
        namespaces = conn.execute("SELECT DISTINCT namespace FROM relayrl.steps").fetchall()
    assert namespaces == [("default",)]
    assert versions == [m.version for m in pg_sink.MIGRATIONS if not m.per_table]
    assert table_versions == [("steps", m.version) for m in pg_sink.MIGRATIONS if m.per_table]
    assert seqs is not None
    assert offsets == [("RELAYRL_default_cartpole", "relayrl-sink-postgres", seqs[1])]
    # The publisher's message ids, as one run: messages 1..n of its one process.
    assert len(ids) == 1
    assert ids[0][1] == [1, seqs[0]]

    # A restart migrates nothing and writes nothing again.
    sink.start()
    sink.wait_ready()
    assert sink.terminate() == 0, sink.logs()
    assert pipeline.postgres_rows(pg.dsn) == want.num_rows


async def test_each_agents_table_in_one_schema_gets_made(pg: postgres.PostgresServer) -> None:
    """Two Agents writing to one database schema, each to a table of its own."""
    for table in ("cartpole_steps", "pendulum_steps"):
        writer = pg_sink.PostgresWriter(
            lambda: pg.dsn, stream=f"S_{table}", consumer="c", schema_name="shared", table=table
        )
        assert await writer.open() == 0
        await writer.close()
    with psycopg.connect(pg.dsn) as conn:
        made = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'shared' ORDER BY 1"
        ).fetchall()
        recorded = conn.execute(
            "SELECT table_name, version FROM shared.table_migrations ORDER BY 1"
        ).fetchall()
    assert [r[0] for r in made] == [
        "cartpole_steps",
        "pendulum_steps",
        "schema_migrations",
        "sink_message_ids",
        "sink_offsets",
        "table_migrations",
    ]
    per_table = [m.version for m in pg_sink.MIGRATIONS if m.per_table]
    assert recorded == [(t, v) for t in ("cartpole_steps", "pendulum_steps") for v in per_table]


async def test_a_table_of_an_older_sink_gets_the_namespace_column(
    pg: postgres.PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A steps table made before migration 5: the next sink adds the column, and the
    rows written before keep NULL there."""
    older = tuple(m for m in pg_sink.MIGRATIONS if m.version < 5)
    with monkeypatch.context() as m:
        m.setattr(pg_sink, "MIGRATIONS", older)
        writer = pg_sink.PostgresWriter(lambda: pg.dsn, stream="S", consumer="c", table="old")
        assert await writer.open() == 0
        await writer.close()
    with psycopg.connect(pg.dsn) as conn:
        columns = conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'old'"
        ).fetchall()
    assert ("namespace",) not in columns
    writer = pg_sink.PostgresWriter(
        lambda: pg.dsn, stream="S", consumer="c", table="old", namespace="ml"
    )
    assert await writer.open() == 0
    await writer.close()
    with psycopg.connect(pg.dsn) as conn:
        columns = conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'old'"
        ).fetchall()
        done = conn.execute(
            "SELECT version FROM relayrl.table_migrations WHERE table_name = 'old'"
        ).fetchall()
    assert ("namespace",) in columns
    assert [v for (v,) in done] == [m.version for m in pg_sink.MIGRATIONS if m.per_table]


async def test_a_column_already_in_the_table_is_not_altered_again(
    pg: postgres.PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    """After a lost connection the writer forgets the table's columns; it reads them
    again before adding any, because ALTER TABLE takes an exclusive lock on the table
    (stopping every other sink's COPY into it) even for a column that is there."""
    writer = pg_sink.PostgresWriter(lambda: pg.dsn, stream="S", consumer="c", table="alter_once")
    assert await writer.open() == 0
    try:
        wide = pa.Table.from_batches([trajectories.batch(2, 0)])
        wide = wide.append_column("extra_metric", pa.array([1.5] * wide.num_rows))
        for seq in (1, 2):
            if seq == 2:
                writer._columns = {}  # as after a lost connection
                caplog.clear()
            now = dt.datetime.now(dt.UTC)
            await writer.add(service.Delivery(seq, now, wide, 1, 0))
            with caplog.at_level(logging.INFO, logger=pg_sink.__name__):
                await writer.commit(writer.seal(seq))
            added = [r.getMessage() for r in caplog.records if "added column" in r.getMessage()]
            if seq == 1:  # the table's columns a trajectory message brings, and one more
                assert "postgres: added column extra_metric double precision" in added
            else:
                assert added == []
    finally:
        await writer.close()
    with psycopg.connect(pg.dsn) as conn:
        rows = conn.execute(
            "SELECT count(*), count(extra_metric) FROM relayrl.alter_once"
        ).fetchone()
    assert rows == (2 * wide.num_rows, 2 * wide.num_rows)


async def test_bad_messages_go_to_the_dead_letter_subject(
    pg_pipeline: pipeline.Pipeline, pg: postgres.PostgresServer
) -> None:
    arrow, pgsink = _both_sinks(pg_pipeline)
    nc = await nats.connect(pg_pipeline.nats.url)
    try:
        js = nc.jetstream()
        good = trajectories.batch(4, 0)
        valid = _ipc(pa.Table.from_batches([good]))
        v = streams.HEADER_SCHEMA_VERSION
        garbage = await js.publish(SUBJECT, b"not arrow at all", headers={v: "1"})
        unknown = await js.publish(SUBJECT, valid, headers={v: "99"})
        missing = await js.publish(SUBJECT, valid)  # no version header
        # "²" passes str.isdigit() but not int(); a column twice breaks field lookups.
        superscript = await js.publish(SUBJECT, valid, headers={v: "\u00b2"})
        schema = pa.schema([*good.schema, good.schema.field("reward")], good.schema.metadata)
        doubled = pa.RecordBatch.from_arrays([*good.columns, good.column("reward")], schema=schema)
        doubled_ipc = _ipc(pa.Table.from_batches([doubled]))
        twice = await js.publish(SUBJECT, doubled_ipc, headers={v: "1"})
        # A column whose first row is fine and whose others index past its dictionary:
        # the writers' checks of one row take it; their writes would fail on it.
        n = good.num_rows
        tag = pa.DictionaryArray.from_arrays(
            pa.array([0] + [7] * (n - 1), pa.int32()), pa.array(["x"]), safe=False
        )
        past_ipc = _ipc(
            pa.Table.from_batches([good.append_column(pa.field("aux_tag", tag.type), tag)])
        )
        past = await js.publish(SUBJECT, past_ipc, headers={v: "1"})
        await js.publish(SUBJECT, valid, headers={v: "1"})

        dead = await _dead_letters(js, 12, tries=50)
        reasons = sorted(
            (
                (m.headers or {})[streams.HEADER_DEAD_SINK],
                (m.headers or {})[streams.HEADER_DEAD_REASON],
                int((m.headers or {})[streams.HEADER_ORIGINAL_SEQUENCE]),
            )
            for m in dead
        )
        assert reasons == sorted(
            (kind, reason, seq)
            for kind in ("arrow", "postgres")
            for reason, seq in (
                ("invalid-arrow", garbage.seq),
                ("unknown-schema-version", unknown.seq),
                ("unknown-schema-version", missing.seq),
                ("unknown-schema-version", superscript.seq),
                ("schema-mismatch", twice.seq),
                ("invalid-arrow", past.seq),
            )
        )
        assert all(m.data in (b"not arrow at all", valid, doubled_ipc, past_ipc) for m in dead)
    finally:
        await nc.close()

    # The sinks kept going: the good message is stored, once.
    want = trajectories.sort(pa.Table.from_batches([good]))
    root = pg_pipeline.arrow_dir
    pipeline.wait_until("arrow rows", lambda: pipeline.arrow_rows(root) == want.num_rows)
    pipeline.wait_until("pg rows", lambda: pipeline.postgres_rows(pg.dsn) == want.num_rows)
    assert arrow.alive()
    assert pgsink.alive()
    assert arrow.metric("relayrl_sink_dead_letters_total") == 6
    for s in (arrow, pgsink):
        assert s.terminate() == 0, s.logs()
    pipeline.assert_same(pipeline.read_arrow(root), want, "arrow")
    pipeline.assert_same(pipeline.read_postgres(pg.dsn), want, "postgres")


async def test_messages_that_would_stop_a_sink_are_dead_lettered_and_it_keeps_going(
    pg_pipeline: pipeline.Pipeline, pg: postgres.PostgresServer
) -> None:
    """Each of these once stopped a sink (exit 2, or out of memory) at its write, and
    again after every restart: now the sink that cannot take it dead-letters it."""
    arrow, pgsink = _both_sinks(pg_pipeline)

    def message(k: int) -> pa.Table:
        return pa.Table.from_batches([trajectories.batch(4, k)])

    def with_column(t: pa.Table, name: str, values: pa.Array) -> pa.Table:
        return t.append_column(name, values)

    n = message(0).num_rows
    no_agent = message(1).drop_columns(["agent"])
    zeros = pa.table({"aux_zeros": pa.nulls(service.MAX_DECODED_BYTES // 8 + 1, pa.int64())
                      .fill_null(0)})  # fmt: skip
    bomb_out = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.ipc.new_stream(bomb_out, zeros.schema, options=options) as w:
        w.write_table(zeros)
    bomb = bytes(bomb_out.getvalue().to_pybytes())
    del zeros
    nul = with_column(message(2), "aux_note", pa.array(["a\x00b"] * n))
    early = message(3)
    i = early.schema.get_field_index("obs_time")
    micros = [-(2**62)] * n
    early = early.set_column(
        i, early.schema.field(i), pa.array(micros, pa.int64()).cast(early.schema.field(i).type)
    )
    seconds = pa.array([0] * (n - 1) + [2**62], pa.int64()).cast(pa.timestamp("s"))
    far = with_column(message(4), "aux_t", seconds)
    long_a, long_b = "aux_" + "x" * 70 + "_a", "aux_" + "x" * 70 + "_b"
    long_names = with_column(
        with_column(message(5), long_a, pa.array([1.0] * n)), long_b, pa.array([2.0] * n)
    )
    good = message(6)
    nc = await nats.connect(pg_pipeline.nats.url)
    try:
        js = nc.jetstream()
        v = {streams.HEADER_SCHEMA_VERSION: "1"}
        seq = {}
        for name, payload in (
            ("no agent", _ipc(no_agent)),
            ("bomb", bomb),
            ("nul", _ipc(nul)),
            ("early", _ipc(early)),
            ("far", _ipc(far)),
            ("long names", _ipc(long_names)),
            ("good", _ipc(good)),
        ):
            seq[name] = (await js.publish(SUBJECT, payload, headers=v)).seq
        dead = await _dead_letters(js, 8, tries=60)
    finally:
        await nc.close()
    reasons = sorted(
        (
            (m.headers or {})[streams.HEADER_DEAD_SINK],
            int((m.headers or {})[streams.HEADER_ORIGINAL_SEQUENCE]),
            (m.headers or {})[streams.HEADER_DEAD_REASON],
        )
        for m in dead
    )
    assert reasons == sorted(
        [
            ("arrow", seq["no agent"], "schema-mismatch"),
            ("arrow", seq["bomb"], "invalid-arrow"),
            ("arrow", seq["far"], "schema-mismatch"),
            ("postgres", seq["no agent"], "schema-mismatch"),
            ("postgres", seq["bomb"], "invalid-arrow"),
            ("postgres", seq["nul"], "schema-mismatch"),
            ("postgres", seq["early"], "schema-mismatch"),
            ("postgres", seq["far"], "schema-mismatch"),
        ]
    )
    root = pg_pipeline.arrow_dir
    pipeline.wait_until("arrow rows", lambda: pipeline.arrow_rows(root) == 4 * n)
    pipeline.wait_until("pg rows", lambda: pipeline.postgres_rows(pg.dsn) == 2 * n)
    assert arrow.alive()
    assert pgsink.alive()
    for sink in (arrow, pgsink):
        assert sink.terminate() == 0, sink.logs()
    # The long names, each in a column of its own (Postgres keeps 63 bytes of a name).
    a, b = pg_sink.column_name(long_a), pg_sink.column_name(long_b)
    with psycopg.connect(pg.dsn) as conn:
        row = conn.execute(
            psycopg.sql.SQL("SELECT sum({a}), sum({b}) FROM relayrl.steps").format(
                a=psycopg.sql.Identifier(a), b=psycopg.sql.Identifier(b)
            )
        ).fetchone()
    assert row == (1.0 * n, 2.0 * n)


async def test_rows_postgres_refuses_at_commit_are_dead_lettered_and_the_rest_written(
    pg_pipeline: pipeline.Pipeline, pg: postgres.PostgresServer
) -> None:
    """A constraint added to the table by hand refuses one message's rows: no check can
    foresee it. The commit finds that message, dead-letters it and commits the others;
    before, the sink exited 2 and met the same message after every restart."""
    pgsink = pg_pipeline.postgres_sink()
    pgsink.start()
    pgsink.wait_ready()
    first = pa.Table.from_batches([trajectories.batch(4, 0)])
    nc = await nats.connect(pg_pipeline.nats.url)
    try:
        js = nc.jetstream()
        v = {streams.HEADER_SCHEMA_VERSION: "1"}
        await js.publish(SUBJECT, _ipc(first), headers=v)
        pipeline.wait_until("first rows", lambda: pipeline.postgres_rows(pg.dsn) == first.num_rows)
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute("ALTER TABLE relayrl.steps ADD CONSTRAINT small CHECK (reward < 100)")
        bad = pa.Table.from_batches([trajectories.batch(4, 1)])
        i = bad.schema.get_field_index("reward")
        rewards = bad.column(i).to_pylist()
        rewards[-1] = 1000.0
        bad = bad.set_column(i, bad.schema.field(i), pa.array(rewards, bad.schema.field(i).type))
        good = [pa.Table.from_batches([trajectories.batch(4, k)]) for k in (2, 3)]
        # In one batch (one transaction) with the good ones around it.
        before = await js.publish(SUBJECT, _ipc(good[0]), headers=v)
        refused = await js.publish(SUBJECT, _ipc(bad), headers=v)
        await js.publish(SUBJECT, _ipc(good[1]), headers=v)
        dead = await _dead_letters(js, 1)
    finally:
        await nc.close()
    assert before.seq + 1 == refused.seq
    headers = dead[0].headers or {}
    assert headers[streams.HEADER_ORIGINAL_SEQUENCE] == str(refused.seq)
    assert headers[streams.HEADER_DEAD_REASON] == "schema-mismatch"
    assert "Postgres refused its rows" in headers["Relayrl-Dead-Letter-Detail"]
    assert "small" in headers["Relayrl-Dead-Letter-Detail"]
    assert dead[0].data == _ipc(bad)
    want = first.num_rows + good[0].num_rows + good[1].num_rows
    pipeline.wait_until("pg rows", lambda: pipeline.postgres_rows(pg.dsn) == want)
    assert pgsink.alive()
    assert pgsink.metric("relayrl_sink_messages_total") == 3
    assert pgsink.metric("relayrl_sink_rows_total") == want
    assert pgsink.terminate() == 0, pgsink.logs()
    with psycopg.connect(pg.dsn) as conn:
        row = conn.execute("SELECT max(reward) < 100 FROM relayrl.steps").fetchone()
    assert row == (True,)


async def test_postgres_dead_letters_a_column_type_its_table_cannot_take(
    pg_pipeline: pipeline.Pipeline, pg: postgres.PostgresServer
) -> None:
    """obs as float64 after the table has it as real[]: COPY would fail on every retry.

    The messages after it, one with an extra aux column, are stored as usual (a
    schema change inside a batch is one more COPY in the same transaction).
    """
    pgsink = pg_pipeline.postgres_sink()
    pgsink.start()
    pgsink.wait_ready()
    first = pa.Table.from_batches([trajectories.batch(4, 0)])
    i = first.schema.get_field_index("obs")
    width = first.schema.field("obs").type.list_size
    wide = pa.Table.from_batches([trajectories.batch(4, 1)])
    wide = wide.set_column(i, "obs", wide.column(i).cast(pa.list_(pa.float64(), width)))
    extra = pa.Table.from_batches([trajectories.batch(4, 2)])
    extra = extra.append_column(
        pa.field("aux_extra", pa.float32(), nullable=False),
        pa.array([0.5] * extra.num_rows, pa.float32()),
    )
    last = pa.Table.from_batches([trajectories.batch(4, 3)])
    nc = await nats.connect(pg_pipeline.nats.url)
    try:
        js = nc.jetstream()
        v = streams.HEADER_SCHEMA_VERSION
        await js.publish(SUBJECT, _ipc(first), headers={v: "1"})
        pipeline.wait_until("first rows", lambda: pipeline.postgres_rows(pg.dsn) == first.num_rows)
        bad = await js.publish(SUBJECT, _ipc(wide), headers={v: "1"})
        for t in (extra, last):
            await js.publish(SUBJECT, _ipc(t), headers={v: "1"})
        dead = await _dead_letters(js, 1)
    finally:
        await nc.close()
    assert [int((m.headers or {})[streams.HEADER_ORIGINAL_SEQUENCE]) for m in dead] == [bad.seq]
    assert (dead[0].headers or {})[streams.HEADER_DEAD_REASON] == "schema-mismatch"
    want = first.num_rows + extra.num_rows + last.num_rows
    pipeline.wait_until("pg rows", lambda: pipeline.postgres_rows(pg.dsn) == want)
    assert pgsink.alive()
    assert pgsink.terminate() == 0, pgsink.logs()
    with psycopg.connect(pg.dsn) as conn:
        row = conn.execute("SELECT count(aux_extra) FROM relayrl.steps").fetchone()
    assert row == (extra.num_rows,)


def _as_agent(table: pa.Table, agent: str) -> pa.Table:
    i = table.schema.get_field_index("agent")
    indices = pa.array([0] * table.num_rows, pa.int32())
    column = pa.DictionaryArray.from_arrays(indices, pa.array([agent]))
    return table.set_column(i, table.schema.field(i), column)


async def test_two_agents_sharing_a_table_with_clashing_column_types(
    pg_pipeline: pipeline.Pipeline, pg: postgres.PostgresServer
) -> None:
    """Both sinks start before the table has an obs column; the second one's COPY fails.

    That sink ends (exit 2), and its restart reads the table again and dead-letters the
    message instead of retrying the COPY forever; the first Agent's rows are untouched.
    """
    first = pa.Table.from_batches([trajectories.batch(7, 0)])
    i = first.schema.get_field_index("obs")
    width = first.schema.field("obs").type.list_size
    wide = _as_agent(pa.Table.from_batches([trajectories.batch(8, 0)]), "other")
    wide = wide.set_column(i, "obs", wide.column(i).cast(pa.list_(pa.float64(), width)))
    fits = _as_agent(pa.Table.from_batches([trajectories.batch(8, 1)]), "other")
    mine = pg_pipeline.postgres_sink()
    other = pg_pipeline.postgres_sink("--agent", "other")
    pipeline.start_ready(mine, other)
    other_subject = streams.trajectories_subject(pipeline.NAMESPACE, "other")
    v = {streams.HEADER_SCHEMA_VERSION: "1"}
    nc = await nats.connect(pg_pipeline.nats.url)
    try:
        js = nc.jetstream()
        await js.publish(SUBJECT, _ipc(first), headers=v)
        pipeline.wait_until("first rows", lambda: pipeline.postgres_rows(pg.dsn) == first.num_rows)
        bad = await js.publish(other_subject, _ipc(wide), headers=v)
        pipeline.wait_until("the other sink to end", lambda: not other.alive(), timeout=60)
        assert other.proc is not None
        assert other.proc.returncode == 2  # a permanent error (sink_cli)
        assert "COPY failed" in other.logs()
        other.start()  # as the Deployment's pod restarts
        other.wait_ready()
        await js.publish(other_subject, _ipc(fits), headers=v)
        want = first.num_rows + fits.num_rows
        pipeline.wait_until("pg rows", lambda: pipeline.postgres_rows(pg.dsn) == want)
        dead = await _dead_letters(js, 1, agent="other")
    finally:
        await nc.close()
    assert (dead[0].headers or {})[streams.HEADER_ORIGINAL_SEQUENCE] == str(bad.seq)
    assert (dead[0].headers or {})[streams.HEADER_DEAD_REASON] == "schema-mismatch"
    assert other.alive()
    for s in (mine, other):
        assert s.terminate() == 0, s.logs()


@pytest.mark.parametrize("running", [False, True], ids=["sinks-stopped", "sinks-running"])
async def test_a_stream_made_anew_is_taken_from_its_start(
    pg_pipeline: pipeline.Pipeline, pg: postgres.PostgresServer, running: bool
) -> None:
    """An Agent deleted and made again: same stream name, sequences from 1 again.

    The sinks' files and offsets table outlive the old stream; resuming after the old
    position would skip the new stream's first messages. Stopped sinks notice at their
    start; running ones when their consumer goes.
    """
    old = [pa.Table.from_batches([trajectories.batch(5, i)]) for i in range(3)]
    new = pa.Table.from_batches([trajectories.batch(6, 0)])
    v = streams.HEADER_SCHEMA_VERSION
    root = pg_pipeline.arrow_dir
    old_rows = sum(t.num_rows for t in old)
    arrow = pg_pipeline.arrow_sink("--rotate-seconds", "0.5")
    pgsink = pg_pipeline.postgres_sink()
    pipeline.start_ready(arrow, pgsink)
    nc = await nats.connect(pg_pipeline.nats.url)
    try:
        js = nc.jetstream()
        for t in old:
            await js.publish(SUBJECT, _ipc(t), headers={v: "1"})
        pipeline.wait_until("old arrow rows", lambda: pipeline.arrow_rows(root) == old_rows)
        pipeline.wait_until("old pg rows", lambda: pipeline.postgres_rows(pg.dsn) == old_rows)
        if running:
            # The old stream ends, after the last commit, on a message that is only
            # dead-lettered: the sinks' last taken sequence is past their committed one.
            await js.publish(SUBJECT, b"not arrow", headers={v: "1"})
            assert len(await _dead_letters(js, 2)) == 2  # one from each sink
        else:
            for s in (arrow, pgsink):
                assert s.terminate() == 0, s.logs()
        await js.delete_stream(streams.stream_name(pipeline.NAMESPACE, pipeline.AGENT))
        if running:
            # Made again (as the operator would for an Agent made again).
            config = streams.stream_config(pipeline.NAMESPACE, pipeline.AGENT)
            await streams.ensure_stream(js, config)
        else:
            pipeline.start_ready(arrow, pgsink)  # they make the stream again, empty
        await js.publish(SUBJECT, _ipc(new), headers={v: "1"})
        pipeline.wait_until("new arrow rows", lambda: pipeline.arrow_rows(root) == new.num_rows)
        want = old_rows + new.num_rows
        pipeline.wait_until("pg rows", lambda: pipeline.postgres_rows(pg.dsn) == want)
    finally:
        await nc.close()
    for s in (arrow, pgsink):
        if running:
            assert s.alive()
        assert s.terminate() == 0, s.logs()
    pipeline.assert_same(pipeline.read_arrow(root), trajectories.sort(new), "arrow")
    aside = list((root / f"agent={pipeline.AGENT}").glob("_replaced-*/date=*/part-*"))
    assert sum(pq.ParquetFile(p).metadata.num_rows for p in aside) == old_rows
    assert "made anew" in arrow.logs()
    if running:
        assert "made anew" in pgsink.logs()


async def test_a_bad_message_near_max_payload_is_dead_lettered_cut_short(
    tmp_path: Path,
) -> None:
    """Its copy plus the dead-letter headers would pass max_payload: the start goes."""
    limit = 64 << 10
    with natsserver.NatsServer(max_payload=limit) as srv:
        p = pipeline.Pipeline(srv, tmp_path, None)
        try:
            arrow = p.arrow_sink("--rotate-seconds", "1")
            arrow.start()
            arrow.wait_ready()
            nc = await nats.connect(srv.url)
            try:
                js = nc.jetstream()
                v = streams.HEADER_SCHEMA_VERSION
                big = b"x" * (limit - 200)
                bad = await js.publish(SUBJECT, big, headers={v: "1"})
                good = trajectories.batch(4, 0)
                await js.publish(SUBJECT, _ipc(pa.Table.from_batches([good])), headers={v: "1"})
                dead = await _dead_letters(js, 1)
            finally:
                await nc.close()
            assert len(dead) == 1
            headers = dead[0].headers or {}
            assert headers[streams.HEADER_ORIGINAL_SEQUENCE] == str(bad.seq)
            assert headers[streams.HEADER_DEAD_TRUNCATED] == str(len(big))
            assert big.startswith(dead[0].data)
            assert len(dead[0].data) > limit // 2
            want = trajectories.sort(pa.Table.from_batches([good]))
            root = p.arrow_dir
            pipeline.wait_until("arrow rows", lambda: pipeline.arrow_rows(root) == want.num_rows)
            assert arrow.alive()
            assert arrow.terminate() == 0, arrow.logs()
        finally:
            p.close()


def test_health_ready_and_metrics(arrow_pipeline: pipeline.Pipeline) -> None:
    sink = arrow_pipeline.arrow_sink("--rotate-seconds", "1")
    sink.start()
    sink.wait_ready()
    assert sink.get("/healthz")[0] == 200
    producer = arrow_pipeline.producer(5, "--count", "10")
    producer.start()
    report = producer.result()
    rows = report["batches"] * 400
    pipeline.wait_until("committed", lambda: sink.metric("relayrl_sink_rows_total") == rows)
    pipeline.wait_until("lag", lambda: sink.metric("relayrl_sink_lag_messages") == 0)
    _, body = sink.get("/metrics")
    for name in (
        "relayrl_sink_messages_total",
        "relayrl_sink_bytes_total",
        "relayrl_sink_commit_seconds_bucket",
        "relayrl_sink_committed_sequence",
    ):
        assert name in body
    assert sink.metric("relayrl_sink_bytes_total") > 0
    # Not ready once NATS is gone; ready again when it is back.
    arrow_pipeline.nats.stop()
    pipeline.wait_until("not ready", lambda: sink.get("/readyz")[0] == 503, 30)
    arrow_pipeline.nats.start()
    sink.wait_ready(30)
    assert sink.terminate() == 0, sink.logs()


@pytest.mark.parametrize("host", ["::1", "::"])
def test_the_http_endpoints_listen_on_an_ipv6_address(
    arrow_pipeline: pipeline.Pipeline, host: str
) -> None:
    """As in an IPv6 cluster, where the operator passes the pod's IPv6 address; "::"
    takes IPv4 connections too."""
    sink = arrow_pipeline.arrow_sink(host=host)
    sink.start()
    sink.wait_ready()
    assert sink.get("/healthz")[0] == 200
    assert "relayrl_sink_rows_total" in sink.get("/metrics")[1]
    if host == "::":
        url = f"http://127.0.0.1:{sink.port}/healthz"
        with urllib.request.urlopen(url, timeout=2) as resp:
            assert resp.status == 200
    assert sink.terminate() == 0, sink.logs()


async def test_dead_letters_at_the_streams_tail_are_not_dead_lettered_again_after_a_restart(
    pg_pipeline: pipeline.Pipeline,
) -> None:
    """Dead letters after the last data message are recorded by both sinks (a commit
    with no data), so the sinks restarted later resume after them."""
    arrow, pgsink = _both_sinks(pg_pipeline)
    nc = await nats.connect(pg_pipeline.nats.url)
    try:
        js = nc.jetstream()
        v = {streams.HEADER_SCHEMA_VERSION: "1"}
        data = await js.publish(
            SUBJECT, _ipc(pa.Table.from_batches([trajectories.batch(4, 0)])), headers=v
        )
        for s in (arrow, pgsink):  # committed: what follows is after the last data
            pipeline.wait_until(
                f"{s.name} to commit {data.seq}",
                lambda s=s: s.metric("relayrl_sink_committed_sequence") == data.seq,
            )
        await js.publish(SUBJECT, b"not arrow", headers=v)
        last = await js.publish(SUBJECT, b"not arrow either", headers=v)
        for s in (arrow, pgsink):
            pipeline.wait_until(
                f"{s.name} to record {last.seq}",
                lambda s=s: s.metric("relayrl_sink_committed_sequence") == last.seq,
            )
            assert s.metric("relayrl_sink_dead_letters_total") == 2
            assert s.terminate() == 0, s.logs()
        for s in (arrow, pgsink):
            before = len(s.log_path.read_bytes())
            s.start()
            s.wait_ready()
            logged = s.log_path.read_bytes()[before:].decode()
            assert f"starts at sequence {last.seq + 1}\n" in logged, logged
            assert s.metric("relayrl_sink_dead_letters_total") == 0
            assert s.terminate() == 0, s.logs()
    finally:
        await nc.close()


async def test_a_message_jetstream_stored_twice_is_written_once(
    pg_pipeline: pipeline.Pipeline, pg: postgres.PostgresServer
) -> None:
    """A publish whose ack was lost, sent again after the stream's duplicate window (a
    long outage): JetStream stores the retry as a second message. Both sinks skip it by
    its Nats-Msg-Id, after a kill -9 too (the ids are kept with the data).

    The window is half a second here (15 minutes in a real stream), so the copies are
    made by publishing the same id again after it.
    """
    v = streams.HEADER_SCHEMA_VERSION
    tables = [pa.Table.from_batches([trajectories.batch(7, i)]) for i in range(3)]
    payloads = [_ipc(t) for t in tables]

    def headers(i: int) -> dict[str, str]:
        producer = "pod-7-1-c0ffee"  # as the runtime's publisher names itself
        return {
            v: "1",
            streams.HEADER_PRODUCER: producer,
            streams.HEADER_MSG_ID: f"{producer}-{i + 1}",
        }

    nc = await nats.connect(pg_pipeline.nats.url)
    try:
        js = nc.jetstream()
        config = streams.stream_config(pipeline.NAMESPACE, pipeline.AGENT)
        config.duplicate_window = 0.5
        await streams.ensure_stream(js, config)
        # Told not to make the stream: they would set its window back to 15 minutes.
        arrow = pg_pipeline.arrow_sink("--rotate-seconds", "0.5", "--no-create-stream")
        pgsink = pg_pipeline.postgres_sink("--no-create-stream")
        pipeline.start_ready(arrow, pgsink)

        async def store(i: int) -> int:
            """Publish message i, as a new stream message even when sent before."""
            for _ in range(40):
                ack = await js.publish(SUBJECT, payloads[i], headers=headers(i))
                if not ack.duplicate:
                    return ack.seq
                await asyncio.sleep(0.25)  # the server forgets ids a little after the window
            raise AssertionError(f"message {i} was still taken for a duplicate")

        await store(0)
        await store(1)
        first = tables[0].num_rows + tables[1].num_rows
        root = pg_pipeline.arrow_dir
        pipeline.wait_until("arrow rows", lambda: pipeline.arrow_rows(root) == first)
        pipeline.wait_until("pg rows", lambda: pipeline.postgres_rows(pg.dsn) == first)
        for s in (arrow, pgsink):
            s.kill9()  # the ids must come back from the files and the table
        await asyncio.sleep(1.0)
        copies = [await store(0), await store(2), await store(1)]  # the last at the tail
        info = await js.stream_info(streams.stream_name(pipeline.NAMESPACE, pipeline.AGENT))
        assert info.state.messages == 5
        pipeline.start_ready(arrow, pgsink)
        for s in (arrow, pgsink):
            pipeline.wait_until(
                f"{s.kind} sink past the copies",
                lambda s=s: s.metric("relayrl_sink_committed_sequence") == copies[-1],  # type: ignore[misc]
            )
            assert s.metric("relayrl_sink_duplicates_total") == 2, s.logs()
    finally:
        await nc.close()
    for s in (arrow, pgsink):
        assert s.terminate() == 0, s.logs()
    want = trajectories.sort(pa.concat_tables(tables))
    pipeline.assert_same(pipeline.read_arrow(root), want, "arrow")
    pipeline.assert_same(pipeline.read_postgres(pg.dsn), want, "postgres")


async def test_messages_a_parquet_file_cannot_hold_together_are_written_apart(
    arrow_pipeline: pipeline.Pipeline,
) -> None:
    """No check foresees these: each message's int8 dictionary holds 100 values, fine
    alone, and two of them are more than an int8 index reaches, so their file cannot be
    written. Before, the Arrow sink exited 2, and again after every restart. Now it takes
    the file's messages again one by one: those that fit alone are written, and one that
    does not even alone (two batches of 100 values each) is dead-lettered."""
    arrow = arrow_pipeline.arrow_sink("--rotate-seconds", "2")
    pipeline.start_ready(arrow)

    def tagged(k: int, distinct: int) -> pa.RecordBatch:
        return trajectories.tagged(4, k, distinct, str(k))

    published = [
        pa.Table.from_batches([tagged(0, 10)]),
        pa.Table.from_batches([tagged(1, 100)]),
        pa.Table.from_batches([tagged(2, 10)]),
        pa.Table.from_batches([tagged(3, 100), tagged(4, 100)]),  # never fits
        pa.Table.from_batches([tagged(5, 100)]),
        pa.Table.from_batches([tagged(6, 10)]),
    ]
    nc = await nats.connect(arrow_pipeline.nats.url)
    try:
        js = nc.jetstream()
        v = {streams.HEADER_SCHEMA_VERSION: "1"}
        seqs = [(await js.publish(SUBJECT, _ipc(t), headers=v)).seq for t in published]
        dead = await _dead_letters(js, 1)
    finally:
        await nc.close()
    headers = dead[0].headers or {}
    assert headers[streams.HEADER_ORIGINAL_SEQUENCE] == str(seqs[3])
    assert headers[streams.HEADER_DEAD_SINK] == "arrow"
    assert "Arrow could not write it" in headers["Relayrl-Dead-Letter-Detail"]
    assert dead[0].data == _ipc(published[3])
    written = [t for i, t in enumerate(published) if i != 3]
    want = sum(t.num_rows for t in written)
    root = arrow_pipeline.arrow_dir
    pipeline.wait_until("arrow rows", lambda: pipeline.arrow_rows(root) == want)
    assert arrow.alive()
    assert arrow.metric("relayrl_sink_messages_total") == 5
    assert arrow.metric("relayrl_sink_rows_total") == want
    assert arrow.metric("relayrl_sink_dead_letters_total") == 1
    assert arrow.terminate() == 0, arrow.logs()
    assert "could not be written together" in arrow.logs()
    # Every row of the written messages once, none of the dead letter's.
    files = sorted(root.glob("agent=*/date=*/part-*.parquet"))
    tags = sorted(t for f in files for t in pq.read_table(f).column("aux_tag").to_pylist())
    assert tags == sorted(t for m in written for t in m.column("aux_tag").to_pylist())


async def test_a_refused_file_is_split_only_where_refused(
    arrow_pipeline: pipeline.Pipeline,
) -> None:
    """33 messages in one file, of which the first two cannot share one: the halving
    that finds them leaves the rest in few files, not one each, and a dead letter
    among them is published and counted once, though its messages are taken again."""
    arrow = arrow_pipeline.arrow_sink("--rotate-seconds", "2")
    pipeline.start_ready(arrow)

    def tagged(k: int, distinct: int) -> pa.Table:
        return pa.Table.from_batches([trajectories.tagged(4, k, distinct, str(k))])

    published = [tagged(0, 100), tagged(1, 100)] + [tagged(k, 10) for k in range(2, 33)]
    nc = await nats.connect(arrow_pipeline.nats.url)
    try:
        js = nc.jetstream()
        v = {streams.HEADER_SCHEMA_VERSION: "1"}
        for i, t in enumerate(published):
            if i == 5:
                await js.publish(SUBJECT, b"not arrow", headers=v)
            await js.publish(SUBJECT, _ipc(t), headers=v)
        await _dead_letters(js, 1)
    finally:
        await nc.close()
    want = sum(t.num_rows for t in published)
    root = arrow_pipeline.arrow_dir
    pipeline.wait_until("arrow rows", lambda: pipeline.arrow_rows(root) == want)
    assert arrow.metric("relayrl_sink_messages_total") == len(published)
    assert arrow.metric("relayrl_sink_dead_letters_total") == 1
    refused = arrow.metric('relayrl_sink_errors_total{sink="arrow",where="write"}')
    files = arrow_stream.committed_files(root)
    assert arrow.terminate() == 0, arrow.logs()
    # Halved down to the pair: 16, 8, 4, 2 and 1 to a file, each range once.
    assert 2 <= refused <= 6, arrow.logs()
    assert len(files) <= refused + 2, files
    tags = sorted(t for _, _, f in files for t in pq.read_table(f).column("aux_tag").to_pylist())
    assert tags == sorted(t for m in published for t in m.column("aux_tag").to_pylist())


_CAPPED_STREAM = f"RELAYRL_default_{pipeline.AGENT}"


def _sink_on_a_capped_stream(p: pipeline.Pipeline, url: str) -> tuple[pipeline.Sink, int]:
    """An arrow sink on a stream that keeps 5 messages (as maxAge or a size bound
    would, fewer), after its first 2 messages (800 rows): the sink and its position."""

    async def make(js: object) -> object:
        cfg = streams.stream_config("default", pipeline.AGENT)
        cfg.max_msgs = 5
        return await js.add_stream(cfg)  # type: ignore[attr-defined]

    natsserver.jetstream(url, make)
    sink = p.arrow_sink("--rotate-seconds", "1", "--no-create-stream")
    pipeline.start_ready(sink)
    p.producer(1, "--count", "2", "--rate", "2").start()
    pipeline.wait_until("rows", lambda: pipeline.arrow_rows(p.arrow_dir) >= 800, 60)
    return sink, int(sink.metric("relayrl_sink_committed_sequence"))


def _said_lost_after_catching_up(sink: pipeline.Sink, committed: int, url: str) -> Any:
    """Once the sink has caught up: it counted one loss and named its sequences. The
    stream's state."""

    async def state(js: object) -> object:
        return (await js.stream_info(_CAPPED_STREAM)).state  # type: ignore[attr-defined]

    st: Any = natsserver.jetstream(url, state)
    assert st.first_seq > committed + 1
    pipeline.wait_until(
        "caught up",
        lambda: sink.metric("relayrl_sink_committed_sequence") >= st.last_seq,
        60,
    )
    metrics = sink.get("/metrics")[1]
    assert 'relayrl_sink_errors_total{sink="arrow",where="stream-head-expired"} 1.0' in metrics
    said = f"discarded messages {committed + 1}-{st.first_seq - 1} before this sink read them"
    assert said in sink.logs()
    return st


def test_messages_the_stream_discarded_unread_are_said_lost(
    arrow_pipeline: pipeline.Pipeline, nats_server: natsserver.NatsServer
) -> None:
    """The stream's limits discard messages while the sink is down: it starts at the
    first one left, and says which sequences it never read (an ERROR,
    `stream-head-expired`), rather than nothing."""
    p = arrow_pipeline
    sink, committed = _sink_on_a_capped_stream(p, nats_server.url)
    assert sink.terminate() == 0
    later = p.producer(2, "--count", "20", "--rate", "2")
    later.start()
    later.result()
    sink.start()
    sink.wait_ready()
    st = _said_lost_after_catching_up(sink, committed, nats_server.url)
    # What the stream still held is written, once.
    assert pipeline.arrow_rows(p.arrow_dir) == 800 + (st.last_seq - st.first_seq + 1) * 400


def test_messages_discarded_while_the_sink_is_behind_are_said_lost(
    arrow_pipeline: pipeline.Pipeline, nats_server: natsserver.NatsServer
) -> None:
    """The same, with the sink running but behind (stopped with SIGSTOP, as a sink stuck
    on slow storage would be): the consumer skips what the stream discarded, without a
    gap in its own sequence, and the sink still says which sequences it lost."""
    p = arrow_pipeline
    sink, committed = _sink_on_a_capped_stream(p, nats_server.url)
    assert sink.proc is not None
    sink.proc.send_signal(signal.SIGSTOP)
    try:
        later = p.producer(2, "--count", "20", "--rate", "5")
        later.start()
        later.result()
    finally:
        sink.proc.send_signal(signal.SIGCONT)
    st = _said_lost_after_catching_up(sink, committed, nats_server.url)
    assert sink.terminate() == 0

    async def steps_held(js: Any) -> int:
        seqs = range(st.first_seq, st.last_seq + 1)
        held = [await js.get_msg(_CAPPED_STREAM, seq) for seq in seqs]
        return sum(int(m.headers[streams.HEADER_STEPS]) for m in held)

    # Every message is written once or said lost: what the stream still held is in.
    assert pipeline.arrow_rows(p.arrow_dir) == 800 + natsserver.jetstream(
        nats_server.url, steps_held
    )
