"""A real nats-server for tests: re-exports :mod:`relayrl_localstack.natsserver`, and
asks a server about an Agent's stream.

The launcher lives in the local stack package so that the demo and the benchmarks
use the same one; tests keep importing ``support.natsserver``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats
import nats.js.errors

from relayrl_localstack.natsserver import (
    NatsServer,
    NatsServerMissingError,
    binary,
    free_port,
)
from relayrl_runtime import streams

__all__ = [
    "NatsServer",
    "NatsServerMissingError",
    "binary",
    "free_port",
    "jetstream",
    "stream_exists",
]

T = TypeVar("T")


def jetstream(url: str, action: Callable[[Any], Awaitable[T]]) -> T:
    """Run `action(JetStream context)` on a connection of its own."""

    async def run() -> T:
        nc = await nats.connect(url)
        try:
            return await action(nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(run())


def stream_exists(url: str, namespace: str, agent: str) -> bool:
    """Whether the server holds the Agent's stream (its default name)."""

    async def check(js: Any) -> bool:
        try:
            await js.stream_info(streams.stream_name(namespace, agent))
        except nats.js.errors.NotFoundError:
            return False
        return True

    return jetstream(url, check)
