"""A NATS outage with large observations: actors block, memory stays bounded, nothing is lost.

The agent's routers feed a real `NatsPublisher` against a real nats-server, which is
stopped while the actors run. The publisher's backlog is bounded in bytes; so is what
waits for the routers (`Agent(queue_bytes=...)`): the steps the actors manage to record
during the outage fit in those bounds (plus the trajectory buffer), then they block. A
drain (SIGTERM) lets the publisher's backlog pass its bound by what the routers held,
no more. Once NATS is back every step is stored.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import numpy as np
import pyarrow as pa
import pytest

from relayrl_runtime import agent as agent_mod
from relayrl_runtime import errors, spec, streams
from relayrl_runtime.actors import pool
from relayrl_runtime.inference import export
from relayrl_runtime.transport import publisher
from support import natsserver
from support.pipeline import wait_until

AGENT = "bigobs"
OBS = 5000  # 20 KB a step
ACTORS = 4
REQUESTS = 1000  # 80 MB of steps in all, far above the bounds below
BACKLOG_BYTES = 4 << 20
QUEUE_BYTES = 4 << 20
MAX_LENGTH = 50


class _Actors:
    """An actor thread stepping `ACTORS` actors until done, or until the agent is shut
    down; `steps` counts the steps recorded."""

    def __init__(self, a: agent_mod.Agent) -> None:
        self.agent = a
        self.steps = 0
        self.thread = threading.Thread(target=self._run, name="actors")
        self.thread.start()

    def _run(self) -> None:
        obs = np.random.default_rng(0).standard_normal((ACTORS, OBS)).astype(np.float32)
        ids = list(range(ACTORS))
        try:
            for t in range(REQUESTS):
                self.agent.request_action(ids, obs, reward=1.0)
                self.steps += ACTORS
                if t % 20 == 19:
                    self.agent.flag_last_action(ids, reward=1.0)
        except errors.AgentClosedError:
            return  # the drain stopped it

    def wait_blocked(self, queued: list[int]) -> None:
        """Until the steps stop for 1.5 s (or the thread ends); samples the bytes
        waiting for the routers into `queued` meanwhile."""
        deadline = time.monotonic() + 60
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline and self.thread.is_alive():
            queued.append(self.agent.router_queue_bytes)
            if self.steps != last:
                last, since = self.steps, time.monotonic()
            elif time.monotonic() - since > 1.5:
                return
            time.sleep(0.02)


@pytest.fixture
def server() -> Iterator[natsserver.NatsServer]:
    with natsserver.NatsServer() as srv:
        yield srv


@pytest.fixture
def pub(server: natsserver.NatsServer) -> Iterator[publisher.NatsPublisher]:
    """A publisher that connected, to a server stopped since."""
    cfg = publisher.PublisherConfig(
        namespace="default", agent=AGENT, max_backlog_bytes=BACKLOG_BYTES, close_seconds=60
    )
    p = publisher.NatsPublisher(streams.ConnectOptions(servers=(server.url,)), cfg)
    p.start()
    try:
        wait_until("the publisher to connect", lambda: p.connected, timeout=20)
        server.stop()
        yield p
    finally:
        if p.failure is None:
            p.close(timeout=30)


@pytest.fixture
def big(tmp_path: Path, pub: publisher.NatsPublisher) -> Iterator[agent_mod.Agent]:
    model_dir = tmp_path / "model"
    export.export_mlp(model_dir, spec.ModelFormat.ONNX, obs_dim=OBS, hidden=(16,))
    a = agent_mod.Agent(
        model_dir,
        actor_count=ACTORS,
        sink=pub,
        name=AGENT,
        max_length=MAX_LENGTH,
        queue_bytes=QUEUE_BYTES,
    )
    try:
        yield a
    finally:
        a.shutdown()


def _bound(a: agent_mod.Agent) -> int:
    """What the steps recorded during the outage may take: the publisher's backlog, the
    routers' queue, one message and one outbox batch beyond them, and the trajectory
    buffer (8 rows of MAX_LENGTH + 1 steps)."""
    step_bytes = pool.record_dtype(a.layout).itemsize
    return (
        BACKLOG_BYTES
        + QUEUE_BYTES
        + (1 << 20)
        + QUEUE_BYTES // 8
        + 8 * (MAX_LENGTH + 1) * step_bytes
    )


async def _stored_steps(url: str) -> pa.Table:
    """The (actor_id, episode_id, step) of every step in the stream."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        stream = streams.stream_name("default", AGENT)
        info = await js.stream_info(stream)
        sub = await js.pull_subscribe(
            streams.trajectories_subject("default", AGENT), durable=None, stream=stream
        )
        tables: list[pa.Table] = []
        while len(tables) < info.state.messages:
            for m in await sub.fetch(min(64, info.state.messages - len(tables)), timeout=5):
                tables.append(
                    pa.ipc.open_stream(m.data).read_all().select(["actor_id", "episode_id", "step"])
                )
        return pa.concat_tables(tables)
    finally:
        await nc.close()


async def _check_stored(url: str, steps: int) -> None:
    """Every step recorded is stored, once."""
    table = await _stored_steps(url)
    assert table.num_rows == steps
    distinct = table.group_by(["actor_id", "episode_id", "step"]).aggregate([])
    assert distinct.num_rows == steps


async def test_actors_block_within_the_byte_bounds_while_nats_is_away(
    server: natsserver.NatsServer, pub: publisher.NatsPublisher, big: agent_mod.Agent
) -> None:
    step_bytes = pool.record_dtype(big.layout).itemsize
    actors = _Actors(big)
    queued: list[int] = []
    try:
        actors.wait_blocked(queued)
        assert actors.thread.is_alive(), "the actors went on: nothing held them back"
        # Nothing recorded is acked: all of it is held, within the bounds.
        held = actors.steps * step_bytes
        assert held <= _bound(big), f"{held} bytes recorded during the outage"
        assert max(queued) <= QUEUE_BYTES
    finally:
        server.start()
        actors.thread.join(60)
    assert not actors.thread.is_alive()
    assert actors.steps == REQUESTS * ACTORS
    big.shutdown()
    await _check_stored(server.url, actors.steps)


async def test_a_drain_during_the_outage_passes_the_backlog_bound_by_the_queue_at_most(
    server: natsserver.NatsServer, pub: publisher.NatsPublisher, big: agent_mod.Agent
) -> None:
    """SIGTERM while NATS is away: the app stops the actors and lets the publisher's
    backlog pass its bound (`drain_by`) so the routers can hand it what they hold; that
    is bounded too. NATS comes back before the drain's end: nothing is lost."""
    actors = _Actors(big)
    stopping = threading.Thread(target=big.shutdown, name="shutdown")
    backlog: list[int] = []

    def routers_done() -> bool:
        backlog.append(pub.backlog_bytes)
        return big.router_scale == 0  # they stop once they handed everything on

    try:
        actors.wait_blocked([])
        assert actors.thread.is_alive(), "the actors went on: nothing held them back"
        pub.drain_by(time.monotonic() + 60)
        stopping.start()
        wait_until("the routers to stop", routers_done, timeout=30)
        assert stopping.is_alive(), "the publisher waits for NATS"
        assert max(backlog) <= _bound(big)
    finally:
        server.start()
        actors.thread.join(60)
        if stopping.is_alive():
            stopping.join(60)
    assert not stopping.is_alive()
    await _check_stored(server.url, actors.steps)
