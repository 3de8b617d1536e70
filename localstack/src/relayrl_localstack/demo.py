"""``relayrl-localstack demo``: an actor fleet on the local stack, from nothing to a summary.

``make demo`` runs this. In one command it:

1. starts the local stack in a background process (:func:`relayrl_localstack.cli.start_stack`:
   control plane, kwok with a fake CPU and GPU node, the process node), a nats-server
   with JetStream (:mod:`relayrl_localstack.natsserver`) and a PostgreSQL
   (:mod:`relayrl_localstack.postgres`);
2. applies the CRDs from ``crds/`` and installs the operator with the chart
   ``helm/relayrl-operator`` (pinned helm); the operator pod runs on the process node,
   with a KUBECONFIG holding its ServiceAccount token, so the chart's RBAC is real;
3. exports an ONNX CartPole policy and pushes it to the Agent's model bucket, creates
   the Postgres DSN Secret and applies ``examples/cartpole-cpu/localstack.yaml`` (with
   this run's NATS URL and bucket filled in);
4. waits for the Agent to be Ready, printing its progress, lets trajectories flow for
   ``--seconds`` and prints a summary (steps, episodes, mean return from the Postgres
   rows, Parquet files, model version, where to look next);
5. tears everything down, or with ``--keep`` leaves it running and says how to stop it
   (``relayrl-localstack down --dir DIR``).

Needs the runtime package (``relayrl_runtime`` with its onnx, gymnasium, postgres
extras) in the same environment: the process node runs the pods with it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import psycopg
import pyarrow.dataset as ds
import yaml

from relayrl_localstack import binaries, cli, natsserver, postgres, testing

NAMESPACE = "relayrl-demo"
AGENT = "cartpole"
OPERATOR_NAMESPACE = "relayrl-system"
RELEASE = "relayrl-operator"
MODEL_NAME = "cartpole"
DSN_SECRET = "pg"
MANIFEST = Path("examples") / "cartpole-cpu" / "localstack.yaml"
CHART = Path("helm") / "relayrl-operator"
CRDS = (Path("crds") / "agents.relayrl.io.yaml", Path("crds") / "kopf.dev.yaml")


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and what was seen."""


def _out(text: str, stream: TextIO | None = None) -> None:
    """Write a line to the terminal (stdout unless told), now."""
    target = stream or sys.stdout
    target.write(text + "\n")
    target.flush()


def default_dir() -> Path:
    """``${RELAYRL_CACHE:-~/.cache/relayrl}/demo``: apart from ``relayrl-localstack up``."""
    return binaries.cache_root() / "demo"


class Clock:
    """Prints lines prefixed with the seconds since the demo started."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def say(self, text: str) -> None:
        """One progress line."""
        _out(f"[{time.monotonic() - self.start:6.1f}s] {text}")


@dataclass(frozen=True)
class Stack:
    """What the demo started and where it is."""

    directory: Path
    kubeconfig: Path
    bins: binaries.Binaries
    nats: natsserver.NatsServer
    pg: postgres.PostgresServer
    node_work_dir: Path

    def kubectl(self, *args: str, input_text: str | None = None) -> str:
        """Run the pinned kubectl; raise :class:`DemoError` with its stderr on failure."""
        return _run(
            [str(self.bins.kubectl), "--kubeconfig", str(self.kubeconfig), *args], input_text
        )

    def helm(self, *args: str) -> str:
        """Run the pinned helm against the stack."""
        return _run([str(self.bins.helm), "--kubeconfig", str(self.kubeconfig), *args])

    def get_json(self, *args: str) -> dict[str, Any]:
        """``kubectl get ... -o json``."""
        data: dict[str, Any] = json.loads(self.kubectl("get", *args, "-o", "json"))
        return data


def _run(argv: list[str], input_text: str | None = None, timeout: float = 300) -> str:
    result = subprocess.run(
        argv, capture_output=True, text=True, input=input_text, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise DemoError(f"{' '.join(argv[:4])} ... failed ({result.returncode}):\n{result.stderr}")
    return result.stdout


# ------------------------------------------------------------------------- steps


def start(directory: Path, clock: Clock, stack_timeout: float) -> Stack:
    """NATS, Postgres and the background stack; recorded in the state file for ``down``."""
    if cli.running_state(directory) is not None:
        raise DemoError(
            f"a demo stack is already running in {directory}; stop it first: "
            f"relayrl-localstack down --dir {directory}"
        )
    bins = binaries.ensure_binaries()
    with contextlib.ExitStack() as undo:
        # Until the state file records them, a failure stops what was started here.
        nats = natsserver.NatsServer()
        undo.callback(nats.close)
        nats.start()
        clock.say(f"nats-server with JetStream at {nats.url}")
        pg = postgres.PostgresServer()
        undo.callback(pg.close)
        pg.init()
        clock.say(f"PostgreSQL at {pg.url}")
        undo.callback(cli.stop_stack, directory)
        state = cli.start_stack(
            directory, cpu_nodes=1, gpu_nodes=1, gpus_per_node=8, timeout=stack_timeout
        )
        undo.pop_all()
    # From here `relayrl-localstack down --dir` stops all of it, even if this process dies.
    pids = {"nats-server": _pid(nats.proc), "postgres": _pid(pg.proc)}
    cli.record(directory, pids, [nats.base_dir, pg.base_dir])
    clock.say(
        f"control plane {state['server']} (Kubernetes {state['kubernetes_version']}), "
        "kwok nodes and the process node are up"
    )
    return Stack(
        directory=directory,
        kubeconfig=Path(state["kubeconfig"]),
        bins=bins,
        nats=nats,
        pg=pg,
        node_work_dir=directory / "cluster" / "process-node",
    )


def _pid(proc: subprocess.Popen[bytes] | None) -> int:
    if proc is None:
        raise DemoError("a server of the demo is not running")
    return proc.pid


def install_operator(stack: Stack, repo: Path, clock: Clock) -> None:
    """The CRDs, then the chart with the operator pod placed on the process node."""
    for crd in CRDS:
        stack.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(repo / crd))
    stack.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/agents.relayrl.io")
    clock.say("CRDs applied: agents.relayrl.io, kopf peering")
    placement = testing.process_node_placement()
    values = {
        "nodeSelector": placement["nodeSelector"],
        "tolerations": placement["tolerations"],
        # The process node gives every pod its own loopback address: bind it, so the
        # operator's ports do not take 8080/8081 on every address of the machine.
        "operator": {
            "bindPodIP": True,
            "agentPodsBindPodIP": True,
            "logFormat": "text",
            "resyncSeconds": 10,
        },
    }
    values_file = stack.directory / "operator-values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    stack.helm(
        "upgrade",
        "--install",
        RELEASE,
        str(repo / CHART),
        "--namespace",
        OPERATOR_NAMESPACE,
        "--create-namespace",
        "--values",
        str(values_file),
    )
    clock.say(f"helm install {RELEASE} ({repo / CHART}) in {OPERATOR_NAMESPACE}")
    try:
        stack.kubectl(
            "rollout", "status", f"deployment/{RELEASE}", "-n", OPERATOR_NAMESPACE, "--timeout=180s"
        )
    except DemoError as err:
        raise DemoError(f"{err}\noperator log:\n{operator_log(stack)}") from err
    pod = stack.get_json(
        "pods", "-n", OPERATOR_NAMESPACE, "-l", f"app.kubernetes.io/instance={RELEASE}"
    )
    where = ", ".join(
        f"{p['metadata']['name']} on {p['spec'].get('nodeName')} ({p['status'].get('podIP')})"
        for p in pod["items"]
    )
    clock.say(f"operator Ready: {where}")


def operator_log(stack: Stack) -> str:
    """The operator container's output on the process node (for failures)."""
    logs = sorted(stack.node_work_dir.glob(f"pods/{OPERATOR_NAMESPACE}/*/logs/*"))
    return "\n".join(procs_tail(p) for p in logs) or "(no log yet)"


def procs_tail(path: Path, chars: int = 4000) -> str:
    """The end of a log file."""
    return f"--- {path}\n" + path.read_text(errors="replace")[-chars:]


def push_model(stack: Stack, clock: Clock) -> str:
    """Export the CartPole ONNX policy and push it to the Agent's model bucket."""
    from relayrl_runtime import streams  # the runtime is needed anyway: pods run it

    bucket = streams.model_bucket(NAMESPACE, AGENT)
    model_dir = stack.directory / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    runtime = [sys.executable, "-m", "relayrl_runtime.cli", "model"]
    _run([*runtime, "export", str(model_dir), "--version", "1", "--seed", "1"])
    push = ["push", str(model_dir), "--nats", stack.nats.url, "--bucket", bucket]
    _run([*runtime, *push, "--name", MODEL_NAME])
    clock.say(f"ONNX CartPole policy v1 pushed to objectstore://{bucket}/{MODEL_NAME}")
    return bucket


def apply_agent(stack: Stack, repo: Path, bucket: str, clock: Clock) -> None:
    """The namespace, the DSN Secret and the example Agent with this run's addresses."""
    stack.kubectl("create", "namespace", NAMESPACE)
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": DSN_SECRET, "namespace": NAMESPACE},
        "stringData": {"dsn": stack.pg.dsn},
    }
    stack.kubectl("apply", "-f", "-", input_text=json.dumps(secret))
    manifest = yaml.safe_load((repo / MANIFEST).read_text())
    manifest["metadata"]["namespace"] = NAMESPACE
    manifest["spec"]["trajectories"]["nats"]["url"] = stack.nats.url
    manifest["spec"]["model"]["uri"] = f"objectstore://{bucket}/{MODEL_NAME}"
    stack.kubectl("apply", "-f", "-", input_text=json.dumps(manifest))
    spec = manifest["spec"]
    clock.say(
        f"applied {MANIFEST}: Agent {NAMESPACE}/{AGENT}, {spec['actors']} actors in "
        f"{spec['actors'] // spec['actorsPerPod']} pods, sinks arrow (parquet) + postgres"
    )


def agent_status(stack: Stack) -> dict[str, Any]:
    """The Agent's status (empty before the operator wrote one)."""
    agent = stack.get_json("agent", AGENT, "-n", NAMESPACE)
    status: dict[str, Any] = agent.get("status") or {}
    status["_generation"] = agent["metadata"].get("generation")
    return status


def pg_stats(dsn: str) -> dict[str, Any]:
    """Steps, episodes and returns from the Postgres sink's table (zeros before it exists)."""
    stats: dict[str, Any] = {"rows": 0, "episodes": 0, "mean_return": None, "versions": []}
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        found = conn.execute("SELECT to_regclass('relayrl.steps') IS NOT NULL").fetchone()
        if not found or not found[0]:
            return stats
        row = conn.execute(
            "SELECT count(*), array_agg(DISTINCT policy_version) FROM relayrl.steps"
        ).fetchone()
        if row:
            stats["rows"] = int(row[0])
            stats["versions"] = sorted(v for v in (row[1] or []) if v is not None)
        # An episode is complete when a row ends it: terminated, or truncated by the env
        # (not cut by the runtime at the max length or at shutdown). Segments of one
        # episode share its episode_id, so summing rewards by it gives the return.
        row = conn.execute(
            """SELECT count(*), avg(ret), min(ret), max(ret) FROM (
                   SELECT episode_id, sum(reward) AS ret FROM relayrl.steps
                   GROUP BY episode_id
                   HAVING bool_or(terminated OR (truncated AND NOT cut))
               ) AS episodes"""
        ).fetchone()
        if row:
            stats["episodes"] = int(row[0])
            stats["mean_return"] = float(row[1]) if row[1] is not None else None
            stats["min_return"] = row[2]
            stats["max_return"] = row[3]
    return stats


def parquet_files(stack: Stack) -> list[Path]:
    """The Parquet files the Arrow sink pod wrote so far (its data volume on the process node)."""
    pattern = f"pods/{NAMESPACE}/{AGENT}-arrow-sink-*/volumes/data/**/*.parquet"
    return sorted(stack.node_work_dir.glob(pattern))


def parquet_rows(files: list[Path]) -> int:
    """Rows in finished Parquet files."""
    if not files:
        return 0
    return int(ds.dataset([str(f) for f in files], format="parquet").count_rows())


def wait_ready(stack: Stack, clock: Clock, timeout: float) -> dict[str, Any]:
    """Print the Agent's progress until it is Ready at its current generation."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        status = agent_status(stack)
        rows = pg_stats(stack.pg.dsn)["rows"]
        line = (
            f"agent phase={status.get('phase', '-')} actors "
            f"{status.get('readyActors', 0)}/{status.get('desiredActors', '?')} ready, pods "
            f"{status.get('readyPods', 0)} ready, model v{status.get('modelVersion', '-')}, "
            f"{rows} rows in Postgres"
        )
        if line != last:
            clock.say(line)
            last = line
        if (
            status.get("phase") == "Ready"
            and status.get("observedGeneration") == status["_generation"]
        ):
            return status
        if time.monotonic() > deadline:
            raise DemoError(
                f"Agent not Ready within {timeout:.0f}s; last status:\n"
                f"{json.dumps(status, indent=2)}\n{pod_logs(stack)}"
            )
        time.sleep(2)


def pod_logs(stack: Stack, chars: int = 2000) -> str:
    """The end of every demo pod's container output (for failures)."""
    paths = sorted(stack.node_work_dir.glob(f"pods/{NAMESPACE}/*/logs/*"))
    return "\n".join(procs_tail(p, chars) for p in paths)


def flow(stack: Stack, clock: Clock, seconds: float) -> None:
    """Let trajectories flow for ``seconds``, printing rows and rates every few seconds."""
    end = time.monotonic() + seconds
    before = pg_stats(stack.pg.dsn)["rows"]
    t0 = time.monotonic()
    while True:
        time.sleep(min(10.0, max(0.0, end - time.monotonic())))
        stats = pg_stats(stack.pg.dsn)
        files = parquet_files(stack)
        rate = (stats["rows"] - before) / max(1e-9, time.monotonic() - t0)
        mean = stats["mean_return"]
        returns = f" (mean return {mean:.1f})" if mean is not None else ""
        clock.say(
            f"{stats['rows']} steps in Postgres ({rate:,.0f}/s), "
            f"{stats['episodes']} episodes{returns}, {len(files)} Parquet files"
        )
        if time.monotonic() >= end:
            return


def summary(stack: Stack, status: dict[str, Any], output: Path, seconds: float) -> str:
    """The closing report; copies the Parquet files to ``output`` (they outlive the pods)."""
    stats = pg_stats(stack.pg.dsn)
    files = parquet_files(stack)
    shutil.rmtree(output, ignore_errors=True)
    output.mkdir(parents=True)
    for f in files:
        shutil.copy2(f, output / f.name)
    copied = sorted(output.glob("*.parquet"))
    pods = stack.get_json("pods", "-n", NAMESPACE)["items"]
    ops = stack.get_json("pods", "-n", OPERATOR_NAMESPACE)["items"]
    mean = stats["mean_return"]
    lines = [
        "",
        "==================== RelayRL Fleet demo: summary ====================",
        f"Agent {NAMESPACE}/{AGENT}: phase {status.get('phase')}, "
        f"{status.get('readyActors')}/{status.get('desiredActors')} actors ready in "
        f"{status.get('readyPods')} pods on the process node, model version "
        f"{status.get('modelVersion')}",
        f"trajectories flowed for {seconds:.0f}s after Ready",
        f"env steps (Postgres rows): {stats['rows']}",
        f"episodes completed:        {stats['episodes']}",
        "mean return:               "
        + (
            f"{mean:.1f} (min {stats['min_return']:.0f}, max {stats['max_return']:.0f})"
            if mean is not None
            else "-"
        ),
        f"policy versions recorded:  {stats['versions']}",
        f"Parquet files written:     {len(files)} ({parquet_rows(copied)} rows)",
        f"  copied to {output}",
        "",
        "Where to look next (these stay up only with --keep):",
        f"  export KUBECONFIG={stack.kubeconfig}",
        f"  {stack.bins.kubectl} get agents -n {NAMESPACE}",
        f"  {stack.bins.kubectl} get pods -A -o wide",
        f"  psql '{stack.pg.url}' -c 'SELECT count(*) FROM relayrl.steps'",
        "  /metrics:",
    ]
    for pod in [*ops, *pods]:
        ip = pod["status"].get("podIP")
        for container in pod["spec"]["containers"]:
            for port in container.get("ports") or []:
                if port.get("name") == "metrics":
                    url = f"http://{ip}:{port['containerPort']}/metrics"
                    lines.append(f"    {url}  ({pod['metadata']['name']})")
    lines.append(f"  pod logs: {stack.node_work_dir}/pods/<namespace>/<pod>/logs/")
    return "\n".join(lines)


# --------------------------------------------------------------------- driver


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the teardown runs."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous: Callable[[int, FrameType | None], Any] | int | None = signal.signal(
        signal.SIGTERM, handler
    )
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def teardown(stack: Stack) -> None:
    """Stop the stack (its pods first), NATS and Postgres; remove their data."""
    cli.stop_stack(stack.directory)
    stack.nats.close()
    stack.pg.close()


def run(args: argparse.Namespace) -> int:
    """The whole demo; the exit code of ``relayrl-localstack demo``."""
    clock = Clock()
    directory: Path = args.dir
    repo = binaries.repo_root()
    clock.say(f"RelayRL Fleet demo (state in {directory})")
    stack: Stack | None = None
    keep = False
    with _sigterm_as_interrupt():
        try:
            stack = start(directory, clock, args.stack_timeout)
            install_operator(stack, repo, clock)
            bucket = push_model(stack, clock)
            apply_agent(stack, repo, bucket, clock)
            status = wait_ready(stack, clock, args.ready_timeout)
            clock.say(f"Agent Ready; letting trajectories flow for {args.seconds:.0f}s")
            flow(stack, clock, args.seconds)
            status = agent_status(stack)
            _out(summary(stack, status, directory / "output" / "parquet", args.seconds))
            keep = args.keep
        except (RuntimeError, OSError, subprocess.SubprocessError, psycopg.Error) as err:
            # DemoError, StackError, a missing server binary, a timeout: say what failed.
            _out(f"demo failed: {type(err).__name__}: {err}", sys.stderr)
            return 1
        except KeyboardInterrupt:
            _out("interrupted", sys.stderr)
            return 130
        finally:
            if stack is not None and not keep:
                clock.say("tearing down: pods, operator, control plane, NATS, PostgreSQL")
                teardown(stack)
                clock.say(f"done; Parquet copies stay in {directory / 'output'}")
    down = f"{Path(sys.executable).parent / 'relayrl-localstack'} down --dir {directory}"
    if keep:
        _out(f"\nThe stack keeps running (--keep). Tear it down with:\n  {down}")
    else:
        _out(f"\nTo keep it running next time: relayrl-localstack demo --keep; then {down}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``demo`` subcommand's options."""
    parser.add_argument("--dir", type=Path, default=default_dir(), help="state directory")
    parser.add_argument(
        "--seconds", type=float, default=60.0, help="how long trajectories flow after Ready"
    )
    parser.add_argument(
        "--keep", action="store_true", help="leave everything running (stop with `down --dir`)"
    )
    parser.add_argument(
        "--ready-timeout", type=float, default=300.0, help="seconds to wait for the Agent"
    )
    parser.add_argument(
        "--stack-timeout", type=float, default=300.0, help="seconds to wait for the stack"
    )
