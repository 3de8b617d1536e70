"""The consumer loop shared by the sink processes (`relayrl-sink arrow|postgres`).

A sink process pulls an Agent's trajectory messages from its durable JetStream consumer,
checks each one (valid Arrow IPC of a schema version it knows), hands the good ones to
its `Writer` and sends the bad ones to the dead-letter subject with the reason. It acks
only what the writer has made durable (issue 4, DESIGN.md "Delivery semantics").

Exactly once, with the writer as the source of truth: each writer records the last
stream sequence it committed in the same durable step as the data (the file name; the
Postgres transaction). On start the consumer is re-created at that sequence + 1, so
JetStream's own idea of what was acked never decides what is written. While running,
first deliveries arrive in stream order; a redelivery (a sequence already seen) is
skipped, and a gap in the consumer's delivery sequence (a message lost in flight, e.g.
across a nats-server restart) re-creates the consumer after the last sequence seen.
A message whose `Nats-Msg-Id` the writer has written already (a copy JetStream stored
twice, after an outage longer than its duplicate window) is skipped: each writer keeps
`message_ids.MessageIds` in the same durable step as its data.

A fetch task keeps one pull ahead of the loop (runtime_image/docs/pipeline.md, "How a
sink keeps up"), and pipelined writers commit while the next batch is added; both keep
stream order, so the checks above hold as they are.

Also serves /metrics, /healthz and /readyz, and drains on SIGTERM: the last batch is
committed and acked before the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import http.server
import logging
import math
import re
import signal
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, Final, Protocol, TypeVar

import nats.aio.client
import nats.errors
import nats.js
import nats.js.api
import nats.js.errors
import prometheus_client as prom
import pyarrow as pa
import pyarrow.compute as pc
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from relayrl_runtime import aio, streams, trajectory
from relayrl_runtime.inference import model
from relayrl_runtime.sinks import message_ids

log = logging.getLogger(__name__)

PREFIX: Final = "relayrl_sink"
SUPPORTED_SCHEMA_VERSIONS: Final = frozenset({trajectory.SCHEMA_VERSION})
_DIGITS: Final = re.compile(r"[0-9]+")
# The layout-independent columns of a schema-version-1 message and their types, as the
# runtime writes them (trajectory.schema); obs, action, mask and aux_* depend on the model.
FIXED_COLUMNS: Final = {
    f.name: f.type
    for f in trajectory.schema(
        trajectory.Layout(
            agent="-",
            obs_shape=(1,),
            obs_dtype="float32",
            action_kind=model.ActionKind.DISCRETE,
            action_size=1,
        )
    )
    if f.name not in ("agent", "obs", "action", "mask")
}
# What one message may decode to: an uncompressed one is as big as its payload; a
# compressed one is read only below this.
MAX_DECODED_BYTES: Final = 256 << 20
# Columns every message has besides FIXED_COLUMNS, whose types depend on the model.
_VALUE_COLUMNS: Final = ("agent", "obs", "action")
# How often the consume loop looks at the writer's commit deadline while nothing arrives.
_TICK_SECONDS: Final = 0.05
# While nothing arrives, the storage is checked this often (/readyz follows it).
PROBE_SECONDS: Final = 5.0
# nats-py reads the socket in pieces of this size, and its stream reader stops reading
# at twice that. Its 32 KiB default makes a 1 MB message 32 reads, each re-growing the
# parser's buffer and pausing the socket: about a fifth of the sink's event loop CPU.
NATS_READ_BUFFER_BYTES: Final = 1 << 20

_T = TypeVar("_T")


class DeadLetterReason:
    """Reasons in the dead-letter header (stable strings, dashboards match on them)."""

    INVALID_ARROW: Final = "invalid-arrow"
    UNKNOWN_SCHEMA_VERSION: Final = "unknown-schema-version"
    SCHEMA_MISMATCH: Final = "schema-mismatch"
    ALL: Final = (INVALID_ARROW, UNKNOWN_SCHEMA_VERSION, SCHEMA_MISMATCH)


# The `where` label of `relayrl_sink_errors_total`: each step that can fail and be
# retried, and the one detected loss.
ERROR_PLACES: Final = (
    "open",
    "connect",
    "stream",
    "origin",
    "restart",
    "consumer",
    "fetch",
    "commit",
    "write",
    "deadletter",
    "storage",
    "stream-tail-lost",
    "stream-head-expired",
)


class InvalidMessageError(Exception):
    """A message no writer can take; it goes to the dead-letter subject."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


@dataclasses.dataclass(frozen=True)
class Delivery:
    """One good trajectory message, decoded."""

    seq: int
    time: dt.datetime
    table: pa.Table
    schema_version: int
    size: int
    msg_id: str | None = None  # Nats-Msg-Id, for the writer's message_ids


class Writer(Protocol):
    """What a sink kind implements; the service owns the loop around it."""

    kind: str

    async def open(self) -> int:
        """Prepare storage; return the last stream sequence already committed (0: none)."""
        ...

    committed_ids: message_ids.MessageIds
    """The message ids written by what is committed (read after `open`); a commit adds
    those of its deliveries, in the same durable step as their data."""

    async def origin(self) -> str | None:
        """Which stream (name and creation time) the committed position belongs to."""
        ...

    async def set_origin(self, origin: str) -> None:
        """Record which stream the committed position belongs to, durably."""
        ...

    async def restart(self, stale: int) -> int:
        """The stream was made anew since `stale` was committed: set aside what belongs
        to the old one, so the new stream is taken from its start; return 0."""
        ...

    def check(self, table: pa.Table) -> None:
        """Raise InvalidMessageError for a decoded message this writer could never store.

        Called before `add`; the message then goes to the dead-letter subject instead of
        failing every commit attempt and holding up everything behind it.
        """
        ...

    async def add(self, delivery: Delivery) -> None:
        """Take one message (not durable yet)."""
        ...

    pipelined: bool
    """Whether commits may run while the next batch is fetched and added."""

    @property
    def hold_seconds(self) -> float:
        """How long an added message may wait before `due` says commit (a file's time,
        a batch's linger): the consumer's ack wait is kept well above it."""
        ...

    def due(self, now: float) -> bool:
        """Whether what was added should be committed now (size, time, batch end)."""
        ...

    def seal(self, last_seq: int) -> object:
        """Take everything added so far as the next commit, `last_seq` its offset (sync)."""
        ...

    async def commit(self, sealed: object) -> None:
        """Make a sealed batch durable with its offset, atomically; safe to retry."""
        ...

    @property
    def pending(self) -> bool:
        """Whether something was added since the last commit."""
        ...

    async def probe(self) -> None:
        """Raise when the storage cannot take a commit now (checked while idle)."""
        ...

    async def close(self) -> None:
        """Release resources (after a final commit)."""
        ...


class SinkMetrics:
    """Prometheus collectors of one sink process (own registry)."""

    def __init__(self, kind: str, registry: prom.CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else prom.CollectorRegistry()
        r = self.registry
        labels = ["sink"]

        def counter(name: str, doc: str) -> prom.Counter:
            """A counter of this sink (the `sink` label set to its kind)."""
            return prom.Counter(f"{PREFIX}_{name}", doc, labels, registry=r).labels(kind)

        def gauge(name: str, doc: str) -> prom.Gauge:
            """A gauge of this sink (the `sink` label set to its kind)."""
            return prom.Gauge(f"{PREFIX}_{name}", doc, labels, registry=r).labels(kind)

        self.messages = counter("messages", "Messages committed.")
        self.rows = counter("rows", "Steps committed.")
        self.bytes = counter("bytes", "Message payload bytes committed.")
        self.dead_letters = prom.Counter(
            f"{PREFIX}_dead_letters",
            "Messages sent to the dead-letter subject.",
            ["sink", "reason"],
            registry=r,
        )
        for reason in DeadLetterReason.ALL:
            self.dead_letters.labels(kind, reason)  # at 0 from the start: increase() sees the first
        self.redeliveries = counter("redeliveries", "Deliveries skipped as already seen.")
        self.duplicates = counter(
            "duplicates", "Messages skipped as copies of one written before (same Nats-Msg-Id)."
        )
        self.repositions = counter("repositions", "Consumer re-creations after a delivery gap.")
        self.lag = gauge("lag_messages", "Messages in the stream not yet delivered.")
        self.committed_seq = gauge("committed_sequence", "Last stream sequence committed.")
        self.commit_seconds = prom.Histogram(
            f"{PREFIX}_commit_seconds",
            "Commit latency (fsync+rename, or COPY+COMMIT).",
            labels,
            buckets=(1e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
            registry=r,
        ).labels(kind)
        self.errors = prom.Counter(
            f"{PREFIX}_errors",
            "Transient errors retried (where: the step), and stream tails found lost.",
            ["sink", "where"],
            registry=r,
        )
        for where in ERROR_PLACES:
            self.errors.labels(kind, where)  # at 0 from the start: increase() sees the first
        # What a sink finds as it starts (a loss, a dead letter) is counted before the
        # first scrape: its counter starts above 0, or goes on where the process before
        # it left off, and increase() sees nothing. The alerts also look at this.
        self.start_time = gauge(
            "start_time_seconds", "When this sink process started (seconds since the epoch)."
        )
        self.start_time.set(time.time())
        self.kind = kind


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    """Where to consume from and how."""

    namespace: str
    agent: str
    stream: str | None = None
    fetch_batch: int = 256
    fetch_max_bytes: int = 8 << 20
    fetch_timeout: float = 0.5
    # Ack wait is long: a writer holds messages until its commit (file rotation). It
    # is raised to 1.25 times the writer's `hold_seconds` plus a minute when that is
    # longer.
    ack_wait_seconds: float = 600.0
    max_ack_pending: int = 100_000
    create_stream: bool = True
    http_host: str = "0.0.0.0"
    http_port: int | None = 9090
    retry: streams.Backoff = dataclasses.field(
        default_factory=lambda: streams.Backoff(initial=0.1, maximum=5.0)
    )


def decode(
    msg_data: bytes, headers: Mapping[str, str] | None, agent: str | None = None
) -> tuple[pa.Table, int]:
    """Check and decode one message; InvalidMessageError says why it is unusable.

    With `agent`, every row's agent column must name it (the subject's Agent).
    """
    raw = (headers or {}).get(streams.HEADER_SCHEMA_VERSION)
    # ASCII digits only: str.isdigit() also takes digits int() refuses (e.g. "²").
    if raw is None or not _DIGITS.fullmatch(raw) or int(raw) not in SUPPORTED_SCHEMA_VERSIONS:
        raise InvalidMessageError(
            DeadLetterReason.UNKNOWN_SCHEMA_VERSION,
            f"header {streams.HEADER_SCHEMA_VERSION}={raw!r}; this sink reads "
            f"{sorted(SUPPORTED_SCHEMA_VERSIONS)}",
        )
    version = int(raw)
    try:
        decoded = ipc_decoded_bytes(msg_data)
    except ValueError as err:
        raise InvalidMessageError(DeadLetterReason.INVALID_ARROW, str(err)) from err
    if decoded > MAX_DECODED_BYTES:
        # Read first, it could take all the memory there is, after every restart again.
        raise InvalidMessageError(
            DeadLetterReason.INVALID_ARROW,
            f"its batches decode to {decoded} bytes, more than the {MAX_DECODED_BYTES}"
            f" a message may (compressed buffers)",
        )
    try:
        table = pa.ipc.open_stream(pa.py_buffer(msg_data)).read_all()
        # Every value, not just the buffers' sizes: a dictionary index past its
        # dictionary (in any column) would fail the write, again after each restart.
        # About 15 µs for a 6,400-step message.
        table.validate(full=True)
    except MemoryError:  # pyarrow's ArrowMemoryError is an ArrowException too
        raise
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as err:
        raise InvalidMessageError(DeadLetterReason.INVALID_ARROW, str(err)) from err
    meta = table.schema.metadata or {}
    in_schema = meta.get(trajectory.META_SCHEMA_VERSION, b"").decode(errors="replace")
    if in_schema != str(version):
        raise InvalidMessageError(
            DeadLetterReason.UNKNOWN_SCHEMA_VERSION,
            f"schema metadata says version {in_schema!r}, header says {version}",
        )
    columns = set(table.schema.names)
    if len(columns) != len(table.schema.names):
        twice = sorted({n for n in table.schema.names if table.schema.names.count(n) > 1})
        raise InvalidMessageError(DeadLetterReason.SCHEMA_MISMATCH, f"columns {twice} twice")
    missing = [c for c in (*FIXED_COLUMNS, *_VALUE_COLUMNS) if c not in columns]
    if missing:
        raise InvalidMessageError(DeadLetterReason.SCHEMA_MISMATCH, f"missing columns {missing}")
    for name, want in FIXED_COLUMNS.items():
        have = table.schema.field(name).type
        if have != want:
            raise InvalidMessageError(
                DeadLetterReason.SCHEMA_MISMATCH,
                f"column {name} is {have}; schema version {version} has {want}",
            )
    agent_type = table.schema.field("agent").type
    if not _is_text_column(agent_type):
        raise InvalidMessageError(
            DeadLetterReason.SCHEMA_MISMATCH,
            f"column agent is {agent_type}; schema version {version} has text",
        )
    for name in (*FIXED_COLUMNS, *_VALUE_COLUMNS):
        nulls = table.column(name).null_count
        if nulls:
            raise InvalidMessageError(
                DeadLetterReason.SCHEMA_MISMATCH, f"column {name} has {nulls} null value(s)"
            )
    if agent is not None and table.num_rows:
        try:
            names = _distinct_text(table.column("agent"))
        except MemoryError:
            raise
        except (pa.ArrowException, IndexError) as err:  # e.g. a dictionary index out of range
            raise InvalidMessageError(DeadLetterReason.INVALID_ARROW, str(err)) from err
        if names != {agent}:
            raise InvalidMessageError(
                DeadLetterReason.SCHEMA_MISMATCH,
                f"agent column holds {sorted(map(str, names))}, the subject is Agent {agent!r}",
            )
    return table, version


def _is_text_column(t: pa.DataType) -> bool:
    """Text, or a dictionary of text."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t))


class _Flat:
    """Just enough of a flatbuffer reader for Arrow IPC message headers: a table's
    fields (by index) as scalars, tables and vectors. Out of range: struct.error."""

    def __init__(self, buf: bytes) -> None:
        self.buf = buf

    def root(self) -> int:
        return self._u32(0)

    def field(self, table: int, index: int) -> int | None:
        """Where field `index` of the table at `table` is, or None when absent."""
        vtable = table - struct.unpack_from("<i", self.buf, table)[0]
        vt_size = struct.unpack_from("<H", self.buf, vtable)[0]
        if 4 + 2 * index >= vt_size:
            return None
        at = struct.unpack_from("<H", self.buf, vtable + 4 + 2 * index)[0]
        return table + at if at else None

    def u8(self, at: int) -> int:
        return int(struct.unpack_from("<B", self.buf, at)[0])

    def target(self, at: int) -> int:
        """The table or vector an offset field points to."""
        return at + self._u32(at)

    def structs(self, vector: int, fmt: str) -> Iterator[tuple[Any, ...]]:
        size = struct.calcsize(fmt)
        for i in range(self._u32(vector)):
            yield struct.unpack_from(fmt, self.buf, vector + 4 + i * size)

    def _u32(self, at: int) -> int:
        return int(struct.unpack_from("<I", self.buf, at)[0])


_DICTIONARY_BATCH, _RECORD_BATCH = 2, 3  # Arrow's MessageHeader union


def ipc_decoded_bytes(data: bytes) -> int:
    """The bytes an Arrow IPC stream's batches decode to, from its headers alone: the
    body for uncompressed buffers, the length each compressed buffer says it holds.
    Raises ValueError for headers that are not Arrow's."""
    total = 0
    try:
        for message in pa.ipc.MessageReader.open_stream(pa.py_buffer(data)):
            flat = _Flat(message.metadata.to_pybytes())
            root = flat.root()
            kind, header = flat.field(root, 1), flat.field(root, 2)
            if kind is None or header is None:
                continue
            batch = flat.target(header)
            if flat.u8(kind) == _DICTIONARY_BATCH:
                data_field = flat.field(batch, 1)
                if data_field is None:
                    continue
                batch = flat.target(data_field)
            elif flat.u8(kind) != _RECORD_BATCH:
                continue
            buffers = flat.field(batch, 2)
            if buffers is None:
                continue
            compressed = flat.field(batch, 3) is not None
            body = message.body if compressed and message.body is not None else b""
            for offset, length in flat.structs(flat.target(buffers), "<qq"):
                if not compressed or length < 8:
                    total += max(0, length)
                    continue
                # A compressed buffer starts with its decoded length (-1: stored as is).
                (decoded,) = struct.unpack_from("<q", body, offset)
                total += length - 8 if decoded < 0 else decoded
    except (struct.error, pa.ArrowException) as err:
        raise ValueError(f"not Arrow IPC headers: {err}") from err
    return total


def fit_dead_letter(data: bytes, headers: dict[str, str], max_payload: int) -> bytes:
    """The payload of a dead-letter copy: all of `data`, or its start when headers and
    data together would pass the server's max_payload (which it answers by closing the
    connection, so the copy could never be published). Marks a cut in `headers`.
    """
    if max_payload <= 0:
        return data
    headers_size = len(b"NATS/1.0\r\n\r\n") + sum(
        len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items()
    )
    room = max_payload - headers_size - 128  # 128: the truncation header and slack
    if len(data) <= room:
        return data
    headers[streams.HEADER_DEAD_TRUNCATED] = str(len(data))
    return data[: max(0, room)]


def _distinct_text(col: pa.ChunkedArray) -> set[str]:
    """Distinct values of a (dictionary) text column, without decoding every row."""
    out: set[str] = set()
    for chunk in col.chunks:
        if pa.types.is_dictionary(chunk.type):
            if chunk.null_count == 0 and len(chunk):
                # The usual message: every row the same index (one Agent). A min/max
                # says so in a tenth of the time of a hash of all the indices.
                bounds = pc.min_max(chunk.indices)
                low, high = bounds["min"].as_py(), bounds["max"].as_py()
                if low == high and 0 <= low < len(chunk.dictionary):
                    out.add(str(chunk.dictionary[low].as_py()))
                    continue
            used = chunk.dictionary.take(pc.unique(chunk.indices))
            out.update(str(v) for v in used.to_pylist())
        else:
            out.update(str(v) for v in pc.unique(chunk).to_pylist())
    return out


# The last commit on the way out, all of it: within the pod's termination grace period
# (relayrl_operator.constants), so the kubelet does not kill it midway.
FINAL_COMMIT_SECONDS: Final = 45.0
# Each attempt to connect to NATS at startup; between them the heartbeat moves and a
# SIGTERM is seen.
CONNECT_ATTEMPT_SECONDS: Final = 5.0
# How stale `lag_messages` may get while nothing is delivered before it is asked of
# the stream instead.
LAG_REFRESH_SECONDS: Final = 10.0
# All of the way out after SIGTERM: past it, the process writes its stacks and exits
# (watchdog) rather than sit until the kubelet kills it with nothing in its log.
EXIT_SECONDS: Final = 55.0


class SinkService:
    """Runs one writer against one Agent's stream until stopped."""

    def __init__(
        self,
        writer: Writer,
        connect: streams.ConnectOptions,
        config: ServiceConfig,
        metrics: SinkMetrics | None = None,
    ) -> None:
        self.writer = writer
        self.options = connect
        self.config = config
        self.metrics = metrics if metrics is not None else SinkMetrics(writer.kind)
        self.stream = streams.stream_name(config.namespace, config.agent, config.stream)
        self.subject = streams.trajectories_subject(config.namespace, config.agent)
        self.deadletter = streams.deadletter_subject(config.namespace, config.agent)
        self.durable = streams.durable_name(writer.kind)
        self.stopping = asyncio.Event()
        self.ready = False
        self._failing: set[str] = set()
        self._uncommitted = [0, 0, 0]  # messages, rows, bytes added since the last commit
        self._avg_size = float(1 << 20)  # bytes per message, until measured
        self._inflight: asyncio.Task[None] | None = None
        # Set once a commit failed or was cut short: nothing after it may be committed,
        # or the position would move past what that commit held (lost on restart).
        self._commit_failed = False
        self.heartbeat = time.monotonic()
        self.http: http.server.ThreadingHTTPServer | None = None
        self._nc: NATS | None = None
        self._last_seen = 0
        self._last_dseq = 0
        self._lag_at = 0.0  # when `lag_messages` was last set (monotonic)
        self._last_msg: Msg | None = None
        # The last message taken without data (dead-lettered, or a duplicate skipped),
        # when no commit has recorded and acked it yet.
        self._dead_unacked: Msg | None = None
        # Ids of the messages written: committed (the writer's) plus added since.
        self._ids = message_ids.MessageIds()
        self._max_msg = 0  # the stream's largest message (0: unknown)
        self._next_probe = 0.0
        self._reconnects = 0  # the connection's reconnect count when the consumer was made
        # (through, size): messages of a file that could not be written (`WriteRefused`),
        # up to `through`, are taken again `size` to a commit (`_split_size`); halving
        # finds the one(s) to blame.
        self._splits: list[tuple[int, int]] = []
        # Messages up to here were taken once before a rewind: their dead letters are
        # published and counted, their copies counted, already.
        self._taken_through = 0
        # Sequences up to here that the stream discarded unread were said lost already.
        self._lost_through = 0

    def ack_wait_seconds(self) -> float:
        """The consumer's ack wait: past it, JetStream delivers a message again.

        Messages are acked at commit, so a writer holding them longer (a file open for
        an hour) would have every one delivered again, over and over, while it waits.
        """
        return max(self.config.ack_wait_seconds, 1.25 * self.writer.hold_seconds + 60)

    # --------------------------------------------------------------- lifecycle

    def install_signal_handlers(self, on_signal: Callable[[], None] | None = None) -> None:
        """SIGTERM/SIGINT start a graceful drain (and call `on_signal`)."""
        loop = asyncio.get_running_loop()

        def stop() -> None:
            self.stopping.set()
            if on_signal is not None:
                on_signal()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)

    async def run(self) -> None:
        """Open the writer, connect, consume until `stopping`; commit and ack on the way out."""
        if self.config.http_port is not None:
            try:
                self.http = serve_http(self, self.config.http_host, self.config.http_port)
            except OSError as err:
                raise PermanentError(
                    f"--http-host/--http-port: cannot listen on {self.config.http_host}:"
                    f"{self.config.http_port}: {err.strerror or err}"
                ) from err
        final_commit_failed: BaseException | None = None
        try:
            committed = await self._retry("open", self.writer.open)
            self._last_seen = committed
            self._ids = self.writer.committed_ids.copy()
            self.metrics.committed_seq.set(committed)
            log.info("%s sink: committed up to stream sequence %d", self.writer.kind, committed)
            _widen_nats_reads()
            nc = await self._connect()
            self._nc = nc
            js = nc.jetstream()
            lag = asyncio.create_task(self._follow_lag(js))
            try:
                await self._consume(js)
            finally:
                await aio.cancel_and_wait(lag)
                final_commit_failed = await self._final_commit()
                # Not drain(): a pending pull request would hold it for drain_timeout.
                with contextlib.suppress(Exception):
                    await nc.flush(timeout=2)
                with contextlib.suppress(Exception):
                    await nc.close()
        except _Stopped as stop:
            log.info("%s sink: stopped while %s was being retried", self.writer.kind, stop)
        finally:
            self.ready = False
            await self.writer.close()
            if self.http is not None:
                self.http.shutdown()
                self.http.server_close()
        if final_commit_failed is not None:
            raise PermanentError(
                f"the final commit failed ({final_commit_failed}); nothing of it was acked,"
                " it comes again after a restart"
            )

    async def _follow_lag(self, js: nats.js.JetStreamContext) -> None:
        """Keep `lag_messages` true while no delivery sets it (a commit being retried
        holds up the fetching): the consumer's pending count, as a delivery says it
        (of this sink's subject: not the dead letters beside it in the stream)."""
        while True:
            await asyncio.sleep(LAG_REFRESH_SECONDS)
            if time.monotonic() - self._lag_at < LAG_REFRESH_SECONDS:
                continue  # deliveries keep it
            try:
                info = await js.consumer_info(self.stream, self.durable)
            except Exception as err:  # NATS away too: the gauge keeps its last value
                log.debug("%s sink: consumer info for the lag: %s", self.writer.kind, err)
                continue
            self.metrics.lag.set(info.num_pending or 0)
            self._lag_at = time.monotonic()

    async def _connect(self) -> NATS:
        """The NATS connection, tried again and again until it is up: the heartbeat
        moves meanwhile (a NATS that is away is no reason for the liveness probe to
        restart the sink), and a SIGTERM ends the wait (`_Stopped`)."""
        attempt = 0
        while True:
            attempt += 1
            try:
                nc = await streams.connect(self.options, deadline=CONNECT_ATTEMPT_SECONDS)
            except streams.ConnectError as err:
                self._failing.add("connect")
                self.metrics.errors.labels(self.writer.kind, "connect").inc()
                log.log(
                    logging.WARNING if attempt <= 3 or attempt % 10 == 0 else logging.DEBUG,
                    "%s sink: %s (attempt %d); trying again",
                    self.writer.kind,
                    err,
                    attempt,
                )
                self.heartbeat = time.monotonic()
                if self.stopping.is_set():
                    raise _Stopped("connect") from None
                continue
            self._failing.discard("connect")
            if self.stopping.is_set():
                await nc.close()
                raise _Stopped("connect")
            return nc

    async def _open_stream(self, js: nats.js.JetStreamContext) -> None:
        """Make the stream if this sink is told to, then compare it with the position's."""
        if self.config.create_stream:
            cfg = streams.stream_config(
                self.config.namespace, self.config.agent, self.config.stream
            )
            await self._retry("stream", lambda: streams.ensure_stream(js, cfg))
        await self._check_stream(js)

    async def _check_stream(self, js: nats.js.JetStreamContext) -> None:
        """Start over on a stream made anew since the committed position was recorded.

        That happens when an Agent is deleted (its stream with it) and made again with
        the same name while the files or the offsets table stay: resuming after the old
        position would skip the new stream's first messages. The stream's creation time
        tells, stored with the position (sequences alone cannot: a stream that lost its
        tail in a crash also ends before the position, and starting over would repeat).
        """
        want = streams.stream_config(self.config.namespace, self.config.agent, self.config.stream)

        async def owned() -> nats.js.api.StreamInfo:
            # Another Agent's stream of the same name: not consumed (not ready, said).
            info = await js.stream_info(self.stream)
            streams.check_owner(want, info.config)
            return info

        info = await self._retry("stream", owned)
        self._max_msg = info.config.max_msg_size or 0
        created = info.created.isoformat() if info.created is not None else ""
        origin = f"{self.stream}@{created}"
        stored = await self._retry("origin", self.writer.origin)
        if stored == origin:
            last = info.state.last_seq if info.state is not None else 0
            first = info.state.first_seq if info.state is not None else 0
            if last >= first > self._last_seen + 1:
                # The stream's limits (maxAge, a size bound) discarded messages after
                # the committed position before this sink read them: gone, said loudly.
                self._said_lost(self._last_seen + 1, first - 1)
            if last < self._last_seen:
                # The same stream, ending before what was committed: a NATS node crash
                # lost its unsynced tail. New messages take the lost sequences again,
                # and this position skips them: said loudly, as there is no telling them
                # apart here (pipeline.md, "Delivery").
                self.metrics.errors.labels(self.writer.kind, "stream-tail-lost").inc()
                log.error(
                    "%s sink: stream %s ends at sequence %d, but %d was committed: NATS"
                    " lost its tail; new messages numbered %d-%d are skipped",
                    self.writer.kind,
                    self.stream,
                    last,
                    self._last_seen,
                    last + 1,
                    self._last_seen,
                )
            return
        if stored is not None and self._last_seen > 0:
            log.warning(
                "%s sink: committed up to sequence %d of %s, but the stream is now %s: "
                "it was made anew; setting the old position aside, starting from its start",
                self.writer.kind,
                self._last_seen,
                stored,
                origin,
            )
            stale = self._last_seen
            self._last_seen = await self._retry("restart", lambda: self.writer.restart(stale))
            # Sequences of the old stream:
            self._splits, self._taken_through, self._lost_through = [], 0, 0
            self.metrics.committed_seq.set(self._last_seen)
        await self._retry("origin", lambda: self.writer.set_origin(origin))

    def is_ready(self) -> bool:
        """Consuming, connected to NATS, and the writer's storage answering."""
        nc = self._nc
        return (
            self.ready
            and not self._failing
            and not self.stopping.is_set()
            and nc is not None
            and nc.is_connected
        )

    async def _final_commit(self) -> BaseException | None:
        """Commit what is written; returns why it failed, if it did."""
        if self._commit_failed:
            log.warning(
                "%s sink: a commit failed; what came after it is not committed either"
                " (it comes again after the restart)",
                self.writer.kind,
            )
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FINAL_COMMIT_SECONDS

        def left() -> float:
            return max(0.0, deadline - loop.time())

        try:
            await asyncio.wait_for(self._drain_commits(), timeout=left())
            if self.writer.pending or self._dead_unacked is not None:
                await asyncio.wait_for(self._commit(), timeout=left())
                await asyncio.wait_for(self._drain_commits(), timeout=left())
        except Exception as err:
            # Not committed means not acked: the messages come again after restart.
            log.exception("%s sink: final commit failed", self.writer.kind)
            return err
        return None

    # ----------------------------------------------------------------- consume

    async def _position(
        self, js: nats.js.JetStreamContext
    ) -> nats.js.JetStreamContext.PullSubscription:
        """(Re)create the durable consumer to start right after the last sequence seen."""
        start = self._last_seen + 1
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_consumer(self.stream, self.durable)
        await js.add_consumer(
            self.stream,
            nats.js.api.ConsumerConfig(
                durable_name=self.durable,
                description=f"RelayRL {self.writer.kind} sink",
                deliver_policy=nats.js.api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=start,
                ack_policy=nats.js.api.AckPolicy.ALL,
                ack_wait=self.ack_wait_seconds(),
                max_ack_pending=self.config.max_ack_pending,
                max_deliver=-1,
                filter_subject=self.subject,
            ),
        )
        self._last_dseq = 0
        self._reconnects = self._reconnect_count()
        log.info(
            "%s sink: consumer %s starts at sequence %d", self.writer.kind, self.durable, start
        )
        return await js.pull_subscribe_bind(durable=self.durable, stream=self.stream)

    async def _consume(self, js: nats.js.JetStreamContext) -> None:
        """Take fetched batches until stopped; re-position the consumer when told to."""
        while not self.stopping.is_set():
            # At start, and whenever the consumer must move (a delivery gap, a server
            # restart, the stream gone): the stream may have been made anew meanwhile
            # (deleted and made again, so its sequences start at 1). What was taken from
            # the old one is committed first (nothing at start), then the stream is
            # made if configured and compared with the committed position.
            try:
                if self.writer.pending:
                    await self._commit()
                await self._drain_commits()
            except WriteRefused as before:
                await self._rewind(before)
                continue
            await self._open_stream(js)
            sub = await self._retry("consumer", lambda: self._position(js))
            self.ready = True
            # One batch waits here while the next is being fetched: the network, the
            # server and the writer's threads work while this loop decodes and adds.
            fetched: asyncio.Queue[list[Msg] | None] = asyncio.Queue(1)
            fetcher = asyncio.create_task(self._fetch_loop(sub, fetched))
            refused: WriteRefused | None = None
            try:
                await self._take(js, fetched, fetcher)
            except WriteRefused as err:
                refused = err
            finally:
                # A cancel alone may be lost inside the fetch (aio): cancel until it ends.
                await aio.cancel_and_wait(fetcher)
                # Read even when _take raised (else asyncio logs it as never retrieved).
                failed = aio.failure(fetcher)
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            if refused is not None:
                await self._rewind(refused)
            elif failed is not None:
                raise failed  # what ended the fetching (after the consumer must move)

    async def _rewind(self, refused: WriteRefused) -> None:
        """Drop what was taken after the committed position (the refused file's messages
        and any after them) and take it again from the stream, the refused file's
        messages in commits of half as many: halved again while refused, down to files
        of one, which are written alone or dead-lettered (RowsRefused). The consumer is
        re-positioned by the caller's loop."""
        size = max(1, refused.messages // 2)
        log.error(
            "%s sink: messages %d-%d could not be written together (%s); taking them"
            " again, %d to a file",
            self.writer.kind,
            refused.first,
            refused.last,
            refused.reason,
            size,
        )
        self.metrics.errors.labels(self.writer.kind, "write").inc()
        await refused.reset()
        self._taken_through = max(self._taken_through, self._last_seen)
        self._last_seen = refused.first - 1
        self._last_msg = self._dead_unacked = None
        # Only this file's messages get the smaller size; split ranges already passed go.
        self._splits = [(t, n) for t, n in self._splits if t >= refused.first]
        self._splits.append((refused.last, size))
        self._ids = self.writer.committed_ids.copy()
        self._uncommitted = [0, 0, 0]
        self._commit_failed = False

    def _split_size(self) -> float:
        """How many messages of a refused file the next commit holds: the size of the
        innermost split range the last message taken is in (no limit outside them)."""
        seq = self._last_seen
        inside = [(through, size) for through, size in self._splits if through >= seq]
        if not inside:
            self._splits = []  # all passed (a file refused again makes its own)
            return math.inf
        return min(inside)[1]

    async def _fetch_loop(
        self,
        sub: nats.js.JetStreamContext.PullSubscription,
        out: asyncio.Queue[list[Msg] | None],
    ) -> None:
        """Fetch batches in stream order into `out`; None: the consumer must be re-created."""
        fetch_errors = 0
        while True:
            try:
                msgs = await sub.fetch(self._batch_size(), timeout=self.config.fetch_timeout)
                fetch_errors = 0
            except (nats.errors.TimeoutError, TimeoutError):
                # Nothing new (nats-py raises either kind). A lost pull request shows
                # up as a delivery gap later, which re-positions the consumer.
                if self._reconnect_count() != self._reconnects:
                    # Deliveries in flight when the connection dropped are lost: with
                    # nothing after them (the stream's tail), no gap would show them
                    # before the ack wait. Start again after the last one taken.
                    await out.put(None)
                    return
                continue
            except (nats.errors.Error, nats.js.errors.Error, OSError) as err:
                # Disconnected, server restarting, consumer gone: wait, then re-position
                # (a consumer lost with the server's state must be re-created).
                fetch_errors += 1
                self.metrics.errors.labels(self.writer.kind, "fetch").inc()
                log.warning(
                    "%s sink: fetch failed: %s: %s", self.writer.kind, type(err).__name__, err
                )
                await self._sleep(self.config.retry.delay(fetch_errors))
                if fetch_errors >= 3 or isinstance(err, nats.js.errors.NotFoundError):
                    await out.put(None)
                    return
                continue
            await out.put(msgs)

    async def _take(
        self,
        js: nats.js.JetStreamContext,
        fetched: asyncio.Queue[list[Msg] | None],
        fetcher: asyncio.Task[None],
    ) -> None:
        """Handle fetched batches and commit when due; return when the consumer must move."""
        while not self.stopping.is_set():
            self.heartbeat = time.monotonic()
            try:
                # Short waits: a commit that falls due while nothing arrives (the file's
                # time is up) is not held back by a fetch waiting for messages.
                msgs = await asyncio.wait_for(fetched.get(), _TICK_SECONDS)
            except TimeoutError:
                if fetcher.done() and fetched.empty():
                    fetcher.result()  # raises what ended it
                    return
                msgs = []
                await self._probe()
            if msgs is None:
                return
            gap = False
            for msg in msgs:
                if not await self._handle(js, msg):
                    gap = True
                    break
                if self._splits and self._uncommitted[0] >= self._split_size():
                    await self._commit()  # messages of a refused file, fewer to a file
            if self._inflight is not None and self._inflight.done():
                await self._drain_commits()  # raises what the commit raised
            await self._ack_dead_letters()
            # Commit when the writer says so, or before unacked messages reach the
            # consumer's max_ack_pending (the server would stop delivering). A commit
            # still running is waited for: that bounds what a writer holds (backpressure).
            held = self._uncommitted[0] >= self.config.max_ack_pending // 2
            if self.writer.pending and (held or self.writer.due(time.monotonic())):
                await self._commit()
            if gap:
                self.metrics.repositions.inc()
                return

    def _reconnect_count(self) -> int:
        nc = self._nc
        return int(nc.stats.get("reconnects", 0)) if nc is not None else 0

    def _batch_size(self) -> int:
        # nats-py's fetch has no byte bound, and a pull of hundreds of 1 MB messages
        # makes the server cut the connection as a slow consumer: bound it by the
        # average message size seen so far.
        by_bytes = int(self.config.fetch_max_bytes // max(self._avg_size, 1.0))
        return max(1, min(self.config.fetch_batch, by_bytes))

    async def _handle(self, js: nats.js.JetStreamContext, msg: Msg) -> bool:
        """Take one delivery; False when a delivery gap means the consumer must move."""
        meta = msg.metadata
        dseq, seq = meta.sequence.consumer, meta.sequence.stream
        if seq <= self._last_seen:
            # A redelivery: already taken. JetStream gives it the next consumer
            # sequence; it counts as the next delivery only when it is that: a
            # redelivery right after a delivery lost in flight must not hide the gap.
            if dseq == self._last_dseq + 1:
                self._last_dseq = dseq
            self.metrics.redeliveries.inc()
            return True
        if dseq != self._last_dseq + 1:
            # A first delivery that does not follow the last one: something between
            # was lost in flight (e.g. across a server restart). The consumer is made
            # afresh at every (re-)positioning, so its first delivery must be number 1.
            log.warning(
                "%s sink: delivery gap (consumer sequence %d after %d); re-positioning at %d",
                self.writer.kind,
                dseq,
                self._last_dseq,
                self._last_seen + 1,
            )
            return False
        self._last_dseq = dseq
        if seq > self._last_seen + 1 and self._last_seen > 0 and seq - 1 > self._lost_through:
            # Sequences skipped: messages of another subject (dead letters), or ones the
            # stream's limits discarded before this sink read them (it fell behind).
            await self._check_discarded(js, seq)
        self.metrics.lag.set(meta.num_pending)
        self._lag_at = time.monotonic()
        self._avg_size += 0.2 * (len(msg.data) - self._avg_size)
        msg_id = message_ids.tracked(msg.headers)
        if msg_id in self._ids:
            log.warning(
                "%s sink: message %d skipped: %s=%s was written before",
                self.writer.kind,
                seq,
                streams.HEADER_MSG_ID,
                msg_id,
            )
            if seq > self._taken_through:
                self.metrics.duplicates.inc()
            self._last_seen, self._last_msg = seq, msg
            self._dead_unacked = msg  # recorded and acked after this batch (_take)
            return True
        # The position moves past a message only once it is taken (added or
        # dead-lettered): a commit after a failure here must not cover it.
        try:
            table, version = self._checked(msg, seq)
        except InvalidMessageError as err:
            if seq > self._taken_through:  # else published before a rewind
                await self._dead_letter(js, msg.data, msg.subject, seq, err)
            self._last_seen, self._last_msg = seq, msg
            self._dead_unacked = msg  # recorded and acked after this batch (_take)
            return True
        try:
            await self.writer.add(
                Delivery(
                    seq=seq,
                    time=meta.timestamp,
                    table=table,
                    schema_version=version,
                    size=len(msg.data),
                    msg_id=msg_id,
                )
            )
        except BaseException:
            # Part of it may be in the writer now: nothing may be committed after this.
            self._commit_failed = True
            raise
        if msg_id is not None:
            self._ids.add(msg_id, meta.timestamp.timestamp())
        self._last_seen, self._last_msg = seq, msg
        self._uncommitted[0] += 1
        self._uncommitted[1] += table.num_rows
        self._uncommitted[2] += len(msg.data)
        return True

    async def _check_discarded(self, js: nats.js.JetStreamContext, seq: int) -> None:
        """Say lost what the stream discarded between the last message taken and `seq`.

        The consumer's own sequence has no gap for them: JetStream skips messages its
        limits removed, so only the stream's first sequence tells. Asked only when the
        stream sequence jumps, which otherwise means a dead letter in between.
        """
        try:
            info = await js.stream_info(self.stream)
        except (nats.errors.Error, nats.js.errors.Error, OSError) as err:
            log.warning(
                "%s sink: could not check sequences %d-%d for discarded messages: %s: %s",
                self.writer.kind,
                self._last_seen + 1,
                seq - 1,
                type(err).__name__,
                err,
            )
            return
        first = info.state.first_seq if info.state is not None else 0
        self._said_lost(self._last_seen + 1, min(first, seq) - 1)

    def _said_lost(self, first: int, last: int) -> None:
        """Messages `first`..`last` were discarded by the stream's limits unread: an
        ERROR and `stream-head-expired`, once for each sequence."""
        first = max(first, self._lost_through + 1)
        if first > last:
            return  # said already (found at a re-positioning and while running)
        self.metrics.errors.labels(self.writer.kind, "stream-head-expired").inc()
        log.error(
            "%s sink: stream %s: its limits discarded messages %d-%d before this sink read"
            " them (it was down or behind, having read up to %d); their steps are lost to it",
            self.writer.kind,
            self.stream,
            first,
            last,
            self._last_seen,
        )
        self._lost_through = max(self._lost_through, last)

    async def _ack_dead_letters(self) -> None:
        """Record and ack dead letters (and skipped duplicates) after the last data
        message, once nothing before them waits for a commit.

        A commit records and acks through the last message taken, dead letters
        included. Dead letters after the last data message would wait for the next
        data message: unacked, they came again every ack-wait; acked but not recorded,
        a restart dead-lettered them again. A commit with no data records them (the
        writer keeps the sequence) and acks them.
        """
        if self._dead_unacked is None or self.writer.pending or self._inflight is not None:
            return
        await self._commit()

    def _checked(self, msg: Msg, seq: int) -> tuple[pa.Table, int]:
        """Decode and check one message; InvalidMessageError when it cannot be taken.

        What decoding raises beyond the foreseen cases is still the message's fault
        (raised on, it would end the sink and come back after every restart), and so
        is what a writer's check raises on odd data; running out of memory is not.
        """
        try:
            table, version = decode(msg.data, msg.headers, self.config.agent)
        except (InvalidMessageError, MemoryError):
            raise
        except Exception as err:
            raise self._unforeseen(seq, err) from err
        try:
            self.writer.check(table)
        except (InvalidMessageError, MemoryError):
            raise
        except (pa.ArrowException, ValueError, TypeError, KeyError, IndexError) as err:
            raise self._unforeseen(seq, err) from err
        return table, version

    def _unforeseen(self, seq: int, err: Exception) -> InvalidMessageError:
        log.error("%s sink: message %d failed its checks", self.writer.kind, seq, exc_info=err)
        return InvalidMessageError(DeadLetterReason.INVALID_ARROW, f"{type(err).__name__}: {err}")

    async def _dead_letter_stored(self, seq: int, reason: str) -> int:
        """Dead-letter message `seq` of the stream, read back from it (a message whose
        rows the storage refused at commit); returns its size."""
        if self._nc is None:
            raise streams.ConnectError("not connected to NATS")
        js = self._nc.jetstream()

        async def read() -> nats.js.api.RawStreamMsg | None:
            try:
                return await js.get_msg(self.stream, seq)
            except nats.js.errors.NotFoundError:  # gone from the stream (its limits)
                return None

        stored = await self._retry("deadletter", read)
        if stored is None:
            data, subject = b"", ""
            reason += "; the message is no longer in the stream: no copy"
        else:
            data, subject = stored.data or b"", stored.subject or ""
        err = InvalidMessageError(DeadLetterReason.SCHEMA_MISMATCH, reason)
        await self._dead_letter(js, data, subject, seq, err)
        return len(data)

    async def _dead_letter(
        self,
        js: nats.js.JetStreamContext,
        data: bytes,
        subject: str,
        seq: int,
        err: InvalidMessageError,
    ) -> None:
        log.warning("%s sink: message %d dead-lettered: %s", self.writer.kind, seq, err)
        headers = {
            streams.HEADER_MSG_ID: f"deadletter-{self.writer.kind}-{self.stream}-{seq}",
            streams.HEADER_DEAD_REASON: err.reason,
            streams.HEADER_DEAD_SINK: self.writer.kind,
            streams.HEADER_ORIGINAL_SUBJECT: subject,
            streams.HEADER_ORIGINAL_SEQUENCE: str(seq),
            # ASCII: the text may quote the message (its column names, values).
            "Relayrl-Dead-Letter-Detail": str(err)
            .replace("\r", " ")
            .replace("\n", " ")
            .encode("ascii", "backslashreplace")
            .decode()[:1000],
        }
        limits = [self._max_msg, self._nc.max_payload if self._nc is not None else 0]
        payload = fit_dead_letter(data, headers, min((n for n in limits if n > 0), default=0))
        await self._retry(
            "deadletter",
            lambda: js.publish(self.deadletter, payload, headers=headers),
        )
        self.metrics.dead_letters.labels(self.writer.kind, err.reason).inc()

    async def _commit(self) -> None:
        """Seal what was added and commit it; pipelined writers commit in the background.

        At most one commit is in flight: the next waits for it, so offsets move in order.
        """
        await self._drain_commits()
        last, msg = self._last_seen, self._last_msg
        self._dead_unacked = None  # this commit's ack covers it
        counts, self._uncommitted = self._uncommitted, [0, 0, 0]
        self._ids.forget_idle()
        if self._commit_failed:
            raise PermanentError("a commit failed before: nothing after it is committed")
        sealed = self.writer.seal(last)
        work = self._commit_sealed(sealed, last, msg, counts)
        if self.writer.pipelined:
            self._inflight = asyncio.create_task(work)
        else:
            await self._watched(work)

    async def _drain_commits(self) -> None:
        task, self._inflight = self._inflight, None
        if task is not None:
            await self._watched(task)

    async def _watched(self, commit: Awaitable[None]) -> None:
        """Await a commit; one that fails or is cancelled stops all later commits."""
        try:
            await commit
        except BaseException:
            self._commit_failed = True
            raise

    async def _commit_sealed(
        self, sealed: object, last: int, msg: Msg | None, counts: list[int]
    ) -> None:
        start = time.monotonic()

        async def commit() -> None:
            while True:
                try:
                    await self.writer.commit(sealed)
                    return
                except RowsRefused as refused:
                    # Dead-lettered before the commit moves the position past them: a
                    # crash in between sees them again (the copy's id dedups it).
                    for seq, reason in refused.messages:
                        size = await self._dead_letter_stored(seq, reason)
                        counts[0] -= 1
                        counts[1] -= refused.rows.get(seq, 0)
                        counts[2] -= size
                    refused.leave_out()

        try:
            await self._retry("commit", commit)
        except WriteRefused as refused:
            if refused.committed_seq:  # files of the commit before the refused one
                self._count_committed(refused.committed, refused.committed_seq)
            raise
        self.metrics.commit_seconds.observe(time.monotonic() - start)
        self._failing.discard("storage")  # a commit went through
        self._count_committed(counts, last)
        if msg is not None:
            # AckPolicy.ALL: one ack covers every message up to this one. Best effort:
            # after a crash the writer's record, not the ack, decides where to resume.
            with contextlib.suppress(Exception):
                await msg.ack()

    def _count_committed(self, counts: list[int], last: int) -> None:
        """Counted when committed: the metrics say what is durable."""
        messages, rows, size = counts
        self.metrics.committed_seq.set(last)
        self.metrics.messages.inc(messages)
        self.metrics.rows.inc(rows)
        self.metrics.bytes.inc(size)

    async def _probe(self) -> None:
        """While idle, ask the storage now and then whether a commit could go through:
        with nothing to commit, no commit would find out it is gone (/readyz)."""
        now = time.monotonic()
        if now < self._next_probe or self.writer.pending or self._inflight is not None:
            return
        self._next_probe = now + PROBE_SECONDS
        try:
            await asyncio.wait_for(self.writer.probe(), PROBE_SECONDS)
        except Exception as err:
            if "storage" not in self._failing:
                log.warning("%s sink: storage check failed: %s", self.writer.kind, err)
            self._failing.add("storage")
            self.metrics.errors.labels(self.writer.kind, "storage").inc()
            return
        if "storage" in self._failing:
            log.info("%s sink: storage answers again", self.writer.kind)
        self._failing.discard("storage")

    # ----------------------------------------------------------------- helpers

    async def _retry(self, where: str, op: Callable[[], Awaitable[_T]]) -> _T:
        """Retry a transient failure with jittered backoff until it works or we stop."""
        for attempt, delay in enumerate(self.config.retry.delays()):
            try:
                result = await op()
                self._failing.discard(where)
                return result
            except PermanentError:
                raise
            except Exception as err:
                if self.stopping.is_set() and where not in {"commit", "deadletter"}:
                    raise _Stopped(where) from err
                self._failing.add(where)
                self.metrics.errors.labels(self.writer.kind, where).inc()
                log.warning(
                    "%s sink: %s failed (attempt %d): %s; retrying in %.2fs",
                    self.writer.kind,
                    where,
                    attempt + 1,
                    err,
                    delay,
                )
                self.heartbeat = time.monotonic()
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)


class _Stopped(Exception):
    """Told to stop while something (named) was being retried: a clean stop."""


class RowsRefused(Exception):
    """A commit the storage refused for the rows of some of its messages (a value out
    of its range, a constraint on the table): `messages` are (sequence, reason). The
    service dead-letters them, then calls `leave_out` (the writer's: it takes them out
    of the sealed batch) and commits the batch again. `rows` counts each one's rows,
    for the metrics."""

    def __init__(self, messages: list[tuple[int, str]]) -> None:
        self.messages = messages
        self.rows: dict[int, int] = {}
        self.leave_out: Callable[[], None] = lambda: None
        super().__init__(f"refused the rows of messages {[seq for seq, _ in messages]}")


class PermanentError(Exception):
    """A failure no retry can fix (a file write that failed midway, a COPY Postgres
    refused with no message's rows to blame): the sink exits 2 with nothing of it
    acked. Connection and credential problems are retried instead, /readyz answering
    503 meanwhile."""


class WriteRefused(PermanentError):
    """A commit whose file could not be written, for the data of the messages in it
    (sequences `first` to `last`), not for the storage: Arrow refused to encode them
    together. `reset` (the writer's) drops everything it holds not committed; the
    service then takes these messages again, half as many to a commit (and so on), so
    that the ones to blame are dead-lettered (the writer raises RowsRefused for a file
    of one) and the others written. It ends the sink only from its final commit (the
    restart does the same)."""

    def __init__(
        self,
        first: int,
        last: int,
        messages: int,
        reason: str,
        reset: Callable[[], Awaitable[None]],
    ) -> None:
        self.first, self.last, self.messages = first, last, messages
        self.reason, self.reset = reason, reset
        # Messages, rows and bytes of the files of the same commit before the refused
        # one, which are committed, and the last sequence they hold (0: none).
        self.committed = [0, 0, 0]
        self.committed_seq = 0
        super().__init__(f"messages {first}-{last} could not be written together: {reason}")


def _widen_nats_reads() -> None:
    """Make nats-py read in `NATS_READ_BUFFER_BYTES` pieces (this process's connections).

    nats-py has no option for it: its module constant is read at each connect and
    read, so setting it is enough. A sink process has only its own connection.
    """
    if getattr(nats.aio.client, "DEFAULT_BUFFER_SIZE", 0) < NATS_READ_BUFFER_BYTES:
        nats.aio.client.DEFAULT_BUFFER_SIZE = NATS_READ_BUFFER_BYTES


# --------------------------------------------------------------------- http


def _listen_family(host: str) -> tuple[socket.AddressFamily, str]:
    """The socket family to listen on `host` with, and the host without brackets.

    An IPv6 address (a pod IP in an IPv6 cluster) needs an IPv6 socket; "::" takes IPv4
    too where the kernel maps it (net.ipv6.bindv6only=0, the default). A name takes
    the family it resolves to first; "" (every IPv4 address) resolves to nothing.
    """
    host = host.removeprefix("[").removesuffix("]")
    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return socket.AF_INET, host  # the bind says what is wrong with it
    return found[0][0], host


# How long the sink's HTTP server waits for a request's lines before it drops the
# connection (and its thread).
HTTP_IDLE_SECONDS = 10.0


def serve_http(service: SinkService, host: str, port: int) -> http.server.ThreadingHTTPServer:
    """Serve /metrics, /healthz (loop alive) and /readyz (consuming) in a thread."""

    class Handler(http.server.BaseHTTPRequestHandler):
        # A connection that sends nothing (half-open after a node failure, a TCP check
        # that holds it) would hold its thread for good.
        timeout = HTTP_IDLE_SECONDS

        def do_GET(self) -> None:
            if self.path == "/metrics":
                body = prom.generate_latest(service.metrics.registry)
                self._reply(200, body, prom.CONTENT_TYPE_LATEST)
            elif self.path == "/healthz":
                alive = time.monotonic() - service.heartbeat < 60
                self._reply(200 if alive else 503, b"ok\n" if alive else b"stalled\n")
            elif self.path == "/readyz":
                ok = service.is_ready()
                self._reply(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
            else:
                self._reply(404, b"not found\n")

        def _reply(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("http: %s", format % args)

    family, host = _listen_family(host)

    class Server(http.server.ThreadingHTTPServer):
        address_family = family
        daemon_threads = True

    server = Server((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="sink-http", daemon=True).start()
    return server


__all__: Sequence[str] = ("Delivery", "SinkService", "Writer", "decode")
