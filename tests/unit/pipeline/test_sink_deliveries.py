"""The sink's delivery bookkeeping: a gap in consumer sequences re-positions the consumer.

Driven without NATS: `_handle` decides from a delivery's sequences before it decodes
anything, and a gap must be seen even on the first delivery of a fresh consumer (the
fault tests with a real nats-server cover the re-positioning itself).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Any

import nats.js.api
import pyarrow as pa
import pytest

from relayrl_runtime import aio, streams
from relayrl_runtime.sinks import message_ids, service
from support import cancels, trajectories


@dataclass
class Sequence:
    consumer: int
    stream: int


@dataclass
class Metadata:
    sequence: Sequence
    num_pending: int = 0
    timestamp: Any = None


@dataclass
class Delivery:
    metadata: Metadata
    data: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    subject: str = "relayrl.ml.cartpole.trajectories"


class NoWriter:
    kind = "arrow"

    async def add(self, delivery: Any) -> None:
        raise AssertionError("a gap must be caught before anything is written")


def sink(last_seen: int) -> service.SinkService:
    svc = service.SinkService(
        NoWriter(),  # type: ignore[arg-type]
        streams.ConnectOptions(),
        service.ServiceConfig(namespace="ml", agent="cartpole", http_port=None),
    )
    svc._last_seen = last_seen  # as if positioned at last_seen + 1

    async def no_dead_letters(*args: Any) -> None:
        # Past the gap check, the empty payload would be dead-lettered (through NATS,
        # retried): fail at once instead.
        raise AssertionError("the delivery got past the gap check")

    svc._dead_letter = no_dead_letters  # type: ignore[method-assign]
    return svc


def delivery(consumer: int, stream: int) -> Delivery:
    return Delivery(Metadata(Sequence(consumer, stream)))


async def test_a_fresh_consumers_first_delivery_must_be_number_one() -> None:
    svc = sink(last_seen=10)
    # Delivery 1 (stream 11) was lost in flight; 2 arrives first.
    assert await svc._handle(None, delivery(consumer=2, stream=12)) is False  # type: ignore[arg-type]
    assert svc._last_seen == 10


async def test_a_gap_later_in_the_stream_is_caught_too() -> None:
    svc = sink(last_seen=10)
    svc._last_dseq = 5
    assert await svc._handle(None, delivery(consumer=7, stream=17)) is False  # type: ignore[arg-type]


async def test_a_redelivery_is_taken_as_seen() -> None:
    svc = sink(last_seen=10)
    svc._last_dseq = 3
    assert await svc._handle(None, delivery(consumer=4, stream=9)) is True  # type: ignore[arg-type]
    assert svc._last_dseq == 4


class IdleWriter(NoWriter):
    """A writer holding nothing: every delivery here is dead-lettered. It records the
    sequences its commits cover."""

    pending = False
    pipelined = False

    def __init__(self) -> None:
        self.committed: list[int] = []
        self.acked: list[Ackable] = []  # none of these may be acked before a commit

    def seal(self, last_seq: int) -> int:
        return last_seq

    async def commit(self, sealed: object) -> None:
        assert isinstance(sealed, int)
        assert all(m.acks == 0 for m in self.acked), "acked before its commit"
        self.committed.append(sealed)


def dead_lettering_sink(writer: IdleWriter) -> service.SinkService:
    """A sink positioned at 11 whose dead letters go nowhere (no NATS)."""
    svc = service.SinkService(
        writer,  # type: ignore[arg-type]
        streams.ConnectOptions(),
        service.ServiceConfig(namespace="ml", agent="cartpole", http_port=None),
    )
    svc._last_seen = 10

    async def dead_letter(*args: Any) -> None:
        pass

    svc._dead_letter = dead_letter  # type: ignore[method-assign]
    return svc


@dataclass
class Ackable(Delivery):
    acks: int = 0

    async def ack(self) -> None:
        self.acks += 1


async def test_a_dead_letter_during_a_commit_is_acked_once_the_commit_is_done() -> None:
    """Else nothing acks it (no later message), and it comes back every ack-wait."""
    svc = dead_lettering_sink(IdleWriter())
    running = asyncio.get_running_loop().create_future()

    async def commit() -> None:
        await running

    svc._inflight = asyncio.create_task(commit())
    bad = Ackable(Metadata(Sequence(1, 11)), data=b"not arrow")
    assert await svc._handle(None, bad) is True  # type: ignore[arg-type]
    await svc._ack_dead_letters()
    assert bad.acks == 0, "acking now would ack the messages the commit holds"
    running.set_result(None)
    await svc._drain_commits()
    await svc._ack_dead_letters()
    assert bad.acks == 1
    await svc._ack_dead_letters()
    assert bad.acks == 1


async def test_a_dead_letter_after_the_last_data_message_is_recorded_before_its_ack() -> None:
    """Acked but not recorded, it was dead-lettered again after a restart (a duplicate
    on the dead-letter subject once its message id had left the duplicate window)."""
    writer = IdleWriter()
    svc = dead_lettering_sink(writer)
    first = Ackable(Metadata(Sequence(1, 11)), data=b"not arrow")
    second = Ackable(Metadata(Sequence(2, 12)), data=b"not arrow either")
    writer.acked = [first, second]
    for bad in (first, second):
        assert await svc._handle(None, bad) is True  # type: ignore[arg-type]
    assert writer.committed == []  # one record for the batch, not one per message
    await svc._ack_dead_letters()
    assert writer.committed == [12]
    assert (first.acks, second.acks) == (0, 1)  # AckPolicy.ALL: the last covers both


async def test_a_redelivery_after_a_lost_delivery_does_not_hide_the_gap() -> None:
    """Delivery 11 (stream 11) is lost in flight; 12 is a redelivery of stream 5 (its
    ack wait ran out); 13 brings stream 12. Counting 12 as the next would take 12 and
    later drop stream 11 as seen: lost."""
    svc = sink(last_seen=10)
    svc._last_dseq = 10
    assert await svc._handle(None, delivery(consumer=12, stream=5)) is True  # type: ignore[arg-type]
    assert await svc._handle(None, delivery(consumer=13, stream=12)) is False  # type: ignore[arg-type]
    assert svc._last_seen == 10


class FailingWriter(NoWriter):
    pending = True

    def check(self, table: pa.Table) -> None:
        pass

    async def add(self, delivery: Any) -> None:
        raise OSError("disk gone")


async def test_a_message_the_writer_fails_to_take_is_never_committed() -> None:
    """The final commit on the way out must not cover it (nor anything after)."""
    svc = service.SinkService(
        FailingWriter(),  # type: ignore[arg-type]
        streams.ConnectOptions(),
        service.ServiceConfig(namespace="ml", agent="cartpole", http_port=None),
    )
    svc._last_seen, svc._last_dseq = 10, 10
    good = Ackable(Metadata(Sequence(11, 11)), data=trajectory_message())
    good.headers = {streams.HEADER_SCHEMA_VERSION: "1"}
    with pytest.raises(OSError, match="disk gone"):
        await svc._handle(None, good)  # type: ignore[arg-type]
    assert svc._last_seen == 10
    assert svc._commit_failed
    await svc._final_commit()  # commits nothing, says why
    assert good.acks == 0


def trajectory_message() -> bytes:
    sink_ = pa.BufferOutputStream()
    batch = trajectories.batch(1, 0)
    with pa.ipc.new_stream(sink_, batch.schema) as w:
        w.write_batch(batch)
    return bytes(sink_.getvalue().to_pybytes())


def test_running_out_of_memory_is_not_the_messages_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    """pyarrow's ArrowMemoryError is an ArrowException too: it must not dead-letter."""

    def no_memory(*args: Any) -> Any:
        raise pa.ArrowMemoryError("malloc of 1 GiB failed")

    monkeypatch.setattr(pa.ipc, "open_stream", no_memory)
    with pytest.raises(MemoryError):
        service.decode(trajectory_message(), {streams.HEADER_SCHEMA_VERSION: "1"})


class Holding(NoWriter):
    def __init__(self, hold: float) -> None:
        self.hold_seconds = hold


def test_the_ack_wait_stays_above_what_a_writer_holds() -> None:
    def ack_wait(hold: float) -> float:
        svc = service.SinkService(
            Holding(hold),  # type: ignore[arg-type]
            streams.ConnectOptions(),
            service.ServiceConfig(namespace="ml", agent="cartpole", http_port=None),
        )
        return svc.ack_wait_seconds()

    assert ack_wait(0.2) == 600.0
    assert ack_wait(3600.0) == 4560.0  # a file open for an hour


class Idle:
    """A pull subscription with nothing to deliver."""

    async def fetch(self, batch: int, **kwargs: float) -> list[Any]:
        await asyncio.sleep(0.01)
        raise TimeoutError


@dataclass
class Connection:
    stats: dict[str, int] = field(default_factory=lambda: {"reconnects": 0})


async def test_a_reconnect_re_positions_the_consumer_even_with_nothing_after_it() -> None:
    """Deliveries in flight when the connection dropped are lost; at the stream's tail
    no later delivery shows the gap, and the ack wait is long: start again at once."""
    svc = sink(last_seen=10)
    nc = Connection()
    svc._nc = nc  # type: ignore[assignment]
    svc._reconnects = svc._reconnect_count()
    out: asyncio.Queue[Any] = asyncio.Queue()
    fetching = asyncio.create_task(svc._fetch_loop(Idle(), out))  # type: ignore[arg-type]
    await asyncio.sleep(0.1)
    assert out.empty()  # idle: nothing to do
    nc.stats["reconnects"] += 1
    assert await asyncio.wait_for(out.get(), 5) is None  # re-position
    await asyncio.wait_for(fetching, 5)


class LosesOneCancel(cancels.LosesOneCancel):
    """A pull subscription whose fetch once swallows a cancel, as nats-py's fetch does on
    Python 3.11 when a reply and the cancel land together."""

    def __init__(self) -> None:
        super().__init__()
        self.fetches = 0

    async def fetch(self, batch: int, **kwargs: float) -> list[Any]:
        self.fetches += 1
        await self.wait(0.2)
        raise TimeoutError

    async def unsubscribe(self) -> None:
        pass


class Quiet(NoWriter):
    pending = False

    async def probe(self) -> None:
        pass


async def test_stopping_ends_the_fetch_even_when_a_cancel_is_lost() -> None:
    """A sink on SIGTERM stops its fetch loop; a fetch that lost the cancel fetched on
    forever, and the sink never exited (nor, when re-positioning, took anything more)."""
    svc = sink(last_seen=10)
    svc.writer = Quiet()  # type: ignore[assignment]
    sub = LosesOneCancel()

    async def nothing(*args: Any) -> None:
        pass

    async def position(js: Any) -> LosesOneCancel:
        return sub

    svc._open_stream = nothing  # type: ignore[method-assign]
    svc._position = position  # type: ignore[method-assign,assignment]
    consuming = asyncio.create_task(svc._consume(None))  # type: ignore[arg-type]
    await asyncio.sleep(0.1)
    assert sub.fetches == 1
    svc.stopping.set()  # what SIGTERM does
    # Not wait_for: its own cancel at the timeout would end the loop and hide the hang.
    await asyncio.wait({consuming}, timeout=10)
    try:
        assert consuming.done(), "the sink still waits for its fetch loop"
    finally:
        await aio.cancel_and_wait(consuming)
    assert sub.lost
    consuming.result()


class StorageDown(NoWriter):
    """A writer holding data whose every commit fails as with Postgres down."""

    pending = True
    pipelined = False

    def __init__(self) -> None:
        self.attempts = 0

    def seal(self, last_seq: int) -> int:
        return last_seq

    async def commit(self, sealed: object) -> None:
        self.attempts += 1
        raise OSError("connection refused")


async def test_the_final_commit_gives_up_within_its_budget_and_acks_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """On SIGTERM with the database down the commit is retried, but only until the budget
    is spent: the pod must exit within its grace period, and what was not committed stays
    unacked (it comes again after the restart)."""
    monkeypatch.setattr(service, "FINAL_COMMIT_SECONDS", 0.5)
    writer = StorageDown()
    svc = service.SinkService(
        writer,  # type: ignore[arg-type]
        streams.ConnectOptions(),
        service.ServiceConfig(
            namespace="ml",
            agent="cartpole",
            http_port=None,
            retry=streams.Backoff(initial=0.05, maximum=0.05),
        ),
    )
    taken = Ackable(Metadata(Sequence(11, 11)))
    svc._last_seen, svc._last_msg = 11, taken  # type: ignore[assignment]
    svc.stopping.set()
    start = time.monotonic()
    failed = await asyncio.wait_for(svc._final_commit(), 10)
    assert 0.5 <= time.monotonic() - start < 2.0
    assert failed is not None  # `run` ends with it: exit 2, not a clean 0
    assert writer.attempts > 3  # retried while the budget lasted
    assert taken.acks == 0
    assert "final commit failed" in caplog.text


class RecordingWriter(IdleWriter):
    """Takes good messages (recording their ids) and commits whatever is added."""

    def __init__(self, written: list[str]) -> None:
        super().__init__()
        self.added: list[str | None] = []
        self.committed_ids = message_ids.MessageIds()
        for msg_id in written:
            self.committed_ids.add(msg_id, 0.0)

    @property
    def pending(self) -> bool:  # type: ignore[override]
        return False  # the test commits by hand

    def check(self, table: pa.Table) -> None:
        pass

    async def add(self, delivery: service.Delivery) -> None:
        self.added.append(delivery.msg_id)


async def test_a_copy_of_a_message_written_before_is_skipped_and_recorded() -> None:
    """JetStream stores a retry twice when its duplicate window passed since the first
    copy (a lost ack, then a long outage): the sink drops the copy by its message id,
    whether the first was written before a restart or earlier in this run."""
    writer = RecordingWriter(written=["pod-1-a-1"])  # committed before a restart
    svc = dead_lettering_sink(writer)
    svc._ids = writer.committed_ids.copy()  # as `run` does after `open`
    table = pa.Table.from_batches([trajectories.batch(1, 0)])
    out = pa.BufferOutputStream()
    with pa.ipc.new_stream(out, table.schema) as w:
        w.write_table(table)
    data = out.getvalue().to_pybytes()

    def msg(dseq: int, seq: int, msg_id: str | None) -> Ackable:
        headers = {streams.HEADER_SCHEMA_VERSION: "1"}
        if msg_id is not None:
            headers[streams.HEADER_MSG_ID] = msg_id
            headers[streams.HEADER_PRODUCER] = msg_id.rsplit("-", 1)[0]
        when = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
        return Ackable(Metadata(Sequence(dseq, seq), timestamp=when), data=data, headers=headers)

    def foreign(dseq: int, msg_id: str) -> Ackable:
        m = msg(dseq, dseq + 10, None)
        m.headers[streams.HEADER_MSG_ID] = msg_id
        return m

    batch = [
        msg(1, 11, "pod-1-a-1"),  # a copy of one committed before
        msg(2, 12, "pod-1-a-2"),
        msg(3, 13, "pod-1-a-2"),  # a copy of one taken in this run
        msg(4, 14, None),  # no id: never taken for a copy
        msg(5, 15, None),
        foreign(6, "pod-1-a-2"),  # the same id, not from the runtime's publisher
        msg(7, 17, "pod-1-a-3"),
        msg(8, 18, "pod-1-a-1"),  # a copy after the last data message
    ]
    for m in batch:
        assert await svc._handle(None, m) is True  # type: ignore[arg-type]
    assert writer.added == ["pod-1-a-2", None, None, None, "pod-1-a-3"]
    # Taken, not committed: the writer's record must not have them (its next commit
    # would store them, and after a crash they would be skipped: lost).
    assert ["pod-1-a-2" in writer.committed_ids, "pod-1-a-3" in writer.committed_ids] == [
        False,
        False,
    ]
    assert svc.metrics.duplicates._value.get() == 3
    assert svc._last_seen == 18
    # Like a dead letter at the tail: recorded by a commit before its ack.
    assert writer.committed == []
    await svc._ack_dead_letters()
    assert writer.committed == [18]
    assert batch[-1].acks == 1


class OriginWriter(NoWriter):
    """A writer whose stored origin is the stream's, as before a NATS node crash."""

    def __init__(self, origin: str) -> None:
        self._origin = origin

    async def origin(self) -> str:
        return self._origin


class OneStream:
    """JetStream as far as `_check_stream` asks: the Agent's stream, ending at `last`."""

    def __init__(self, last: int, created: dt.datetime, first: int = 1) -> None:
        self.info = nats.js.api.StreamInfo(
            config=streams.stream_config("ml", "cartpole"),
            state=nats.js.api.StreamState(
                messages=last - first + 1,
                bytes=0,
                first_seq=first,
                last_seq=last,
                consumer_count=0,
            ),
            created=created,
        )

    async def stream_info(self, name: str) -> nats.js.api.StreamInfo:
        return self.info


async def _checked_at_12(last: int, first: int = 1) -> service.SinkService:
    """A sink that committed through sequence 12 of the stream it finds again (the same
    origin), now holding `first`..`last`, after it checked the stream."""
    created = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    js = OneStream(last, created, first)
    svc = service.SinkService(
        OriginWriter(f"{js.info.config.name}@{created.isoformat()}"),  # type: ignore[arg-type]
        streams.ConnectOptions(),
        service.ServiceConfig(namespace="ml", agent="cartpole", http_port=None),
    )
    svc._last_seen = 12
    await svc._check_stream(js)  # type: ignore[arg-type]
    return svc


@pytest.mark.parametrize(("last", "lost"), [(20, False), (7, True)])
async def test_a_stream_ending_before_the_position_is_said_to_have_lost_its_tail(
    last: int, lost: bool, caplog: pytest.LogCaptureFixture
) -> None:
    svc = await _checked_at_12(last)
    counted = svc.metrics.errors.labels("arrow", "stream-tail-lost")._value.get()
    assert counted == (1 if lost else 0)
    assert ("NATS lost its tail; new messages numbered 8-12 are skipped" in caplog.text) is lost
    assert svc._last_seen == 12  # the same stream: the position stays


@pytest.mark.parametrize(("first", "lost"), [(13, False), (1, False), (16, True)])
async def test_a_stream_whose_limits_discarded_unread_messages_says_so(
    first: int, lost: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """maxAge (or a size bound) removed messages after the position while the sink was
    down: the consumer starts at the first one left, and the gap is said, not silent."""
    svc = await _checked_at_12(30, first)
    counted = svc.metrics.errors.labels("arrow", "stream-head-expired")._value.get()
    assert counted == (1 if lost else 0)
    said = "its limits discarded messages 13-15 before this sink read them"
    assert (said in caplog.text) is lost
    assert svc._last_seen == 12


async def test_messages_discarded_while_the_sink_runs_are_said_lost_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A running sink that falls behind: the consumer skips what the stream's limits
    discarded, with no gap in its own sequence. A jump of the stream sequence is
    checked against the stream's first sequence; each lost range is said once."""
    svc = await _checked_at_12(30, first=16)  # 13-15 found at the positioning
    counted = svc.metrics.errors.labels("arrow", "stream-head-expired")
    assert counted._value.get() == 1
    js = OneStream(40, dt.datetime(2026, 11, 1, tzinfo=dt.UTC), first=25)
    svc._last_seen = 16
    await svc._check_discarded(js, 26)  # type: ignore[arg-type]
    assert counted._value.get() == 2
    assert "its limits discarded messages 17-24 before this sink read them" in caplog.text
    # A jump over messages still in the stream (a dead letter between): nothing lost.
    svc._last_seen = 30
    await svc._check_discarded(js, 32)  # type: ignore[arg-type]
    # Taken again after a rewind: the range said before is not said again.
    svc._last_seen = 12
    await svc._check_discarded(js, 26)  # type: ignore[arg-type]
    assert counted._value.get() == 2
    assert caplog.text.count("before this sink read them") == 2


async def test_lag_follows_the_stream_while_nothing_is_delivered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A commit retried for an hour (Postgres down) holds up the fetching: the lag must
    grow with the stream, not stay at its last delivery's value."""
    monkeypatch.setattr(service, "LAG_REFRESH_SECONDS", 0.05)

    class Consumer:
        """The sink's consumer: 2,000 of its subject's messages not delivered (the
        stream's dead letters beside them are not its own)."""

        async def consumer_info(self, stream: str, durable: str) -> Any:
            assert durable == "relayrl-sink-arrow"
            return nats.js.api.ConsumerInfo(
                name=durable, stream_name=stream, config=None, created=None, num_pending=2000
            )

    js = Consumer()
    svc = sink(last_seen=10)
    svc.metrics.lag.set(0)  # what the last delivery said
    follow = asyncio.create_task(svc._follow_lag(js))  # type: ignore[arg-type]
    try:
        for _ in range(100):
            if svc.metrics.lag._value.get() == 2000:
                break
            await asyncio.sleep(0.02)
        assert svc.metrics.lag._value.get() == 2000
    finally:
        await aio.cancel_and_wait(follow)
