"""``relayrl-localstack``: start and stop the whole local stack from a shell.

``relayrl-localstack up`` builds the binaries if needed, then starts, in a background
process of its own, the control plane (:class:`~relayrl_localstack.cluster.LocalCluster`),
kwok with fake CPU and GPU nodes, and the process node. It writes
``<dir>/kubeconfig`` and ``<dir>/state.json`` (``<dir>`` defaults to
``${RELAYRL_CACHE:-~/.cache/relayrl}/localstack``) and prints the ``export
KUBECONFIG=...`` line. ``relayrl-localstack down`` stops everything recorded in the
state file, and leaves no process behind even if the background process died; it
removes the cluster's data and credentials (etcd's data, the PKI, the kubeconfigs with
their tokens) and keeps the logs (``<dir>/localstack.log``, ``<dir>/cluster/logs``).
``make cluster-up`` / ``make cluster-down`` call these. ``relayrl-localstack demo``
(``make demo``) runs :mod:`relayrl_localstack.demo` on a stack of its own.

The state file records each process with its start time and the boot id, and a process
is signalled, or a stack counted as up, only while its pid still names that process: a
state file left by a stack that was killed, or by an earlier boot, names pids that
other programs may have by now.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from relayrl_localstack import binaries, cluster, kwok, processnode, procs

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"


def default_dir() -> Path:
    """``${RELAYRL_CACHE:-~/.cache/relayrl}/localstack``."""
    return binaries.cache_root() / "localstack"


def _read_state(directory: Path) -> dict[str, Any] | None:
    """The recorded state; None when there is none or it is not one (no process id)."""
    try:
        state = json.loads((directory / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not isinstance(state.get("pid"), int):
        return None
    return state


def _identify(state: dict[str, Any], pids: list[int]) -> None:
    """Record each pid's start time and the boot id in ``state`` (see the module doc)."""
    state["boot_id"] = procs.boot_id()
    start_times = state.setdefault("start_times", {})
    for pid in pids:
        started = procs.start_time(pid)
        if started is not None:
            start_times[str(pid)] = started


class Recorded(enum.Enum):
    """What a process id recorded in the state file names now."""

    OURS = "ours"  # the recorded process, alive
    GONE = "gone"  # it exited; the pid is free or names another process
    UNCHECKED = "unchecked"  # an older state file, without start times: cannot tell


def recorded(state: dict[str, Any], pid: int) -> Recorded:
    """Whether ``pid`` of ``state`` is still the process the state file recorded."""
    started = (state.get("start_times") or {}).get(str(pid))
    boot = state.get("boot_id")
    if not isinstance(started, int) or not isinstance(boot, str):
        return Recorded.UNCHECKED
    if procs.is_process(pid, started, boot) and procs.group_alive(pid):
        return Recorded.OURS
    return Recorded.GONE


def _unchecked_note(directory: Path, pid: int) -> str:
    return (
        f"{directory / STATE_FILE} is of an older format, without process start times: "
        f"process {pid} it names is running but may not be the stack's, so it is left "
        f"alone; if it is the stack's, stop it with: kill -TERM -- -{pid}"
    )


def _write_state(directory: Path, state: dict[str, Any]) -> None:
    tmp = directory / f"{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(directory / STATE_FILE)


def _export_line(directory: Path) -> str:
    return f"export KUBECONFIG={directory / 'kubeconfig'}"


class StackError(RuntimeError):
    """The background stack did not come up; the message says why and where the log is."""


def start_stack(
    directory: Path,
    *,
    cpu_nodes: int,
    gpu_nodes: int,
    gpus_per_node: int,
    timeout: float,
) -> dict[str, Any]:
    """Start the stack in a background process of its own; return its ready state.

    Used by ``up`` and by ``demo``. Raises :class:`StackError` when it fails or is not
    ready within ``timeout`` seconds (then nothing it started is left running).
    """
    directory.mkdir(parents=True, exist_ok=True)
    state = _read_state(directory)
    if state and not _stop_recorded(directory, state):
        # Starting would clear the directory under a stack that may still run.
        raise StackError(
            f"not started: a stack recorded in {directory / STATE_FILE} (older format) may"
            f" still run there; stop it as said above, then remove {directory / STATE_FILE}"
        )
    try:
        binaries.ensure_binaries()
    except binaries.BinariesError as err:
        raise StackError(f"the control-plane binaries are not available: {err}") from err
    log = directory / "localstack.log"
    log.write_text("")
    daemon = procs.spawn(
        [
            sys.executable,
            "-m",
            "relayrl_localstack.cli",
            "serve",
            "--dir",
            str(directory),
            "--cpu-nodes",
            str(cpu_nodes),
            "--gpu-nodes",
            str(gpu_nodes),
            "--gpus-per-node",
            str(gpus_per_node),
        ],
        log_path=log,
        die_with_parent=False,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = daemon.poll()
        if code is not None:
            raise StackError(
                f"local stack failed to start (exit {code}); log: {log}\n{procs.tail(log, 40)}"
            )
        state = _read_state(directory)
        if state and state.get("ready"):
            return state
        time.sleep(0.3)
    procs.stop_group(daemon.pid, grace_seconds=30, popen=daemon)
    raise StackError(f"local stack not ready within {timeout:.0f}s; log: {log}")


def running_state(directory: Path) -> dict[str, Any] | None:
    """The state of a stack that is up in ``directory``, if any."""
    state = _read_state(directory)
    if state and recorded(state, int(state["pid"])) is Recorded.OURS and state.get("ready"):
        return state
    return None


def record(directory: Path, components: dict[str, int], cleanup: list[Path]) -> None:
    """Add processes and directories to the state file, for ``down`` to stop and remove."""
    state = _read_state(directory)
    if state is None:
        raise StackError(f"no local stack recorded in {directory}")
    state.setdefault("components", {}).update(components)
    _identify(state, list(components.values()))
    state["cleanup"] = [*state.get("cleanup", []), *(str(p) for p in cleanup)]
    _write_state(directory, state)


def stop_stack(directory: Path) -> bool:
    """Stop the stack recorded in ``directory``; False when none was recorded."""
    state = _read_state(directory)
    if state is None:
        return False
    _stop_recorded(directory, state)
    return True


def cmd_up(args: argparse.Namespace) -> int:
    """Start the stack in the background and wait until it is ready."""
    directory: Path = args.dir
    if running_state(directory) is not None:
        state = _read_state(directory) or {}
        print(f"local stack already up (pid {state.get('pid')})", file=sys.stderr)
        print(_export_line(directory))
        return 0
    try:
        state = start_stack(
            directory,
            cpu_nodes=args.cpu_nodes,
            gpu_nodes=args.gpu_nodes,
            gpus_per_node=args.gpus_per_node,
            timeout=args.timeout,
        )
    except StackError as err:
        print(err, file=sys.stderr)
        return 1
    print(
        f"local stack up: {state['server']} (log: {directory / 'localstack.log'})", file=sys.stderr
    )
    print(_export_line(directory))
    return 0


def _stop_recorded(directory: Path, state: dict[str, Any]) -> bool:
    """Stop the background process, then anything it recorded that is still alive;
    False when something was left running.

    Only processes the state file still names (:func:`recorded`) are signalled; a
    running process that an older state file names is left alone, and said so: then
    the state file, the cluster's data and the recorded directories stay too.
    """
    # Postgres needs a moment for its shutdown checkpoint.
    pids = [(int(state["pid"]), 60.0)]
    pids += [(int(pid), 10.0) for pid in (state.get("components") or {}).values()]
    left_alone = False
    for pid, grace in pids:
        check = recorded(state, pid)
        if check is Recorded.OURS:
            procs.stop_group(pid, grace_seconds=grace)
        elif check is Recorded.UNCHECKED and procs.group_alive(pid):
            print(_unchecked_note(directory, pid), file=sys.stderr)
            left_alone = True
    if left_alone:
        print(
            f"the cluster's data in {directory / 'cluster'} and {directory / STATE_FILE} are kept",
            file=sys.stderr,
        )
        return False
    _remove_cluster_data(directory)
    for path in state.get("cleanup") or []:
        shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        (directory / STATE_FILE).unlink()
    return True


def _remove_cluster_data(directory: Path) -> None:
    """Remove what a stopped stack leaves in ``directory`` but its logs: etcd's data, the
    PKI, the kubeconfigs (they hold tokens), the process node's pod directories."""
    work = directory / "cluster"
    if work.is_dir():
        for entry in work.iterdir():
            if entry.name == "logs":
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    (directory / "kubeconfig").unlink(missing_ok=True)


def cmd_down(args: argparse.Namespace) -> int:
    """Stop the stack recorded in the state file."""
    directory: Path = args.dir
    if not stop_stack(directory):
        print(f"no local stack recorded in {directory}", file=sys.stderr)
        return 0
    print("local stack stopped", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print the state file; exit 1 when the stack is not running."""
    state = _read_state(args.dir)
    pid = int(state["pid"]) if state is not None else 0
    check = recorded(state, pid) if state is not None else Recorded.GONE
    if check is not Recorded.OURS:
        if check is Recorded.UNCHECKED and procs.group_alive(pid):
            print(_unchecked_note(args.dir, pid), file=sys.stderr)
        print("down")
        return 1
    print(json.dumps(state, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo (:mod:`relayrl_localstack.demo`)."""
    from relayrl_localstack import demo

    return demo.run(args)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the stack in this process until SIGTERM (started by ``up``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    directory: Path = args.dir
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    work = directory / "cluster"
    shutil.rmtree(work, ignore_errors=True)
    state: dict[str, Any] = {"pid": os.getpid(), "ready": False, "components": {}}
    _identify(state, [os.getpid()])
    _write_state(directory, state)
    bins = binaries.ensure_binaries(build=False)
    with cluster.LocalCluster(work, bins=bins) as local:
        state["components"] = local.pids()
        _identify(state, list(state["components"].values()))
        _write_state(directory, state)
        with kwok.Kwok(local.kubeconfig, work, bins=bins) as kwok_proc:
            state["components"]["kwok"] = kwok_proc.pid
            _identify(state, list(state["components"].values()))
            _write_state(directory, state)
            with local.api_client() as api:
                kwok.create_nodes(
                    api,
                    cpu=args.cpu_nodes,
                    gpu=args.gpu_nodes,
                    gpus_per_node=args.gpus_per_node,
                )
                with processnode.ProcessNode(api, work_dir=work / "process-node"):
                    shutil.copyfile(local.kubeconfig, directory / "kubeconfig")
                    (directory / "kubeconfig").chmod(0o600)
                    state.update(
                        ready=True,
                        server=local.info.server,
                        kubeconfig=str(directory / "kubeconfig"),
                        kubernetes_version=bins.kubernetes_version,
                        bin_dir=str(bins.bin_dir),
                    )
                    _write_state(directory, state)
                    stop.wait()
    with contextlib.suppress(FileNotFoundError):
        (directory / STATE_FILE).unlink()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    parser = argparse.ArgumentParser(prog="relayrl-localstack", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add_common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dir", type=Path, default=default_dir(), help="state directory")

    up = sub.add_parser("up", help="start cluster, kwok nodes and the process node")
    add_common(up)
    up.add_argument("--cpu-nodes", type=int, default=2)
    up.add_argument("--gpu-nodes", type=int, default=2)
    up.add_argument("--gpus-per-node", type=int, default=8)
    up.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for ready")
    up.set_defaults(func=cmd_up)

    down = sub.add_parser(
        "down",
        help="stop everything started by up; remove the cluster's data and credentials, "
        "keep the logs",
    )
    add_common(down)
    down.set_defaults(func=cmd_down)

    status = sub.add_parser("status", help="print the state of the stack")
    add_common(status)
    status.set_defaults(func=cmd_status)

    demo = sub.add_parser(
        "demo", help="bring up the stack, the operator chart and a CartPole fleet; summarise"
    )
    demo.set_defaults(func=cmd_demo)
    # Imported here: the demo imports this module (start_stack, record, stop_stack).
    from relayrl_localstack import demo as demo_module

    demo_module.add_arguments(demo)

    serve = sub.add_parser("serve", help=argparse.SUPPRESS)
    add_common(serve)
    serve.add_argument("--cpu-nodes", type=int, default=2)
    serve.add_argument("--gpu-nodes", type=int, default=2)
    serve.add_argument("--gpus-per-node", type=int, default=8)
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``relayrl-localstack`` console script."""
    args = build_parser().parse_args(argv)
    args.dir = args.dir.expanduser().resolve()
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
