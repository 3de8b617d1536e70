"""Fixtures for the trajectory pipeline tests (issue 4): real servers and processes only.

nats-server (JetStream, file storage) and PostgreSQL run on free loopback ports, started
here; the helpers (sink and producer processes, readers) are in `support.pipeline`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from support import natsserver, pipeline, postgres


@pytest.fixture
def nats_server() -> Iterator[natsserver.NatsServer]:
    with natsserver.NatsServer() as srv:
        yield srv


@pytest.fixture
def pg() -> Iterator[postgres.PostgresServer]:
    with postgres.PostgresServer() as server:
        yield server


@pytest.fixture
def arrow_pipeline(
    nats_server: natsserver.NatsServer, tmp_path: Path
) -> Iterator[pipeline.Pipeline]:
    p = pipeline.Pipeline(nats_server, tmp_path, None)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def pg_pipeline(
    nats_server: natsserver.NatsServer, pg: postgres.PostgresServer, tmp_path: Path
) -> Iterator[pipeline.Pipeline]:
    p = pipeline.Pipeline(nats_server, tmp_path, pg.dsn)
    try:
        yield p
    finally:
        p.close()
