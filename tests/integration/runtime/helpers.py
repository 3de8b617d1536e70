"""Helpers for runtime integration tests: run the real process, poll with deadlines."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

RUNTIME = Path(sys.executable).parent / "relayrl-runtime"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Poll `check` until it returns something truthy, failing after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError:
        return 0, ""


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} not in /metrics")


class RuntimeProcess:
    """`relayrl-runtime run --config FILE` as a real subprocess."""

    def __init__(self, tmp: Path, cfg: dict[str, Any]) -> None:
        self.port = free_port()
        cfg = {**cfg, "server": {"host": "127.0.0.1", "port": self.port}, "logFormat": "json"}
        self.config = tmp / "runtime.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.log = tmp / "runtime.log"
        self._log = self.log.open("wb")
        self.proc = subprocess.Popen(
            [str(RUNTIME), "run", "--config", str(self.config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"runtime exited {self.proc.returncode}:\n{self.logs()}")
            return http_get(self.port, "/readyz")[0] == 200

        wait_for("/readyz", ready, timeout)

    def metrics(self) -> str:
        status, body = http_get(self.port, "/metrics")
        assert status == 200
        return body

    def terminate(self, timeout: float = 60.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._log.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()

    def logs(self) -> str:
        return self.log.read_text(errors="replace")
