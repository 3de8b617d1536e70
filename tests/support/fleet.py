"""Drive the operator and Agents from cluster tests and benchmarks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
import pyarrow.dataset as ds
import yaml
from kubernetes import client

from relayrl_localstack import binaries, testing
from relayrl_operator import constants
from relayrl_runtime import spec, streams
from support import natsserver, specs

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "relayrl-operator"
RUNTIME_CLI = [sys.executable, "-m", "relayrl_runtime.cli"]


def run(*argv: str, timeout: float = 120) -> str:
    """Run a command; fail with its output."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(argv)} failed:\n{output}"
    return output


def push_model(directory: Path, version: int, nats_url: str, bucket: str) -> None:
    """Export a CartPole MLP of the given version and push it to the model registry."""
    run(
        *RUNTIME_CLI,
        "model",
        "export",
        str(directory),
        "--version",
        str(version),
        "--seed",
        str(version),
    )
    run(
        *RUNTIME_CLI,
        "model",
        "push",
        str(directory),
        "--nats",
        nats_url,
        "--bucket",
        bucket,
        "--name",
        "cartpole",
    )


def prepare_fleet(
    k8s: testing.ClusterHandle, namespace: str, nats_url: str, dsn: str, directory: Path
) -> str:
    """For an Agent `cartpole` that really runs: model v1 in its registry bucket and the
    Postgres DSN Secret `pg`. Returns the bucket."""
    bucket = streams.model_bucket(namespace, "cartpole")
    push_model(directory / "v1", 1, nats_url, bucket)
    k8s.core.create_namespaced_secret(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "pg"},
            "stringData": {"dsn": dsn},
        },
    )
    return bucket


def postgres_steps(dsn: str, where: str = "true", params: tuple[Any, ...] = ()) -> int:
    """Rows in the Postgres sinks' table matching `where` (0 before a sink created it)."""
    with psycopg.connect(dsn) as conn:
        found = conn.execute("SELECT to_regclass('relayrl.steps') IS NOT NULL").fetchone()
        if not found or not found[0]:
            return 0
        row = conn.execute(f"SELECT count(*) FROM relayrl.steps WHERE {where}", params).fetchone()
        return int(row[0]) if row else 0


def helm(
    *args: str, check: bool = True, kubeconfig: Path | None = None, stderr: bool = True
) -> str:
    """Run the pinned helm; with ``check``, fail with its output. Returns its stdout and
    (with ``stderr``) its stderr: without, for output that is parsed (templates)."""
    argv = [str(binaries.ensure_binaries(build=False).helm), *args]
    if kubeconfig is not None:
        argv += ["--kubeconfig", str(kubeconfig)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=180, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout + (result.stderr if stderr else "")


def render_chart(values: Path | None, namespace: str, *extra: str) -> list[dict[str, Any]]:
    """`helm template` of the chart (test hooks included) as a list of objects."""
    args = ["template", "relayrl-ci", str(CHART), "--namespace", namespace, *extra]
    if values is not None:
        args += ["--values", str(values)]
    return [d for d in yaml.safe_load_all(helm(*args, stderr=False)) if d]


# The API the chart's finalizer policy needs; `helm template` does not assume it.
ADMISSION_POLICY_API = "admissionregistration.k8s.io/v1/MutatingAdmissionPolicy"


def finalizer_policy_yaml() -> str:
    """The chart's MutatingAdmissionPolicy and binding for the Agent finalizer, as YAML
    (release `relayrl`, every namespace), for clusters the operator runs on as a process."""
    return helm(
        "template",
        "relayrl",
        str(CHART),
        "--api-versions",
        ADMISSION_POLICY_API,
        "--show-only",
        "templates/finalizer-policy.yaml",
        stderr=False,
    )


def finalizers_on_create(api: client.ApiClient, namespace: str) -> list[str]:
    """The finalizers admission gives a new Agent (a dry-run create: nothing is stored)."""
    body = {**specs.base_manifest(), "metadata": {"name": "probe"}}
    created = client.CustomObjectsApi(api).create_namespaced_custom_object(
        spec.GROUP, spec.VERSION, namespace, spec.PLURAL, body, dry_run="All"
    )
    return list(created["metadata"].get("finalizers") or [])


def wait_finalizer_policy(api: client.ApiClient, active: bool = True) -> None:
    """Wait until the apiserver applies the finalizer policy (or, not ``active``, no longer
    does): it picks policies up from an informer, a moment after they are written."""
    want = [constants.FINALIZER] if active else []
    errors: list[str] = []

    def applied() -> bool:
        try:
            return finalizers_on_create(api, "default") == want
        except client.ApiException as err:  # a CRD just made: its endpoint may lag
            errors.append(f"{err.status} {err.reason}")
            return False

    what = f"the finalizer policy {'applied' if active else 'gone'}"
    try:
        testing.wait_for(applied, timeout=30, what=what)
    except TimeoutError as err:
        raise TimeoutError(f"{err}; last errors: {errors[-3:]}") from err


class Operator:
    """The operator as a separate process, as it runs in a cluster."""

    def __init__(
        self,
        kubeconfig: Path,
        log: Path,
        resync_seconds: float | None = 5,
        *,
        priority: int | None = None,
        namespaces: Sequence[str] = (),
        pod_ip: str | None = None,
    ) -> None:
        """``resync_seconds`` is short for tests; None keeps the operator's default.

        With a ``priority`` the operator runs with Kopf peering at that priority
        (the peering object must exist); without one, standalone.

        Without a ``pod_ip`` it listens on 127.0.0.1. With one it is told that IP as
        the chart tells it (POD_IP) and picks its listen address itself, as in a pod:
        every address of that IP's family; it is then reached at that family's
        loopback address.
        """
        self.kubeconfig = kubeconfig
        self.pod_ip = pod_ip
        self.host = "[::1]" if pod_ip is not None and ":" in pod_ip else "127.0.0.1"
        self.log = log
        self.resync_seconds = resync_seconds
        self.priority = priority
        self.namespaces = tuple(namespaces)
        self.metrics_port = natsserver.free_port()
        self.health_port = natsserver.free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it and wait until its liveness endpoint answers."""
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "relayrl_operator.cli",
                    "run",
                    "--kubeconfig",
                    str(self.kubeconfig),
                    *(
                        ["--standalone"]
                        if self.priority is None
                        else ["--priority", str(self.priority)]
                    ),
                    *(arg for ns in self.namespaces for arg in ("--namespace", ns)),
                    *(["--bind", "127.0.0.1"] if self.pod_ip is None else []),
                    "--metrics-port",
                    str(self.metrics_port),
                    "--health-port",
                    str(self.health_port),
                    "--log-format",
                    "text",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={
                    **os.environ,
                    # Its temporary files (NATS credentials) beside its log, so that they
                    # go with the log's directory even when a test kills the operator.
                    "TMPDIR": str(self.log.parent),
                    # Pods on the process node share its network namespace.
                    "RELAYRL_POD_LISTEN": "podIP",
                    **(
                        {"RELAYRL_RESYNC_SECONDS": str(self.resync_seconds)}
                        if self.resync_seconds is not None
                        else {}
                    ),
                    **({"POD_IP": self.pod_ip} if self.pod_ip is not None else {}),
                },
            )
        testing.wait_for(self._healthy, timeout=60, what=f"operator healthy (log: {self.log})")

    def _healthy(self) -> bool:

        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"operator exited {self.proc.returncode}:\n{self.logs()}")
        try:
            with urllib.request.urlopen(
                f"http://{self.host}:{self.health_port}/healthz", timeout=2
            ):
                return True
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM and wait."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)

    def logs(self) -> str:
        """What it logged so far."""
        return self.log.read_text(errors="replace")[-20000:]

    def metrics(self) -> str:
        """Its /metrics page."""

        url = f"http://{self.host}:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return str(resp.read().decode())


class Agents:
    """Create, change and wait for Agents in one namespace."""

    def __init__(self, k8s: testing.ClusterHandle, namespace: str) -> None:
        self.k8s = k8s
        self.namespace = namespace
        self.api = client.CustomObjectsApi(k8s.api)

    def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Create an Agent."""
        out: dict[str, Any] = self.api.create_namespaced_custom_object(
            spec.GROUP, spec.VERSION, self.namespace, spec.PLURAL, manifest
        )
        return out

    def get(self, name: str) -> dict[str, Any]:
        """The Agent as the apiserver has it."""
        out: dict[str, Any] = self.api.get_namespaced_custom_object(
            spec.GROUP, spec.VERSION, self.namespace, spec.PLURAL, name
        )
        return out

    def patch(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """A merge patch of the Agent."""
        out: dict[str, Any] = self.api.patch_namespaced_custom_object(
            spec.GROUP, spec.VERSION, self.namespace, spec.PLURAL, name, patch
        )
        return out

    def delete(self, name: str) -> None:
        """Delete the Agent."""
        self.api.delete_namespaced_custom_object(
            spec.GROUP, spec.VERSION, self.namespace, spec.PLURAL, name
        )

    def wait(self, name: str, what: str, check: Any, timeout: float = 60) -> dict[str, Any]:
        """Wait until `check(agent)` is true; return the Agent."""
        seen: dict[str, Any] = {}

        def ready() -> bool:
            seen.update(self.get(name))
            return bool(check(seen))

        try:
            testing.wait_for(ready, timeout=timeout, what=what)
        except Exception as err:
            raise AssertionError(
                f"{what}: last seen status {seen.get('status')}\n{self.pod_logs()}"
            ) from err
        return seen

    def actor_pods(self) -> list[Any]:
        """The actor pods in this namespace (every Agent's)."""
        return list(
            self.k8s.core.list_namespaced_pod(
                self.namespace, label_selector="app.kubernetes.io/component=actors"
            ).items
        )

    def parquet_rows(self, agent: str) -> int:
        """Rows in the Parquet files an Agent's Arrow sink (on the process node) committed."""
        files = list(
            self.k8s.node.work_dir.glob(
                f"pods/{self.namespace}/{agent}-arrow-sink-*/volumes/data/**/*.parquet"
            )
        )
        return ds.dataset(files, format="parquet").count_rows() if files else 0

    def pod_logs(self, tail: int = 3000) -> str:
        """The last output of every container that ran on the process node here."""
        out = []
        for pod in self.k8s.core.list_namespaced_pod(self.namespace).items:
            for container in pod.spec.containers:
                path = self.k8s.node.log_path(self.namespace, pod.metadata.name, container.name)
                if path is not None and path.is_file():
                    text = path.read_text(errors="replace")[-tail:]
                    out.append(f"--- {pod.metadata.name}/{container.name}\n{text}")
        return "\n".join(out)

    def wait_phase(self, name: str, phase: str, timeout: float = 60) -> dict[str, Any]:
        """Wait for a phase at the current generation."""

        def check(a: dict[str, Any]) -> bool:
            st = a.get("status") or {}
            return bool(
                st.get("phase") == phase
                and st.get("observedGeneration") == a["metadata"]["generation"]
            )

        return self.wait(name, f"agent {name} phase {phase}", check, timeout)


def elapsed_since(start: float) -> float:
    """Seconds since a monotonic timestamp."""
    return time.monotonic() - start
