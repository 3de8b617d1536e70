"""Child watch events: the operator's own writes do not trigger a re-apply, others' do."""

from __future__ import annotations

from typing import Any

from relayrl_operator import constants, reconcile, settings

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


def test_a_deleted_child_is_put_back_and_leaves_the_cache() -> None:
    rec = reconciler()
    st = state(rec)
    rec.child_event("ADDED", child("Service", "cartpole-remote", resourceVersion="2"))
    st.needs_apply = False
    rec.child_event("DELETED", child("Service", "cartpole-remote", resourceVersion="3"))
    assert st.needs_apply
    assert ("Service", "cartpole-remote") not in st.seen
