"""The real runtime process publishing CartPole trajectories; SIGTERM flushes everything.

`relayrl-runtime run` steps gymnasium CartPole with an ONNX policy and publishes through
the NATS publisher; both sinks consume. After SIGTERM the runtime logs how many env
steps it recorded (all flushed before exit), and the stream, the Arrow files and the
Postgres rows hold exactly those steps, with the same content.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nats
import pyarrow as pa
import pytest
import yaml

from relayrl_runtime import spec, streams
from relayrl_runtime.inference import export
from support import natsserver, pipeline, postgres, trajectories

pytestmark = pytest.mark.slow

RUNTIME = Path(sys.executable).parent / "relayrl-runtime"


def _env_steps(log: str) -> int:
    for line in reversed(log.splitlines()):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "env_steps" in record:
            return int(record["env_steps"])
    raise AssertionError(f"the runtime logged no env_steps:\n{log[-4000:]}")


async def _stream_table(url: str) -> pa.Table:
    """Every trajectory message in the stream, decoded: what the runtime published."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        subject = streams.trajectories_subject(pipeline.NAMESPACE, pipeline.AGENT)
        stream = streams.stream_name(pipeline.NAMESPACE, pipeline.AGENT)
        info = await js.stream_info(stream, subjects_filter=subject)
        total = (info.state.subjects or {}).get(subject, 0)
        sub = await js.pull_subscribe(subject, durable=None, stream=stream)
        tables: list[pa.Table] = []
        while len(tables) < total:
            for m in await sub.fetch(min(64, total - len(tables)), timeout=5):
                tables.append(pa.ipc.open_stream(m.data).read_all())
        return pa.concat_tables(tables)
    finally:
        await nc.close()


def _start_runtime(
    tmp_path: Path, nats_url: str, actors: int, **extra: Any
) -> tuple[subprocess.Popen[bytes], Path]:
    """`relayrl-runtime run` of CartPole with an ONNX policy, publishing to `nats_url`."""
    model = tmp_path / "model"
    export.export_mlp(model, spec.ModelFormat.ONNX, version=1)
    cfg: dict[str, Any] = {
        "agent": pipeline.AGENT,
        "namespace": pipeline.NAMESPACE,
        "actors": actors,
        "model": {"uri": str(model), "format": "onnx"},
        "environment": {"gymnasium": {"id": "CartPole-v1"}},
        "trajectories": {"maxLength": 200, "nats": {"url": nats_url}},
        "server": {"host": "127.0.0.1", "port": pipeline.free_port()},
        "logFormat": "json",
        **extra,
    }
    config = tmp_path / "runtime.yaml"
    config.write_text(yaml.safe_dump(cfg))
    log_path = tmp_path / "runtime.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(RUNTIME), "run", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    return proc, log_path


def test_sigterm_of_the_runtime_flushes_every_step(
    pg_pipeline: pipeline.Pipeline, pg: postgres.PostgresServer, tmp_path: Path
) -> None:
    arrow = pg_pipeline.arrow_sink("--rotate-seconds", "1")
    pgsink = pg_pipeline.postgres_sink()
    for s in (arrow, pgsink):
        s.start()
        s.wait_ready()

    proc, log_path = _start_runtime(tmp_path, pg_pipeline.nats.url, actors=8)
    try:
        pipeline.wait_until(
            "runtime publishing",
            lambda: pipeline.arrow_rows(pg_pipeline.arrow_dir) > 1000,
            90,
        )
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, log_path.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    steps = _env_steps(log_path.read_text())
    assert steps > 1000

    published = trajectories.sort(asyncio.run(_stream_table(pg_pipeline.nats.url)))
    assert published.num_rows == steps, "the stream holds every recorded step, once"
    keys = published.select(["episode_id", "segment", "step"]).to_pylist()
    assert len({tuple(k.values()) for k in keys}) == steps

    pipeline.wait_until("arrow", lambda: pipeline.arrow_rows(pg_pipeline.arrow_dir) >= steps)
    pipeline.wait_until("postgres", lambda: pipeline.postgres_rows(pg.dsn) >= steps)
    for s in (arrow, pgsink):
        assert s.terminate() == 0, s.logs()
    arrow_table = _read_arrow_like(pg_pipeline.arrow_dir, published.schema)
    pipeline.assert_same(arrow_table, published, "arrow")
    pg_table = trajectories.sort(pipeline.read_postgres(pg.dsn, published.schema))
    pipeline.assert_same(pg_table, published, "postgres")


def _read_arrow_like(root: Path, schema: pa.Schema) -> pa.Table:
    import pyarrow.dataset as ds

    table = ds.dataset(root, format="parquet", partitioning="hive").to_table()
    table = table.drop_columns(["date"])
    table = table.set_column(
        table.schema.get_field_index("agent"), "agent", table.column("agent").cast(pa.utf8())
    )
    return trajectories.sort(table.select(schema.names).cast(schema))


def test_a_stream_that_refuses_every_message_stops_the_runtime_with_exit_3(
    nats_server: natsserver.NatsServer, tmp_path: Path
) -> None:
    # A stream that refuses the runtime's messages (here: its size limit cut by hand)
    # is a sink failed for good. The runtime must not go on stepping environments
    # whose trajectories it cannot write: it says why and exits 3.
    stream = streams.stream_name(pipeline.NAMESPACE, pipeline.AGENT)

    async def messages() -> int:
        nc = await nats.connect(nats_server.url)
        try:
            return int((await nc.jetstream().stream_info(stream)).state.messages)
        except nats.js.errors.NotFoundError:
            return 0
        finally:
            await nc.close()

    async def refuse_all() -> None:
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            info = await js.stream_info(stream)
            await js.update_stream(dataclasses.replace(info.config, max_msg_size=64))
        finally:
            await nc.close()

    proc, log_path = _start_runtime(tmp_path, nats_server.url, actors=4, drainSeconds=10)
    try:
        pipeline.wait_until("runtime publishing", lambda: asyncio.run(messages()) > 0, 90)
        asyncio.run(refuse_all())
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    logs = log_path.read_text()
    assert code == 3, logs[-4000:]
    assert "runtime stopping: sink failed" in logs, logs[-4000:]
    assert "maximum" in logs, logs[-4000:]  # the server's reason, passed on


def test_sigterm_while_nats_is_away_says_what_is_lost_in_one_line(tmp_path: Path) -> None:
    """NATS gone for good: the drain ends at drainSeconds with exit 3, and the log says
    once how many steps were not acked (lost), with no traceback and no claim that
    they were flushed late."""
    with natsserver.NatsServer() as srv:
        proc, log_path = _start_runtime(tmp_path, srv.url, actors=2, drainSeconds=4)
        try:
            pipeline.wait_until(
                "the runtime publishing",
                lambda: '"publisher: connected to' in log_path.read_text(),
                90,
            )
            srv.stop()
            time.sleep(2)  # steps recorded while NATS is away
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    logs = log_path.read_text()
    assert code == 3, logs[-4000:]
    assert logs.count("not acked by the end of the drain: those steps are lost") == 1, logs[-4000:]
    assert "flushed late" not in logs, logs[-4000:]
    assert "Traceback" not in logs, logs[-4000:]
