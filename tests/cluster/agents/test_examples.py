"""Every example under examples/ applied to a cluster with kubectl, as a user would.

An example names addresses only its reader's cluster has (``nats://nats:4222``, the
``relayrl-models`` bucket, a database host) and leaves placement to the scheduler.
:func:`localize` changes exactly those, and nothing else, before ``kubectl apply``:
the NATS URL and model bucket become this session's, Postgres DSNs its server's,
Arrow sinks drop a host ``path`` (on the process node that would be the host's own
directory) and rotate their files every 5 s (a file's rows show once it is committed),
and pods that must really run go to the process node. The CPU and GPU
fleets run on kwok nodes; remote-simulators, postgres-sink and model-update run for
real on the process node.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from relayrl_localstack import testing
from relayrl_runtime import spec
from support import fleet, natsserver, postgres

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def localize(
    doc: dict[str, Any], *, nats_url: str, bucket: str, dsn: str = "", process_node: bool
) -> dict[str, Any]:
    """The example object with this session's addresses and placement (see module doc)."""
    out = copy.deepcopy(doc)
    placement = testing.process_node_placement() if process_node else {}
    if out["kind"] == spec.KIND:
        agent = out["spec"]
        agent.setdefault("trajectories", {})["nats"] = {"url": nats_url}
        model = agent["model"]
        model["uri"] = f"objectstore://{bucket}/{model['uri'].rsplit('/', 1)[1]}"
        for sink in agent.get("sinks") or []:
            if "arrow" in sink:
                sink["arrow"].pop("path", None)
                # Files are committed (renamed into place) when they rotate: soon, here.
                sink["arrow"]["rotateSeconds"] = 5
        agent.setdefault("template", {}).update(placement)
    elif out["kind"] == "Secret" and "dsn" in out.get("stringData", {}):
        out["stringData"]["dsn"] = dsn
    elif out["kind"] == "Deployment":
        out["spec"]["template"]["spec"].update(placement)
    return out


def apply(k8s: testing.ClusterHandle, namespace: str, docs: list[dict[str, Any]]) -> None:
    k8s.kubectl("apply", "--namespace", namespace, "-f", "-", input_text=yaml.safe_dump_all(docs))


@pytest.fixture
def bucket(
    agents: fleet.Agents,
    nats: natsserver.NatsServer,
    postgres_server: postgres.PostgresServer,
    namespace: str,
    tmp_path: Path,
) -> str:
    """Model v1 in this namespace's registry bucket (and the DSN Secret `pg`)."""
    return fleet.prepare_fleet(agents.k8s, namespace, nats.url, postgres_server.dsn, tmp_path)


@pytest.mark.usefixtures("operator")
@pytest.mark.parametrize("example", ["cartpole-cpu", "gpu-fleet"])
def test_fleet_example_becomes_ready_on_kwok_nodes(
    example: str, agents: fleet.Agents, nats: natsserver.NatsServer, bucket: str, namespace: str
) -> None:
    (doc,) = documents(EXAMPLES / example / "agent.yaml")
    apply(
        agents.k8s, namespace, [localize(doc, nats_url=nats.url, bucket=bucket, process_node=False)]
    )
    name = doc["metadata"]["name"]
    agent = agents.wait_phase(name, "Ready", timeout=120)
    assert agent["status"]["readyActors"] == doc["spec"]["actors"]
    pods = agents.actor_pods()
    assert len(pods) == doc["spec"]["actors"] // doc["spec"]["actorsPerPod"]
    gpus = doc["spec"].get("gpusPerPod", 0) if doc["spec"]["device"] == "cuda" else 0
    for pod in pods:
        node = agents.k8s.core.read_node(pod.spec.node_name)
        assert int(node.status.capacity.get("nvidia.com/gpu", "0")) >= gpus, pod.spec.node_name
        limits = pod.spec.containers[0].resources.limits or {}
        if gpus:
            assert limits["nvidia.com/gpu"] == str(gpus)
        else:
            assert "nvidia.com/gpu" not in limits


@pytest.mark.timeout(600)
@pytest.mark.usefixtures("operator")
def test_postgres_sink_example_writes_rows(
    agents: fleet.Agents,
    nats: natsserver.NatsServer,
    postgres_server: postgres.PostgresServer,
    bucket: str,
    namespace: str,
) -> None:
    docs = documents(EXAMPLES / "postgres-sink" / "secret.yaml") + documents(
        EXAMPLES / "postgres-sink" / "agent.yaml"
    )
    apply(
        agents.k8s,
        namespace,
        [
            localize(
                d, nats_url=nats.url, bucket=bucket, dsn=postgres_server.dsn, process_node=True
            )
            for d in docs
        ],
    )
    agents.wait_phase("cartpole-pg", "Ready", timeout=240)
    testing.wait_for(
        lambda: fleet.postgres_steps(postgres_server.dsn, "agent = %s", ("cartpole-pg",)) > 1000,
        timeout=180,
        what=f"Postgres rows of cartpole-pg\n{agents.pod_logs()}",
    )


@pytest.mark.timeout(600)
@pytest.mark.usefixtures("operator")
def test_remote_simulators_example_steps_through_the_service(
    agents: fleet.Agents, nats: natsserver.NatsServer, bucket: str, namespace: str
) -> None:
    k8s = agents.k8s
    (agent_doc,) = documents(EXAMPLES / "remote-simulators" / "agent.yaml")
    (simulators,) = documents(EXAMPLES / "remote-simulators" / "simulators.yaml")
    apply(
        k8s, namespace, [localize(agent_doc, nats_url=nats.url, bucket=bucket, process_node=True)]
    )
    agents.wait_phase("sim-policy", "Ready", timeout=240)
    apply(
        k8s, namespace, [localize(simulators, nats_url=nats.url, bucket=bucket, process_node=True)]
    )

    def simulator_pods() -> list[Any]:
        return list(
            k8s.core.list_namespaced_pod(
                namespace, label_selector="app.kubernetes.io/name=sim-policy-simulators"
            ).items
        )

    replicas = simulators["spec"]["replicas"]
    testing.wait_for(
        lambda: sum(p.status.phase == "Running" for p in simulator_pods()) == replicas,
        timeout=180,
        what=f"{replicas} simulators running\n{agents.pod_logs()}",
    )
    # Trajectories finished by remote actors reach the Agent's Arrow sink.
    testing.wait_for(
        lambda: agents.parquet_rows("sim-policy") > 2000,
        timeout=240,
        what=f"Parquet rows from remote actors\n{agents.pod_logs()}",
    )
    for pod in simulator_pods():
        (status,) = pod.status.container_statuses
        assert status.restart_count == 0, agents.pod_logs()
    # The Service name in their args was resolved to one of the actor pods.
    actor_ips = {p.status.pod_ip for p in agents.actor_pods()}
    pids = k8s.node.pids()
    for pod in simulator_pods():
        pid = pids[f"{namespace}/{pod.metadata.name}/simulator"]
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        assert any(f"--address=tcp://{ip}:5555" in argv for ip in actor_ips), argv


@pytest.mark.timeout(600)
@pytest.mark.usefixtures("operator")
def test_model_update_example_changes_the_running_version(
    agents: fleet.Agents, nats: natsserver.NatsServer, bucket: str, namespace: str
) -> None:
    k8s = agents.k8s
    (doc,) = documents(EXAMPLES / "model-update" / "agent.yaml")
    apply(k8s, namespace, [localize(doc, nats_url=nats.url, bucket=bucket, process_node=True)])
    agents.wait(
        "cartpole-live",
        "Ready on model version 1",
        lambda a: (
            (a.get("status") or {}).get("phase") == "Ready" and a["status"].get("modelVersion") == 1
        ),
        timeout=240,
    )
    uids = {p.metadata.uid for p in agents.actor_pods()}
    venv_bin = str(Path(sys.executable).parent)
    result = subprocess.run(
        ["sh", str(EXAMPLES / "model-update" / "update-model.sh"), "2"],
        env={
            **os.environ,
            "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
            "NATS_URL": nats.url,
            "BUCKET": bucket,
            "NAMESPACE": namespace,
            "KUBECTL": str(k8s.bins.kubectl),
            "KUBECONFIG": str(k8s.kubeconfig),
            "TIMEOUT": "180s",
        },
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{agents.pod_logs()}"
    assert "cartpole-live" in result.stdout
    assert agents.get("cartpole-live")["status"]["modelVersion"] == 2
    after = {p.metadata.uid for p in agents.actor_pods()}
    assert after == uids, "a pushed model must not restart actor pods"
