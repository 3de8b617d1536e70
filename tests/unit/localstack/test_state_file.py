"""relayrl-localstack's state file: what it cannot use counts as no stack, not a crash, and
a pid it names is signalled only while it still names the process it recorded."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relayrl_localstack import cli, procs

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("text", ['{"server": "https://127.0.0.1:1"}', "[1, 2]", "not json"])
def test_status_and_down_treat_an_unusable_state_file_as_no_stack(
    tmp_path: Path, text: str
) -> None:
    (tmp_path / "state.json").write_text(text)
    for command, code, out in (("status", 1, "down"), ("down", 0, "no local stack")):
        done = subprocess.run(
            [str(BIN / "relayrl-localstack"), command, "--dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == code, done.stderr
        assert out in done.stdout + done.stderr
        assert "Traceback" not in done.stderr, done.stderr


def _cli(command: str, directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "relayrl-localstack"), command, "--dir", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated program in a process group of its own."""
    proc = subprocess.Popen(["sleep", "120"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait(10)


def _write(directory: Path, state: dict[str, Any]) -> None:
    (directory / "state.json").write_text(json.dumps(state))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stale", ["start time", "boot id"])
def test_a_stale_state_file_naming_another_process_is_not_trusted(
    tmp_path: Path, bystander: subprocess.Popen[bytes], stale: str
) -> None:
    """A stack killed (or a reboot) left state.json behind; its pid is now another program's."""
    pid = bystander.pid
    started = procs.start_time(pid)
    assert started is not None
    boot = procs.boot_id()
    if stale == "start time":
        started -= 1  # the stack's process had this pid before it
    else:
        boot = "00000000-0000-0000-0000-000000000000"
    _write(
        tmp_path,
        {"pid": pid, "ready": True, "boot_id": boot, "start_times": {str(pid): started}},
    )
    assert cli.running_state(tmp_path) is None  # `up` does not say "already up"
    status = _cli("status", tmp_path)
    assert (status.returncode, status.stdout.strip()) == (1, "down"), status.stderr
    down = _cli("down", tmp_path)
    assert down.returncode == 0, down.stderr
    assert bystander.poll() is None, "down signalled a process that was not the stack's"
    assert not (tmp_path / "state.json").exists()


@pytest.mark.timeout(120)
def test_an_older_state_file_is_not_signalled_and_down_says_so(
    tmp_path: Path, bystander: subprocess.Popen[bytes]
) -> None:
    pid = bystander.pid
    _stack_files(tmp_path)
    _write(tmp_path, {"pid": pid, "ready": True, "components": {"etcd": pid}})
    assert cli.running_state(tmp_path) is None
    status = _cli("status", tmp_path)
    assert (status.returncode, status.stdout.strip()) == (1, "down")
    assert "older format" in status.stderr
    assert str(pid) in status.stderr
    down = _cli("down", tmp_path)
    assert down.returncode == 0, down.stderr
    assert "older format" in down.stderr
    assert f"kill -TERM -- -{pid}" in down.stderr
    assert bystander.poll() is None, "down signalled a process it could not check"
    # What may still be in use is kept, the state file too.
    assert (tmp_path / "cluster" / "etcd" / "member" / "snap" / "db").exists()
    assert (tmp_path / cli.STATE_FILE).exists()
    # And `up` refuses to start over it (it would clear the directory under it).
    up = _cli("up", tmp_path)
    assert up.returncode == 1
    assert "not started: a stack recorded in" in up.stderr
    assert bystander.poll() is None
    assert (tmp_path / "cluster" / "etcd" / "member" / "snap" / "db").exists()


@pytest.mark.timeout(120)
def test_down_stops_the_processes_the_state_file_still_names(tmp_path: Path) -> None:
    stack = procs.spawn(["sleep", "120"], log_path=tmp_path / "stack.log", die_with_parent=False)
    part = procs.spawn(["sleep", "120"], log_path=tmp_path / "part.log", die_with_parent=False)
    try:
        times = {str(p.pid): procs.start_time(p.pid) for p in (stack, part)}
        _write(
            tmp_path,
            {
                "pid": stack.pid,
                "ready": True,
                "boot_id": procs.boot_id(),
                "start_times": times,
                "components": {"etcd": part.pid},
            },
        )
        assert cli.running_state(tmp_path) is not None
        status = _cli("status", tmp_path)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["pid"] == stack.pid
        down = _cli("down", tmp_path)
        assert down.returncode == 0, down.stderr
        assert stack.wait(10) == -signal.SIGTERM
        assert part.wait(10) == -signal.SIGTERM
    finally:
        for proc in (stack, part):
            proc.kill()
            proc.wait(10)


def _stack_files(directory: Path) -> None:
    """What a stack leaves in its directory (as `up` lays it out)."""
    for name in (
        "cluster/etcd/member/snap/db",
        "cluster/pki/tokens.csv",
        "cluster/pki/sa.key",
        "cluster/kubeconfig",
        "cluster/scheduler.kubeconfig",
        "cluster/scheduler/kube-scheduler.key",
        "cluster/process-node/pvc/ns/claim/data",
        "cluster/logs/kube-apiserver.log",
        "kubeconfig",
        "localstack.log",
    ):
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text("x")


@pytest.mark.timeout(120)
def test_down_removes_the_clusters_data_and_credentials_and_keeps_the_logs(
    tmp_path: Path,
) -> None:
    stack = procs.spawn(["sleep", "120"], log_path=tmp_path / "stack.log", die_with_parent=False)
    try:
        _stack_files(tmp_path)
        _write(
            tmp_path,
            {
                "pid": stack.pid,
                "ready": True,
                "boot_id": procs.boot_id(),
                "start_times": {str(stack.pid): procs.start_time(stack.pid)},
            },
        )
        down = _cli("down", tmp_path)
        assert down.returncode == 0, down.stderr
    finally:
        stack.kill()
        stack.wait(10)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["cluster/logs/kube-apiserver.log", "localstack.log", "stack.log"]
