"""The publisher's I/O loop on the way out: its send loop ends even when a cancel is lost.

nats-py waits for acks inside `asyncio.wait_for`, which on Python 3.11 can swallow a
cancel that lands together with the awaited result (tests/unit/runtime/test_aio.py sets
that race up). A send loop that lost its one cancel would keep running, and close()
would wait for the I/O thread until its 30 s join gave up.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any

import pytest

from relayrl_runtime import streams
from relayrl_runtime.sinks import base
from relayrl_runtime.transport import publisher
from support import cancels, trajectories
from support.natsserver import free_port


class Connection:
    def __init__(self) -> None:
        self.closed = False

    def jetstream(self, **kwargs: Any) -> object:
        return object()

    async def flush(self, **kwargs: float) -> None:
        pass

    async def close(self) -> None:
        self.closed = True


async def test_stopping_ends_a_send_loop_that_loses_a_cancel() -> None:
    # No stream to make: the connection is a stand-in, with no JetStream behind it.
    pub = publisher.NatsPublisher(
        streams.ConnectOptions(),
        publisher.PublisherConfig(namespace="ml", agent="cartpole", create_stream=False),
    )
    nc = Connection()
    sender = cancels.LosesOneCancel()

    async def connect(closed: asyncio.Event) -> Connection:
        return nc

    pub._connect = connect  # type: ignore[method-assign]
    pub._send_loop = sender.run  # type: ignore[method-assign,assignment]
    pub._stop = asyncio.Event()
    main = asyncio.create_task(pub._main())
    await asyncio.sleep(0.2)
    pub._stop.set()
    await asyncio.wait_for(main, 10)
    assert sender.lost
    assert nc.closed


def test_close_with_a_full_backlog_and_nats_away_raises_in_its_timeout() -> None:
    """The pending message joins a full backlog at close (by one message over the
    bound): close's wait for acks is the only one, and it ends at its timeout."""
    pub = publisher.NatsPublisher(
        streams.ConnectOptions(servers=(f"nats://127.0.0.1:{free_port()}",)),
        publisher.PublisherConfig(
            namespace="ml",
            agent="cartpole",
            max_message_bytes=64 << 10,
            max_backlog_bytes=64 << 10,
        ),
    )
    pub.start()
    blocked = threading.Event()

    def produce() -> None:
        with contextlib.suppress(base.SinkError):  # closed under it
            for i in range(100):
                pub.write(trajectories.batch(9, i, trajectories=4, length=50))
            blocked.set()  # never: the backlog fills first

    writer = threading.Thread(target=produce, daemon=True)
    writer.start()
    time.sleep(1.0)
    assert writer.is_alive()  # the writer waits for room
    assert not blocked.is_set()
    with pub._lock:
        # One message in the backlog, and pending behind it more than the room left.
        assert len(pub._backlog) == 1
        pending = sum(b.nbytes for b in pub._pending)
        assert pub._backlog_bytes + pending > pub.config.max_backlog_bytes
    started = time.monotonic()
    with pytest.raises(base.SinkError, match="not acked after 2"):
        pub.close(timeout=2)
    assert time.monotonic() - started < 10
    writer.join(5)
    assert not writer.is_alive()


async def test_a_send_loop_that_fails_ends_the_publisher_at_once() -> None:
    """Not at shutdown only: writers learn it (the runtime exits) while it happens."""
    pub = publisher.NatsPublisher(
        streams.ConnectOptions(), publisher.PublisherConfig(namespace="ml", agent="cartpole")
    )
    nc = Connection()

    async def connect(closed: asyncio.Event) -> Connection:
        return nc

    async def broken(js: object) -> None:
        raise RuntimeError("the encoder broke")

    pub._connect = connect  # type: ignore[method-assign,assignment]
    pub._send_loop = broken  # type: ignore[method-assign,assignment]
    pub._stop = asyncio.Event()
    with pytest.raises(RuntimeError, match="the encoder broke"):
        await asyncio.wait_for(pub._main(), 5)
    assert nc.closed


def test_a_drain_lets_blocked_writers_go_and_close_ends_at_its_deadline() -> None:
    """NATS away, the backlog full, routers waiting in `write`: the runtime's drain
    must be able to stop them (they are joined before the sink closes), and close
    then says what was not acked by the drain's end."""
    pub = publisher.NatsPublisher(
        streams.ConnectOptions(servers=(f"nats://127.0.0.1:{free_port()}",)),
        publisher.PublisherConfig(
            namespace="ml", agent="cartpole", max_message_bytes=64 << 10, max_backlog_bytes=64 << 10
        ),
    )
    pub.start()
    done = threading.Event()

    def produce() -> None:
        for i in range(40):
            pub.write(trajectories.batch(9, i, trajectories=4, length=50))
        done.set()

    writer = threading.Thread(target=produce, daemon=True)
    writer.start()
    time.sleep(1.0)
    assert not done.is_set()  # waiting for room
    pub.drain_by(time.monotonic() + 2)
    assert done.wait(5), "the writer still waits after the drain began"
    started = time.monotonic()
    with pytest.raises(base.SinkError, match="not acked"):
        pub.close()
    assert time.monotonic() - started < 5
