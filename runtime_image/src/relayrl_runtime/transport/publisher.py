"""The NATS JetStream trajectory publisher: the runtime's sink when trajectories leave the pod.

Implements `sinks.base.TrajectorySink` (router threads call `write`). Several record
batches of whole trajectories are packed into one Arrow IPC stream message up to
`max_message_bytes`, stamped with a `Nats-Msg-Id` that never changes across retries
(JetStream drops a re-sent copy inside the stream's duplicate window) and headers with
the schema version, step and trajectory counts and the policy version range.

Delivery (DESIGN.md "Delivery semantics", issue 4): a message leaves the backlog only
when JetStream has acked it. The backlog is bounded in bytes; when it is full, `write`
blocks (backpressure to routers and actors), it never drops. While NATS is away the
publisher retries each message with jittered backoff and nats-py reconnects with the
jittered delays of `streams.ConnectOptions`. `flush` waits for every ack; `close` (the
SIGTERM path of the runtime) flushes, then disconnects.

The asyncio side runs on a loop in a thread the publisher owns, so the synchronous
sink protocol can be called from any router thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

import nats.errors
import nats.js
import nats.js.errors
import prometheus_client as prom
import pyarrow as pa
import pyarrow.compute as pc
from nats.aio.client import Client as NATS

from relayrl_runtime import aio, streams, trajectory
from relayrl_runtime.sinks import base

log = logging.getLogger(__name__)

# JetStream answers a publish with these when it is busy, not because of the message:
# 408 and 429 (its queues are full), 409 (a replicated stream still storing the same
# message id, when a retry overtakes the first attempt).
_BUSY_CODES: Final = frozenset({408, 409, 429})
# JetStream's err_codes for a store that has no room: its server's or account's
# max_file_store (10023, "insufficient resources"), or the storage itself (10047).
_STORE_FULL_CODES: Final = frozenset({10023, 10047})

PREFIX: Final = "relayrl_publisher"
# Arrow IPC framing per record batch: a fixed part, and per column its buffers' entries
# in the batch's header (16 bytes each, 2-3 buffers a column: validity, values, a list's
# child), field nodes, and up to 7 bytes of padding a buffer. Counted so a message stays
# under the bound without encoding it twice; the encoded size decides all the same
# (`_pack`). By column count, not by type: hashing a schema costs 16 us a batch.
_BATCH_FRAMING: Final = 256
_COLUMN_FRAMING: Final = 80
# The schema message (and the dictionaries) at the start of each message.
_SCHEMA_OVERHEAD: Final = 8192
# A connection whose options are made anew (`NatsPublisher(connect=<callable>)`): how
# long one attempt at connecting may take before the options are read again (after
# `streams.AUTH_REFUSALS` refusals of its credentials in a row it is made anew).
_CONNECT_SECONDS: Final = 30.0
# NATS's header block around the `key: value` lines: "NATS/1.0\r\n" and "\r\n".
_HEADER_BLOCK: Final = 12


class PublisherMetrics:
    """Prometheus collectors of one publisher (its own registry unless one is given)."""

    def __init__(self, registry: prom.CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else prom.CollectorRegistry()
        r = self.registry
        self.messages = prom.Counter(
            f"{PREFIX}_messages", "Messages acked by JetStream.", registry=r
        )
        self.bytes = prom.Counter(f"{PREFIX}_bytes", "Payload bytes acked.", registry=r)
        self.steps = prom.Counter(f"{PREFIX}_steps", "Steps acked.", registry=r)
        self.retries = prom.Counter(
            f"{PREFIX}_retries", "Publish attempts that failed and were retried.", registry=r
        )
        self.duplicates = prom.Counter(
            f"{PREFIX}_duplicates", "Retries JetStream recognised as already stored.", registry=r
        )
        self.backlog_bytes = prom.Gauge(
            f"{PREFIX}_backlog_bytes", "Bytes encoded and not yet acked.", registry=r
        )
        self.backlog_messages = prom.Gauge(
            f"{PREFIX}_backlog_messages", "Messages encoded and not yet acked.", registry=r
        )
        self.blocked_seconds = prom.Counter(
            f"{PREFIX}_blocked_seconds", "Time writers waited on a full backlog.", registry=r
        )
        self.ack_seconds = prom.Histogram(
            f"{PREFIX}_ack_seconds",
            "From first publish attempt to ack.",
            buckets=(1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0, 5.0, 30.0),
            registry=r,
        )
        self.connected = prom.Gauge(f"{PREFIX}_connected", "1 while connected to NATS.", registry=r)
        self.store_full = prom.Gauge(
            f"{PREFIX}_store_full",
            "1 while JetStream answers publishes that its store is full.",
            registry=r,
        )


class UnackedError(base.SinkError):
    """A flush or close stopped waiting for acks: what JetStream had not acked by then."""

    def __init__(self, messages: int, steps: int, nbytes: int, when: str) -> None:
        super().__init__(
            f"{messages} message(s) holding {steps} steps ({nbytes} bytes) not acked {when}"
        )
        self.messages = messages
        self.steps = steps
        self.nbytes = nbytes


@dataclasses.dataclass(frozen=True)
class PublisherConfig:
    """Where and how to publish."""

    namespace: str
    agent: str
    stream: str | None = None
    max_message_bytes: int = 1 << 20
    max_backlog_bytes: int = 256 << 20
    max_in_flight: int = 32
    ack_timeout: float = 5.0
    # Seal a partly filled message after this long, so a slow actor's steps still move.
    linger_seconds: float = 0.2
    # Create or update the stream on connect (standalone use; under the operator it
    # exists already and the runtime may lack the permission).
    create_stream: bool = True
    # How long `close` waits for acks before it raises, unless `drain_by` set an end.
    close_seconds: float = 60.0
    stream_settings: streams.StreamSettings = dataclasses.field(
        default_factory=streams.StreamSettings
    )
    retry: streams.Backoff = dataclasses.field(
        default_factory=lambda: streams.Backoff(initial=0.05, maximum=2.0)
    )


@dataclasses.dataclass
class _Message:
    msg_id: str
    payload: bytes
    headers: dict[str, str]
    steps: int
    first_attempt: float = 0.0
    # Handed to a connection at least once: JetStream may hold it (its ack lost).
    sent: bool = False


class NatsPublisher:
    """A `TrajectorySink` that publishes to JetStream; start() before use, close() at the end."""

    def __init__(
        self,
        connect: streams.ConnectOptions | Callable[[], streams.ConnectOptions],
        config: PublisherConfig,
        metrics: PublisherMetrics | None = None,
    ) -> None:
        # Options, or how to make them: then read again for every new connection (a
        # mounted Secret's credentials may have changed since).
        self.options = connect
        self._rereads = not isinstance(connect, streams.ConnectOptions)
        self._read_options: Callable[[], streams.ConnectOptions] = (
            connect if not isinstance(connect, streams.ConnectOptions) else lambda: connect
        )
        self.config = config
        self.metrics = metrics if metrics is not None else PublisherMetrics()
        self.subject = streams.trajectories_subject(config.namespace, config.agent)
        self.stream = streams.stream_name(config.namespace, config.agent, config.stream)
        # Never configurable: numbering starts at 1 in every process, so an id reused
        # by a later process would have the sinks skip its messages as copies.
        self.producer_id = _default_producer_id()
        self._lock = threading.Condition()
        # Batches waiting to be packed, and their estimated encoded size.
        self._pending: list[pa.RecordBatch] = []
        self._pending_bytes = 0
        self._pending_since = 0.0
        self._seq = 0
        # Encoded, not yet acked, in order. Guarded by _lock.
        self._backlog: collections.deque[_Message] = collections.deque()
        self._backlog_bytes = 0
        self._unacked: dict[str, _Message] = {}
        self._closed = False
        # Set by `drain_by`: writers no longer wait for room, close waits until then.
        self._drain_deadline: float | None = None
        self._failed: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._wake: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None
        self._nc: NATS | None = None
        # Whether the stream takes messages: made or checked, or one acked. Until then,
        # if JetStream refused it or another stream took the messages, /readyz says so
        # (`waiting`). No answer does not hold readiness: a runtime allowed to publish
        # but not to manage streams gets none, and its stream may well be there.
        self._stream_ok = not config.create_stream
        self._stream_problem: str | None = None
        self._stream_refused = False
        self._stored_in: str | None = None  # the stream that acked, if another one
        self._stream_missing = False  # JetStream said no stream takes the subject
        # Why JetStream answered the last publish with a server error (a full store,
        # say), until a publish is acked: said in /readyz and logged when it changes.
        self._refusal: str | None = None
        self._ensuring: asyncio.Task[None] | None = None
        self._max_payload = config.max_message_bytes
        self.acked_messages = 0
        self.acked_steps = 0

    # ------------------------------------------------------------------ protocol

    @property
    def connected(self) -> bool:
        """Whether NATS is connected now and the stream takes messages (feeds /readyz)."""
        return self.waiting is None

    @property
    def waiting(self) -> str | None:
        """Why the publisher cannot deliver now; None when it can."""
        if self._closed:
            return f"publisher to {self.subject} is closed"
        nc = self._nc
        if nc is None or not nc.is_connected:
            return "not connected to NATS"
        if self._stream_missing:
            return f"no stream stores {self.subject} (stream {self.stream} deleted?)"
        if not self._stream_ok and (self._stream_refused or self._stored_in):
            elsewhere = self._stored_in and (
                f"messages are stored in stream {self._stored_in}, not {self.stream}"
            )
            return "; ".join(filter(None, (elsewhere, self._stream_problem)))
        return self._refusal

    @property
    def backlog_bytes(self) -> int:
        """Bytes encoded and not yet acked (bounded by `max_backlog_bytes` but while
        draining)."""
        return self._backlog_bytes

    @property
    def failure(self) -> str | None:
        """Why publishing stopped for good (a refused message, a broken I/O loop)."""
        failed = self._failed
        if failed is not None:
            return str(failed) or type(failed).__name__
        return f"publisher to {self.subject} is closed" if self._closed else None

    def start(self) -> None:
        """Start the I/O thread; connecting goes on in the background until it succeeds."""
        if self._thread is not None:
            return
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="relayrl-publisher", daemon=True
        )
        self._thread.start()
        ready.wait()

    def write(self, batch: pa.RecordBatch) -> None:
        """Queue one record batch of whole trajectories; blocks while the backlog is full."""
        if batch.num_rows == 0:
            return
        sealed: list[list[pa.RecordBatch]] = []
        with self._lock:
            self._check_open()
            for piece, size in self._split(batch):
                if self._pending and (
                    self._pending_bytes + size > self._budget()
                    or not piece.schema.equals(self._pending[0].schema, check_metadata=True)
                ):
                    sealed.append(self._take_pending())
                if not self._pending:
                    self._pending_since = time.monotonic()
                self._pending.append(piece)
                self._pending_bytes += size
        for group in sealed:
            for message in self._pack(group):
                self._enqueue(message)
        self._poke()

    def flush(self, timeout: float | None = None) -> None:
        """Send what is pending and wait until JetStream acked every message; raises
        `UnackedError` after `timeout`.

        The pending message joins the backlog even when it is full (by one message at
        most), so the wait below is the only one, bounded by `timeout`."""
        self._flush(timeout, "" if timeout is None else f"after {timeout:g}s")

    def _flush(self, timeout: float | None, when: str) -> None:
        self._seal_pending(block=False)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._backlog or self._unacked:
                if self._failed is not None:
                    raise base.SinkError(f"publisher failed: {self._failed}") from self._failed
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    messages = [*self._backlog, *self._unacked.values()]
                    raise UnackedError(
                        len(messages),
                        sum(m.steps for m in messages) + sum(b.num_rows for b in self._pending),
                        self._backlog_bytes + self._pending_bytes,
                        when,
                    )
                self._lock.wait(0.1 if left is None else min(left, 0.1))

    def drain_by(self, deadline: float) -> None:
        """The process drains, until `deadline` (time.monotonic()): writers blocked on
        a full backlog go on (the backlog passes its bound by what the routers still
        hold, so they can stop), and `close` waits for acks until then."""
        with self._lock:
            self._drain_deadline = deadline
            self._lock.notify_all()

    def close(self, timeout: float | None = None) -> None:
        """Flush (bounded by `timeout`; default: until the `drain_by` deadline, else
        `close_seconds`), then disconnect. Unacked data raises, never vanishes: what
        is lost is logged in one error line, and raised as `UnackedError`."""
        deadline = self._drain_deadline
        if timeout is None and deadline is not None:
            timeout, when = max(0.0, deadline - time.monotonic()), "by the end of the drain"
        else:
            timeout = self.config.close_seconds if timeout is None else timeout
            when = f"after {timeout:g}s"
        error: BaseException | None = None
        try:
            if self._thread is not None:
                self._flush(timeout, when)
        except UnackedError as err:
            # Expected (NATS away, or too slow for the drain): said once, no traceback.
            log.error("publisher: closed with %s: those steps are lost", err)
            error = err
        except base.SinkError as err:
            error = err
        finally:
            with self._lock:
                self._closed = True
                self._lock.notify_all()
            self._shutdown_loop()
        if error is not None:
            raise error

    # ------------------------------------------------------------------- packing

    def _limit(self) -> int:
        """The most bytes a message may take, as NATS counts them (headers included)."""
        return max(1, min(self.config.max_message_bytes, self._max_payload))

    def _budget(self) -> int:
        return self._limit() - (streams.HEADER_ROOM_BYTES + _SCHEMA_OVERHEAD)

    def _split(self, batch: pa.RecordBatch) -> Iterator[tuple[pa.RecordBatch, int]]:
        """Cut a batch bigger than one message at trajectory ends (rows as a last resort).

        Yields each piece with its estimated encoded size.
        """
        budget = self._budget()
        size = _estimate(batch)
        if size <= budget:
            yield batch, size
            return
        # Too big, or a slice of something big: the exact size of what it holds.
        size = _exact_size(batch)
        if size <= budget:
            yield batch, size
            return
        framing = _framing(batch)
        per_row = max(1.0, (size - framing) / batch.num_rows)
        max_rows = max(1, int((budget - framing) / per_row))
        ends = _trajectory_ends(batch)
        start = 0
        while start < batch.num_rows:
            limit = start + max_rows
            if limit >= batch.num_rows:
                stop = batch.num_rows
            else:
                # The last trajectory end that fits; none fits: cut the trajectory.
                fitting = [e for e in ends if start < e <= limit]
                stop = fitting[-1] if fitting else limit
            yield batch.slice(start, stop - start), int(per_row * (stop - start)) + framing
            start = stop

    def _take_pending(self) -> list[pa.RecordBatch]:
        group, self._pending, self._pending_bytes = self._pending, [], 0
        return group

    def _seal_pending(self, block: bool = True) -> None:
        with self._lock:
            group = self._take_pending() if self._pending else []
        if group:
            for message in self._pack(group):
                self._enqueue(message, block)
        self._poke()

    def _pack(self, group: list[pa.RecordBatch]) -> list[_Message]:
        """Encode `group` as one message, or as several where one would exceed the
        bound (the size estimate is a guess; a server's max_payload may have shrunk).
        A single step bigger than the bound cannot be sent: the publisher fails."""
        message = self._encode(group)
        limit = self._limit()
        if wire_size(message) <= limit:
            with self._lock:
                self._seq += 1
                message.msg_id = f"{self.producer_id}-{self._seq}"
                message.headers[streams.HEADER_MSG_ID] = message.msg_id
            return [message]
        halves = _halves(group)
        if halves is None:
            err = base.SinkError(
                f"one step takes {len(message.payload)} bytes, more than a message may"
                f" ({limit} bytes: NATS max_payload and trajectories.maxBatchBytes)"
            )
            with self._lock:  # for good: every later step of this model is as big
                self._failed = err
                self._lock.notify_all()
            raise err
        return [m for half in halves for m in self._pack(half)]

    def _encode(self, group: list[pa.RecordBatch]) -> _Message:
        """The message of `group`; its id is given by `_pack` once it fits."""
        payload = encode(group)
        steps = sum(b.num_rows for b in group)
        policy = pc.min_max(pa.chunked_array([b.column("policy_version") for b in group]))
        ends = sum(len(_trajectory_ends(b)) for b in group)
        meta = group[0].schema.metadata or {}
        version = meta.get(trajectory.META_SCHEMA_VERSION, str(trajectory.SCHEMA_VERSION).encode())
        # Room for the id `_pack` gives it: the producer's, a dash and up to 20 digits.
        msg_id = f"{self.producer_id}-{'0' * 20}"
        headers = {
            streams.HEADER_MSG_ID: msg_id,
            streams.HEADER_SCHEMA_VERSION: version.decode(),
            streams.HEADER_STEPS: str(steps),
            streams.HEADER_TRAJECTORIES: str(ends),
            streams.HEADER_POLICY_MIN: str(policy["min"].as_py()),
            streams.HEADER_POLICY_MAX: str(policy["max"].as_py()),
            streams.HEADER_PRODUCER: self.producer_id,
        }
        return _Message(msg_id=msg_id, payload=payload, headers=headers, steps=steps)

    def _enqueue(self, message: _Message, block: bool = True) -> None:
        size = len(message.payload)
        with self._lock:
            start = time.monotonic()
            # Backpressure: wait for acks to make room (one message always fits). The
            # I/O loop itself never waits here (it delivers the acks): its lingering
            # partial message may overshoot the bound by one message.
            limit = self.config.max_backlog_bytes
            while (
                block
                and self._drain_deadline is None
                and self._backlog_bytes
                and self._backlog_bytes + size > limit
            ):
                self._check_open()
                self._lock.wait(0.1)
            waited = time.monotonic() - start
            self._backlog.append(message)
            self._backlog_bytes += size
            self.metrics.backlog_bytes.set(self._backlog_bytes)
            self.metrics.backlog_messages.set(len(self._backlog) + len(self._unacked))
        if waited > 0.001:
            self.metrics.blocked_seconds.inc(waited)

    def _check_open(self) -> None:
        if self._closed:
            raise base.SinkError(f"publisher to {self.subject} is closed")
        if self._failed is not None:
            raise base.SinkError(f"publisher failed: {self._failed}") from self._failed

    def _poke(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(wake.set)

    # ---------------------------------------------------------------- I/O thread

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        ready.set()
        try:
            loop.run_until_complete(self._main())
        except BaseException as err:  # recorded for writers, then the thread ends
            log.exception("publisher I/O loop failed")
            with self._lock:
                self._failed = err
                self._lock.notify_all()
        finally:
            # nats-py leaves reader tasks behind a closed connection: end them here, so
            # none is collected after the loop is gone.
            loop.run_until_complete(_cancel_leftovers())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _shutdown_loop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None

    async def _main(self) -> None:
        """Connect and deliver until stopped. A connection nats-py gives up on (closed
        after some server errors: an authorization violation, an expired credential)
        is replaced by a new one, with the credentials read again; the messages it
        had not acked are sent again, under the same ids."""
        assert self._stop is not None
        stopping = asyncio.create_task(self._stop.wait())
        try:
            while await self._connection(stopping):
                self._resend_unacked()
        finally:
            await aio.cancel_and_wait(stopping)

    async def _connection(self, stopping: asyncio.Task[Any]) -> bool:
        """One connection's life: True when NATS closed it, False when stopped."""
        closed = asyncio.Event()
        connecting = asyncio.create_task(self._connect(closed))
        done, _ = await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if connecting not in done:
            await aio.cancel_and_wait(connecting)
            failed = aio.failure(connecting)
            if not connecting.cancelled() and failed is None:
                with contextlib.suppress(Exception):  # connected after all: close it
                    await connecting.result().close()
            elif failed is not None and not isinstance(failed, streams.ConnectError):
                log.warning("publisher: connecting failed while stopping: %r", failed)
            return False
        nc = connecting.result()
        js = nc.jetstream(timeout=self.config.ack_timeout)
        sender = asyncio.create_task(self._send_loop(js))
        if not self._stream_ok:
            # Tried again beside the sender: the stream may exist as it is (made by the
            # operator, for a runtime allowed to publish but not to manage streams).
            self._ensuring = asyncio.create_task(self._ensure_stream(js))
        lost = asyncio.create_task(closed.wait())
        try:
            # The sender ends only by failing: that ends the publisher at once.
            await asyncio.wait({stopping, lost, sender}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ensuring = self._take_ensuring()
            await aio.cancel_and_wait(sender, lost, *([ensuring] if ensuring else []))
            late = self._take_ensuring()  # started by a delivery meanwhile
            if late is not None:
                await aio.cancel_and_wait(late)
            if not closed.is_set():
                with contextlib.suppress(Exception):
                    await nc.flush(timeout=2)
            with contextlib.suppress(Exception):
                await nc.close()
            self.metrics.connected.set(0)
            self._nc = None
        failed = aio.failure(sender)
        if failed is not None:
            raise failed
        if stopping.done():
            return False
        log.warning(
            "publisher: NATS closed the connection (%s); connecting again",
            streams.describe(nc.last_error) if nc.last_error else "no error given",
        )
        return True

    def _take_ensuring(self) -> asyncio.Task[None] | None:
        task, self._ensuring = self._ensuring, None
        return task

    def _resend_unacked(self) -> None:
        """Messages sent on a lost connection and not acked go first on the next."""
        with self._lock:
            self._backlog.extendleft(reversed(list(self._unacked.values())))
            self._unacked.clear()

    async def _connect(self, closed: asyncio.Event | None = None) -> NATS:
        """Connect, with the options read again for each attempt of `_CONNECT_SECONDS`
        (a Secret fixed meanwhile is used). Once connected, nats-py reconnects on its
        own, with the credentials it has: refused `streams.AUTH_REFUSALS` times in a row, the
        connection is closed, so that `_main` makes a new one with them read again."""
        refusals = 0
        made: list[NATS] = []
        closing: set[asyncio.Task[None]] = set()

        async def disconnected() -> None:
            self.metrics.connected.set(0)
            if not self._closed:
                log.warning("publisher: disconnected from NATS; holding the backlog")

        async def reconnected() -> None:
            nonlocal refusals
            refusals = 0
            self.metrics.connected.set(1)
            self._max_payload = made[0].max_payload  # another server may take less
            log.info("publisher: reconnected to NATS")

        async def gone() -> None:
            # The connection returned, not an attempt that timed out (closed by
            # streams.connect): that would end the next one at once.
            if closed is not None and made:
                closed.set()

        async def give_up(nc: NATS) -> None:
            # nats-py's close() first writes what it buffered while reconnecting to the
            # refused attempt's socket: reset by the server, that raises before
            # closed_cb runs. The connection is closed all the same (its state says so,
            # it never reconnects): `_main` must connect anew in any case.
            try:
                await nc.close()
            finally:
                if closed is not None:
                    closed.set()

        def given_up(task: asyncio.Task[None]) -> None:
            closing.discard(task)
            failed = aio.failure(task)  # retrieved: expected of a refused socket
            if failed is not None:
                log.debug("publisher: closing the refused connection: %r", failed)

        async def refused(err: Exception) -> None:
            nonlocal refusals
            if not made or not streams.refuses_credentials(err):
                return
            refusals += 1
            if refusals == streams.AUTH_REFUSALS and not self._rereads:
                log.error("publisher: NATS refuses its credentials; fix them, it keeps trying")
            elif refusals == streams.AUTH_REFUSALS:
                log.warning("publisher: NATS refuses its credentials; reading them again")
                # Not awaited here: nats-py's reconnect loop awaits this callback, and
                # close() cancels that loop. `give_up` then has `_main` connect anew.
                task = asyncio.create_task(give_up(made[0]))
                closing.add(task)
                task.add_done_callback(given_up)

        for delay in self.config.retry.delays():
            try:
                # Read again each time: a Secret fixed meanwhile is used, and one
                # broken meanwhile (a bad certificate, a missing key) is waited out.
                nc = await streams.connect(
                    self._read_options(),
                    deadline=_CONNECT_SECONDS if self._rereads else None,
                    disconnected_cb=disconnected,
                    reconnected_cb=reconnected,
                    closed_cb=gone,
                    error_cb=refused,
                )
                break
            except streams.ConnectError as err:
                log.warning("publisher: %s; trying again with the options read again", err)
            except Exception as err:  # the options: InvalidArgumentError, ssl.SSLError, OSError
                log.error("publisher: cannot connect: %s; trying again in %.1fs", err, delay)
                await asyncio.sleep(delay)
        made.append(nc)
        self._nc = nc
        self._max_payload = nc.max_payload
        self.metrics.connected.set(1)
        if self.config.create_stream:
            # One try before the first message (it may need the stream's new settings).
            await self._try_stream(nc.jetstream())
        log.info(
            "publisher: connected to %s, publishing on %s",
            nc.connected_url.netloc if nc.connected_url else "?",
            self.subject,
        )
        return nc

    async def _ensure_stream(self, js: nats.js.JetStreamContext) -> None:
        """Create or update the stream until done (a refusal may be fixed meanwhile: a
        stream holding its subjects deleted, say), or until a message is stored in it."""
        for delay in self.config.retry.delays():
            if self._stream_ok or await self._try_stream(js):
                return
            await asyncio.sleep(delay)

    async def _try_stream(self, js: nats.js.JetStreamContext) -> bool:
        """One attempt at the stream; False to try again."""
        # Room for the largest message this publisher sends: no more, so that a server
        # taking larger payloads than that does not make it undo the operator's setting.
        settings = dataclasses.replace(
            self.config.stream_settings,
            max_msg_bytes=max(self.config.stream_settings.max_msg_bytes, self._limit()),
        )
        cfg = streams.stream_config(
            self.config.namespace, self.config.agent, self.config.stream, settings
        )
        try:
            await streams.ensure_stream(js, cfg)
        except streams.StreamConflictError as err:
            self._stream_note(str(err), refused=True)
            return False
        except (nats.errors.Error, TimeoutError) as err:
            # A 4xx answer (e.g. another stream holds the subjects) is not transient,
            # but publishing goes on all the same: to the stream as it is, if any.
            refused = isinstance(err, nats.js.errors.APIError) and err.code in range(400, 500)
            what = "JetStream refused to create or update it" if refused else "no answer"
            self._stream_note(
                f"stream {cfg.name}: {what}: {err or type(err).__name__}", refused=refused
            )
            return False
        self._stream_ok, self._stream_problem = True, None
        return True

    def _stream_note(self, problem: str, *, refused: bool) -> None:
        """Why the stream may not take messages: logged when it changes; a refusal holds
        /readyz until a message is stored in the stream."""
        if problem != self._stream_problem:
            log.warning("publisher: %s; trying again", problem)
        self._stream_problem = problem
        self._stream_refused = self._stream_refused or refused

    async def _send_loop(self, js: nats.js.JetStreamContext) -> None:
        assert self._wake is not None
        assert self._stop is not None
        slots = asyncio.Semaphore(self.config.max_in_flight)
        tasks: set[asyncio.Task[None]] = set()
        try:
            # The stop flag, not only cancellation, ends the loop: Python 3.11's wait_for
            # can swallow a cancel that races with the wake event (bpo-42130).
            while not self._stop.is_set():
                self._wake.clear()
                if self._pending_due():
                    self._seal_pending(block=False)
                while True:
                    with self._lock:
                        message = self._backlog.popleft() if self._backlog else None
                        if message is not None:
                            self._unacked[message.msg_id] = message
                    if message is None:
                        break
                    await slots.acquire()
                    task = asyncio.create_task(self._deliver(js, message, slots))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.config.linger_seconds)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _pending_due(self) -> bool:
        with self._lock:
            return bool(self._pending) and (
                time.monotonic() - self._pending_since >= self.config.linger_seconds
            )

    async def _deliver(
        self, js: nats.js.JetStreamContext, message: _Message, slots: asyncio.Semaphore
    ) -> None:
        """Publish one message until JetStream acks it; the same id on every attempt."""
        try:
            message.first_attempt = time.monotonic()
            for delay in self.config.retry.delays():
                nc = self._nc
                if nc is not None and wire_size(message) > nc.max_payload:
                    # Packed for a larger max_payload (before the first connect, or
                    # for another server): sent as smaller messages.
                    self._repack(message, nc.max_payload)
                    return
                sent, message.sent = message.sent, True
                try:
                    ack = await js.publish(
                        self.subject,
                        message.payload,
                        timeout=self.config.ack_timeout,
                        headers=dict(message.headers),
                    )
                except nats.errors.MaxPayloadError:  # refused before it was sent
                    message.sent = sent
                    self._repack(message, self._max_payload)
                    return
                except (
                    nats.errors.TimeoutError,
                    nats.errors.ConnectionClosedError,
                    nats.errors.OutboundBufferLimitError,
                    nats.errors.ConnectionReconnectingError,
                    nats.errors.NoRespondersError,
                    nats.js.errors.NoStreamResponseError,
                    nats.js.errors.ServiceUnavailableError,
                    nats.js.errors.ServerError,
                    nats.errors.UnexpectedEOF,
                    TimeoutError,
                    OSError,
                ) as err:
                    if isinstance(err, nats.js.errors.NoStreamResponseError):
                        self._stream_gone(js)
                    elif isinstance(err, nats.js.errors.APIError):
                        self._refused(err)  # 500 or 503: the server's own trouble
                    self.metrics.retries.inc()
                    log.debug("publish %s failed (%s); retry in %.2fs", message.msg_id, err, delay)
                    await asyncio.sleep(delay)
                    continue
                except nats.js.errors.APIError as err:
                    # A stream that refuses the message (too big, no such subject): the
                    # data cannot go anywhere, so it is a hard failure, not a drop.
                    # 5xx, and 429: the stream's ingest queue is full (nats-server
                    # answers so under load rather than queue without bound): retry.
                    if err.code is not None and (err.code >= 500 or err.code in _BUSY_CODES):
                        if err.code >= 500:
                            self._refused(err)
                        self.metrics.retries.inc()
                        await asyncio.sleep(delay)
                        continue
                    raise
                if ack.duplicate:
                    self.metrics.duplicates.inc()
                self._acked(message, ack.stream)
                return
        except asyncio.CancelledError:
            raise
        except BaseException as err:
            log.error("publish %s refused by JetStream: %s", message.msg_id, err)
            with self._lock:
                self._failed = err
                self._lock.notify_all()
        finally:
            slots.release()

    def _repack(self, message: _Message, max_payload: int) -> None:
        """Put `message` back as smaller messages, first in line, under new ids.

        Safe when it was never sent. One sent before (to a server that took its size)
        whose ack was lost may be stored already: its steps may then be stored twice,
        which is said, rather than hold it for good where no server takes it."""
        self._max_payload = max_payload
        if message.sent:
            log.warning(
                "publisher: message %s was sent to a server with a larger max_payload and"
                " not acked; sent again in pieces under new ids, its steps may be stored"
                " twice",
                message.msg_id,
            )
        pieces = self._pack(decode(message.payload))
        log.info(
            "publisher: message %s (%d bytes) is over NATS's max_payload of %d: sent as %d",
            message.msg_id,
            wire_size(message),
            max_payload,
            len(pieces),
        )
        with self._lock:
            del self._unacked[message.msg_id]
            self._backlog.extendleft(reversed(pieces))
            self._backlog_bytes += sum(len(p.payload) for p in pieces) - len(message.payload)
            self.metrics.backlog_bytes.set(self._backlog_bytes)
            self.metrics.backlog_messages.set(len(self._backlog) + len(self._unacked))
        self._poke()

    def _refused(self, err: nats.js.errors.APIError) -> None:
        """JetStream answered a publish with a server error: kept until one is acked."""
        refusal = f"JetStream refuses messages: {err.description} ({err.code}, {err.err_code})"
        if err.err_code in _STORE_FULL_CODES:
            days = streams.StreamSettings().max_age_seconds / 86400
            refusal += (
                f"; the JetStream store is full: raise nats-server's max_file_store (or"
                f" the account's JetStream storage limit) or its volume (stream"
                f" {self.stream} keeps each message {days:g} days,"
                f" read or not). Nothing is dropped: steps wait in this pod's backlog,"
                f" and the actors with them once it is full"
            )
        if refusal != self._refusal:
            log.warning("publisher: %s; trying again", refusal)
        self._refusal = refusal
        self.metrics.store_full.set(1 if err.err_code in _STORE_FULL_CODES else 0)

    def _stream_gone(self, js: nats.js.JetStreamContext) -> None:
        """No stream takes the subject (deleted, or never made): /readyz says so until a
        message is stored, and the stream is made again where the publisher may."""
        if self._stream_missing:
            return
        self._stream_missing = True
        if not self.config.create_stream:
            log.warning("publisher: no stream stores %s (stream %s)", self.subject, self.stream)
            return
        self._stream_ok = False
        log.warning("publisher: no stream stores %s; trying to make %s", self.subject, self.stream)
        if self._ensuring is None or self._ensuring.done():
            self._ensuring = asyncio.create_task(self._ensure_stream(js))

    def _acked(self, message: _Message, stream: str) -> None:
        self.metrics.ack_seconds.observe(time.monotonic() - message.first_attempt)
        self.metrics.messages.inc()
        self.metrics.bytes.inc(len(message.payload))
        self.metrics.steps.inc(message.steps)
        self._stream_missing = False  # some stream stores the subject
        if self._refusal is not None:
            log.info("publisher: JetStream stores messages again")
            self._refusal = None
            self.metrics.store_full.set(0)
        if stream == self.stream:
            self._stream_ok = True
        elif stream != self._stored_in:
            # Stored (so kept), but where the Agent's sinks do not read.
            log.warning("publisher: messages are stored in stream %s, not %s", stream, self.stream)
            self._stored_in = stream
        with self._lock:
            del self._unacked[message.msg_id]
            self._backlog_bytes -= len(message.payload)
            self.acked_messages += 1
            self.acked_steps += message.steps
            self.metrics.backlog_bytes.set(self._backlog_bytes)
            self.metrics.backlog_messages.set(len(self._backlog) + len(self._unacked))
            self._lock.notify_all()


async def _cancel_leftovers() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    await aio.cancel_and_wait(*tasks)
    for task in tasks:
        aio.failure(task)  # retrieved: ended is all that matters here


def encode(group: list[pa.RecordBatch]) -> bytes:
    """Record batches of one schema as one Arrow IPC stream."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, group[0].schema) as writer:
        for b in group:
            writer.write_batch(b)
    return bytes(sink.getvalue().to_pybytes())


def decode(payload: bytes) -> list[pa.RecordBatch]:
    """The record batches of a message `encode` made."""
    return list(pa.ipc.open_stream(payload))


def wire_size(message: _Message) -> int:
    """A message's size as NATS counts it against max_payload: payload and headers."""
    headers = sum(len(k) + len(v) + 4 for k, v in message.headers.items())
    return len(message.payload) + _HEADER_BLOCK + headers


def _framing(batch: pa.RecordBatch) -> int:
    """Estimated IPC framing of one record batch."""
    return _BATCH_FRAMING + _COLUMN_FRAMING * int(batch.num_columns)


def _halves(group: list[pa.RecordBatch]) -> list[list[pa.RecordBatch]] | None:
    """`group` in two, at a trajectory end near the middle where there is one; None for
    a single row."""
    if len(group) > 1:
        middle = len(group) // 2
        return [group[:middle], group[middle:]]
    batch = group[0]
    if batch.num_rows < 2:
        return None
    middle = batch.num_rows // 2
    ends = [e for e in _trajectory_ends(batch) if 0 < e < batch.num_rows]
    cut = min(ends, key=lambda e: abs(e - middle)) if ends else middle
    return [[batch.slice(0, cut)], [batch.slice(cut)]]


def _estimate(batch: pa.RecordBatch) -> int:
    """Upper bound of a batch's encoded size: its buffers whole, in microseconds.

    For a slice the buffers hold more than the slice; `_exact_size` then counts only
    the ranges it uses (pyarrow's `nbytes`, about 0.2 ms per CartPole batch).
    """
    return int(batch.get_total_buffer_size()) + _framing(batch)


def _exact_size(batch: pa.RecordBatch) -> int:
    return int(batch.nbytes) + _framing(batch)


def _trajectory_ends(batch: pa.RecordBatch) -> list[int]:
    """Row indices just past each trajectory's last row."""
    ends = pc.or_(batch.column("terminated"), batch.column("truncated"))
    idx = pc.indices_nonzero(ends).to_numpy()
    return [int(i) + 1 for i in idx]


def _default_producer_id() -> str:
    # Pod name (stable) plus a per-process nonce: ids never collide with those of an
    # earlier incarnation of the same pod, whose messages may still be in the window.
    # The pid is no help there (the runtime is its container's pid 1), so the nonce is
    # 64 bits: a pod restarting every 5 minutes for the sinks' 7-day window of ids
    # repeats one with odds of about 1 in 10^13.
    host = os.environ.get("RELAYRL_POD_NAME") or socket.gethostname()
    return f"{host}-{os.getpid()}-{secrets.token_hex(8)}"
