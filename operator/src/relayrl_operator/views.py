"""What an Agent's status is computed from: its cached pods and sink Deployments.

`observe` turns the reconciler's memory of an Agent (relayrl_operator.cache) and its
pods' latest reports into `status.Observed`, the facts relayrl_operator.status
computes phase and conditions from. Pure: no requests, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from relayrl_operator import cache, constants, status
from relayrl_operator.builders import common, sinks
from relayrl_runtime import reporting

FAILING_REASONS = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "CreateContainerConfigError",
        "CreateContainerError",
        "InvalidImageName",
    }
)


def observe(
    agent: common.AgentRef,
    state: cache.AgentState,
    restart_hash: str,
    reports: Mapping[str, reporting.PodReport],
    *,
    streams: bool,
) -> status.Observed:
    """The facts status depends on.

    `restart_hash` is the one the Agent's current pods carry, `reports` the pods'
    fresh reports by pod name, and `streams` whether this operator manages the stream
    (when not, status has no StreamReady to say).
    """
    layout = state.config_layout
    handover_revision = state.handover_revision if layout is not None and layout.handover else None
    pods = []
    replacing = removing = 0
    sink_pods: dict[str, list[Mapping[str, Any]]] = {}
    for pod in state.pods.values():
        labels = pod["metadata"].get("labels") or {}
        component = labels.get(constants.LABEL_COMPONENT)
        if component != constants.COMPONENT_ACTORS:
            sink_pods.setdefault(str(component), []).append(pod)
            continue
        if pod["metadata"].get("deletionTimestamp"):
            if pod_index(pod) >= agent.spec.pods():
                removing += 1
            elif not runs(pod, restart_hash):
                replacing += 1
            continue
        report = reports.get(pod["metadata"]["name"])
        pods.append(
            pod_view(
                pod,
                restart_hash,
                report,
                state.model_rollout,
                handover_revision,
                agent.spec.environment.copies_per_actor(),
                config_revision=state.config_revision,
                model_uri=agent.spec.model.uri,
            )
        )
    handing_over = (
        tuple(handover_waiting(cache.running_actor_pods(state), reports, handover_revision))
        if handover_revision is not None
        else None
    )
    sink_views = []
    for name in sinks.desired_names(agent):
        deployment = state.deployments.get(name)
        if deployment is not None:
            sink_views.append(sink_view(deployment, sink_pods))
    return status.Observed(
        pods=pods,
        sinks=sink_views,
        stream_ready=state.stream_ready if streams else None,
        stream_message=state.stream_message,
        error=state.error,
        apply_failing=state.apply_failing,
        applied=state.applied_message,
        replacing=replacing,
        removing=removing,
        model_rollout=state.model_rollout,
        handover=handing_over,
        not_created=state.not_created,
    )


def pod_view(
    pod: Mapping[str, Any],
    restart_hash: str,
    report: reporting.PodReport | None,
    model_rollout: int | None,
    handover_revision: str | None = None,
    copies: int = 1,
    *,
    config_revision: str | None = None,
    model_uri: str | None = None,
) -> status.PodView:
    """One actor pod's facts. `config_revision`: the runtime ConfigMap's; a ready pod
    that reports another has not taken a hot change yet (a pod that reports none, of an
    older runtime, is taken to run the current one). `model_uri`: the spec's; a pod
    that reports another runs the model a rollout is moving away from (one that
    reports none, of an older runtime, is taken to run the spec's)."""
    index = pod_index(pod)
    conditions = {c["type"]: c for c in (pod.get("status") or {}).get("conditions") or []}
    ready = conditions.get("Ready", {}).get("status") == "True"
    scheduled = conditions.get("PodScheduled", {})
    unschedulable = None
    if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        unschedulable = scheduled.get("message") or "no node fits"
    failing = waiting_failure(pod)
    refused = report.refused if report is not None else None
    if refused is not None and refused.incompatible and refused.version == model_rollout:
        refused = None  # the rolling update for it replaces this pod
    handing_over = (
        report is not None
        and handover_revision is not None
        and report.config_revision == handover_revision
    )
    applying = (
        ready
        and handover_revision is None  # a handover follows the pods' reports itself
        and report is not None
        and report.config_revision is not None
        and config_revision is not None
        and report.config_revision != config_revision
    )
    return status.PodView(
        index=index,
        ready=ready,
        current=runs(pod, restart_hash),
        unschedulable=unschedulable,
        failing=failing,
        model_version=report.model_version if report is not None else None,
        previous_model=report is not None
        and report.model_uri is not None
        and model_uri is not None
        and report.model_uri != model_uri,
        refused=None if refused is None else _refusal(refused),
        runs_refused=refused is not None
        and refused.version is not None
        and report is not None
        and refused.version == report.model_version,
        # In step 1 of a handover a pod runs only the actors of its new slice it ran
        # before; before it takes a hot change, the actors of its old slice. It reports
        # its environment copies: `copies` for each actor.
        # (Remote-simulator Agents: the actors are the clients', not the slices'.)
        reported_actors=report.actors // max(1, copies)
        if report is not None and copies > 0 and (handing_over or applying)
        else None,
        applying=applying,
    )


def _refusal(refused: reporting.Refusal) -> str:
    """What a pod could not load, as status says it: no version means the bucket or
    the object is missing (the reason says which)."""
    what = "the model" if refused.version is None else f"model version {refused.version}"
    return f"{what}: {refused.reason}"


def handover_waiting(
    running: Iterable[str], reports: Mapping[str, reporting.PodReport], revision: str
) -> list[str]:
    """The running actor pods that have not reported this handover config."""
    return [n for n in running if n not in reports or reports[n].config_revision != revision]


def runs(pod: Mapping[str, Any], restart_hash: str) -> bool:
    """Whether an actor pod was made from the current template (its restart hash)."""
    annotations = pod["metadata"].get("annotations") or {}
    return bool(annotations.get(constants.ANNOTATION_RESTART_HASH) == restart_hash)


def pod_index(pod: Mapping[str, Any]) -> int:
    """An actor pod's ordinal: its label, else the end of its StatefulSet name."""
    meta = pod["metadata"]
    index_label = (meta.get("labels") or {}).get(constants.LABEL_POD_INDEX)
    return int(index_label) if index_label is not None else int(meta["name"].rsplit("-", 1)[1])


def waiting_failure(pod: Mapping[str, Any]) -> str | None:
    """The failure a pod's containers report (CrashLoopBackOff, ...), in words that stay
    the same from one restart to the next: status (and an Event) changes only when the
    failure does.

    A crash loop is told by its last exit, not by the back-off the kubelet names (its
    length grows at each restart); between two back-offs the container runs, not ready
    yet, after a failed run, and that is the same failure.
    """
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        last = (cs.get("lastState") or {}).get("terminated") or {}
        exited = ""
        if last.get("exitCode"):
            exited = f"last exit {last['exitCode']}"
            if last.get("reason"):
                exited += f" ({last['reason']})"
        reason = waiting.get("reason")
        if reason == "CrashLoopBackOff" and exited:
            return f"CrashLoopBackOff: {exited}"
        if reason in FAILING_REASONS:
            return f"{reason}: {waiting.get('message', '')}".rstrip(": ")
        if exited and not cs.get("ready") and cs.get("restartCount", 0) > 0:
            return f"CrashLoopBackOff: {exited}"
    return None


def sink_view(
    deployment: Mapping[str, Any], pods: Mapping[str, list[Mapping[str, Any]]]
) -> status.SinkView:
    meta = deployment["metadata"]
    st = deployment.get("status") or {}
    want = (deployment.get("spec") or {}).get("replicas", 1)
    ready = (
        st.get("observedGeneration", 0) >= meta.get("generation", 0)
        and st.get("availableReplicas", 0) >= want
        and st.get("updatedReplicas", 0) >= want
    )
    message = failing = ""
    for cond in st.get("conditions") or []:
        if cond.get("type") == "Available" and cond.get("status") != "True":
            message = cond.get("message", "")
        # Its pod cannot be made at all (a quota, Pod Security, an admission webhook).
        if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
            failing = cond.get("message", "") or "its pod cannot be created"
        # A starting Deployment is unavailable for a while; one whose rollout passed its
        # progress deadline is failing.
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            failing = cond.get("message", "") or "rollout exceeded its progress deadline"
    component = (meta.get("labels") or {}).get(constants.LABEL_COMPONENT, meta["name"])
    for pod in pods.get(component, []):
        if not pod["metadata"].get("deletionTimestamp"):
            failing = waiting_failure(pod) or failing
    return status.SinkView(component=component, ready=ready, message=message, failing=failing)
