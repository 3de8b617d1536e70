"""Child watch events: the operator's own writes do not trigger a re-apply, others' do."""

from __future__ import annotations

from typing import Any

from unit.operator.pods import actor_pod

from relayrl_operator import constants, reconcile, settings
from relayrl_operator.builders import common, statefulset
from relayrl_runtime import spec
from support import specs

KEY = ("ml", "cartpole")


def child(kind: str, name: str, **meta: Any) -> dict[str, Any]:
    labels = {constants.LABEL_AGENT: "cartpole"}
    return {"kind": kind, "metadata": {"namespace": "ml", "name": name, "labels": labels, **meta}}


def reconciler() -> reconcile.Reconciler:
    rec = reconcile.Reconciler(client=None, cfg=settings.Settings(), streams=None)  # type: ignore[arg-type]
    rec.agent_event("ADDED", {"metadata": {"namespace": "ml", "name": "cartpole", "generation": 1}})
    return rec


def state(rec: reconcile.Reconciler) -> Any:
    return rec._states[KEY]


def test_own_configmap_write_is_not_drift_and_someone_elses_is() -> None:
    rec = reconciler()
    st = state(rec)
    st.needs_apply = False
    st.child_versions[("ConfigMap", "cartpole-runtime")] = "5"
    rec.child_event("MODIFIED", child("ConfigMap", "cartpole-runtime", resourceVersion="5"))
    assert not st.needs_apply
    assert ("ConfigMap", "cartpole-runtime") in st.seen
    rec.child_event("MODIFIED", child("ConfigMap", "cartpole-runtime", resourceVersion="9"))
    assert st.needs_apply


def test_statefulset_status_change_is_not_drift_and_a_spec_edit_is() -> None:
    rec = reconciler()
    st = state(rec)
    st.needs_apply = False
    st.child_generations[("StatefulSet", "cartpole-actors")] = 3
    rec.child_event("MODIFIED", child("StatefulSet", "cartpole-actors", generation=3))
    assert not st.needs_apply
    rec.child_event("MODIFIED", child("StatefulSet", "cartpole-actors", generation=4))
    assert st.needs_apply


def test_an_owner_reference_taken_off_a_workload_is_drift() -> None:
    """A metadata edit leaves the generation as it is; without the owner reference the
    child would outlive the Agent, so it is put back at once."""
    rec = reconciler()
    st = state(rec)
    st.agent = specs.agent_ref({"metadata": {"name": "cartpole"}}, namespace="ml", uid="u1")
    st.needs_apply = False
    st.child_generations[("Deployment", "cartpole-arrow-sink")] = 3
    owned = {"generation": 3, "ownerReferences": [{"kind": "Agent", "uid": "u1"}]}
    rec.child_event("MODIFIED", child("Deployment", "cartpole-arrow-sink", **owned))
    assert not st.needs_apply
    rec.child_event("MODIFIED", child("Deployment", "cartpole-arrow-sink", generation=3))
    assert st.needs_apply


def test_a_deleted_child_is_put_back_and_leaves_the_cache() -> None:
    rec = reconciler()
    st = state(rec)
    rec.child_event("ADDED", child("Service", "cartpole-remote", resourceVersion="2"))
    st.needs_apply = False
    rec.child_event("DELETED", child("Service", "cartpole-remote", resourceVersion="3"))
    assert st.needs_apply
    assert ("Service", "cartpole-remote") not in st.seen


def drained(rec: reconcile.Reconciler) -> int:
    """How many Agents were queued for a pass since the last call."""
    n = len(rec._queue)
    while len(rec._queue):
        rec._queue.get_nowait()
    return n


def pod(ready: str, **status: Any) -> dict[str, Any]:
    body = child("Pod", "cartpole-actors-0", resourceVersion="1")
    body["metadata"]["labels"][constants.LABEL_COMPONENT] = constants.COMPONENT_ACTORS
    body["status"] = {"conditions": [{"type": "Ready", "status": ready}], **status}
    return body


def test_only_events_that_can_change_status_or_need_repair_queue_a_pass() -> None:
    rec = reconciler()
    st = state(rec)
    drained(rec)
    st.needs_apply = False
    st.child_generations[("StatefulSet", "cartpole-actors")] = 3
    st.child_versions[("PodDisruptionBudget", "cartpole-actors")] = "5"
    # Controllers' status updates of children status does not read: no pass.
    rec.child_event("MODIFIED", child("StatefulSet", "cartpole-actors", generation=3))
    pdb = child("PodDisruptionBudget", "cartpole-actors", generation=1, resourceVersion="7")
    rec.child_event("MODIFIED", pdb)
    assert drained(rec) == 0
    # A pod: its first sight and a change of readiness queue a pass; an update that
    # leaves what status reads as it was (a new resourceVersion, a start time) does not.
    rec.child_event("ADDED", pod("False"))
    assert drained(rec) == 1
    rec.child_event("MODIFIED", pod("False", startTime="2026-11-21T00:00:00Z"))
    assert drained(rec) == 0
    rec.child_event("MODIFIED", pod("True"))
    assert drained(rec) == 1
    # Drift and deletion queue a pass.
    rec.child_event("MODIFIED", child("StatefulSet", "cartpole-actors", generation=4))
    assert drained(rec) == 1
    rec.child_event("DELETED", child("Service", "cartpole", resourceVersion="8"))
    assert drained(rec) == 1
    rec.child_event("DELETED", pod("True"))
    assert drained(rec) == 1


def test_a_terminating_pod_of_an_older_template_counts_as_being_replaced() -> None:
    rec = reconciler()
    st = state(rec)
    agent_spec = spec.parse_agent(specs.base_manifest()).spec
    agent = common.AgentRef("cartpole", "ml", "uid", 1, agent_spec)
    current = statefulset.restart_hash(agent, settings.Settings())
    rec.child_event("ADDED", actor_pod(0, "older", terminating=True))
    rec.child_event("ADDED", actor_pod(1, current, terminating=False))
    observed = rec.observe(agent, st)
    assert [p.index for p in observed.pods] == [1]
    assert observed.replacing == 1
    # A terminating pod of the current template (a scale-down, a deleted pod) is not.
    rec.child_event("MODIFIED", actor_pod(0, current, terminating=True))
    assert rec.observe(agent, st).replacing == 0


def test_an_agent_made_again_under_its_name_sees_the_pods_it_adopts() -> None:
    """Deleted with its children orphaned, then created again: the pods keep running and
    send no event, so the new Agent's status must count them from the cache."""
    rec = reconciler()
    agent_spec = spec.parse_agent(specs.base_manifest()).spec
    current = statefulset.restart_hash(
        common.AgentRef("cartpole", "ml", "uid-1", 1, agent_spec), settings.Settings()
    )
    rec.child_event("ADDED", actor_pod(0, current, terminating=False))
    rec.child_event("ADDED", child("ConfigMap", "cartpole-runtime", resourceVersion="4"))
    rec.agent_event("DELETED", {"metadata": {"namespace": "ml", "name": "cartpole"}})
    # Forgotten as an Agent; its children's cache stays.
    assert state(rec).body is None
    rec.agent_event(
        "ADDED",
        {"metadata": {"namespace": "ml", "name": "cartpole", "uid": "uid-2", "generation": 1}},
    )
    st = state(rec)
    again = common.AgentRef("cartpole", "ml", "uid-2", 1, agent_spec)
    assert [p.index for p in rec.observe(again, st).pods] == [0]
    assert ("ConfigMap", "cartpole-runtime") in st.seen
    # The last child gone: nothing is kept of a deleted Agent.
    rec.agent_event("DELETED", {"metadata": {"namespace": "ml", "name": "cartpole"}})
    rec.child_event("DELETED", actor_pod(0, current, terminating=False))
    assert KEY not in rec._states
