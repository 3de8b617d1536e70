"""A real PostgreSQL server: initdb into a temp dir, run on a free loopback port.

Used by the pipeline's integration tests and benchmarks (issue 4, through
``tests/support/postgres.py``) and by ``relayrl-localstack demo``. The binaries come from
Debian's postgresql package (`hack/system-deps.sh` installs it) under
/usr/lib/postgresql/<major>/bin; a missing install is a loud error, never a skip. As root
(CI, the dev machines) the server runs as the `postgres` system user, which owns the data
directory, because postgres refuses to run as root.

    with relayrl_localstack.postgres.PostgresServer() as pg:
        psycopg.connect(pg.dsn)
        pg.stop(); pg.start()   # a restart keeps the data and the port
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from relayrl_localstack import procs

__all__ = [
    "DATABASE",
    "SUPERUSER",
    "SYSTEM_USER",
    "PostgresMissingError",
    "PostgresServer",
    "bin_dir",
    "free_port",
    "running",
]

# A TCP port free on 127.0.0.1 right now (tests import it from here).
free_port = procs.free_port

SYSTEM_USER = "postgres"
SUPERUSER = "relayrl"
DATABASE = "relayrl"


class PostgresMissingError(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


def bin_dir() -> Path:
    """The newest installed PostgreSQL's bin directory (or $RELAYRL_PG_BIN)."""
    override = os.environ.get("RELAYRL_PG_BIN")
    if override:
        return Path(override)
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    for c in reversed(candidates):
        if (c / "postgres").is_file() and (c / "initdb").is_file():
            return c
    raise PostgresMissingError(
        "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin: "
        "run hack/system-deps.sh (apt-get install postgresql)"
    )


class PostgresServer(procs.ServerProcess):
    """One postgres process with its own data directory; stop/start keep data and port."""

    def __init__(self, port: int | None = None) -> None:
        # Its own dir under /tmp, not pytest's tmp_path: that one is private to root
        # (0700), and the server runs as the postgres user.
        self.base_dir = Path(tempfile.mkdtemp(prefix="relayrl-pg-"))
        self.data_dir = self.base_dir / "pgdata"
        self.socket_dir = self.base_dir / "sock"
        self.log_file = self.base_dir / "postgres.log"
        self.port = port or free_port()
        self.bin = bin_dir()
        self.proc: subprocess.Popen[bytes] | None = None
        self._as_user = _drop_to(SYSTEM_USER) if os.geteuid() == 0 else None

    # ------------------------------------------------------------------ lifecycle

    @property
    def dsn(self) -> str:
        """A libpq connection string for the database."""
        return f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname={DATABASE}"

    @property
    def url(self) -> str:
        """The same as a postgresql:// URL."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{DATABASE}"

    def init(self) -> None:
        """initdb (trust auth on loopback) and create the database."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            pw = pwd.getpwnam(SYSTEM_USER)
            for p in (self.base_dir, self.socket_dir):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        self._run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-instructions",
            ]
        )
        self.start()
        self._run(
            [
                str(self.bin / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                DATABASE,
            ]
        )

    def start(self, timeout: float = 30.0) -> None:
        """Start postgres on the same port and data dir; wait until it accepts connections."""
        if self.proc is not None and self.proc.poll() is None:
            return
        log = open(self.log_file, "ab")  # noqa: SIM115 - the child keeps it open
        try:
            self.proc = subprocess.Popen(
                [
                    str(self.bin / "postgres"),
                    "-D",
                    str(self.data_dir),
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.socket_dir),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "max_connections=50",
                    "-c",
                    "shared_buffers=128MB",
                    # Durability stays on: the sink's exactly-once relies on commit = durable.
                    "-c",
                    "synchronous_commit=on",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=self._as_user,
                start_new_session=True,
            )
        finally:
            log.close()
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}:\n{self.logs()}")
            ready = subprocess.run(
                [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"],
                check=False,
            )
            if ready.returncode == 0:
                return
            time.sleep(0.1)
        raise TimeoutError(f"postgres not ready after {timeout}s:\n{self.logs()}")

    def stop(self, mode: str = "fast", timeout: float = 30.0) -> None:
        """Stop postgres: fast (SIGINT, rollback open transactions) or immediate (SIGQUIT)."""
        sig = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]
        self._end(sig, timeout)

    def kill(self) -> None:
        """SIGKILL the postmaster (a crash); the next start runs crash recovery."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
            # Orphaned backends still hold the shared memory; wait for them to notice.
            pid_file = self.data_dir / "postmaster.pid"
            deadline = time.monotonic() + 10
            while pid_file.exists() and time.monotonic() < deadline:
                with contextlib.suppress(FileNotFoundError):
                    pid_file.unlink()
                time.sleep(0.1)
        self.proc = None

    def __enter__(self) -> PostgresServer:
        self.init()
        return self

    # -------------------------------------------------------------------- helpers

    def _run(self, cmd: list[str]) -> None:
        out = subprocess.run(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=self._as_user,
            check=False,
            cwd=self.base_dir,
        )
        if out.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed ({out.returncode}):\n{out.stdout.decode()}")


def _drop_to(user: str) -> Callable[[], None]:
    pw = pwd.getpwnam(user)

    def demote() -> None:
        os.setgid(pw.pw_gid)
        os.setgroups([])
        os.setuid(pw.pw_uid)
        os.environ["HOME"] = pw.pw_dir

    return demote


@contextlib.contextmanager
def running() -> Iterator[PostgresServer]:
    """A started server, stopped and cleaned up on exit."""
    server = PostgresServer()
    server.init()
    try:
        yield server
    finally:
        server.close()
