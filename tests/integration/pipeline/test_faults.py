"""Faults with real processes: afterwards Arrow and Postgres hold exactly what was produced.

Each test runs a producer process (the runtime's publisher), nats-server with file
storage, PostgreSQL and both `relayrl-sink` processes, breaks one of them mid-stream,
and then compares the sinks' contents with the producer's report: same steps, same
values, nothing lost and nothing twice (DESIGN.md "Delivery semantics", issue 4).
"""

from __future__ import annotations

import random
import time

import pyarrow as pa
import pytest

from support import pipeline, postgres, trajectories

pytestmark = pytest.mark.slow


def _start_sinks(p: pipeline.Pipeline) -> tuple[pipeline.Sink, pipeline.Sink]:
    # Small files and batches: commits are frequent, so faults land around them.
    arrow = p.arrow_sink("--rotate-bytes", "2000000", "--rotate-seconds", "1.5")
    pg = p.postgres_sink("--batch-rows", "2000")
    for s in (arrow, pg):
        s.start()
    for s in (arrow, pg):
        s.wait_ready()
    return arrow, pg


def _check(
    p: pipeline.Pipeline,
    pg: postgres.PostgresServer,
    sinks: tuple[pipeline.Sink, ...],
    produced: dict[int, int] | pa.Table,
) -> None:
    want = trajectories.expected(produced) if isinstance(produced, dict) else produced
    assert want.num_rows > 0
    try:
        pipeline.wait_until(
            "arrow sink caught up", lambda: pipeline.arrow_rows(p.arrow_dir) >= want.num_rows, 120
        )
        pipeline.wait_until(
            "postgres sink caught up",
            lambda: pipeline.postgres_rows(pg.dsn) >= want.num_rows,
            120,
        )
    except AssertionError as err:
        logs = "\n".join(f"--- {s.kind} sink:\n{s.logs()[-6000:]}" for s in sinks)
        raise AssertionError(
            f"{err} (want {want.num_rows} rows; arrow has {pipeline.arrow_rows(p.arrow_dir)},"
            f" postgres {pipeline.postgres_rows(pg.dsn)})\n{logs}"
        ) from None
    for s in sinks:
        assert s.terminate() == 0, s.logs()
    pipeline.assert_same(pipeline.read_arrow(p.arrow_dir), want, "arrow")
    pipeline.assert_same(pipeline.read_postgres(pg.dsn), want, "postgres")


def test_kill9_sinks_mid_batch_many_times(
    pg_pipeline: pipeline.Pipeline, pg: postgres.PostgresServer
) -> None:
    # Small batches at a steady rate: data flows during the whole kill loop.
    producer = pg_pipeline.producer(
        11, "--count", "1800", "--rate", "45", "--trajectories", "4", "--length", "50"
    )
    producer.start()
    arrow, pgsink = _start_sinks(pg_pipeline)
    rng = random.Random(11)
    kills = 0
    for i in range(12):
        victims = [arrow, pgsink] if i % 3 == 2 else [(arrow, pgsink)[i % 2]]
        # Kill while consuming: ready (consumer positioned), then a moment of work.
        for v in victims:
            v.wait_ready()
        time.sleep(rng.uniform(0.3, 1.5))
        for v in victims:
            v.kill9()
            kills += 1
        for v in victims:
            v.start()
    assert producer.alive(), "the kills happened while data was flowing"
    report = producer.result()
    assert kills >= 12
    assert arrow.starts > 4
    assert pgsink.starts > 4
    # Some kills hit a file being written: its temp file was dropped on restart.
    assert "removing uncommitted" in arrow.log_path.read_text()
    want = trajectories.expected({11: report["batches"]}, trajectories=4, length=50)
    _check(pg_pipeline, pg, (arrow, pgsink), want)


def test_nats_server_restart_mid_stream(
    pg_pipeline: pipeline.Pipeline, pg: postgres.PostgresServer
) -> None:
    producer = pg_pipeline.producer(12, "--count", "300", "--rate", "40")
    producer.start()
    arrow, pgsink = _start_sinks(pg_pipeline)
    nats = pg_pipeline.nats
    for how in ("restart", "kill", "restart"):
        time.sleep(1.5)
        if how == "kill":
            nats.kill()  # a crash: file storage keeps what was acked
        else:
            nats.stop()
        time.sleep(1.0)  # the producer's backlog holds; the sinks wait
        nats.start()
    report = producer.result()
    assert report["batches"] == 300
    _check(pg_pipeline, pg, (arrow, pgsink), {12: 300})


def test_postgres_stop_and_start(
    pg_pipeline: pipeline.Pipeline, pg: postgres.PostgresServer
) -> None:
    producer = pg_pipeline.producer(13, "--count", "300", "--rate", "40")
    producer.start()
    arrow, pgsink = _start_sinks(pg_pipeline)
    time.sleep(1.5)
    pg.stop("fast")
    pipeline.wait_until("postgres sink not ready", lambda: pgsink.get("/readyz")[0] == 503, 30)
    time.sleep(2.0)
    pg.start()
    pgsink.wait_ready(60)
    time.sleep(1.0)
    pg.kill()  # a crash mid-transaction: crash recovery rolls the open COPY back
    time.sleep(1.0)
    pg.start()
    report = producer.result()
    assert pgsink.alive(), pgsink.logs()
    _check(pg_pipeline, pg, (arrow, pgsink), {13: report["batches"]})


def test_an_idle_postgres_sink_is_not_ready_while_postgres_is_down(
    pg_pipeline: pipeline.Pipeline, pg: postgres.PostgresServer
) -> None:
    """Nothing to commit, so no commit finds out: the sink asks Postgres now and then."""
    sink = pg_pipeline.postgres_sink()
    sink.start()
    sink.wait_ready()
    pg.stop("fast")
    pipeline.wait_until("not ready", lambda: sink.get("/readyz")[0] == 503, 30)
    pg.start()
    sink.wait_ready(60)
    assert sink.alive(), sink.logs()
    assert sink.terminate() == 0, sink.logs()


def test_sigterm_of_the_publisher_flushes(
    pg_pipeline: pipeline.Pipeline, pg: postgres.PostgresServer
) -> None:
    arrow, pgsink = _start_sinks(pg_pipeline)
    fast = pg_pipeline.producer(14)  # flat out until SIGTERM
    fast.start()
    pipeline.wait_until("producing", lambda: fast.progress() >= 100, 60)
    assert fast.terminate(240) == 0
    first = fast.result()

    # SIGTERM while NATS is away: the backlog waits for it and is flushed, not dropped.
    away = pg_pipeline.producer(15)
    away.start()
    pipeline.wait_until("producing", lambda: away.progress() >= 50, 60)
    pg_pipeline.nats.stop()
    time.sleep(0.5)
    assert away.proc is not None
    away.proc.send_signal(15)
    time.sleep(2.0)
    assert away.alive(), "still flushing while NATS is away"
    pg_pipeline.nats.start()
    second = away.result()
    _check(pg_pipeline, pg, (arrow, pgsink), {14: first["batches"], 15: second["batches"]})
