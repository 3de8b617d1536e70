"""End to end: an Agent whose pods really run, from `kubectl apply` to rows and files.

The actor pods and both sink pods run on the process node as real processes (the
runtime on CartPole-v1 with an ONNX model from the registry, the Arrow and Postgres
sinks), publishing through a real nats-server into a real PostgreSQL. A pushed model
version reaches the pods without a restart and shows in status and in the recorded
steps. An actorsPerPod change moves an actor between pods without it running in two
at once.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import psycopg
import pytest

from relayrl_localstack import testing
from support import fleet, natsserver, postgres, specs


def _runs_by_actor(dsn: str) -> dict[int, dict[int, tuple[Any, Any]]]:
    """For each actor id, the first and last step time of each process that ran it."""
    out: dict[int, dict[int, tuple[Any, Any]]] = {}
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT actor_id, episode_id >> 32, min(obs_time), max(action_time)"
            " FROM relayrl.steps GROUP BY 1, 2"
        ).fetchall()
    for actor_id, run, first, last in rows:
        out.setdefault(int(actor_id), {})[int(run)] = (first, last)
    return out


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

    # 6 actors, 3 per pod: actor 2 moves from pod 1 to pod 0, and pod 1 takes actors 4
    # and 5. Both pods apply it, each on its own: pod 1 gives actor 2 up before pod 0
    # takes it.
    agents.patch("cartpole", {"spec": {"actors": 6, "actorsPerPod": 3}})
    agent = agents.wait(
        "cartpole",
        "two pods running 6 actors",
        lambda a: (
            (a.get("status") or {}).get("observedGeneration") == a["metadata"]["generation"]
            and (a["status"]["readyPods"], a["status"]["readyActors"]) == (2, 6)
            and conditions(a)["Progressing"]["status"] == "False"
        ),
        timeout=120,
    )
    assert "hand actors over" in conditions(agent)["Progressing"]["message"]
    assert {p.metadata.name: p.metadata.uid for p in agents.actor_pods()} == actor_uids
    # Actor a's env copies are ids 2a and 2a + 1. Pod 0 is the process that ran actor 0,
    # pod 1 the one that ran actor 3.
    (pod0,) = _runs_by_actor(postgres_server.dsn)[0]
    (pod1,) = _runs_by_actor(postgres_server.dsn)[6]
    testing.wait_for(
        lambda: (
            all(pod0 in _runs_by_actor(postgres_server.dsn).get(i, {}) for i in (4, 5))
            and all(pod1 in _runs_by_actor(postgres_server.dsn).get(i, {}) for i in range(8, 12))
        ),
        timeout=120,
        what="steps of actor 2 from pod 0 and of actors 4 and 5 from pod 1",
    )
    runs_by_actor = _runs_by_actor(postgres_server.dsn)
    for actor_id, runs in runs_by_actor.items():
        spans = sorted(runs.values())
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end < start, f"actor id {actor_id} ran in two pods at once: {runs}"
    assert [len(runs_by_actor[i]) for i in range(12)] == [1] * 4 + [2] * 2 + [1] * 6

    agents.delete("cartpole")
    testing.wait_for(
        lambda: not k8s.core.list_namespaced_pod(namespace).items,
        timeout=120,
        what="pods gone",
    )
    # The stream went with the Agent, before its pods drained: they publish their last
    # steps and do not make the stream again (it would outlive the Agent, and hand its
    # steps to the next Agent of the name).
    assert not natsserver.stream_exists(nats.url, namespace, "cartpole")
