"""The local stack behaves like a cluster: versions, scheduling on kwok nodes, the process node.

Runs against the session cluster of ``conftest.py`` (the local stack, or an existing
cluster with ``RELAYRL_USE_EXISTING_CLUSTER=1``).
"""

from __future__ import annotations

import base64
import functools
import json
import os
import secrets
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
import yaml
from kubernetes import client

from relayrl_localstack import binaries, cluster, podrunner, processnode, procs
from relayrl_localstack.testing import (
    ClusterHandle,
    condition,
    process_alive,
    process_node_placement,
    wait_for,
)


def _pinned_version() -> str:
    return binaries.read_versions()["KUBERNETES_VERSION"]


def _pod_gone(k8s: ClusterHandle, namespace: str, name: str) -> bool:
    return not k8s.exists(k8s.core.read_namespaced_pod, name, namespace)


@pytest.mark.timeout(60)
def test_apiserver_and_kubectl_report_the_pinned_version(k8s: ClusterHandle) -> None:
    version = cluster.server_version(k8s.kubeconfig)
    if k8s.local is not None:
        assert version["gitVersion"] == _pinned_version()
        assert version["major"] == "1"
        assert version["minor"] == _pinned_version().split(".")[1]
    else:
        assert version["gitVersion"].startswith("v1.")
    client_version = json.loads(k8s.kubectl("version", "--client", "-o", "json").stdout)
    assert client_version["clientVersion"]["gitVersion"] == _pinned_version()


@pytest.mark.timeout(120)
def test_deployment_pods_schedule_onto_kwok_nodes_and_run(
    k8s: ClusterHandle, namespace: str
) -> None:
    labels = {"app": "web"}
    apps: Any = client.AppsV1Api(k8s.api)
    apps.create_namespaced_deployment(
        namespace,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 3,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "nodeSelector": {"type": "kwok"},
                        "containers": [{"name": "web", "image": "registry.invalid/web:1"}],
                    },
                },
            },
        },
    )

    def running_pods() -> list[dict[str, Any]] | None:
        pods = k8s.get_json(k8s.core.list_namespaced_pod, namespace)["items"]
        running = [p for p in pods if p["status"].get("phase") == "Running"]
        return running if len(running) == 3 else None

    pods = wait_for(running_pods, timeout=90, what="3 Running pods of the Deployment")
    assert {p["spec"]["nodeName"] for p in pods} <= set(k8s.kwok_nodes)
    wait_for(
        lambda: (
            k8s.get_json(apps.read_namespaced_deployment, "web", namespace)["status"].get(
                "availableReplicas"
            )
            == 3
        ),
        timeout=60,
        what="Deployment available",
    )


@pytest.mark.timeout(120)
def test_gpu_pod_lands_on_a_gpu_node(k8s: ClusterHandle, namespace: str) -> None:
    k8s.core.create_namespaced_pod(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "trainer"},
            "spec": {
                "containers": [
                    {
                        "name": "trainer",
                        "image": "registry.invalid/trainer:1",
                        "resources": {"limits": {"nvidia.com/gpu": "2"}},
                    }
                ]
            },
        },
    )
    pod = wait_for(
        lambda: (p := k8s.pod(namespace, "trainer"))["status"].get("phase") == "Running" and p,
        timeout=90,
        what="the GPU pod Running",
    )
    node = k8s.get_json(k8s.core.read_node, pod["spec"]["nodeName"])
    assert node["metadata"]["labels"]["nvidia.com/gpu.present"] == "true"


@pytest.mark.timeout(120)
def test_pod_asking_for_too_many_gpus_stays_pending_with_the_schedulers_reason(
    k8s: ClusterHandle, namespace: str
) -> None:
    nodes = k8s.get_json(k8s.core.list_node)["items"]
    most = max(int(n["status"].get("allocatable", {}).get("nvidia.com/gpu", "0")) for n in nodes)
    assert most > 0, "the session's kwok GPU nodes are missing"
    too_many = str(most + 1)
    k8s.core.create_namespaced_pod(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "greedy"},
            "spec": {
                "containers": [
                    {
                        "name": "greedy",
                        "image": "registry.invalid/greedy:1",
                        "resources": {"limits": {"nvidia.com/gpu": too_many}},
                    }
                ]
            },
        },
    )
    scheduled = wait_for(
        lambda: condition(k8s.pod(namespace, "greedy"), "PodScheduled"),
        timeout=60,
        what="a PodScheduled condition",
    )
    assert scheduled["status"] == "False"
    assert scheduled["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in scheduled["message"]
    assert k8s.pod(namespace, "greedy")["status"]["phase"] == "Pending"


SERVER = textwrap.dedent(
    """
    import http.server, json, os, sys
    config_path, secret_path, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    report = {
        "greeting": os.environ["GREETING"],
        "token": os.environ["API_TOKEN"],
        "pod": os.environ["POD_NAME"],
        "namespace": os.environ["POD_NAMESPACE"],
        "pod_ip": os.environ["POD_IP"],
        "config": open(config_path).read(),
        "secret_file": open(secret_path).read(),
        "cwd": os.getcwd(),
        "python": sys.executable,
        "mount_root": os.environ["RELAYRL_MOUNT_ROOT"],
    }
    with open("report.json", "w") as f:
        json.dump(report, f)
    http.server.ThreadingHTTPServer.allow_reuse_address = True
    handler = http.server.SimpleHTTPRequestHandler
    http.server.ThreadingHTTPServer((os.environ["POD_IP"], port), handler).serve_forever()
    """
)


@pytest.mark.timeout(120)
def test_pod_on_the_process_node_runs_turns_ready_and_is_killed_on_delete(
    k8s: ClusterHandle, namespace: str
) -> None:
    core = k8s.core
    core.create_namespaced_config_map(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "settings"},
            "data": {"greeting": "hello from a configmap", "app.conf": "answer = 42\n"},
        },
    )
    core.create_namespaced_secret(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "creds"},
            "stringData": {"token": "s3cr3t", "password": "hunter2"},
        },
    )
    port = procs.free_port()
    core.create_namespaced_pod(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "server"},
            "spec": {
                **process_node_placement(),
                "terminationGracePeriodSeconds": 5,
                "containers": [
                    {
                        "name": "server",
                        "image": "ignored:latest",
                        "command": ["python", "-c", SERVER],
                        "args": [
                            "/etc/relayrl/app.conf",
                            "/var/run/creds/password",
                            str(port),
                        ],
                        "workingDir": "/srv/www",
                        "ports": [{"name": "http", "containerPort": port}],
                        "env": [
                            {
                                "name": "GREETING",
                                "valueFrom": {
                                    "configMapKeyRef": {"name": "settings", "key": "greeting"}
                                },
                            },
                            {
                                "name": "API_TOKEN",
                                "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}},
                            },
                            {
                                "name": "POD_NAME",
                                "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                            },
                            {
                                "name": "POD_NAMESPACE",
                                "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
                            },
                            {
                                "name": "POD_IP",
                                "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
                            },
                        ],
                        "volumeMounts": [
                            {"name": "config", "mountPath": "/etc/relayrl"},
                            {"name": "creds", "mountPath": "/var/run/creds", "readOnly": True},
                        ],
                        "readinessProbe": {
                            "httpGet": {"path": "/report.json", "port": "http"},
                            "periodSeconds": 1,
                        },
                    }
                ],
                "volumes": [
                    {"name": "config", "configMap": {"name": "settings"}},
                    {"name": "creds", "secret": {"secretName": "creds"}},
                ],
            },
        },
    )
    pod = wait_for(
        lambda: (
            (condition(p := k8s.pod(namespace, "server"), "Ready") or {}).get("status") == "True"
            and p
        ),
        timeout=60,
        what="the process-node pod Ready",
    )
    assert pod["spec"]["nodeName"] == k8s.process_node
    assert pod["status"]["phase"] == "Running"
    pod_ip = pod["status"]["podIP"]
    assert pod_ip.startswith("127.1.")
    (status,) = pod["status"]["containerStatuses"]
    assert status["ready"] is True
    assert "running" in status["state"]
    pid = int(status["containerID"].removeprefix("process://"))
    assert process_alive(pid)

    with urllib.request.urlopen(f"http://{pod_ip}:{port}/report.json", timeout=5) as response:
        report = json.loads(response.read())
    assert report["greeting"] == "hello from a configmap"
    assert report["token"] == "s3cr3t"
    assert report["pod"] == "server"
    assert report["namespace"] == namespace
    assert report["pod_ip"] == pod_ip
    assert report["config"] == "answer = 42\n"
    assert report["secret_file"] == "hunter2"
    assert report["cwd"] == os.path.join(report["mount_root"], "srv/www")
    assert Path(report["python"]).parent == Path(sys.executable).parent

    core.delete_namespaced_pod("server", namespace)
    wait_for(lambda: _pod_gone(k8s, namespace, "server"), timeout=30, what="the pod deleted")
    wait_for(lambda: not process_alive(pid), timeout=10, what=f"process {pid} gone")


@pytest.mark.timeout(120)
def test_process_node_restarts_a_failing_container_per_restart_policy(
    k8s: ClusterHandle, namespace: str
) -> None:
    k8s.core.create_namespaced_pod(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "crasher"},
            "spec": {
                **process_node_placement(),
                "restartPolicy": "OnFailure",
                "containers": [
                    {
                        "name": "crasher",
                        "image": "ignored",
                        "command": ["python", "-c", "import sys; sys.exit(3)"],
                    }
                ],
            },
        },
    )

    def restarted() -> dict[str, Any] | None:
        statuses = k8s.pod(namespace, "crasher")["status"].get("containerStatuses") or []
        if statuses and statuses[0]["restartCount"] >= 2 and statuses[0].get("lastState"):
            return dict(statuses[0])
        return None

    status = wait_for(restarted, timeout=60, what="two restarts")
    assert status["lastState"]["terminated"]["exitCode"] == 3
    assert k8s.pod(namespace, "crasher")["status"]["phase"] == "Running"


@pytest.mark.timeout(60)
def test_process_node_pod_that_succeeds_reports_succeeded(
    k8s: ClusterHandle, namespace: str
) -> None:
    k8s.core.create_namespaced_pod(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "job"},
            "spec": {
                **process_node_placement(),
                "restartPolicy": "Never",
                "containers": [
                    {"name": "job", "image": "ignored", "command": ["python", "-c", "pass"]}
                ],
            },
        },
    )
    pod = wait_for(
        lambda: (p := k8s.pod(namespace, "job"))["status"].get("phase") == "Succeeded" and p,
        timeout=30,
        what="the pod Succeeded",
    )
    (status,) = pod["status"]["containerStatuses"]
    assert status["state"]["terminated"]["exitCode"] == 0
    assert status["state"]["terminated"]["reason"] == "Completed"


@pytest.mark.timeout(180)
def test_local_cluster_teardown_leaves_no_process_behind(
    k8s: ClusterHandle, tmp_path: Path
) -> None:
    with cluster.LocalCluster(tmp_path / "cluster", bins=k8s.bins) as local:
        pids = local.pids()
        assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"}
        assert all(process_alive(pid) for pid in pids.values())
        assert cluster.server_version(local.kubeconfig)["gitVersion"] == _pinned_version()
    leftovers = {name: pid for name, pid in pids.items() if procs.group_alive(pid)}
    assert leftovers == {}
    # Nothing else was started from the cluster's work dir either.
    work = str(tmp_path / "cluster")
    strays = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if work in cmdline and process_alive(int(entry.name)):
                strays.append(cmdline)
    assert strays == []


@pytest.mark.timeout(60)
def test_process_node_kills_a_process_ignoring_sigterm_after_the_grace_period(
    k8s: ClusterHandle, namespace: str
) -> None:
    port = procs.free_port()
    # Ignores SIGTERM, then listens: the tcpSocket readiness probe tells when it is armed.
    stubborn = (
        "import signal, socket, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"s = socket.create_server(('0.0.0.0', {port})); time.sleep(600)"
    )
    k8s.core.create_namespaced_pod(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "stubborn"},
            "spec": {
                **process_node_placement(),
                "terminationGracePeriodSeconds": 2,
                "containers": [
                    {
                        "name": "stubborn",
                        "image": "ignored",
                        "command": ["python", "-c", stubborn],
                        "readinessProbe": {"tcpSocket": {"port": port}, "periodSeconds": 1},
                    }
                ],
            },
        },
    )

    def ready_pid() -> int | None:
        statuses = k8s.pod(namespace, "stubborn")["status"].get("containerStatuses") or []
        if statuses and statuses[0]["ready"]:
            return int(statuses[0]["containerID"].removeprefix("process://"))
        return None

    pid = wait_for(ready_pid, timeout=30, what="the stubborn pod Ready")
    started = time.monotonic()
    k8s.core.delete_namespaced_pod("stubborn", namespace)
    wait_for(lambda: not process_alive(pid), timeout=20, what=f"process {pid} killed")
    took = time.monotonic() - started
    assert 1.5 <= took < 10, f"killed after {took:.1f}s, expected the 2s grace period"
    wait_for(lambda: _pod_gone(k8s, namespace, "stubborn"), timeout=20, what="the pod deleted")


@pytest.mark.timeout(90)
def test_pods_on_the_process_node_have_their_own_ips_and_live_volumes(
    k8s: ClusterHandle, namespace: str
) -> None:
    """Two pods bind the same port on their own pod IPs; a changed ConfigMap reaches them."""
    port = procs.free_port()
    core = k8s.core
    core.create_namespaced_config_map(
        namespace,
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "live"}, "data": {"v": "1"}},
    )
    serve = (
        "import http.server, os; os.chdir(os.environ['DATA']); "
        "http.server.ThreadingHTTPServer((os.environ['POD_IP'], "
        f"{port}), http.server.SimpleHTTPRequestHandler).serve_forever()"
    )
    for name in ("one", "two"):
        core.create_namespaced_pod(
            namespace,
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name},
                "spec": {
                    "nodeName": k8s.process_node,
                    "tolerations": [{"operator": "Exists"}],
                    "containers": [
                        {
                            "name": "web",
                            "image": "ignored",
                            "command": ["python", "-c", serve],
                            "ports": [{"name": "http", "containerPort": port}],
                            "env": [
                                {
                                    "name": "POD_IP",
                                    "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
                                },
                                {"name": "DATA", "value": "/data"},
                            ],
                            "volumeMounts": [{"name": "live", "mountPath": "/data"}],
                            "readinessProbe": {
                                "httpGet": {"path": "/v", "port": "http"},
                                "periodSeconds": 1,
                            },
                        }
                    ],
                    "volumes": [{"name": "live", "configMap": {"name": "live"}}],
                },
            },
        )
    ips = []
    for name in ("one", "two"):
        pod = wait_for(
            lambda name=name: (
                (condition(p := k8s.pod(namespace, name), "Ready") or {}).get("status") == "True"
                and p
            ),
            timeout=60,
            what=f"pod {name} Ready",
        )
        ips.append(pod["status"]["podIP"])
    assert len(set(ips)) == 2

    def served(ip: str) -> str:
        with urllib.request.urlopen(f"http://{ip}:{port}/v", timeout=5) as response:
            return str(response.read().decode())

    assert [served(ip) for ip in ips] == ["1", "1"]
    core.patch_namespaced_config_map("live", namespace, {"data": {"v": "2"}})
    wait_for(
        lambda: [served(ip) for ip in ips] == ["2", "2"],
        timeout=30,
        what="the changed ConfigMap in both pods' volumes",
    )


@pytest.fixture
def own_node(k8s: ClusterHandle, tmp_path: Path) -> Iterator[processnode.ProcessNode]:
    """A process node of the test's own, whose API client a test may wrap to inject a
    failed read without touching the session's node. Pods reach it by ``nodeName``
    (it is tainted like the session's, so the scheduler sends it nothing)."""
    name = f"relayrl-test-own-{secrets.token_hex(3)}"
    with processnode.ProcessNode(
        k8s.api, name=name, work_dir=tmp_path / "node", heartbeat_seconds=5
    ) as node:
        yield node


class FailingReads:
    """Wraps one client method: the next calls fail with the given errors, in turn."""

    def __init__(self, method: Callable[..., Any], *errors: Exception) -> None:
        self.method = method
        self.errors = list(errors)
        self.lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            error = self.errors.pop(0) if self.errors else None
        if error is not None:
            raise error
        return self.method(*args, **kwargs)

    def spent(self) -> bool:
        with self.lock:
            return not self.errors


def _transient_errors() -> list[Exception]:
    """What a read of the apiserver can meet: a 5xx, and a dropped connection."""
    return [
        client.ApiException(status=500, reason="etcdserver: request timed out"),
        urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError(104)),
    ]


def _sleeper_with_a_config_volume(node: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "sleeper"},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "sleeper",
                    "image": "ignored",
                    "command": ["sleep", "300"],
                    "volumeMounts": [{"name": "cfg", "mountPath": "/cfg"}],
                }
            ],
            "volumes": [{"name": "cfg", "configMap": {"name": "cfg"}}],
        },
    }


def _pod_ip(k8s: ClusterHandle, namespace: str, name: str) -> str | None:
    ip = k8s.pod(namespace, name)["status"].get("podIP")
    return str(ip) if ip else None


def _ready_pid(k8s: ClusterHandle, namespace: str, name: str) -> int | None:
    pod = k8s.pod(namespace, name)
    statuses = pod["status"].get("containerStatuses") or []
    if (condition(pod, "Ready") or {}).get("status") == "True" and statuses:
        return int(statuses[0]["containerID"].removeprefix("process://"))
    return None


@pytest.mark.timeout(90)
def test_failed_api_reads_during_a_volume_refresh_keep_the_pod_running(
    k8s: ClusterHandle, namespace: str, own_node: processnode.ProcessNode
) -> None:
    core = k8s.core
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "cfg"}, "data": {"v": "1"}})
    core.create_namespaced_pod(namespace, _sleeper_with_a_config_volume(own_node.name))
    pid = wait_for(lambda: _ready_pid(k8s, namespace, "sleeper"), timeout=30, what="the pod Ready")
    flaky = FailingReads(own_node.core.read_namespaced_config_map, *_transient_errors())
    own_node.core.read_namespaced_config_map = flaky
    wait_for(flaky.spent, timeout=15, what="the refreshes to meet both failed reads")
    # One more refresh after the failures.
    time.sleep(2 * podrunner.VOLUME_REFRESH_SECONDS)
    assert process_alive(pid), "the container's process was killed by a failed API read"
    assert _ready_pid(k8s, namespace, "sleeper") == pid
    assert k8s.pod(namespace, "sleeper")["status"]["phase"] == "Running"
    # The volume still follows its ConfigMap.
    core.patch_namespaced_config_map("cfg", namespace, {"data": {"v": "2"}})
    (volume,) = own_node.work_dir.glob(f"pods/{namespace}/sleeper-*/volumes/cfg")
    wait_for(lambda: (volume / "v").read_text() == "2", timeout=15, what="the ConfigMap change")


@pytest.mark.timeout(90)
def test_failed_api_reads_while_a_pod_starts_are_retried(
    k8s: ClusterHandle, namespace: str, own_node: processnode.ProcessNode
) -> None:
    core = k8s.core
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "cfg"}, "data": {"v": "1"}})
    flaky = FailingReads(own_node.core.read_namespaced_config_map, *_transient_errors())
    own_node.core.read_namespaced_config_map = flaky
    core.create_namespaced_pod(namespace, _sleeper_with_a_config_volume(own_node.name))
    pid = wait_for(
        lambda: _ready_pid(k8s, namespace, "sleeper"),
        timeout=30,
        what="the pod Ready after two failed reads of its ConfigMap",
    )
    assert flaky.spent()
    assert process_alive(pid)


@pytest.mark.timeout(90)
def test_a_runner_that_fails_reports_the_pod_failed_with_the_reason(
    k8s: ClusterHandle,
    namespace: str,
    own_node: processnode.ProcessNode,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: Any) -> dict[str, str]:
        raise RuntimeError("no env for you")

    monkeypatch.setattr(own_node, "pod_extra_env", broken)
    k8s.core.create_namespaced_pod(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "doomed"},
            "spec": {
                "nodeName": own_node.name,
                "containers": [{"name": "c", "image": "ignored", "command": ["sleep", "300"]}],
            },
        },
    )
    pod = wait_for(
        lambda: (p := k8s.pod(namespace, "doomed"))["status"].get("phase") == "Failed" and p,
        timeout=30,
        what="the pod Failed",
    )
    assert pod["status"]["reason"] == "ProcessNodeError"
    assert "RuntimeError: no env for you" in pod["status"]["message"]
    assert (condition(pod, "Ready") or {}).get("status") == "False"
    # Deleting it still works: the node did not forget the pod.
    k8s.core.delete_namespaced_pod("doomed", namespace)
    wait_for(lambda: _pod_gone(k8s, namespace, "doomed"), timeout=30, what="the pod deleted")


@pytest.mark.timeout(90)
def test_a_secret_value_that_is_not_text_in_env_is_a_config_error_until_fixed(
    k8s: ClusterHandle, namespace: str
) -> None:
    core = k8s.core
    core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "binary"},
            "data": {"key": base64.b64encode(b"\xff\xfe\x00k").decode()},
        },
    )
    core.create_namespaced_pod(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "reader"},
            "spec": {
                **process_node_placement(),
                "terminationGracePeriodSeconds": 1,
                "containers": [
                    {
                        "name": "reader",
                        "image": "ignored",
                        "command": ["sleep", "300"],
                        "env": [
                            {
                                "name": "KEY",
                                "valueFrom": {"secretKeyRef": {"name": "binary", "key": "key"}},
                            }
                        ],
                    }
                ],
            },
        },
    )

    def waiting() -> dict[str, Any] | None:
        statuses = k8s.pod(namespace, "reader")["status"].get("containerStatuses") or []
        return statuses[0]["state"].get("waiting") if statuses else None

    state = wait_for(
        lambda: (w := waiting()) and w.get("reason") == "CreateContainerConfigError" and w,
        timeout=30,
        what="the container waiting with CreateContainerConfigError",
    )
    assert 'key "key" of secret "binary" is not UTF-8 text' in state["message"]
    assert k8s.pod(namespace, "reader")["status"]["phase"] == "Pending"
    # Retried: a fixed Secret lets the pod start.
    core.patch_namespaced_secret("binary", namespace, {"stringData": {"key": "text"}})
    wait_for(lambda: _ready_pid(k8s, namespace, "reader"), timeout=30, what="the pod Ready")


@pytest.mark.timeout(150)
def test_local_cluster_starts_with_a_proxy_in_the_environment(
    k8s: ClusterHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its health checks of loopback ports do not go to the user's proxy."""
    proxy = f"http://127.0.0.1:{procs.free_port()}"  # nothing listens there
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(name, proxy)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with cluster.LocalCluster(tmp_path / "cluster", bins=k8s.bins, startup_timeout=60) as local:
        assert cluster.server_version(local.kubeconfig)["gitVersion"] == _pinned_version()


WHOAMI = textwrap.dedent(
    """
    import hashlib, time, kubernetes
    while True:
        # Loads $KUBECONFIG again each time, as kopf does after a 401.
        cfg = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(client_configuration=cfg)
        bearer = cfg.api_key.get("BearerToken") or cfg.api_key.get("authorization")
        with kubernetes.client.ApiClient(cfg) as api:
            review = kubernetes.client.AuthenticationV1Api(api).create_self_subject_review(
                {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
            )
        digest = hashlib.sha256(str(bearer).encode()).hexdigest()[:12]
        print(review.status.user_info.username, digest, flush=True)
        time.sleep(1)
    """
)


def _jwt_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return claims


@pytest.mark.timeout(120)
def test_a_pods_token_is_renewed_near_its_end_and_its_kubeconfig_reads_the_file(
    k8s: ClusterHandle,
    namespace: str,
    own_node: processnode.ProcessNode,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    k8s.core.create_namespaced_pod(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "whoami"},
            "spec": {
                "nodeName": own_node.name,
                "terminationGracePeriodSeconds": 1,
                "containers": [
                    {"name": "whoami", "image": "ignored", "command": ["python", "-c", WHOAMI]}
                ],
            },
        },
    )
    wait_for(lambda: _ready_pid(k8s, namespace, "whoami"), timeout=30, what="the pod Ready")
    # The ServiceAccount admission plugin's volume: a token of 3607 s.
    (token_file,) = own_node.work_dir.glob(
        f"pods/{namespace}/whoami-*/volumes/kube-api-access-*/token"
    )
    (kubeconfig,) = own_node.work_dir.glob(f"pods/{namespace}/whoami-*/kubeconfig")
    user = yaml.safe_load(kubeconfig.read_text())["users"][0]["user"]
    assert user == {"tokenFile": str(token_file)}
    first = token_file.read_text()
    claims = _jwt_claims(first)
    # The apiserver gives the kubelet's default lifetime a year: a client that read
    # the token once keeps working after the file is renewed.
    assert claims["exp"] - claims["iat"] > 86400
    log = own_node.log_path(namespace, "whoami", "whoami")
    assert log is not None
    account = f"system:serviceaccount:{namespace}:default"
    wait_for(lambda: account in log.read_text(), timeout=30, what="the pod authenticated")

    # Fresh: no new token at each volume refresh.
    time.sleep(3 * podrunner.VOLUME_REFRESH_SECONDS)
    assert token_file.read_text() == first, "the token was requested again while fresh"

    # Past the renewal point (here a few seconds): a new token, which the pod then uses.
    monkeypatch.setattr(processnode, "TOKEN_RENEW_FRACTION", 0.001)
    wait_for(lambda: token_file.read_text() != first, timeout=20, what="a renewed token")

    def tokens_used() -> set[str]:
        lines = [line.split() for line in log.read_text().splitlines()]
        return {digest for name, digest in (x for x in lines if len(x) == 2) if name == account}

    wait_for(lambda: len(tokens_used()) >= 2, timeout=20, what="the pod using the new token")


@pytest.mark.timeout(120)
def test_pods_of_two_process_nodes_on_one_host_get_different_addresses(
    k8s: ClusterHandle, namespace: str, own_node: processnode.ProcessNode, tmp_path: Path
) -> None:
    """A second stack's node, here a process node in a process of its own."""
    other_name = f"relayrl-test-other-{secrets.token_hex(3)}"
    other = procs.spawn(
        [
            sys.executable,
            "-m",
            "relayrl_localstack.processnode",
            "--kubeconfig",
            str(k8s.kubeconfig),
            "--name",
            other_name,
            "--work-dir",
            str(tmp_path / "other"),
        ],
        log_path=tmp_path / "other.log",
    )
    try:
        wait_for(
            lambda: k8s.exists(k8s.core.read_node, other_name),
            timeout=30,
            what=f"node {other_name} registered",
        )
        for name, node in (("here", own_node.name), ("there", other_name)):
            k8s.core.create_namespaced_pod(
                namespace,
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": name},
                    "spec": {
                        "nodeName": node,
                        "terminationGracePeriodSeconds": 1,
                        "containers": [
                            {"name": "c", "image": "ignored", "command": ["sleep", "300"]}
                        ],
                    },
                },
            )
        ips = [
            wait_for(
                functools.partial(_pod_ip, k8s, namespace, name),
                timeout=30,
                what=f"pod {name}'s address",
            )
            for name in ("here", "there")
        ]
        assert ips[0] != ips[1]
        for name in ("here", "there"):
            k8s.core.delete_namespaced_pod(name, namespace)
        for name in ("here", "there"):
            gone = functools.partial(_pod_gone, k8s, namespace, name)
            wait_for(gone, timeout=30, what=f"pod {name} deleted")
    finally:
        procs.stop_group(other.pid, grace_seconds=20, popen=other)
