"""The sink's delivery bookkeeping: a gap in consumer sequences re-positions the consumer.

Driven without NATS: `_handle` decides from a delivery's sequences before it decodes
anything, and a gap must be seen even on the first delivery of a fresh consumer (the
fault tests with a real nats-server cover the re-positioning itself).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from relayrl_runtime import streams
from relayrl_runtime.sinks import service


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
    """A writer holding nothing: every delivery here is dead-lettered."""

    pending = False


@dataclass
class Ackable(Delivery):
    acks: int = 0

    async def ack(self) -> None:
        self.acks += 1


async def test_a_dead_letter_during_a_commit_is_acked_once_the_commit_is_done() -> None:
    """Else nothing acks it (no later message), and it comes back every ack-wait."""
    svc = service.SinkService(
        IdleWriter(),  # type: ignore[arg-type]
        streams.ConnectOptions(),
        service.ServiceConfig(namespace="ml", agent="cartpole", http_port=None),
    )
    svc._last_seen = 10

    async def dead_letter(*args: Any) -> None:
        pass

    svc._dead_letter = dead_letter  # type: ignore[method-assign]
    running = asyncio.get_running_loop().create_future()

    async def commit() -> None:
        await running

    svc._inflight = asyncio.create_task(commit())
    bad = Ackable(Metadata(Sequence(1, 11)), data=b"not arrow")
    assert await svc._handle(None, bad) is True  # type: ignore[arg-type]
    assert bad.acks == 0, "acking now would ack the messages the commit holds"
    running.set_result(None)
    await svc._drain_commits()
    await svc._ack_dead_letters()
    assert bad.acks == 1
    await svc._ack_dead_letters()
    assert bad.acks == 1
