"""Start and stop host processes so that none outlives its owner.

Every process is started in its own session (so its whole process group can be
signalled) and, on Linux, with ``PR_SET_PDEATHSIG`` = SIGKILL, so it dies with the
thread that started it even when the owner is killed without running its cleanup.
Stopping sends SIGTERM to the group, waits for a grace period, then SIGKILLs it.

Used by :mod:`relayrl_localstack.cluster`, :mod:`relayrl_localstack.kwok` and
:mod:`relayrl_localstack.processnode`; also by the CLI's ``down``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

_PR_SET_PDEATHSIG = 1


def _set_pdeathsig() -> None:
    """Run in the child before exec: die when the parent thread dies."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def spawn(
    argv: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    die_with_parent: bool = True,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session with stdout and stderr appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log: IO[bytes] = log_path.open("ab")
    try:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_set_pdeathsig if die_with_parent else None,
        )
    finally:
        # The child holds its own descriptor.
        log.close()


def group_alive(pgid: int) -> bool:
    """Tell whether any process of group ``pgid`` is still alive (zombies count as gone)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg succeeds for zombies too: look for a live member in /proc.
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            state, pgrp = fields[0], int(fields[2])
            if pgrp == pgid and state not in ("Z", "X"):
                return True
    return False


def start_time(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks after boot (field 22 of
    /proc/<pid>/stat); None when there is no such process.

    With :func:`boot_id` it tells a process from a later one given the same pid.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command (in parentheses, which may hold spaces) start at field 3.
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[22 - 3])


def boot_id() -> str:
    """This boot's id (/proc/sys/kernel/random/boot_id): pids and start times restart
    with each boot."""
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def is_process(pid: int, started: int, boot: str) -> bool:
    """Whether ``pid`` is still the process that started at ``started`` in boot ``boot``,
    not a later one given the same pid (a zombie still counts)."""
    try:
        return boot == boot_id() and start_time(pid) == started
    except OSError:
        return False


def stop_group(
    pgid: int,
    *,
    grace_seconds: float = 10.0,
    popen: subprocess.Popen[bytes] | None = None,
) -> None:
    """SIGTERM process group ``pgid``, wait up to ``grace_seconds``, then SIGKILL it.

    ``popen``, when given, is reaped so no zombie is left behind.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + max(grace_seconds, 0.0)
    while time.monotonic() < deadline:
        if popen is not None:
            popen.poll()
        if not group_alive(pgid):
            break
        time.sleep(0.05)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    if popen is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=5)
    kill_deadline = time.monotonic() + 5
    while group_alive(pgid) and time.monotonic() < kill_deadline:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        time.sleep(0.05)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tail(path: Path, lines: int = 30) -> str:
    """Return the last ``lines`` lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class ServerProcess:
    """What the local servers (NATS, PostgreSQL) share: close, logs, context manager.

    Subclasses set `base_dir` (removed on close) and `log_file`, and implement
    `stop()` and `__enter__`.
    """

    base_dir: Path
    log_file: Path

    def stop(self) -> None:
        """Stop the server process (data kept)."""
        raise NotImplementedError

    proc: subprocess.Popen[bytes] | None

    def _end(self, sig: int, timeout: float) -> None:
        """Send `sig`, wait up to `timeout` seconds, then SIGKILL; forget the process."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def logs(self) -> str:
        """The end of the server log so far (for failure messages)."""
        try:
            return self.log_file.read_text(errors="replace")[-5000:]
        except FileNotFoundError:
            return ""

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
