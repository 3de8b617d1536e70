"""The operator on a real control plane: Agents reconciled into fleets on kwok nodes.

Actor and sink pods land on kwok's fake nodes here (they run for real on the process
node in the end-to-end test); NATS is a real nats-server.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from relayrl_localstack import testing
from relayrl_operator import constants
from relayrl_runtime import streams
from support import fleet, natsserver, specs

RESYNC_SECONDS = 5  # fleet.Operator's default for tests

T = TypeVar("T")


def manifest(nats_url: str, patch: dict[str, Any] | None = None) -> dict[str, Any]:
    base = specs.merge_patch(
        specs.base_manifest(), {"spec": {"trajectories": {"nats": {"url": nats_url}}}}
    )
    return specs.merge_patch(base, patch or {})


def conditions(agent: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (agent.get("status") or {}).get("conditions") or []}


def statefulset(k8s: testing.ClusterHandle, namespace: str, name: str) -> dict[str, Any]:
    return k8s.get_json(client.AppsV1Api(k8s.api).read_namespaced_stateful_set, name, namespace)


def agent_exists(k8s: testing.ClusterHandle, namespace: str, name: str) -> bool:
    return k8s.exists(
        client.CustomObjectsApi(k8s.api).get_namespaced_custom_object,
        "relayrl.io",
        "v1alpha1",
        namespace,
        "agents",
        name,
    )


def events(k8s: testing.ClusterHandle, namespace: str, reason: str) -> list[str]:
    items = k8s.core.list_namespaced_event(namespace).items
    return [e.message for e in items if e.reason == reason]


@pytest.mark.usefixtures("operator")
def test_lifecycle_create_scale_pause_resume_delete(
    agents: fleet.Agents, nats: natsserver.NatsServer, namespace: str
) -> None:
    k8s = agents.k8s
    agents.create(manifest(nats.url))
    agent = agents.wait_phase("cartpole", "Ready")
    st = agent["status"]
    assert (st["readyActors"], st["desiredActors"], st["readyPods"]) == (8, 8, 2)
    assert st["selector"] == "relayrl.io/agent=cartpole,app.kubernetes.io/component=actors"
    assert conditions(agent)["StreamReady"]["status"] == "True"
    assert natsserver.stream_exists(nats.url, namespace, "cartpole")
    sts = statefulset(k8s, namespace, "cartpole-actors")
    assert sts["metadata"]["ownerReferences"][0]["uid"] == agent["metadata"]["uid"]
    assert "relayrl.io/finalizer" in agent["metadata"]["finalizers"]

    # Scale through the spec, then through the scale subresource.
    agents.patch("cartpole", {"spec": {"actors": 12}})
    agent = agents.wait_phase("cartpole", "Ready")
    assert (agent["status"]["readyActors"], agent["status"]["readyPods"]) == (12, 3)
    k8s.kubectl("-n", namespace, "scale", "agent/cartpole", "--replicas=16")
    agent = agents.wait_phase("cartpole", "Ready")
    assert agent["status"]["readyActors"] == 16
    assert any("scaled to 4 actor pods" in m for m in events(k8s, namespace, "SpecApplied"))

    # Pause keeps stream and sinks, scales actors to zero; resume brings them back.
    agents.patch("cartpole", {"spec": {"paused": True}})
    agent = agents.wait_phase("cartpole", "Paused")
    assert agent["status"]["readyPods"] == 0
    testing.wait_for(
        lambda: statefulset(k8s, namespace, "cartpole-actors")["spec"]["replicas"] == 0,
        timeout=30,
        what="actors scaled to zero",
    )
    assert natsserver.stream_exists(nats.url, namespace, "cartpole")
    agents.patch("cartpole", {"spec": {"paused": False}})
    agents.wait_phase("cartpole", "Ready")

    # Delete: the finalizer removes the stream, garbage collection the children.
    agents.delete("cartpole")
    testing.wait_for(
        lambda: not agent_exists(k8s, namespace, "cartpole"), timeout=60, what="agent gone"
    )
    assert not natsserver.stream_exists(nats.url, namespace, "cartpole")


@pytest.mark.usefixtures("operator")
def test_a_delete_waiting_on_nats_says_so_and_can_be_told_not_to_wait(
    agents: fleet.Agents, namespace: str
) -> None:
    k8s = agents.k8s

    def exists() -> bool:
        return agent_exists(k8s, namespace, "cartpole")

    with natsserver.NatsServer() as own:
        agents.create(manifest(own.url))
        agents.wait_phase("cartpole", "Ready")
        own.stop()  # the stream and bucket cannot be removed now
        agents.delete("cartpole")
        testing.wait_for(
            lambda: events(k8s, namespace, "CleanupFailed"),
            timeout=60,
            what="the CleanupFailed Warning",
        )
        (message,) = events(k8s, namespace, "CleanupFailed")
        assert message.startswith(f"cannot remove stream RELAYRL_{namespace}_cartpole"), message
        assert "retainOnDelete: true" in message
        assert exists()  # the delete waits
        # The user tells it to keep them: the delete goes on, and they stay.
        agents.patch("cartpole", {"spec": {"trajectories": {"nats": {"retainOnDelete": True}}}})
        testing.wait_for(lambda: not exists(), timeout=60, what="agent gone")
        own.start()
        assert natsserver.stream_exists(own.url, namespace, "cartpole")


@pytest.mark.usefixtures("operator")
def test_a_namespace_deleted_while_nats_is_down_says_why_in_the_agents_status(
    agents: fleet.Agents, namespace: str
) -> None:
    """A namespace being deleted takes no Events: the Agent's status says why its delete
    (and so the namespace's) waits."""
    k8s = agents.k8s
    with natsserver.NatsServer() as own:
        agents.create(manifest(own.url))
        agents.wait_phase("cartpole", "Ready")
        own.stop()
        k8s.core.delete_namespace(namespace)
        agent = agents.wait(
            "cartpole",
            "the delete's reason in status",
            lambda a: conditions(a).get("Degraded", {}).get("reason") == "CleanupFailed",
        )
        degraded = conditions(agent)["Degraded"]
        assert degraded["message"].startswith(
            f"cannot remove stream RELAYRL_{namespace}_cartpole"
        ), degraded
        assert "retainOnDelete: true" in degraded["message"]
        assert agent["status"]["phase"] == "Degraded"
        assert conditions(agent)["Ready"]["reason"] == "Deleting"
        assert not events(k8s, namespace, "CleanupFailed")  # refused in a terminating namespace
        agents.patch("cartpole", {"spec": {"trajectories": {"nats": {"retainOnDelete": True}}}})
        testing.wait_for(
            lambda: not agent_exists(k8s, namespace, "cartpole"), timeout=60, what="agent gone"
        )


@pytest.mark.usefixtures("operator")
def test_the_finalizer_comes_with_the_create_or_else_from_the_operator(
    agents: fleet.Agents, nats: natsserver.NatsServer
) -> None:
    k8s = agents.k8s
    policy = fleet.finalizer_policy_yaml()
    binding = next(
        d["metadata"]["name"]
        for d in yaml.safe_load_all(policy)
        if d and d["kind"] == "MutatingAdmissionPolicyBinding"
    )
    # The chart's policy: the apiserver stores the Agent with the finalizer, so the
    # operator has no finalizer write to make.
    created = agents.create(manifest(nats.url))
    assert created["metadata"]["finalizers"] == [constants.FINALIZER]
    agents.wait_phase("cartpole", "Ready")

    # Server-side apply: admission's additions belong to the applier's field manager, so
    # a second apply without the finalizer would take it off; the policy puts it back
    # within the same request.
    applied = specs.merge_patch(manifest(nats.url), {"metadata": {"name": "c"}})
    for actors in (8, 4):
        body = json.dumps(specs.merge_patch(applied, {"spec": {"actors": actors}}))
        out = k8s.kubectl(
            "apply",
            "--server-side",
            "-o",
            "json",
            "-n",
            agents.namespace,
            "-f",
            "-",
            input_text=body,
        ).stdout
        assert json.loads(out)["metadata"]["finalizers"] == [constants.FINALIZER]

    # Without the policy (an older cluster, or `operator.finalizerPolicy: false`) the
    # operator adds it; either way deleting the Agent removes it (the policy leaves an
    # Agent being deleted alone).
    k8s.kubectl("delete", "mutatingadmissionpolicybinding", binding)
    try:
        fleet.wait_finalizer_policy(k8s.api, active=False)
        created = agents.create(specs.merge_patch(manifest(nats.url), {"metadata": {"name": "b"}}))
        assert not created["metadata"].get("finalizers")
        agents.wait(
            "b",
            "the operator's finalizer",
            lambda a: constants.FINALIZER in a["metadata"].get("finalizers", []),
        )
        agents.wait_phase("b", "Ready")
    finally:
        k8s.kubectl("apply", "-f", "-", input_text=policy)
        fleet.wait_finalizer_policy(k8s.api)
    for name in ("cartpole", "b", "c"):
        agents.delete(name)
    testing.wait_for(
        lambda: (
            not agents.api.list_namespaced_custom_object(
                "relayrl.io", "v1alpha1", agents.namespace, "agents"
            )["items"]
        ),
        timeout=60,
        what="the three Agents gone",
    )


@pytest.mark.usefixtures("operator")
def test_gpu_agent_lands_only_on_gpu_nodes(
    agents: fleet.Agents, nats: natsserver.NatsServer, namespace: str
) -> None:
    agents.create(manifest(nats.url, {"spec": {"device": "cuda", "gpusPerPod": 2}}))
    agents.wait_phase("cartpole", "Ready")
    nodes = {n.metadata.name: n for n in agents.k8s.core.list_node().items}
    pods = agents.k8s.core.list_namespaced_pod(
        namespace, label_selector="app.kubernetes.io/component=actors"
    ).items
    assert len(pods) == 2
    for pod in pods:
        node = nodes[pod.spec.node_name]
        assert int(node.status.capacity.get("nvidia.com/gpu", "0")) >= 2, pod.spec.node_name
        limits = pod.spec.containers[0].resources.limits
        assert limits["nvidia.com/gpu"] == "2"


@pytest.mark.usefixtures("operator")
def test_gpu_agent_that_fits_nowhere_stays_pending_with_the_reason(
    agents: fleet.Agents, nats: natsserver.NatsServer
) -> None:
    agents.create(manifest(nats.url, {"spec": {"device": "cuda", "gpusPerPod": 16}}))

    def pending(a: dict[str, Any]) -> bool:
        return bool(
            (a.get("status") or {}).get("phase") == "Pending"
            and conditions(a)["Ready"]["reason"] == "Unschedulable"
        )

    agent = agents.wait("cartpole", "pending for lack of GPUs", pending)
    assert "nvidia.com/gpu" in conditions(agent)["Ready"]["message"]


@pytest.mark.usefixtures("operator")
def test_an_object_of_another_owner_under_a_childs_name_is_left_as_it_is(
    agents: fleet.Agents, nats: natsserver.NatsServer, namespace: str
) -> None:
    """A user's ConfigMap that has the name the Agent's runtime config would get is not
    taken over (nor deleted with the Agent): the Agent says so, and makes its own once
    the name is free."""
    core = agents.k8s.core
    theirs = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cartpole-runtime"}}
    core.create_namespaced_config_map(namespace, {**theirs, "data": {"notes.txt": "mine"}})
    agents.create(manifest(nats.url))
    agent = agents.wait_phase("cartpole", "Failed")
    message = conditions(agent)["Degraded"]["message"]
    assert f"ConfigMap {namespace}/cartpole-runtime exists and is not this Agent's" in message
    cm = core.read_namespaced_config_map("cartpole-runtime", namespace)
    assert cm.data == {"notes.txt": "mine"}
    assert not cm.metadata.owner_references
    assert statefulset(agents.k8s, namespace, "cartpole-actors")["spec"]["replicas"] >= 1
    core.delete_namespaced_config_map("cartpole-runtime", namespace)
    agents.wait_phase("cartpole", "Ready", timeout=120)
    data = core.read_namespaced_config_map("cartpole-runtime", namespace).data
    assert constants.CONFIG_KEY in data


@pytest.mark.usefixtures("operator")
def test_actor_pods_a_quota_refuses_are_said_why(
    agents: fleet.Agents, nats: natsserver.NatsServer, namespace: str
) -> None:
    """The StatefulSet shows nothing of pods it cannot create: its FailedCreate events
    do, and the Agent says what they say (Degraded), not Progressing for ever."""
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "no-pods"},
        "spec": {"hard": {"pods": "0"}},
    }
    agents.k8s.core.create_namespaced_resource_quota(namespace, quota)
    agents.create(manifest(nats.url, {"spec": {"sinks": None}}))
    agent = agents.wait(
        "cartpole",
        "the reason pods are missing",
        lambda a: "not created" in conditions(a).get("Degraded", {}).get("message", ""),
        timeout=120,
    )
    message = conditions(agent)["Degraded"]["message"]
    assert "actor pods not created: " in message
    assert "exceeded quota: no-pods" in message
    assert agent["status"]["phase"] == "Degraded"
    agents.k8s.core.delete_namespaced_resource_quota("no-pods", namespace)
    agent = agents.wait_phase("cartpole", "Ready", timeout=180)
    assert "not created" not in conditions(agent)["Degraded"]["message"]


def test_deleted_or_edited_children_come_back(
    operator: fleet.Operator, agents: fleet.Agents, nats: natsserver.NatsServer, namespace: str
) -> None:
    k8s = agents.k8s
    agents.create(manifest(nats.url))
    agents.wait_phase("cartpole", "Ready")
    core = k8s.core
    apps = client.AppsV1Api(k8s.api)

    core.delete_namespaced_config_map("cartpole-runtime", namespace)
    core.delete_namespaced_service("cartpole-actors", namespace)
    apps.patch_namespaced_stateful_set("cartpole-actors", namespace, {"spec": {"replicas": 5}})
    testing.wait_for(
        lambda: (
            k8s.exists(core.read_namespaced_config_map, "cartpole-runtime", namespace)
            and k8s.exists(core.read_namespaced_service, "cartpole-actors", namespace)
            and statefulset(k8s, namespace, "cartpole-actors")["spec"]["replicas"] == 2
        ),
        timeout=30,
        what="children repaired",
    )
    agents.wait_phase("cartpole", "Ready")

    # A metadata edit (the generation stays): the owner reference taken off. Put back
    # from its watch event, well before the periodic re-apply (applied just now, the
    # Agent's children are not re-applied for 10 resyncs, 50 s here).
    policy = client.PolicyV1Api(k8s.api)
    policy.patch_namespaced_pod_disruption_budget(
        "cartpole-actors", namespace, {"metadata": {"ownerReferences": None}}
    )

    def owned_pdb() -> bool:
        pdb = policy.read_namespaced_pod_disruption_budget("cartpole-actors", namespace)
        return bool(pdb.metadata.owner_references)

    testing.wait_for(owned_pdb, timeout=20, what="the owner reference back")
    page = operator.metrics()
    assert 'relayrl_operator_children_total{action="created",kind="ConfigMap"}' in page
    assert 'relayrl_operator_children_total{action="updated",kind="StatefulSet"}' in page
    # Every API request is counted by verb, resource and answer: the repair re-created
    # the ConfigMap with a server-side apply, and status went out on its subresource.
    assert (
        'relayrl_operator_api_requests_total{code="201",resource="configmaps",verb="patch"}' in page
    )
    assert (
        'relayrl_operator_api_requests_total{code="200",resource="agents/status",verb="patch"}'
        in page
    )

    # The stream and the model bucket are children too. A resync lists the streams:
    # a hand-edited stream is put back, a deleted bucket or stream is made again.
    name = streams.stream_name(namespace, "cartpole")
    bucket = streams.object_store_stream(streams.model_bucket(namespace, "cartpole"))
    want = streams.stream_config(namespace, "cartpole")

    async def tamper(js: Any) -> None:
        info = await js.stream_info(name)
        await js.update_stream(info.config.evolve(max_bytes=1 << 30))
        await js.delete_stream(bucket)

    async def restored(js: Any) -> bool:
        have = {c.name: c async for c in streams.iter_stream_configs(js)}
        return name in have and not streams.config_differs(want, have[name]) and bucket in have

    natsserver.jetstream(nats.url, tamper)
    testing.wait_for(
        lambda: natsserver.jetstream(nats.url, restored),
        timeout=30,
        what="stream config and bucket back",
    )
    natsserver.jetstream(nats.url, lambda js: js.delete_stream(name))
    testing.wait_for(
        lambda: natsserver.stream_exists(nats.url, namespace, "cartpole"),
        timeout=30,
        what="stream back",
    )


@pytest.mark.usefixtures("operator")
def test_sinks_added_and_removed(
    agents: fleet.Agents, nats: natsserver.NatsServer, namespace: str
) -> None:
    k8s = agents.k8s
    apps = client.AppsV1Api(k8s.api)
    agents.create(manifest(nats.url))
    agents.wait_phase("cartpole", "Ready")
    assert k8s.exists(apps.read_namespaced_deployment, "cartpole-arrow-sink", namespace)

    two = [{"arrow": {}}, {"postgres": {"dsnSecret": {"name": "pg"}}}]
    agents.patch("cartpole", {"spec": {"sinks": two}})
    agent = agents.wait_phase("cartpole", "Ready")
    assert conditions(agent)["SinksReady"]["message"] == "available: arrow-sink, postgres-sink"
    assert any("sink postgres added" in m for m in events(k8s, namespace, "SpecApplied"))

    agents.patch("cartpole", {"spec": {"sinks": [{"postgres": {"dsnSecret": {"name": "pg"}}}]}})
    testing.wait_for(
        lambda: not k8s.exists(apps.read_namespaced_deployment, "cartpole-arrow-sink", namespace),
        timeout=30,
        what="arrow sink removed",
    )
    agents.wait_phase("cartpole", "Ready")


@pytest.mark.usefixtures("operator")
def test_model_version_is_hot_and_template_change_rolls(
    agents: fleet.Agents, nats: natsserver.NatsServer, namespace: str
) -> None:
    k8s = agents.k8s
    agents.create(manifest(nats.url))
    agents.wait_phase("cartpole", "Ready")
    before = {
        p.metadata.name: p.metadata.uid for p in k8s.core.list_namespaced_pod(namespace).items
    }

    agents.patch("cartpole", {"spec": {"model": {"version": 2}}})
    agent = agents.wait_phase("cartpole", "Ready")
    assert "hot reload" in conditions(agent)["Progressing"]["message"]
    config = k8s.core.read_namespaced_config_map("cartpole-runtime", namespace)
    assert "version: 2" in config.data["runtime.yaml"]
    after = {p.metadata.name: p.metadata.uid for p in k8s.core.list_namespaced_pod(namespace).items}
    assert after == before, "a model version change must not restart pods"

    agents.patch("cartpole", {"spec": {"template": {"labels": {"team": "rl"}}}})

    def rolled(a: dict[str, Any]) -> bool:
        pods = k8s.core.list_namespaced_pod(namespace, label_selector="team=rl").items
        return len(pods) == 2 and (a.get("status") or {}).get("phase") == "Ready"

    agents.wait("cartpole", "pods rolled with the new template", rolled, timeout=90)


def test_operator_killed_mid_reconcile_converges_after_restart(
    operator: fleet.Operator, agents: fleet.Agents, nats: natsserver.NatsServer
) -> None:
    names = [f"fleet-{i}" for i in range(8)]
    for name in names:
        agents.create(manifest(nats.url, {"metadata": {"name": name}}))
    operator.kill()
    operator.start()
    for name in names:
        agents.wait_phase(name, "Ready", timeout=90)
    page = operator.metrics()
    assert 'relayrl_operator_reconciles_total{result="ok"}' in page


PODMONITOR_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "podmonitors.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "scope": "Namespaced",
        "names": {"kind": "PodMonitor", "plural": "podmonitors", "singular": "podmonitor"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "x-kubernetes-preserve-unknown-fields": True,
                    }
                },
            }
        ],
    },
}


@pytest.mark.usefixtures("operator")
def test_podmonitor_appears_once_the_prometheus_operator_api_exists(
    agents: fleet.Agents, nats: natsserver.NatsServer, namespace: str
) -> None:
    """A stand-in PodMonitor CRD (the Prometheus Operator's is not on any registry here)."""
    k8s = agents.k8s
    ext = client.ApiextensionsV1Api(k8s.api)
    custom = client.CustomObjectsApi(k8s.api)
    ext.create_custom_resource_definition(PODMONITOR_CRD)
    try:
        agents.create(manifest(nats.url))
        agents.wait_phase("cartpole", "Ready")

        def podmonitor() -> dict[str, Any] | None:
            try:
                found: dict[str, Any] = custom.get_namespaced_custom_object(
                    "monitoring.coreos.com", "v1", namespace, "podmonitors", "cartpole"
                )
            except client.ApiException as err:
                if err.status == 404:
                    return None
                raise
            return found

        found = testing.wait_for(podmonitor, timeout=60, what="the Agent's PodMonitor")
        assert found["spec"]["selector"]["matchLabels"] == {"relayrl.io/agent": "cartpole"}
        assert found["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
        agents.delete("cartpole")
        testing.wait_for(lambda: podmonitor() is None, timeout=60, what="PodMonitor collected")
    finally:
        ext.delete_custom_resource_definition("podmonitors.monitoring.coreos.com")


def sample_sum(op: fleet.Operator, name: str, skip: Callable[[dict[str, str]], bool]) -> float:
    """Sum of one metric's samples on an operator's /metrics, leaving out some label sets."""
    return sum(
        s.value
        for family in text_string_to_metric_families(op.metrics())
        for s in family.samples
        if s.name == name and not skip(s.labels)
    )


def active(op: fleet.Operator) -> float:
    return sample_sum(op, "relayrl_operator_active", lambda _: False)


def writes(op: fleet.Operator) -> float:
    """API writes an operator made (reads, such as its peering checks and its watches, aside)."""
    return sample_sum(
        op, "relayrl_operator_api_requests_total", lambda lb: lb["verb"] in ("get", "watch")
    )


def test_peering_one_operator_acts_at_a_time(
    agents: fleet.Agents, nats: natsserver.NatsServer, namespace: str, tmp_path: Path
) -> None:
    """A higher-priority operator pauses the running one, which resumes when it leaves.

    Both watch only this test's namespace, with Kopf peering through its KopfPeering.
    The paused one must write nothing at all, through a resync period and a deleted
    child, not just stop handling watch events.
    """
    k8s = agents.k8s
    client.CustomObjectsApi(k8s.api).create_namespaced_custom_object(
        "kopf.dev",
        "v1",
        namespace,
        "kopfpeerings",
        {
            "apiVersion": "kopf.dev/v1",
            "kind": "KopfPeering",
            "metadata": {"name": "relayrl-operator"},
        },
    )
    low = fleet.Operator(k8s.kubeconfig, tmp_path / "low.log", priority=0, namespaces=[namespace])
    high = fleet.Operator(
        k8s.kubeconfig, tmp_path / "high.log", priority=100, namespaces=[namespace]
    )
    ext = client.ApiextensionsV1Api(k8s.api)
    low.start()
    try:
        testing.wait_for(lambda: active(low) == 1, timeout=30, what="the operator acting")
        agents.create(manifest(nats.url, {"metadata": {"name": "first"}}))
        agents.wait_phase("first", "Ready")

        high.start()
        try:
            testing.wait_for(
                lambda: active(low) == 0,
                timeout=30,
                what=f"the priority-0 operator paused (log: {low.log})",
            )
            assert active(high) == 1
            before = writes(low)
            agents.create(manifest(nats.url, {"metadata": {"name": "second"}}))
            agents.wait_phase("second", "Ready")
            k8s.core.delete_namespaced_config_map("second-runtime", namespace)
            testing.wait_for(
                lambda: k8s.exists(
                    k8s.core.read_namespaced_config_map, "second-runtime", namespace
                ),
                timeout=60,
                what="the deleted ConfigMap back",
            )
            # The PodMonitor API appearing makes a resync re-apply every Agent's children:
            # an operator that only stopped its watches would write here.
            ext.create_custom_resource_definition(PODMONITOR_CRD)
            time.sleep(RESYNC_SECONDS + 2)  # a resync comes and goes
            assert writes(low) == before, low.logs()
            assert writes(high) > 0
        finally:
            high.stop()

        # The priority-100 operator removed itself from the peering object on its way out.
        testing.wait_for(
            lambda: active(low) == 1, timeout=30, what=f"the operator resumed (log: {low.log})"
        )
        before = writes(low)
        agents.create(manifest(nats.url, {"metadata": {"name": "third"}}))
        agents.wait_phase("third", "Ready")
        assert writes(low) > before
        assert "pausing: peers" in low.logs()
        assert "resuming" in low.logs()
    finally:
        low.stop()
        with contextlib.suppress(client.ApiException):
            ext.delete_custom_resource_definition(PODMONITOR_CRD["metadata"]["name"])
