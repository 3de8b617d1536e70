"""Trajectory pipeline throughput: end to end vs the raw figures, measured in one run.

    python bench/pipeline/bench_pipeline.py            # full: 3 rounds, about 3 minutes
    python bench/pipeline/bench_pipeline.py --quick    # smaller, for a smoke run

Starts a real nats-server (JetStream, file storage) and PostgreSQL on loopback, then
measures, on the same machine in the same run:

- raw JetStream publish: the publisher's own encoded messages (same bytes), published
  with pipelined acks, no packing;
- publisher: `NatsPublisher.write` of CartPole record batches until every ack is in;
- runtime -> NATS -> Arrow sink: the publisher writing while a `relayrl-sink arrow`
  process consumes, until the sink has committed every step (fsync + rename) and acked
  it (asked of nats-server, so the watching costs the sink nothing); the stream is
  emptied before each end-to-end phase;
- raw Parquet write of the same rows (one writer, same compression), for reference;
- transport only: the raw publish while a consumer process (`drain_consumer.py`) only
  fetches and acks; with the raw Parquet write, it gives the least a step through any
  sink of this design costs here, printed as a ceiling (`print_ceiling`);
- runtime -> NATS -> Postgres sink: the same, until every step is committed in Postgres;
- raw COPY of the same rows: the sink's binary COPY payload sent straight to Postgres.

Prints a table of steps/s and the ratios the issue asks for (targets: end to end at least
0.5x each raw figure). Every phase also reports the CPU the whole machine spent on it
(/proc/stat), and who spent it: this process (the publisher), nats-server, Postgres and
the sink. On a small machine they share the cores, and the CPU per step shows which
path costs what. Every phase has a deadline, so the run is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

import nats
import nats.js.api
import nats.js.errors
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from relayrl_runtime import streams  # noqa: E402
from relayrl_runtime.sinks import arrow_stream  # noqa: E402
from relayrl_runtime.sinks import postgres as pg_sink  # noqa: E402
from relayrl_runtime.transport import publisher  # noqa: E402
from support import cputime, natsserver, pipeline, postgres, trajectories  # noqa: E402

PHASE_DEADLINE = 180.0


# The servers' process groups, whose CPU every phase reports (set once they are up).
SERVERS: dict[str, int] = {}
BENCH: Final = "bench (publisher)"
SINK: Final = "sink"
OTHER: Final = "other"


@dataclasses.dataclass(frozen=True)
class Span:
    """One measured phase: wall seconds and the CPU seconds the whole machine spent busy,
    and who spent them: this process (it runs the publisher and the raw writes), each
    server, the sink; `OTHER` is the rest of the machine."""

    seconds: float
    cpu: float
    parts: dict[str, float]


class Clock:
    """Starts a `Span`: wall time and CPU from now until `stop`."""

    def __init__(self, sink: int | None = None) -> None:
        processes = {BENCH: os.getpid()} | ({SINK: sink} if sink is not None else {})
        self.meter = cputime.Meter(SERVERS, processes)
        self.wall = time.perf_counter()

    def stop(self) -> Span:
        seconds = time.perf_counter() - self.wall
        parts = self.meter.stop()
        machine = parts.pop("machine")
        parts[OTHER] = max(0.0, machine - sum(parts.values()))
        return Span(seconds, machine, parts)


def make_batches(count: int, trajectories_per_batch: int, length: int) -> list[pa.RecordBatch]:
    return [
        trajectories.batch(9, i, trajectories=trajectories_per_batch, length=length)
        for i in range(count)
    ]


def publish_all(url: str, batches: list[pa.RecordBatch], repeat: int) -> tuple[Span, int]:
    """Write `batches` `repeat` times through the publisher; the span until all acked."""
    pub = publisher.NatsPublisher(
        streams.ConnectOptions(servers=(url,)),
        publisher.PublisherConfig(namespace="default", agent=trajectories.AGENT),
    )
    pub.start()
    deadline = time.monotonic() + 30
    while not pub.connected and time.monotonic() < deadline:
        time.sleep(0.01)
    clock = Clock()
    for _ in range(repeat):
        for b in batches:
            pub.write(b)
    pub.flush(PHASE_DEADLINE)
    span = clock.stop()
    steps = pub.acked_steps
    pub.close()
    return span, steps


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


async def raw_publish(url: str, messages: list[tuple[bytes, dict[str, str]]], repeat: int) -> Span:
    """Every message published at once, acks collected as they come (pipelined)."""
    nc, events = await connect_watched(url)
    js = nc.jetstream()
    await streams.ensure_stream(js, streams.stream_config("default", "rawbench"))
    subject = streams.trajectories_subject("default", "rawbench")
    clock = Clock()
    await publish_acked(nc, events, subject, messages, repeat)
    span = clock.stop()
    await streams.delete_stream(js, streams.stream_name("default", "rawbench"))
    await nc.close()
    return span


async def connect_watched(url: str) -> tuple[NATS, list[str]]:
    """A connection, and what happens to it (said should acks go missing)."""
    events: list[str] = []

    async def on_error(err: Exception) -> None:
        events.append(f"error {err}")

    async def on_disconnect() -> None:
        events.append("disconnected")

    nc = await nats.connect(url, error_cb=on_error, disconnected_cb=on_disconnect)
    return nc, events


async def publish_acked(
    nc: NATS,
    events: list[str],
    subject: str,
    messages: list[tuple[bytes, dict[str, str]]],
    repeat: int,
) -> None:
    """Publish `messages` `repeat` times, each with a reply subject, until all are acked.

    Plain publishes with a reply subject rather than nats-py's publish_async: that one
    leaves a future unresolved when JetStream answers an error (its reply handler raises
    instead), and under this load nats-server answers 429 ("too many requests") when
    the stream's ingest queue is full. Those are published again, as any client would.
    """
    inbox = nc.new_inbox()
    pending: dict[str, tuple[bytes, dict[str, str]]] = {}
    refused: list[str] = []
    busy = 0
    done = asyncio.Event()

    async def on_ack(msg: Msg) -> None:
        nonlocal busy
        token = msg.subject.rsplit(".", 1)[1]
        error = json.loads(msg.data).get("error") if msg.data else None
        if error is not None and error.get("code") in (429, 503):
            busy += 1
            payload, hdr = pending[token]
            await nc.publish(subject, payload, reply=msg.subject, headers=hdr)
            return
        if error is not None:
            refused.append(str(error))
        pending.pop(token, None)
        if not pending:
            done.set()

    sub = await nc.subscribe(f"{inbox}.*", cb=on_ack)
    n = 0
    for _ in range(repeat):
        for payload, headers in messages:
            n += 1
            hdr = dict(headers)
            hdr[streams.HEADER_MSG_ID] = f"raw-{n}"
            pending[str(n)] = (payload, hdr)
            await nc.publish(subject, payload, reply=f"{inbox}.{n}", headers=hdr)
    try:
        await asyncio.wait_for(done.wait(), PHASE_DEADLINE)
    except TimeoutError:
        raise RuntimeError(
            f"raw publish: {n - len(pending)} of {n} acks within {PHASE_DEADLINE}s;"
            f" connection: {events or 'no errors'}"
        ) from None
    if refused:
        raise RuntimeError(f"raw publish: {len(refused)} refused: {refused[:3]}")
    if busy:
        print(f"  (raw publish: {busy} publishes answered 'busy' and sent again)")
    await sub.unsubscribe()


async def transport_only(
    url: str, messages: list[tuple[bytes, dict[str, str]]], repeat: int
) -> Span:
    """Raw publish while `drain_consumer.py` fetches and acks: JetStream's store and
    delivery and nats-py's receive, with nothing decoded or written."""
    nc, events = await connect_watched(url)
    js = nc.jetstream()
    config = streams.stream_config("default", "transport")
    await streams.ensure_stream(js, config)
    assert config.name is not None
    durable = "transport"
    await js.add_consumer(
        config.name,
        nats.js.api.ConsumerConfig(
            durable_name=durable, ack_policy=nats.js.api.AckPolicy.ALL, max_ack_pending=-1
        ),
    )
    steps = repeat * sum(int(h[streams.HEADER_STEPS]) for _, h in messages)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(Path(__file__).with_name("drain_consumer.py")),
        url,
        config.name,
        durable,
        str(steps),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdin is not None
        if (await asyncio.wait_for(proc.stdout.readline(), 60)).strip() != b"ready":
            raise RuntimeError("drain consumer did not start")
        clock = Clock(proc.pid)
        subject = streams.trajectories_subject("default", "transport")
        await publish_acked(nc, events, subject, messages, repeat)
        line = await asyncio.wait_for(proc.stdout.readline(), PHASE_DEADLINE)
        span = clock.stop()  # before it exits: its CPU is read from /proc
        if not line.strip().isdigit() or int(line) != steps:
            raise RuntimeError(f"drain consumer took {line!r} steps of {steps}")
        proc.stdin.close()
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await streams.delete_stream(js, config.name)
        await nc.close()
    return span


def sink_rows(sink: pipeline.Sink) -> float:
    try:
        return sink.metric("relayrl_sink_rows_total")
    except (AssertionError, OSError):
        return 0.0


async def wait_acked(url: str, sink: pipeline.Sink) -> None:
    """Until the sink has acked everything in the stream, which it does once committed.

    Asked of nats-server (the consumer's ack floor), not of the sink: polling its
    /metrics costs the sink a millisecond of its event loop's time per request.
    """
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        name = streams.stream_name(pipeline.NAMESPACE, trajectories.AGENT)
        last = (await js.stream_info(name)).state.last_seq
        durable = streams.durable_name(sink.kind)
        deadline = time.monotonic() + PHASE_DEADLINE
        while (await js.consumer_info(name, durable)).ack_floor.stream_seq < last:
            if time.monotonic() > deadline or not sink.alive():
                raise RuntimeError(f"{sink.name} did not commit up to {last}:\n{sink.logs()}")
            await asyncio.sleep(0.01)
    finally:
        await nc.close()


async def purge_trajectories(url: str) -> None:
    """Empty the Agent's stream: an end-to-end phase's sink sees only that phase's steps."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    name = streams.stream_name("default", trajectories.AGENT)
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await js.purge_stream(name)
    await nc.close()


def run_sink_e2e(sink: pipeline.Sink, url: str, batches: list[pa.RecordBatch], repeat: int) -> Span:
    """Publisher writing while the sink consumes; the span until the sink committed all.

    The stream is emptied first, and every sink starts with no committed data: what it
    drains is exactly what the publisher writes during the phase, not earlier phases'
    messages still in the stream.
    """
    asyncio.run(purge_trajectories(url))
    sink.start()
    sink.wait_ready(60)
    base = sink_rows(sink)
    assert sink.proc is not None
    clock = Clock(sink.proc.pid)
    _, steps = publish_all(url, batches, repeat)
    asyncio.run(wait_acked(url, sink))
    span = clock.stop()
    committed = sink_rows(sink) - base
    if committed != steps:
        raise RuntimeError(f"{sink.name} committed {committed:.0f} steps of {steps}")
    assert sink.terminate() == 0
    return span


def raw_parquet(
    batches: list[pa.RecordBatch], repeat: int, out: Path, settings: arrow_stream.ParquetSettings
) -> Span:
    table = pa.Table.from_batches(batches).drop_columns(["agent"])
    clock = Clock()
    with pq.ParquetWriter(out, table.schema, **settings.options(table.schema)) as w:
        for _ in range(repeat):
            w.write_table(table, row_group_size=settings.row_group_rows)
    fd = os.open(out, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return clock.stop()


def raw_copy(dsn: str, batches: list[pa.RecordBatch], repeat: int) -> Span:
    table = pa.Table.from_batches(batches)
    payload = pg_sink.encode_copy(table, 1, 1, "default")  # the rows the sink writes
    cols = ", ".join(
        f'"{c}" {pg_sink.sql_type(f.type)}'
        for c, f in zip(table.column_names, table.schema, strict=True)
    )
    names = ", ".join(f'"{c}"' for c in pg_sink.copy_columns(table.schema))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE raw_copy"
            f" (stream_seq bigint, schema_version smallint, namespace text, {cols})"
        )
        clock = Clock()
        stmt = f"COPY raw_copy ({names}) FROM STDIN (FORMAT BINARY)"
        with conn.transaction(), conn.cursor() as cur, cur.copy(stmt) as copy:
            copy.write(pg_sink._COPY_HEADER)
            for _ in range(repeat):
                copy.write(payload)
            copy.write(pg_sink._COPY_TRAILER)
        span = clock.stop()
        conn.execute("DROP TABLE raw_copy")
    return span


RAW_JS: Final = "raw JetStream publish"
RAW_COPY: Final = "raw COPY (same rows, binary)"
E2E_PARQUET: Final = "runtime -> NATS -> Arrow sink"
E2E_IPC: Final = "runtime -> NATS -> Arrow sink (IPC)"
E2E_PG: Final = "runtime -> NATS -> Postgres sink"
PUBLISHER: Final = "publisher -> NATS (acked)"
RAW_PARQUET: Final = "raw Parquet write (same options)"
TRANSPORT: Final = "raw publish -> NATS -> fetch + ack"


Round = dict[str, tuple[int, Span]]


def run_round(
    srv: natsserver.NatsServer,
    pgs: postgres.PostgresServer,
    work: Path,
    batches: list[pa.RecordBatch],
    parquet: arrow_stream.ParquetSettings,
    quick: bool,
) -> Round:
    """Every phase once, in order, on the same servers: steps and span of each."""
    per_round = sum(b.num_rows for b in batches)
    arrow_repeat = 2 if quick else 24  # 0.64M / 7.7M steps
    pg_repeat = 1 if quick else 6  # 0.32M / 1.9M steps
    arrow_steps = arrow_repeat * per_round
    pg_steps = pg_repeat * per_round
    results: Round = {}
    messages = encoded_messages(batches)
    results[RAW_JS] = (arrow_steps, asyncio.run(raw_publish(srv.url, messages, arrow_repeat)))
    span, steps = publish_all(srv.url, batches, arrow_repeat)
    results[PUBLISHER] = (steps, span)

    pl = pipeline.Pipeline(srv, work, pgs.dsn)
    try:
        # Rotation every 0.5 s bounds the tail (the last file commits at most that late);
        # 256 MB files otherwise.
        rotate = ("--rotate-seconds", "0.5", "--rotate-bytes", str(256 << 20))
        arrow = pl.arrow_sink(*rotate, "--compression", parquet.compression)
        results[E2E_PARQUET] = (arrow_steps, run_sink_e2e(arrow, srv.url, batches, arrow_repeat))
        shutil.rmtree(pl.arrow_dir, ignore_errors=True)
        ipc = pl.arrow_sink(*rotate, "--format", "arrow")
        results[E2E_IPC] = (arrow_steps, run_sink_e2e(ipc, srv.url, batches, arrow_repeat))
        shutil.rmtree(pl.arrow_dir, ignore_errors=True)
        span = raw_parquet(batches, arrow_repeat, work / "raw.parquet", parquet)
        results[RAW_PARQUET] = (arrow_steps, span)
        span = asyncio.run(transport_only(srv.url, messages, arrow_repeat))
        results[TRANSPORT] = (arrow_steps, span)

        pgsink = pl.postgres_sink("--batch-rows", "100000")
        results[E2E_PG] = (pg_steps, run_sink_e2e(pgsink, srv.url, batches, pg_repeat))
        results[RAW_COPY] = (pg_steps, raw_copy(pgs.dsn, batches, pg_repeat))
    finally:
        pl.close()
        shutil.rmtree(pl.arrow_dir, ignore_errors=True)
        # A fresh Postgres sink table each round.
        with psycopg.connect(pgs.dsn, autocommit=True) as conn:
            conn.execute("DROP SCHEMA IF EXISTS relayrl CASCADE")
    return results


def rate(r: Round, name: str) -> float:
    steps, span = r[name]
    return steps / span.seconds


def cost(r: Round, name: str) -> float:
    """Machine CPU seconds per step."""
    steps, span = r[name]
    return span.cpu / steps


def spread(values: list[float], fmt: str) -> str:
    """Median, with the range when there is more than one value."""
    text = format(statistics.median(values), fmt)
    if len(values) > 1:
        text += f" ({format(min(values), fmt)}-{format(max(values), fmt)})"
    return text


def part(r: Round, name: str, who: str) -> float:
    """One process's CPU seconds per step on a path."""
    steps, span = r[name]
    return span.parts.get(who, 0.0) / steps


def print_ceiling(runs: list[Round]) -> None:
    """The most steps/s any pipeline of this design could make here, against raw publish.

    A step has to be published, stored and delivered by nats-server, received by a sink
    process and encoded into Parquet. Each part is taken at the least this run measured
    it: the raw publish's client (pre-encoded messages), nats-server's store and
    delivery (the transport phase, or the Arrow sink's when its consumer kept up
    better), the drain consumer's receive, and the raw Parquet write. With every core
    busy on nothing else, that sum is the least CPU per step, so the most steps/s.
    """
    cores = os.cpu_count() or 1
    least = [
        part(r, RAW_JS, BENCH)
        + min(part(r, TRANSPORT, "nats-server"), part(r, E2E_PARQUET, "nats-server"))
        + part(r, TRANSPORT, SINK)
        + cost(r, RAW_PARQUET)
        for r in runs
    ]
    ceiling = [cores / c for c in least]
    ratio = [c / rate(r, RAW_JS) for c, r in zip(ceiling, runs, strict=True)]
    beyond = [(cost(r, E2E_PARQUET) - c) * 1e6 for r, c in zip(runs, least, strict=True)]
    print(
        "\nceiling of any Parquet pipeline here (publish, store, deliver, receive, encode;"
        " each at the least this run measured):"
        f"\n  {spread([c * 1e6 for c in least], '.3f')} CPU us/step; with all {cores} cores"
        f" busy at most {spread(ceiling, ',.0f')} steps/s, {spread(ratio, '.2f')}x of raw"
        " publish\n  runtime -> NATS -> Arrow sink costs"
        f" {spread(beyond, '.3f')} us/step more (the runtime's encoding, the sink's checks,"
        " ids and commits)"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="Smaller runs (smoke test).")
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="Times every phase runs; medians are reported (default: 3, quick: 1).",
    )
    p.add_argument(
        "--compression",
        default=arrow_stream.ParquetSettings().compression,
        help="Parquet codec of the Arrow sink and of the raw Parquet write (default: the sink's).",
    )
    args = p.parse_args()
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    # The same Parquet settings for the sink and for the raw write it is compared with.
    parquet = arrow_stream.ParquetSettings(compression=args.compression)
    # CartPole-sized trajectories: 32 episodes of 200 steps per router batch.
    batches = make_batches(50, 32, 200)
    work = Path(tempfile.mkdtemp(prefix="relayrl-bench-"))
    runs: list[Round] = []
    # Other work on the machine shows in every figure: the 1-minute load goes with them.
    load_before = os.getloadavg()[0]
    try:
        with natsserver.NatsServer() as srv, postgres.PostgresServer() as pgs:
            assert srv.proc is not None
            assert pgs.proc is not None
            SERVERS.update({"nats-server": srv.proc.pid, "postgres": pgs.proc.pid})
            for _ in range(rounds):
                runs.append(run_round(srv, pgs, work, batches, parquet, args.quick))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\ntrajectory pipeline, {os.cpu_count()} cores, {'quick' if args.quick else 'full'} run,"
        f" {rounds} round(s), medians (range); Parquet {parquet.compression};"
        f" 1-min load {load_before:.2f} -> {os.getloadavg()[0]:.2f}"
    )
    # cores busy: machine CPU seconds / wall seconds over the phase (other processes too);
    # CPU µs/step: what one step cost the machine, every process of the path together.
    print(f"{'path':<38} {'steps/s':>27} {'cores busy':>11} {'CPU us/step':>12}")
    for name in runs[0]:
        rates = [rate(r, name) for r in runs]
        busy = [r[name][1].cpu / r[name][1].seconds for r in runs]
        per_step = [cost(r, name) * 1e6 for r in runs]
        print(
            f"{name:<38} {spread(rates, ',.0f'):>27} {statistics.median(busy):>11.2f}"
            f" {statistics.median(per_step):>12.3f}"
        )

    who = [BENCH, *SERVERS, SINK, OTHER]
    print("\nCPU us/step by process (medians): who pays for each path")
    print(f"{'path':<38}" + "".join(f" {w:>17}" for w in who))
    for name in runs[0]:
        row = [
            statistics.median(r[name][1].parts.get(w, 0.0) / r[name][0] * 1e6 for r in runs)
            for w in who
        ]
        print(f"{name:<38}" + "".join(f" {v:>17.3f}" for v in row))

    print("\nratios (target >= 0.5); 'CPU-bound' is the ratio of CPU per step, the speed ratio")
    print("both phases would have if each kept every core busy:")
    print(f"{'':<38}   {'':<22} {'speed':>18}  {'CPU-bound':>9}")
    for name, base, label in (
        (PUBLISHER, RAW_JS, "raw JetStream publish"),
        (E2E_PARQUET, RAW_JS, "raw JetStream publish"),
        (E2E_IPC, RAW_JS, "raw JetStream publish"),
        (TRANSPORT, RAW_JS, "raw JetStream publish"),
        (E2E_PG, RAW_JS, "raw JetStream publish"),
        (E2E_PG, RAW_COPY, "raw COPY"),
    ):
        speed = [rate(r, name) / rate(r, base) for r in runs]
        bound = [cost(r, base) / cost(r, name) for r in runs]
        print(
            f"{name:<38} / {label:<22} {spread(speed, '.2f'):>18}  {statistics.median(bound):8.2f}x"
        )

    print_ceiling(runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
