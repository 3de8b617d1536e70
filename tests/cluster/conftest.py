"""Fixtures for the cluster tests: a Kubernetes cluster per session, a namespace per test.

By default the session starts the local stack (:mod:`relayrl_localstack`): the pinned
control plane on loopback, kwok with fake CPU and GPU nodes, and the process node.
With ``RELAYRL_USE_EXISTING_CLUSTER=1`` and ``KUBECONFIG`` naming a cluster (kind, in
the CI workflow for users with Docker), the same tests run against that cluster;
kwok and the process node still run here, against it, so every test has the same
nodes to work with. When that cluster is one started by ``relayrl-localstack up``
(it already has a Ready process node and kwok nodes), those are used as they are.

A test that needs the cluster and cannot get it fails: there is no skip. When cluster
tests are selected, the pinned binaries are built (once, cached) at the end of
collection, outside any test's timeout.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from relayrl_localstack import binaries, cluster, kwok, processnode, testing

HERE = Path(__file__).resolve().parent
USE_EXISTING = "RELAYRL_USE_EXISTING_CLUSTER"
CPU_NODES = 2
GPU_NODES = 2
GPUS_PER_NODE = 8
NODE_PREFIX = "relayrl-test"


def _use_existing() -> bool:
    return os.environ.get(USE_EXISTING) == "1"


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the binaries before any cluster test runs (a no-op when cached)."""
    if session.config.option.collectonly:
        return
    if any(Path(str(item.path)).is_relative_to(HERE) for item in session.items):
        binaries.ensure_binaries()


@pytest.fixture(scope="session")
def k8s(tmp_path_factory: pytest.TempPathFactory) -> Iterator[testing.ClusterHandle]:
    """The session's cluster: local stack, or an existing one (see module docstring)."""
    bins = binaries.ensure_binaries()
    work = tmp_path_factory.mktemp("localstack")
    with contextlib.ExitStack() as stack:
        local: cluster.LocalCluster | None = None
        if _use_existing():
            env_kubeconfig = os.environ.get("KUBECONFIG", "")
            if not env_kubeconfig or not Path(env_kubeconfig).is_file():
                pytest.fail(f"{USE_EXISTING}=1 but KUBECONFIG={env_kubeconfig!r} is no file")
            kubeconfig = Path(env_kubeconfig)
        else:
            local = stack.enter_context(cluster.LocalCluster(work / "cluster", bins=bins))
            kubeconfig = local.kubeconfig
        api = stack.enter_context(cluster.api_client_for(kubeconfig))
        running = _running_local_stack(api)
        if running is not None:
            # `relayrl-localstack up` already runs kwok and a process node there: a
            # second kwok or process node would fight over the same nodes.
            node_name, names = running
            yield testing.ClusterHandle(kubeconfig, api, bins, local, None, node_name, names)
            return
        stack.enter_context(kwok.Kwok(kubeconfig, work / "kwok", bins=bins))
        node = stack.enter_context(
            processnode.ProcessNode(api, work_dir=work / "process-node", heartbeat_seconds=5)
        )
        created = kwok.create_nodes(
            api, cpu=CPU_NODES, gpu=GPU_NODES, gpus_per_node=GPUS_PER_NODE, name_prefix=NODE_PREFIX
        )
        stack.callback(_delete_nodes, api, created)
        kwok.wait_nodes_ready(api, [node.name], timeout=30)
        yield testing.ClusterHandle(kubeconfig, api, bins, local, node, node.name, tuple(created))


def _running_local_stack(api: Any) -> tuple[str, tuple[str, ...]] | None:
    """The Ready process node and kwok nodes of a stack already running, if any."""
    nodes = testing.ClusterHandle.list_json(client.CoreV1Api(api).list_node)
    ready = [n for n in nodes if (testing.condition(n, "Ready") or {}).get("status") == "True"]
    process_nodes = [
        n["metadata"]["name"]
        for n in ready
        if n["metadata"].get("labels", {}).get(processnode.NODE_LABEL) == "true"
    ]
    kwok_nodes = tuple(
        n["metadata"]["name"]
        for n in ready
        if n["metadata"].get("annotations", {}).get(kwok.KWOK_NODE_ANNOTATION)
        == kwok.KWOK_NODE_ANNOTATION_VALUE
    )
    if process_nodes and kwok_nodes:
        return process_nodes[0], kwok_nodes
    return None


def _delete_nodes(api: Any, names: list[str]) -> None:
    core = client.CoreV1Api(api)
    for name in names:
        with contextlib.suppress(client.ApiException):
            core.delete_node(name)


@pytest.fixture
def namespace(k8s: testing.ClusterHandle, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards."""
    slug = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{slug}-{secrets.token_hex(3)}"
    core = k8s.core
    core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    # Pods are refused until the controller-manager has made the default ServiceAccount.
    testing.wait_for(
        lambda: k8s.exists(core.read_namespaced_service_account, "default", name),
        timeout=30,
        what=f"default ServiceAccount in {name}",
    )
    yield name
    with contextlib.suppress(client.ApiException):
        core.delete_namespace(name)
