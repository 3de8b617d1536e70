"""Helpers for runtime integration tests: run the real process, poll with deadlines."""

from __future__ import annotations

import json
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

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from relayrl_runtime import config

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


def wait_for_model(proc: Any, version: int, timeout: float = 30.0) -> None:
    """Until the runtime process's metrics say it runs model `version`."""
    wait_for(
        f"model version {version}",
        lambda: metric(proc.metrics(), "relayrl_runtime_model_version") == version,
        timeout,
    )


def http_get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as resp:
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


def logged(logs: str, field: str) -> Any:
    """The value of `field` in the last JSON log line that has it."""
    found: Any = None
    for line in logs.splitlines():
        if f'"{field}"' not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if field in record:
            found = record[field]
    if found is None:
        raise AssertionError(f"no log line with {field!r}:\n{logs}")
    return found


def written(out: Path) -> pa.Table:
    """Every Parquet file a runtime wrote under `out`, as one table."""
    return pa.concat_tables([pq.read_table(f) for f in sorted(out.glob("*.parquet"))])


def trajectories(table: Any) -> dict[tuple[int, int], list[dict[str, Any]]]:
    """Rows of each trajectory (episode id, segment), in step order."""
    out: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for row in table.to_pylist():
        out.setdefault((row["episode_id"], row["segment"]), []).append(row)
    for rows in out.values():
        rows.sort(key=lambda r: r["step"])
    return out


class RuntimeProcess:
    """`relayrl-runtime run --config FILE` as a real subprocess.

    With `mounted=True` the config file sits in a directory laid out the way the kubelet
    mounts a ConfigMap (`runtime.yaml -> ..data/runtime.yaml`, `..data -> ..<version>`),
    and `update_config` swaps it the way the kubelet does (an atomic rename of `..data`).
    """

    def __init__(
        self,
        tmp: Path,
        cfg: dict[str, Any],
        *,
        env: dict[str, str] | None = None,
        mounted: bool = False,
        host: str = "127.0.0.1",
        template: dict[str, Any] | None = None,
    ) -> None:
        """`template`: the config the pod's template was made from, whose cold fields
        the process gets in its environment, as the operator's actor pods do."""
        self.port = free_port()
        self.host = host
        self._server = {"host": "127.0.0.1", "port": self.port}
        self._mount = tmp / "config" if mounted else None
        self._versions = 0
        if self._mount is not None:
            self._mount.mkdir()
            self.config = self._mount / "runtime.yaml"
            self.config.symlink_to(Path("..data") / "runtime.yaml")
        else:
            self.config = tmp / "runtime.yaml"
        self.update_config(cfg)
        env = dict(env or {})
        if template is not None:
            cold = config.cold_fields(config.from_mapping(self._complete(template), {}))
            env[config.ENV_POD_CONFIG] = json.dumps(cold)
        self.log = tmp / "runtime.log"
        self._log = self.log.open("wb")
        self.proc = subprocess.Popen(
            [str(RUNTIME), "run", "--config", str(self.config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        )

    def _complete(self, cfg: dict[str, Any]) -> dict[str, Any]:
        return {**cfg, "server": self._server, "logFormat": "json"}

    def update_config(self, cfg: dict[str, Any]) -> None:
        """Write the config (atomically swapped in when mounted)."""
        text = yaml.safe_dump(self._complete(cfg))
        if self._mount is None:
            self.config.write_text(text)
            return
        self._versions += 1
        version = self._mount / f"..v{self._versions}"
        version.mkdir()
        (version / "runtime.yaml").write_text(text)
        tmp_link = self._mount / "..data_tmp"
        tmp_link.symlink_to(version.name)
        os.replace(tmp_link, self._mount / "..data")
        old = self._mount / f"..v{self._versions - 1}"
        if old.exists():
            for f in old.iterdir():
                f.unlink()
            old.rmdir()

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"runtime exited {self.proc.returncode}:\n{self.logs()}")
            return http_get(self.port, "/readyz", self.host)[0] == 200

        wait_for("/readyz", ready, timeout)

    def wait_waiting(self, reason: str, timeout: float = 30.0) -> None:
        """Until /readyz answers 503 naming `reason`, the process alive meanwhile."""

        def waiting() -> bool:
            assert self.proc.poll() is None, self.logs()
            status, body = http_get(self.port, "/readyz", self.host)
            return status == 503 and reason in body

        wait_for(f"/readyz to say {reason!r}", waiting, timeout)

    def metrics(self) -> str:
        status, body = http_get(self.port, "/metrics", self.host)
        assert status == 200
        return body

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; a process still alive after `timeout` fails with its log.

        Before it is killed it is sent SIGUSR1, so the log ends with every thread's
        stack: where the drain was stuck.
        """
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(2)
            self.kill()
            raise AssertionError(
                f"runtime still running {timeout:.0f}s after SIGTERM:\n{self.logs()}"
            ) from None
        self._log.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()

    def logs(self) -> str:
        return self.log.read_text(errors="replace")
