"""End to end: an Agent whose pods really run, from `kubectl apply` to rows and files.

The actor pods and both sink pods run on the process node as real processes (the
runtime on CartPole-v1 with an ONNX model from the registry, the Arrow and Postgres
sinks), publishing through a real nats-server into a real PostgreSQL. A pushed model
version reaches the pods without a restart and shows in status and in the recorded
steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from relayrl_localstack import testing
from support import fleet, natsserver, postgres, specs


def conditions(agent: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (agent.get("status") or {}).get("conditions") or []}


@pytest.mark.timeout(600)
@pytest.mark.usefixtures("operator")
def test_agent_runs_on_the_process_node_end_to_end(
    agents: fleet.Agents,
    nats: natsserver.NatsServer,
    postgres_server: postgres.PostgresServer,
    namespace: str,
    tmp_path: Path,
) -> None:
    k8s = agents.k8s
    bucket = fleet.prepare_fleet(k8s, namespace, nats.url, postgres_server.dsn, tmp_path)
    placement = testing.process_node_placement()
    manifest = specs.merge_patch(
        specs.base_manifest(),
        {
            "spec": {
                "actors": 4,
                "actorsPerPod": 2,
                "model": {"uri": f"objectstore://{bucket}/cartpole", "format": "onnx"},
                "environment": {"gymnasium": {"id": "CartPole-v1", "envsPerActor": 2}},
                "trajectories": {"maxLength": 200, "nats": {"url": nats.url}},
                "sinks": [
                    {"arrow": {"rotateSeconds": 2}},
                    {"postgres": {"dsnSecret": {"name": "pg"}}},
                ],
                "template": placement,
            }
        },
    )
    agents.create(manifest)
    agent = agents.wait_phase("cartpole", "Ready", timeout=240)
    assert (agent["status"]["readyActors"], agent["status"]["readyPods"]) == (4, 2)
    pods = k8s.core.list_namespaced_pod(namespace).items
    assert {p.spec.node_name for p in pods} == {k8s.process_node}
    assert len({p.status.pod_ip for p in pods}) == len(pods) == 4

    agents.wait(
        "cartpole",
        "model version 1 reported",
        lambda a: (a.get("status") or {}).get("modelVersion") == 1,
        timeout=60,
    )
    testing.wait_for(
        lambda: fleet.postgres_steps(postgres_server.dsn) > 500, timeout=120, what="Postgres rows"
    )

    testing.wait_for(
        lambda: agents.parquet_rows("cartpole") > 500, timeout=120, what="Parquet rows"
    )
    actor_uids = {p.metadata.name: p.metadata.uid for p in agents.actor_pods()}

    # A new model version in the registry: hot-reloaded, reported, recorded.
    fleet.push_model(tmp_path / "v2", 2, nats.url, bucket)
    agent = agents.wait(
        "cartpole",
        "model version 2 reported",
        lambda a: (a.get("status") or {}).get("modelVersion") == 2,
        timeout=120,
    )
    assert conditions(agent)["ModelReady"]["status"] == "True"
    testing.wait_for(
        lambda: fleet.postgres_steps(postgres_server.dsn, "policy_version = 2") > 100,
        timeout=120,
        what="steps recorded with policy version 2",
    )
    after = {p.metadata.name: p.metadata.uid for p in agents.actor_pods()}
    assert after == actor_uids, "a pushed model must not restart actor pods"

    agents.delete("cartpole")
    testing.wait_for(
        lambda: not k8s.core.list_namespaced_pod(namespace).items,
        timeout=120,
        what="pods gone",
    )
