"""The publisher's I/O loop on the way out: its send loop ends even when a cancel is lost.

nats-py waits for acks inside `asyncio.wait_for`, which on Python 3.11 can swallow a
cancel that lands together with the awaited result (tests/unit/runtime/test_aio.py sets
that race up). A send loop that lost its one cancel would keep running, and close()
would wait for the I/O thread until its 30 s join gave up.
"""

from __future__ import annotations

import asyncio
from typing import Any

from relayrl_runtime import streams
from relayrl_runtime.transport import publisher
from support import cancels


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
    pub = publisher.NatsPublisher(
        streams.ConnectOptions(), publisher.PublisherConfig(namespace="ml", agent="cartpole")
    )
    nc = Connection()
    sender = cancels.LosesOneCancel()

    async def connect() -> Connection:
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
