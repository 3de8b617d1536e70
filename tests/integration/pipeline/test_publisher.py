"""The NATS publisher against a real nats-server: packing, headers, dedup, backpressure."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from pathlib import Path

import nats
import pyarrow as pa
import pytest
from nats.aio.msg import Msg

from relayrl_runtime import streams
from relayrl_runtime.transport import publisher
from support import natsserver, trajectories
from support.pipeline import wait_until

SUBJECT = streams.trajectories_subject("default", trajectories.AGENT)
STREAM = streams.stream_name("default", trajectories.AGENT)


def _publisher(url: str, **kw: int | float) -> publisher.NatsPublisher:
    cfg = publisher.PublisherConfig(namespace="default", agent=trajectories.AGENT, **kw)  # type: ignore[arg-type]
    return publisher.NatsPublisher(streams.ConnectOptions(servers=(url,)), cfg)


async def _stream_messages(url: str, **auth: str) -> list[Msg]:
    nc = await nats.connect(url, **auth)
    try:
        js = nc.jetstream()
        info = await js.stream_info(STREAM)
        sub = await js.pull_subscribe(SUBJECT, durable=None, stream=STREAM)
        out: list[Msg] = []
        while len(out) < info.state.messages:
            out += await sub.fetch(min(256, info.state.messages - len(out)), timeout=5)
        return out
    finally:
        await nc.close()


def _stored_steps(msgs: list[Msg]) -> pa.Table:
    """The steps the messages hold, sorted as `trajectories.sort` sorts."""
    return trajectories.sort(pa.concat_tables(pa.ipc.open_stream(m.data).read_all() for m in msgs))


async def test_packs_whole_trajectories_with_headers(nats_server: natsserver.NatsServer) -> None:
    pub = _publisher(nats_server.url, max_message_bytes=128 << 10)
    pub.start()
    batches = [trajectories.batch(7, i) for i in range(40)]
    for b in batches:
        pub.write(b)
    # One batch bigger than a message: split at trajectory ends.
    big = trajectories.batch(7, 40, trajectories=40, length=50)
    pub.write(big)
    pub.close()

    msgs = await _stream_messages(nats_server.url)
    steps = sum(b.num_rows for b in batches) + big.num_rows
    assert sum(int((m.headers or {})[streams.HEADER_STEPS]) for m in msgs) == steps
    assert len(msgs) < 41, "several trajectories go in one message"
    ids = {(m.headers or {})[streams.HEADER_MSG_ID] for m in msgs}
    assert len(ids) == len(msgs)
    tables = []
    for m in msgs:
        assert len(m.data) <= 128 << 10
        table = pa.ipc.open_stream(m.data).read_all()
        tables.append(table)
        ends = table.column("terminated").to_numpy() | table.column("truncated").to_numpy()
        assert ends[-1], "a message ends with a whole trajectory"
        assert int((m.headers or {})[streams.HEADER_TRAJECTORIES]) == int(ends.sum())
        assert (m.headers or {})[streams.HEADER_SCHEMA_VERSION] == "1"
        pv = table.column("policy_version").to_numpy()
        assert int((m.headers or {})[streams.HEADER_POLICY_MIN]) == pv.min()
        assert int((m.headers or {})[streams.HEADER_POLICY_MAX]) == pv.max()
    got = trajectories.sort(pa.concat_tables(tables))
    want = trajectories.sort(pa.Table.from_batches([*batches, big]))
    assert got.equals(want)


async def test_stream_drops_a_resent_message_id(nats_server: natsserver.NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await streams.ensure_stream(js, streams.stream_config("default", trajectories.AGENT))
        headers = {streams.HEADER_MSG_ID: "pod-0-abc-1"}
        first = await js.publish(SUBJECT, b"x", headers=headers)
        again = await js.publish(SUBJECT, b"x", headers=headers)
        assert not first.duplicate
        assert again.duplicate
        assert again.seq == first.seq
        info = await js.stream_info(STREAM)
        assert info.state.messages == 1
        assert info.config.duplicate_window == pytest.approx(900)
    finally:
        await nc.close()


async def test_ensure_stream_updates_only_a_stream_whose_config_differs(
    nats_server: natsserver.NatsServer,
) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        want = streams.stream_config("default", trajectories.AGENT)
        created = await streams.ensure_stream(js, want)
        # The server's own view of the config (its defaults filled in) matches: a second
        # ensure is a read, not an update.
        assert not streams.config_differs(want, created.config)
        assert not streams.config_differs(want, (await js.stream_info(STREAM)).config)
        longer = streams.stream_config(
            "default",
            trajectories.AGENT,
            settings=streams.StreamSettings(max_age_seconds=3 * 24 * 3600.0),
        )
        assert streams.config_differs(longer, created.config)
        updated = await streams.ensure_stream(js, longer)
        assert updated.config.max_age == pytest.approx(3 * 24 * 3600.0)
        assert not streams.config_differs(longer, (await js.stream_info(STREAM)).config)
    finally:
        await nc.close()


async def test_listing_the_streams_goes_through_every_page(
    nats_server: natsserver.NatsServer,
) -> None:
    """More streams than the server lists a page (256): every one, with its config."""
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        names = [f"LIST_{i:03d}" for i in range(300)]
        for name in names:
            await js.add_stream(name=name, subjects=[f"list.{name}"], storage="memory")
        await js.create_object_store("list-bucket")
        want = streams.stream_config("default", trajectories.AGENT)
        await streams.ensure_stream(js, want)
        have = {c.name: c async for c in streams.iter_stream_configs(js)}
        # A stream as ensure_stream made it is listed as not differing (no update due).
        assert not streams.config_differs(want, have[STREAM])
        assert set(names) <= set(have)
        assert streams.object_store_stream("list-bucket") in have
        assert have["LIST_299"].subjects == ["list.LIST_299"]
        await js.delete_stream("LIST_000")
        assert "LIST_000" not in [c.name async for c in streams.iter_stream_configs(js)]
    finally:
        await nc.close()


async def test_backpressure_while_nats_is_away_then_everything_once(
    nats_server: natsserver.NatsServer,
) -> None:
    nats_server.stop()
    pub = _publisher(nats_server.url, max_message_bytes=64 << 10, max_backlog_bytes=512 << 10)
    pub.start()
    batches = [trajectories.batch(3, i) for i in range(120)]  # ~5 MB, 10x the backlog
    written = 0

    def produce() -> None:
        nonlocal written
        for b in batches:
            pub.write(b)
            written += 1

    writer = threading.Thread(target=produce)
    writer.start()
    await asyncio.sleep(2.0)
    assert writer.is_alive(), "write blocks while the backlog is full"
    blocked_at = written
    assert blocked_at < len(batches)
    assert pub.metrics.backlog_bytes._value.get() <= (512 << 10) + (64 << 10)
    await asyncio.sleep(0.5)
    assert written == blocked_at, "nothing is dropped to make room"

    nats_server.start()
    await asyncio.to_thread(writer.join, 60)
    assert not writer.is_alive()
    pub.close(timeout=60)
    msgs = await _stream_messages(nats_server.url)
    got = _stored_steps(msgs)
    assert got.equals(trajectories.sort(pa.Table.from_batches(batches)))


async def test_a_busy_stream_is_retried_not_a_failure() -> None:
    """nats-server answers 429 when a stream's ingest queue is full (here: 2 messages)."""
    with natsserver.NatsServer(jetstream_config="max_buffered_msgs: 2") as srv:
        pub = _publisher(srv.url, max_message_bytes=256 << 10, max_in_flight=32)
        pub.start()
        batches = [trajectories.batch(8, i, trajectories=32, length=100) for i in range(60)]
        for b in batches:
            pub.write(b)
        pub.close(timeout=120)  # raises if any message was refused
        assert pub.metrics.retries._value.get() > 0, "the server never pushed back"
        msgs = await _stream_messages(srv.url)
    got = _stored_steps(msgs)
    assert got.equals(trajectories.sort(pa.Table.from_batches(batches)))


async def test_a_full_store_is_said_and_waited_out_with_nothing_lost_or_twice(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """nats-server's JetStream store fills up (its max_file_store): publishes are
    answered 503; the publisher says why (/readyz, one warning), keeps every step, and
    stores each once after nats-server comes back with room."""
    with natsserver.NatsServer(jetstream_config="max_file_store: 1MB") as srv:
        pub = _publisher(srv.url, max_message_bytes=64 << 10, max_backlog_bytes=16 << 20)
        pub.start()
        wait_until("connected", lambda: pub.connected, 20)
        batches = [trajectories.batch(6, i) for i in range(60)]  # ~2.5 MB
        for b in batches:
            pub.write(b)
        wait_until("the store full", lambda: "store is full" in (pub.waiting or ""), 30)
        assert (pub.waiting or "").startswith(
            "JetStream refuses messages: insufficient resources (503, 10023); the JetStream"
            " store is full"
        ), pub.waiting
        assert not pub.connected
        assert pub.metrics.store_full._value.get() == 1
        stored = pub.acked_steps
        assert 0 < stored < sum(b.num_rows for b in batches)
        warned = [
            r.getMessage()
            for r in caplog.records
            if r.name == publisher.__name__ and r.levelname == "WARNING"
        ]
        assert len([w for w in warned if "store is full" in w]) == 1, warned

        # Room again: the same store, a larger limit.
        conf = srv.config_file.read_text()
        srv.config_file.write_text(conf.replace("max_file_store: 1MB", "max_file_store: 64MB"))
        srv.restart()
        pub.flush(timeout=60)
        assert pub.waiting is None
        assert pub.metrics.store_full._value.get() == 0
        pub.close(timeout=20)
        msgs = await _stream_messages(srv.url)
    got = _stored_steps(msgs)
    assert got.equals(trajectories.sort(pa.Table.from_batches(batches)))


async def test_a_stream_jetstream_refuses_keeps_the_publisher_not_ready_and_nothing_lost(
    nats_server: natsserver.NatsServer,
) -> None:
    """Another stream holds the Agent's subjects, so its own cannot be made: the
    publisher says so (not ready), publishes on, and makes its stream once the other is
    gone; every message is stored, and the Agent's stream holds those after that."""
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="OTHER", subjects=[SUBJECT])
        pub = _publisher(nats_server.url)
        pub.start()
        wait_until("the refusal", lambda: "refused" in (pub.waiting or ""), 20)
        assert not pub.connected
        assert f"stream {STREAM}: JetStream refused to create or update it" in (pub.waiting or "")
        first = trajectories.batch(1, 0)
        pub.write(first)
        wait_until("the first message stored", lambda: pub.acked_messages == 1, 20)
        assert (pub.waiting or "").startswith(
            f"messages are stored in stream OTHER, not {STREAM}; stream {STREAM}: JetStream"
            " refused to create or update it: nats: BadRequestError: code=400"
        ), pub.waiting
        await js.delete_stream("OTHER")
        wait_until("the stream made", lambda: pub.connected, 20)
        second = trajectories.batch(1, 1)
        pub.write(second)
        pub.close(timeout=20)
        assert pub.acked_messages == 2
    finally:
        await nc.close()
    msgs = await _stream_messages(nats_server.url)
    got = pa.concat_tables(pa.ipc.open_stream(m.data).read_all() for m in msgs)
    assert trajectories.sort(got).equals(trajectories.sort(pa.Table.from_batches([second])))


async def test_close_with_nats_gone_raises_instead_of_dropping(
    nats_server: natsserver.NatsServer,
) -> None:
    pub = _publisher(nats_server.url, ack_timeout=0.5)
    pub.start()
    wait_until("connected", lambda: pub.connected, 20)
    nats_server.stop()
    pub.write(trajectories.batch(1, 0))
    with pytest.raises(Exception, match="not acked"):
        pub.close(timeout=2)


async def test_a_drain_that_ends_with_nats_gone_logs_the_loss_in_one_line(
    nats_server: natsserver.NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """What the drain could not deliver is one error line (messages, steps, bytes), with
    no traceback: NATS away at SIGTERM is expected, and the steps are lost."""
    pub = _publisher(nats_server.url, ack_timeout=0.5, max_message_bytes=64 << 10)
    pub.start()
    wait_until("connected", lambda: pub.connected, 20)
    nats_server.stop()
    batches = [trajectories.batch(5, i) for i in range(10)]
    for b in batches:
        pub.write(b)
    pub.drain_by(time.monotonic() + 1)
    with pytest.raises(publisher.UnackedError) as raised:
        pub.close()
    steps = sum(b.num_rows for b in batches)
    assert raised.value.steps == steps
    assert raised.value.messages > 1
    lines = [r for r in caplog.records if r.levelname == "ERROR" and r.name == publisher.__name__]
    assert [r.getMessage() for r in lines] == [
        f"publisher: closed with {raised.value.messages} message(s) holding {steps} steps"
        f" ({raised.value.nbytes} bytes) not acked by the end of the drain: those steps"
        " are lost"
    ]
    assert lines[0].exc_info is None


async def test_token_and_user_password_auth(tmp_path: object) -> None:
    for conf, options in (
        ('authorization { token: "s3cret" }', streams.ConnectOptions(token="s3cret")),
        (
            'authorization { user: "actor", password: "pw" }',
            streams.ConnectOptions(user="actor", password="pw"),
        ),
    ):
        with natsserver.NatsServer(extra_config=conf) as srv:
            opts = streams.ConnectOptions(
                servers=(srv.url,),
                token=options.token,
                user=options.user,
                password=options.password,
            )
            pub = publisher.NatsPublisher(
                opts, publisher.PublisherConfig(namespace="default", agent=trajectories.AGENT)
            )
            pub.start()
            pub.write(trajectories.batch(1, 0))
            pub.close(timeout=20)
            assert pub.acked_steps == 400
            with pytest.raises(streams.ConnectError):
                await streams.connect(streams.ConnectOptions(servers=(srv.url,)), deadline=2)


async def test_messages_packed_for_a_larger_max_payload_are_sent_in_pieces() -> None:
    """Packed while NATS was away, for the configured bound; the server takes less.
    Sent as they were, nats-py would refuse them (or the server close the connection):
    they go in smaller messages, every step once."""
    with natsserver.NatsServer(max_payload=64 << 10) as srv:
        srv.stop()
        pub = _publisher(srv.url, max_message_bytes=1 << 20)
        pub.start()
        batches = [trajectories.batch(5, i) for i in range(60)]  # ~2.5 MB
        for b in batches:
            pub.write(b)
        srv.start()
        pub.close(timeout=60)
        msgs = await _stream_messages(srv.url)
        assert max(len(m.data) for m in msgs) <= 64 << 10
        assert _stored_steps(msgs).equals(trajectories.sort(pa.Table.from_batches(batches)))


async def test_the_stream_is_left_as_the_operator_made_it_on_a_server_taking_more() -> None:
    """A server whose max_payload is above the stream's message bound: the publisher's
    messages stay under its own bound, so it leaves the stream's bound alone (else it
    and the operator would each set theirs in turn)."""
    with natsserver.NatsServer(max_payload=32 << 20) as srv:
        nc = await nats.connect(srv.url)
        try:
            js = nc.jetstream()
            want = streams.stream_config("default", trajectories.AGENT)
            await streams.ensure_stream(js, want)
            pub = _publisher(srv.url)
            pub.start()
            batch = trajectories.batch(5, 0)
            pub.write(batch)
            pub.close(timeout=60)
            info = await js.stream_info(STREAM)
            assert info.config.max_msg_size == want.max_msg_size
            assert info.state.messages == 1
            # A publisher configured for larger messages makes room for them.
            big = _publisher(srv.url, max_message_bytes=16 << 20)
            big.start()
            big.write(trajectories.batch(5, 1))
            big.close(timeout=60)
            assert (await js.stream_info(STREAM)).config.max_msg_size == 16 << 20
        finally:
            await nc.close()


# nats-py leaves the socket of a refused reconnect attempt unclosed when it gives the
# connection up; collected later, it warns. Its own, and only here.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_connection_nats_closes_is_replaced_with_the_credentials_read_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A server reload that changes the password closes the old connection (nats-py
    gives up on it: "Authorization Violation"); the Secret mounted beside it changed
    too. The publisher connects again with what the files say now, and loses nothing."""
    creds = tmp_path / "nats-credentials"
    creds.mkdir()
    (creds / streams.SECRET_KEY_USER).write_text("actor")
    (creds / streams.SECRET_KEY_PASSWORD).write_text("first")
    auth = 'authorization {{ user: actor, password: "{}" }}'
    with natsserver.NatsServer(extra_config=auth.format("first")) as srv:
        env = {streams.ENV_NATS_URL: srv.url, streams.ENV_NATS_CREDENTIALS_DIR: str(creds)}
        cfg = publisher.PublisherConfig(
            namespace="default", agent=trajectories.AGENT, max_message_bytes=64 << 10
        )
        pub = publisher.NatsPublisher(lambda: streams.ConnectOptions.from_env(env), cfg)
        pub.start()
        batches = [trajectories.batch(6, i) for i in range(40)]
        for b in batches[:20]:
            pub.write(b)
        pub.flush(timeout=30)

        srv.config_file.write_text(
            srv.config_file.read_text().replace(auth.format("first"), auth.format("second"))
        )
        (creds / streams.SECRET_KEY_PASSWORD).write_text("second")
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGHUP)  # nats-server reloads its config
        wait_until(
            "the publisher to see its connection closed",
            lambda: "NATS closed the connection" in caplog.text,
            timeout=20,
        )
        for b in batches[20:]:
            pub.write(b)
        pub.close(timeout=30)
        assert pub.failure == f"publisher to {SUBJECT} is closed"  # closed, not failed

        msgs = await _stream_messages(srv.url, user="actor", password="second")
        assert _stored_steps(msgs).equals(trajectories.sort(pa.Table.from_batches(batches)))


@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_credentials_rotated_under_load_are_read_again_and_nothing_is_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As above, but with writes going on throughout: nats-py holds publishes made while
    it reconnects, and its close() writes them to the refused socket, which fails before
    its closed callback runs. The connection counts as closed all the same; the next
    one, with the credentials read again, delivers everything."""
    creds = tmp_path / "nats-credentials"
    creds.mkdir()
    (creds / streams.SECRET_KEY_USER).write_text("actor")
    (creds / streams.SECRET_KEY_PASSWORD).write_text("first")
    auth = 'authorization {{ user: actor, password: "{}" }}'
    with natsserver.NatsServer(extra_config=auth.format("first")) as srv:
        env = {streams.ENV_NATS_URL: srv.url, streams.ENV_NATS_CREDENTIALS_DIR: str(creds)}
        cfg = publisher.PublisherConfig(
            namespace="default",
            agent=trajectories.AGENT,
            max_message_bytes=64 << 10,
            # Unacked publishes are sent again soon: while nats-py reconnects they wait
            # in its buffer, where close() finds them.
            ack_timeout=0.5,
        )
        pub = publisher.NatsPublisher(lambda: streams.ConnectOptions.from_env(env), cfg)
        pub.start()
        written: list[pa.RecordBatch] = []
        stop = threading.Event()

        def write() -> None:
            for i in range(4000):  # ~20 s at most; stopped well before
                if stop.is_set():
                    return
                b = trajectories.batch(6, i)
                pub.write(b)
                written.append(b)
                stop.wait(0.005)

        writer = threading.Thread(target=write, name="writer")
        writer.start()
        try:
            wait_until("some messages acked", lambda: pub.acked_messages > 5, timeout=20)
            srv.config_file.write_text(
                srv.config_file.read_text().replace(auth.format("first"), auth.format("second"))
            )
            (creds / streams.SECRET_KEY_PASSWORD).write_text("second")
            assert srv.proc is not None
            srv.proc.send_signal(signal.SIGHUP)
            wait_until(
                "the publisher to see its connection closed",
                lambda: "NATS closed the connection" in caplog.text,
                timeout=20,
            )
            wait_until("a new connection", lambda: pub.connected, timeout=20)
            acked = pub.acked_messages
            wait_until("acks on the new connection", lambda: pub.acked_messages > acked, 20)
        finally:
            stop.set()
            writer.join(30)
            pub.close(timeout=30)
        assert pub.failure == f"publisher to {SUBJECT} is closed"  # closed, not failed
        assert "never retrieved" not in caplog.text

        msgs = await _stream_messages(srv.url, user="actor", password="second")
        assert _stored_steps(msgs).equals(trajectories.sort(pa.Table.from_batches(written)))


async def test_a_deleted_stream_is_made_again(
    nats_server: natsserver.NatsServer,
) -> None:
    pub = _publisher(nats_server.url, max_message_bytes=64 << 10)
    pub.start()
    batches = [trajectories.batch(8, i) for i in range(20)]
    for b in batches[:10]:
        pub.write(b)
    pub.flush(timeout=30)
    nc = await nats.connect(nats_server.url)
    try:
        await nc.jetstream().delete_stream(STREAM)
    finally:
        await nc.close()
    for b in batches[10:]:
        pub.write(b)
    pub.flush(timeout=30)
    assert pub.connected
    pub.close(timeout=30)
    msgs = await _stream_messages(nats_server.url)
    got = _stored_steps(msgs)
    assert got.equals(trajectories.sort(pa.Table.from_batches(batches[10:])))


async def test_connecting_after_attempts_that_timed_out_keeps_the_connection(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Each attempt that times out is closed; its close must not end the connection
    that finally works."""
    monkeypatch.setattr(publisher, "_CONNECT_SECONDS", 1.0)
    with natsserver.NatsServer() as srv:
        srv.stop()
        cfg = publisher.PublisherConfig(
            namespace="default", agent=trajectories.AGENT, max_message_bytes=64 << 10
        )
        pub = publisher.NatsPublisher(lambda: streams.ConnectOptions(servers=(srv.url,)), cfg)
        pub.start()
        batches = [trajectories.batch(4, i) for i in range(10)]
        for b in batches:
            pub.write(b)
        await asyncio.sleep(2.5)  # two attempts time out
        srv.start()
        pub.flush(timeout=30)
        await asyncio.sleep(1.0)
        pub.close(timeout=30)
        assert "NATS closed the connection" not in caplog.text
        msgs = await _stream_messages(srv.url)
        assert sum(int((m.headers or {})[streams.HEADER_STEPS]) for m in msgs) == sum(
            b.num_rows for b in batches
        )
