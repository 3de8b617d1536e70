"""Fixtures for the Agent tests on a cluster: the CRDs, NATS and a running operator."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from relayrl_localstack import testing
from support import fleet, natsserver, postgres

REPO = Path(__file__).resolve().parents[3]
CRDS = [REPO / "crds" / "agents.relayrl.io.yaml", REPO / "crds" / "kopf.dev.yaml"]


@pytest.fixture(scope="session")
def agent_crd(k8s: testing.ClusterHandle) -> testing.ClusterHandle:
    """The cluster with the Agent and peering CRDs applied and established."""
    for path in CRDS:
        k8s.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    k8s.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/agents.relayrl.io")
    # Established comes before discovery and the OpenAPI document list the new kind.
    testing.wait_for(
        lambda: k8s.kubectl("explain", "agent.spec", check=False).returncode == 0,
        timeout=60,
        what="Agent in the apiserver's OpenAPI",
    )
    return k8s


@pytest.fixture(scope="session")
def nats() -> Iterator[natsserver.NatsServer]:
    """A real nats-server with JetStream for the session."""
    with natsserver.NatsServer() as server:
        yield server


@pytest.fixture(scope="session")
def operator(
    agent_crd: testing.ClusterHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[fleet.Operator]:
    """One operator process for the session, watching every namespace, and what the
    chart installs beside it: the policy that puts the finalizer on Agents. (Only
    beside a running operator: tests of the Agent API alone make Agents that no
    operator would finalize.)"""
    agent_crd.kubectl("apply", "-f", "-", input_text=fleet.finalizer_policy_yaml())
    fleet.wait_finalizer_policy(agent_crd.api)
    # pytest's temporary directories: kept for the last few runs, then removed.
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    # Told an IPv6 pod IP, as in an IPv6 cluster: it listens on "::" by itself (its
    # probes and metrics are then reached at ::1).
    op = fleet.Operator(agent_crd.kubeconfig, log, pod_ip="fd00:10::7")
    op.start()
    yield op
    op.stop()


@pytest.fixture
def agents(agent_crd: testing.ClusterHandle, namespace: str) -> fleet.Agents:
    """Agents in this test's namespace."""
    return fleet.Agents(agent_crd, namespace)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[postgres.PostgresServer]:
    """A real PostgreSQL for the session."""
    with postgres.PostgresServer() as server:
        yield server
