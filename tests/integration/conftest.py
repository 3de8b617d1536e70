"""Shared fixtures for integration tests: real servers on free loopback ports.

`nats_server` is a real nats-server with JetStream (`support.natsserver`); a missing
binary fails the test loudly, it never skips.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from support import natsserver


@pytest.fixture
def nats_server() -> Iterator[natsserver.NatsServer]:
    with natsserver.NatsServer() as srv:
        yield srv
