"""Trajectory pipeline throughput: end to end vs the raw figures, measured in one run.

    python bench/pipeline/bench_pipeline.py            # full (about a minute)
    python bench/pipeline/bench_pipeline.py --quick    # smaller, for a smoke run

Starts a real nats-server (JetStream, file storage) and PostgreSQL on loopback, then
measures, on the same machine in the same run:

- raw JetStream publish: the publisher's own encoded messages (same bytes), published
  with pipelined acks, no packing;
- publisher: `NatsPublisher.write` of CartPole record batches until every ack is in;
- runtime -> NATS -> Arrow sink: the publisher writing while a `relayrl-sink arrow`
  process consumes, until the sink has committed every step (fsync + rename);
- raw Parquet write of the same rows (one writer, same compression), for reference;
- runtime -> NATS -> Postgres sink: the same, until every step is committed in Postgres;
- raw COPY of the same rows: the sink's binary COPY payload sent straight to Postgres.

Prints a table of steps/s and the ratios the issue asks for (targets: end to end at least
0.5x each raw figure). Every phase has a deadline, so the run is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nats
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from relayrl_runtime import streams  # noqa: E402
from relayrl_runtime.sinks import arrow_stream  # noqa: E402
from relayrl_runtime.sinks import postgres as pg_sink  # noqa: E402
from relayrl_runtime.transport import publisher  # noqa: E402
from support import natsserver, pipeline, postgres, trajectories  # noqa: E402

PHASE_DEADLINE = 180.0


def make_batches(count: int, trajectories_per_batch: int, length: int) -> list[pa.RecordBatch]:
    return [
        trajectories.batch(9, i, trajectories=trajectories_per_batch, length=length)
        for i in range(count)
    ]


def publish_all(url: str, batches: list[pa.RecordBatch], repeat: int) -> tuple[float, int]:
    """Write `batches` `repeat` times through the publisher; seconds until all acked."""
    pub = publisher.NatsPublisher(
        streams.ConnectOptions(servers=(url,)),
        publisher.PublisherConfig(namespace="default", agent=trajectories.AGENT),
    )
    pub.start()
    deadline = time.monotonic() + 30
    while not pub.connected and time.monotonic() < deadline:
        time.sleep(0.01)
    start = time.perf_counter()
    for _ in range(repeat):
        for b in batches:
            pub.write(b)
    pub.flush(PHASE_DEADLINE)
    elapsed = time.perf_counter() - start
    steps = pub.acked_steps
    pub.close()
    return elapsed, steps


def encoded_messages(batches: list[pa.RecordBatch]) -> list[tuple[bytes, dict[str, str]]]:
    """The publisher's messages for these batches (same packing, same bytes)."""
    pub = publisher.NatsPublisher(
        streams.ConnectOptions(),
        publisher.PublisherConfig(namespace="default", agent=trajectories.AGENT),
    )
    out = []
    group: list[pa.RecordBatch] = []
    size = 0
    budget = pub._budget()
    for batch in batches:
        for piece, piece_size in pub._split(batch):
            if group and size + piece_size > budget:
                m = pub._encode(group)
                out.append((m.payload, m.headers))
                group, size = [], 0
            group.append(piece)
            size += piece_size
    if group:
        m = pub._encode(group)
        out.append((m.payload, m.headers))
    return out


async def raw_publish(url: str, messages: list[tuple[bytes, dict[str, str]]], repeat: int) -> float:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await streams.ensure_stream(js, streams.stream_config("default", "rawbench"))
    subject = streams.trajectories_subject("default", "rawbench")
    start = time.perf_counter()
    futures = []
    n = 0
    for _ in range(repeat):
        for payload, headers in messages:
            n += 1
            hdr = dict(headers)
            hdr[streams.HEADER_MSG_ID] = f"raw-{n}"
            futures.append(await js.publish_async(subject, payload, headers=hdr))
    await asyncio.wait_for(asyncio.gather(*futures), PHASE_DEADLINE)
    elapsed = time.perf_counter() - start
    await streams.delete_stream(js, streams.stream_name("default", "rawbench"))
    await nc.close()
    return elapsed


def sink_rows(sink: pipeline.Sink) -> float:
    try:
        return sink.metric("relayrl_sink_rows_total")
    except (AssertionError, OSError):
        return 0.0


def run_sink_e2e(
    sink: pipeline.Sink, url: str, batches: list[pa.RecordBatch], repeat: int
) -> tuple[float, float]:
    """Publisher writing while the sink consumes; seconds until the sink committed all."""
    sink.start()
    sink.wait_ready(60)
    base = sink_rows(sink)
    start = time.perf_counter()
    pub_elapsed, steps = publish_all(url, batches, repeat)
    deadline = time.monotonic() + PHASE_DEADLINE
    while sink_rows(sink) - base < steps:
        if time.monotonic() > deadline or not sink.alive():
            raise RuntimeError(f"{sink.name} did not commit {steps} steps:\n{sink.logs()}")
        time.sleep(0.02)
    elapsed = time.perf_counter() - start
    assert sink.terminate() == 0
    return elapsed, pub_elapsed


def raw_parquet(
    batches: list[pa.RecordBatch], repeat: int, out: Path, settings: arrow_stream.ParquetSettings
) -> float:
    table = pa.Table.from_batches(batches).drop_columns(["agent"])
    start = time.perf_counter()
    with pq.ParquetWriter(out, table.schema, **settings.options(table.schema)) as w:
        for _ in range(repeat):
            w.write_table(table, row_group_size=settings.row_group_rows)
    fd = os.open(out, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - start


def raw_copy(dsn: str, batches: list[pa.RecordBatch], repeat: int) -> float:
    table = pa.Table.from_batches(batches)
    payload = pg_sink.encode_copy(table, 1, 1)
    cols = ", ".join(
        f'"{c}" {pg_sink.sql_type(f.type)}'
        for c, f in zip(table.column_names, table.schema, strict=True)
    )
    names = ", ".join(f'"{c}"' for c in pg_sink.copy_columns(table.schema))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE raw_copy (stream_seq bigint, schema_version smallint, {cols})")
        start = time.perf_counter()
        stmt = f"COPY raw_copy ({names}) FROM STDIN (FORMAT BINARY)"
        with conn.transaction(), conn.cursor() as cur, cur.copy(stmt) as copy:
            copy.write(pg_sink._COPY_HEADER)
            for _ in range(repeat):
                copy.write(payload)
            copy.write(pg_sink._COPY_TRAILER)
        elapsed = time.perf_counter() - start
        conn.execute("DROP TABLE raw_copy")
    return elapsed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="Smaller runs (smoke test).")
    p.add_argument(
        "--compression",
        default=arrow_stream.ParquetSettings().compression,
        help="Parquet codec of the Arrow sink and of the raw Parquet write (default: the sink's).",
    )
    args = p.parse_args()
    # The same Parquet settings for the sink and for the raw write it is compared with.
    parquet = arrow_stream.ParquetSettings(compression=args.compression)
    # CartPole-sized trajectories: 32 episodes of 200 steps per router batch.
    batches = make_batches(50, 32, 200)
    per_round = sum(b.num_rows for b in batches)
    arrow_repeat = 2 if args.quick else 24  # 0.64M / 7.7M steps
    pg_repeat = 1 if args.quick else 6  # 0.32M / 1.9M steps
    work = Path(tempfile.mkdtemp(prefix="relayrl-bench-"))
    results: dict[str, float] = {}
    # Other work on the machine shows in every figure: the 1-minute load goes with them.
    load_before = os.getloadavg()[0]
    try:
        with natsserver.NatsServer() as srv, postgres.PostgresServer() as pgs:
            messages = encoded_messages(batches)
            results["raw JetStream publish"] = (
                arrow_repeat * per_round / asyncio.run(raw_publish(srv.url, messages, arrow_repeat))
            )
            elapsed, steps = publish_all(srv.url, batches, arrow_repeat)
            results["publisher -> NATS (acked)"] = steps / elapsed

            pl = pipeline.Pipeline(srv, work, pgs.dsn)
            # Rotation every 0.5 s bounds the tail (the last file commits at most that
            # late); 256 MB files otherwise.
            rotate = ("--rotate-seconds", "0.5", "--rotate-bytes", str(256 << 20))
            arrow = pl.arrow_sink(*rotate, "--compression", parquet.compression)
            elapsed, _ = run_sink_e2e(arrow, srv.url, batches, arrow_repeat)
            results["runtime -> NATS -> Arrow sink"] = arrow_repeat * per_round / elapsed
            shutil.rmtree(pl.arrow_dir, ignore_errors=True)
            ipc = pl.arrow_sink(*rotate, "--format", "arrow")
            elapsed, _ = run_sink_e2e(ipc, srv.url, batches, arrow_repeat)
            results["runtime -> NATS -> Arrow sink (IPC)"] = arrow_repeat * per_round / elapsed
            shutil.rmtree(pl.arrow_dir, ignore_errors=True)
            results["raw Parquet write (same options)"] = (
                arrow_repeat
                * per_round
                / raw_parquet(batches, arrow_repeat, work / "raw.parquet", parquet)
            )

            pgsink = pl.postgres_sink("--batch-rows", "100000")
            elapsed, _ = run_sink_e2e(pgsink, srv.url, batches, pg_repeat)
            results["runtime -> NATS -> Postgres sink"] = pg_repeat * per_round / elapsed
            results["raw COPY (same rows, binary)"] = (
                pg_repeat * per_round / raw_copy(pgs.dsn, batches, pg_repeat)
            )
            pl.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\ntrajectory pipeline, {os.cpu_count()} cores, {'quick' if args.quick else 'full'} run,"
        f" Parquet {parquet.compression}, 1-min load {load_before:.2f} -> {os.getloadavg()[0]:.2f}"
    )
    print(f"{'path':<40} {'steps/s':>12}")
    for name, rate in results.items():
        print(f"{name:<40} {rate:>12,.0f}")
    raw_js = results["raw JetStream publish"]
    print("\nratios (target >= 0.5):")
    for name, base, label in (
        ("publisher -> NATS (acked)", raw_js, "raw JetStream publish"),
        ("runtime -> NATS -> Arrow sink", raw_js, "raw JetStream publish"),
        ("runtime -> NATS -> Arrow sink (IPC)", raw_js, "raw JetStream publish"),
        ("runtime -> NATS -> Postgres sink", raw_js, "raw JetStream publish"),
        ("runtime -> NATS -> Postgres sink", results["raw COPY (same rows, binary)"], "raw COPY"),
    ):
        print(f"{name:<40} / {label:<22} {results[name] / base:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
