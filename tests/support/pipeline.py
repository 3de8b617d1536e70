"""Helpers for the trajectory pipeline tests and benchmarks (issue 4): real processes only.

Sinks run as `relayrl-sink` subprocesses and the publishing side as
`tests/integration/pipeline/producer.py` processes, so kill -9, SIGTERM and server
restarts hit them as they would in a pod; readers load what the sinks stored the way a
user would (a hive-partitioned pyarrow dataset, a SQL query).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.dataset as ds

from support import natsserver, trajectories

PRODUCER = Path(__file__).resolve().parents[1] / "integration" / "pipeline" / "producer.py"
BIN = Path(sys.executable).parent
NAMESPACE = "default"
AGENT = trajectories.AGENT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll `check` until it holds; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Proc:
    """A subprocess with its log in a file, stopped for sure at the end."""

    def __init__(self, name: str, cmd: list[str], log_dir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.cmd = cmd
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env
            )
        self.starts += 1

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(
                f"{self.name} ignored SIGTERM for {timeout}s:\n{self.logs()}"
            ) from None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)


class Sink(Proc):
    """A `relayrl-sink` process with its HTTP port."""

    def __init__(
        self,
        kind: str,
        nats_url: str,
        log_dir: Path,
        extra: list[str],
        env: dict[str, str],
        name: str | None = None,
        host: str = "127.0.0.1",
    ):
        """``host`` is its --http-host; "::" (every address) is reached at ::1."""
        self.kind = kind
        self.port = free_port()
        reach = "::1" if host == "::" else host
        self.url = (
            f"http://[{reach}]:{self.port}" if ":" in reach else f"http://{reach}:{self.port}"
        )
        cmd = [
            str(BIN / "relayrl-sink"),
            kind,
            "--namespace",
            NAMESPACE,
            "--agent",
            AGENT,
            "--nats-url",
            nats_url,
            "--http-host",
            host,
            "--http-port",
            str(self.port),
            *extra,
        ]
        super().__init__(name or f"sink-{kind}", cmd, log_dir, env)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()
        except OSError:
            return 0, ""

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            if not self.alive():
                raise AssertionError(f"{self.name} exited:\n{self.logs()}")
            return self.get("/readyz")[0] == 200

        wait_until(f"{self.name} /readyz", ready, timeout)

    def metric(self, name: str) -> float:
        """Sum of a metric's samples from /metrics."""
        status, body = self.get("/metrics")
        assert status == 200, body
        total = 0.0
        for line in body.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total


def start_ready(*sinks: Sink) -> None:
    """Start each sink and wait until it answers ready, in turn."""
    for s in sinks:
        s.start()
        s.wait_ready()


class Pipeline:
    """Starts producers and sinks for one test and tears them down."""

    def __init__(self, nats: natsserver.NatsServer, work: Path, pg_dsn: str | None) -> None:
        self.nats = nats
        self.work = work
        self.pg_dsn = pg_dsn
        self.arrow_dir = work / "arrow"
        self.procs: list[Proc] = []
        self.env = dict(os.environ)
        self.env["PYTHONUNBUFFERED"] = "1"

    def arrow_sink(self, *extra: str, host: str = "127.0.0.1") -> Sink:
        sink = Sink(
            "arrow",
            self.nats.url,
            self.work,
            ["--path", str(self.arrow_dir), *extra],
            self.env,
            self._sink_name("arrow"),
            host,
        )
        self.procs.append(sink)
        return sink

    def postgres_sink(self, *extra: str) -> Sink:
        assert self.pg_dsn is not None
        dsn_file = self.work / "pg-secret" / "dsn"
        dsn_file.parent.mkdir(exist_ok=True)
        dsn_file.write_text(self.pg_dsn + "\n")
        env = dict(self.env)
        # The DSN comes from a mounted-Secret-style file, as in a pod.
        env["RELAYRL_PG_DSN_FILE"] = str(dsn_file)
        sink = Sink(
            "postgres", self.nats.url, self.work, list(extra), env, self._sink_name("postgres")
        )
        self.procs.append(sink)
        return sink

    def _sink_name(self, kind: str) -> str:
        """sink-<kind>, then sink-<kind>-2, ...: each sink's log in a file of its own."""
        n = sum(1 for p in self.procs if isinstance(p, Sink) and p.kind == kind)
        return f"sink-{kind}" if n == 0 else f"sink-{kind}-{n + 1}"

    def producer(self, producer_id: int, *args: str) -> Producer:
        p = Producer(producer_id, self.nats.url, self.work, list(args), self.env)
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            p.stop()


class Producer(Proc):
    """`producer.py`: writes deterministic batches through the NATS publisher."""

    def __init__(
        self, producer_id: int, url: str, log_dir: Path, args: list[str], env: dict[str, str]
    ):
        self.producer_id = producer_id
        self.report = log_dir / f"producer-{producer_id}.json"
        cmd = [
            sys.executable,
            str(PRODUCER),
            "--url",
            url,
            "--producer",
            str(producer_id),
            "--report",
            str(self.report),
            *args,
        ]
        super().__init__(f"producer-{producer_id}", cmd, log_dir, env)

    def result(self, timeout: float = 240.0) -> dict[str, Any]:
        """Wait for the process to finish; its report."""
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not finish:\n{self.logs()}") from None
        assert rc == 0, f"{self.name} exited {rc}:\n{self.logs()}"
        report: dict[str, Any] = json.loads(self.report.read_text())
        return report

    def progress(self) -> int:
        try:
            return int(json.loads(self.report.with_suffix(".progress").read_text())["written"])
        except (FileNotFoundError, ValueError):
            return 0


# --------------------------------------------------------------------- readers


def read_arrow(root: Path, fmt: str = "parquet") -> pa.Table:
    """Everything the Arrow sink committed, as users read it: a hive-partitioned dataset."""
    if not root.exists():
        return trajectories.sort(trajectories.SCHEMA.empty_table())
    dataset = ds.dataset(
        root,
        format="parquet" if fmt == "parquet" else "arrow",
        partitioning="hive",
        exclude_invalid_files=False,
        ignore_prefixes=[".", "_"],
    )
    table = dataset.to_table()
    table = table.drop_columns(["date"]).cast(_with_plain_agent(table.schema))
    return trajectories.sort(table.select(trajectories.SCHEMA.names))


def _with_plain_agent(schema: pa.Schema) -> pa.Schema:
    fields = [
        pa.field("agent", pa.utf8()) if f.name == "agent" else f for f in schema if f.name != "date"
    ]
    return pa.schema(fields)


def arrow_rows(root: Path) -> int:
    if not root.exists():
        return 0
    dataset = ds.dataset(root, format="parquet", partitioning="hive", ignore_prefixes=[".", "_"])
    return int(dataset.count_rows())


def read_postgres(dsn: str, schema: pa.Schema | None = None) -> pa.Table:
    """The steps table as an Arrow table of `schema` (default: the test layout's, agent
    as text), in (episode_id, step) order."""
    if schema is None:
        schema = trajectories.sort(trajectories.SCHEMA.empty_table()).schema
    cols = ", ".join(f'"{n}"' for n in schema.names)
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            f"SELECT {cols} FROM relayrl.steps ORDER BY episode_id, step"
        ).fetchall()
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in schema.names]
    arrays = [
        pa.array(list(values), type=f.type) for values, f in zip(columns, schema, strict=True)
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def postgres_rows(dsn: str) -> int:
    try:
        with psycopg.connect(dsn, connect_timeout=2) as conn:
            row = conn.execute("SELECT count(*) FROM relayrl.steps").fetchone()
    except (psycopg.OperationalError, psycopg.errors.UndefinedTable):
        return 0
    return int(row[0]) if row else 0


def assert_same(got: pa.Table, want: pa.Table, where: str) -> None:
    """Equal in count and content; on failure say what differs."""
    assert got.num_rows == want.num_rows, (
        f"{where}: {got.num_rows} rows, produced {want.num_rows} "
        f"({'lost' if got.num_rows < want.num_rows else 'duplicated'} data)"
    )
    keys = got.select(list(trajectories.KEY))
    assert keys.equals(want.select(list(trajectories.KEY))), (
        f"{where}: different (episode, step) keys"
    )
    for name in want.column_names:
        assert got.column(name).equals(want.column(name)), f"{where}: column {name} differs"
