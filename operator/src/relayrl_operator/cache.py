"""The reconciler's memory of each Agent: its body, its children, its passes' marks.

The reconciler writes into it what the watches bring (an Agent through `store`, also
after reading one again when it resumes; a child through `note_child`), and the
passes read it: which children exist and with which generation or resourceVersion
(to tell drift from the operator's own writes), a summary of every pod (what status
reads), and what the last passes applied, wrote and are waiting for. Used only by
relayrl_operator.reconcile and the modules it calls (children, views); nothing here
makes a request.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from relayrl_operator import constants, handover
from relayrl_operator.builders import common
from relayrl_runtime import spec

Key = tuple[str, str]  # (namespace, name)


@dataclass
class AgentState:
    """What the reconciler remembers about one Agent between passes."""

    body: dict[str, Any] | None = None
    # The parsed spec of the body's (uid, generation), and the restart hash its pods
    # must carry: the spec only changes with the generation, and most passes come from
    # pod and StatefulSet events, so neither is recomputed on them.
    agent: common.AgentRef | None = None
    restart_hash: str = ""
    applied_generation: int | None = None
    applying_generation: int | None = None  # set while a pass applies this generation
    applied_spec: spec.AgentSpec | None = None
    applied: set[tuple[str, str]] = field(default_factory=set)  # (kind, name) last applied
    applied_at: float = 0.0  # time.monotonic() of the last apply
    needs_apply: bool = True
    failures: int = 0
    stale: bool = False  # body cached before a pause: read the Agent again before acting
    nats_failures: int = 0  # stream/bucket attempts failed in a row
    stream_ready: bool | None = None
    stream_message: str = ""
    error: str | None = None
    error_generation: int | None = None
    # Applying the children failed, transiently, more than once in a row (shown in
    # status while the retries go on), and the message an ApplyFailing Warning said.
    apply_failing: str | None = None
    apply_failing_warned: str | None = None
    applied_message: str = ""
    # The status this operator last wrote, and for which Agent (uid): newer than the
    # body's until the write's watch event arrives.
    last_status: dict[str, Any] | None = None
    status_uid: str | None = None
    # While other Agents wait for a pass, a new Agent's first status (Progressing) may
    # wait for its pods, once (see reconcile): whether that chance is taken or gone (a
    # hold began, or this process wrote a status for the Agent).
    first_status_settled: bool = False
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    deployments: dict[str, dict[str, Any]] = field(default_factory=dict)
    child_generations: dict[tuple[str, str], int] = field(default_factory=dict)
    child_versions: dict[tuple[str, str], str] = field(default_factory=dict)
    seen: set[tuple[str, str]] = field(default_factory=set)  # (kind, name) the watch has
    # The model version the actor pods were rolled for (status.modelRollout); read from
    # the Agent's status once, so an operator restart does not roll them again.
    model_rollout: int | None = None
    rollout_read: bool = False
    # The actor layout the runtime ConfigMap holds (its annotation, from our apply or
    # the watch), and since when a slice handover has waited (relayrl_operator.handover).
    config_layout: handover.Layout | None = None
    handover_since: float | None = None
    handover_revision: str | None = None  # the handover config that clock is for
    handover_check: float = 0.0  # when the pass the handover asked for is due
    config_revision: str | None = None  # of the ConfigMap (its config-hash annotation)
    layout_attempted: handover.Layout | None = None  # of our last ConfigMap apply
    config_rejected: bool = False  # our last ConfigMap apply was rejected for good
    # The layout a SliceHandoverUnsupported Warning was posted for (once per change).
    unsupported_warned: handover.Layout | None = None
    # Children the apiserver refused for good in the last apply (kind, name): one never
    # created is not missing from the watch, and asks for no re-apply on a resync.
    rejected_children: set[tuple[str, str]] = field(default_factory=set)
    # Of those, the ones whose name an object of another owner has (tried again at each
    # resync: the name may be free by then).
    foreign_children: set[tuple[str, str]] = field(default_factory=set)
    # Whether the Warning that a deleted Agent's stream could not be removed was posted.
    cleanup_warned: bool = False
    # Since when fewer actor pods exist than the spec wants (monotonic; None: all do),
    # when the StatefulSet's FailedCreate events were last read, and what they said.
    pods_missing_since: float | None = None
    not_created_checked: float = 0.0
    not_created: str | None = None
    # The uid whose finalizer this process took off: the Agent is going, and events of
    # its children (the garbage collector's deletes) may come before its own DELETED.
    finalized_uid: str | None = None
    # The config revision each actor pod was last asked to mount (children.Children.push_config).
    pushed: dict[str, str] = field(default_factory=dict)


def store(state: AgentState, body: Mapping[str, Any]) -> bool:
    """Keep an Agent as read (a watch event, or a GET after a pause).

    Returns whether a pass could come out differently: not for this operator's own
    status write coming back (a pass per write, at a thousand Agents a thousand passes
    that find nothing to do).
    """
    meta = body["metadata"]
    before, stale = state.body, state.stale
    # managedFields are the bulk of a stored Agent and nothing here reads them.
    state.body = {**body, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}
    state.stale = False
    # Our own finalizer and status writes come back as events during a pass: only
    # a generation neither applied nor being applied needs the children applied.
    done = (state.applied_generation, state.applying_generation, state.error_generation)
    if meta.get("generation") not in done:
        state.needs_apply = True
    return stale or before is None or not _own_status_back(state, before, state.body)


def _own_status_back(state: AgentState, before: Mapping[str, Any], now: Mapping[str, Any]) -> bool:
    """Whether `now` is `before` with this operator's last status write, and nothing else
    changed (but the resourceVersion)."""
    if state.last_status is None or state.status_uid != now["metadata"].get("uid"):
        return False
    # A merge patch takes null fields out (status.modelVersion while none is known).
    written = {k: v for k, v in state.last_status.items() if v is not None}
    if now.get("status") != written:
        return False

    def rest(body: Mapping[str, Any]) -> dict[str, Any]:
        meta = {k: v for k, v in body["metadata"].items() if k != "resourceVersion"}
        return {**{k: v for k, v in body.items() if k != "status"}, "metadata": meta}

    return rest(before) == rest(now)


def note_child(state: AgentState, event_type: str, body: Mapping[str, Any]) -> bool:
    """Take a child's watch event in: refresh the caches, mark drift for a re-apply.

    Returns whether a pass could come out differently because of it.
    """
    meta = body["metadata"]
    kind, name = body.get("kind", ""), meta["name"]
    deleted = event_type == "DELETED"
    # Whether a pass could come out differently: status reads pods and sink
    # Deployments; any other child matters only when deleted or edited (drift).
    # At a thousand Agents most child events are the controllers' status updates
    # (StatefulSet replicas, PodDisruptionBudget counts, a pod's scheduling steps)
    # that change nothing status shows.
    relevant = deleted
    if kind == "Pod":
        if deleted:
            state.pods.pop(name, None)
            state.pushed.pop(name, None)
        else:
            summary = pod_summary(body)
            relevant = state.pods.get(name) != summary
            state.pods[name] = summary
    elif kind == "Deployment":
        relevant = True
        if deleted:
            state.deployments.pop(name, None)
        else:
            state.deployments[name] = dict(body)
    if kind == "ConfigMap" and not deleted:
        ours = state.child_versions.get((kind, name))
        if ours is None or ours == meta.get("resourceVersion"):
            # Not an older event of it arriving late: that would undo a handover step.
            state.config_revision = take_config_meta(state, meta)
    if kind != "Pod":
        child = (kind, name)
        generation = meta.get("generation")
        if generation is None:
            # ConfigMaps and Services have no generation: the resourceVersion our
            # last apply returned tells our own writes from someone else's.
            known = state.child_versions.get(child)
            edited = known is not None and known != meta.get("resourceVersion")
        else:
            previous = state.child_generations.get(child)
            edited = previous is not None and previous != generation
            # A metadata edit leaves the generation as it is: the one that matters is an
            # owner reference taken off (the child would outlive the Agent).
            agent = state.agent
            if previous is not None and agent is not None and not deleted:
                edited = edited or not common.owned_by(meta, agent)
        if deleted or edited:
            # Deleted or changed by someone: server-side apply puts our fields back.
            state.needs_apply = True
            relevant = True
        if deleted:
            state.seen.discard(child)
        else:
            state.seen.add(child)
            if generation is not None:
                state.child_generations[child] = generation
    return relevant


def pod_summary(pod: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a pod that status reads (the cache holds one per pod of every Agent)."""
    meta = pod["metadata"]
    st = pod.get("status") or {}
    annotations = meta.get("annotations") or {}
    summary: dict[str, Any] = {
        "metadata": {
            "name": meta["name"],
            "labels": meta.get("labels") or {},
            "annotations": {
                k: v
                for k, v in annotations.items()
                if k in (constants.ANNOTATION_RESTART_HASH, constants.ANNOTATION_CONFIG_HASH)
            },
        },
        "status": {
            "conditions": [
                {k: c[k] for k in ("type", "status", "reason", "message") if k in c}
                for c in st.get("conditions") or []
            ],
            "containerStatuses": [
                {"state": {"waiting": (cs.get("state") or {}).get("waiting")}}
                for cs in st.get("containerStatuses") or []
                if (cs.get("state") or {}).get("waiting")
            ],
            # Whether a container runs (a slice handover waits for such pods only).
            "running": any(
                (cs.get("state") or {}).get("running") for cs in st.get("containerStatuses") or []
            ),
        },
    }
    if meta.get("deletionTimestamp"):
        summary["metadata"]["deletionTimestamp"] = meta["deletionTimestamp"]
    return summary


def take_config_meta(state: AgentState, meta: Mapping[str, Any]) -> str | None:
    """Keep the actor layout of the runtime ConfigMap with this metadata; its revision."""
    annotations = meta.get("annotations") or {}
    state.config_layout = handover.Layout.decode(annotations.get(constants.ANNOTATION_ACTOR_LAYOUT))
    revision: str | None = annotations.get(constants.ANNOTATION_CONFIG_HASH)
    return revision


def has_status(state: AgentState) -> bool:
    """Whether an operator (this process or one before it) has written the Agent's status."""
    written = (state.body or {}).get("status") or {}
    return written.get("observedGeneration") is not None


def actor_pods(state: AgentState) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """The Agent's actor pods (summaries) by name."""
    for name, pod in state.pods.items():
        labels = pod["metadata"].get("labels") or {}
        if labels.get(constants.LABEL_COMPONENT) == constants.COMPONENT_ACTORS:
            yield name, pod


def running_actor_pods(state: AgentState) -> list[str]:
    """The actor pods with a container running (terminating ones too), by name."""
    return sorted(name for name, pod in actor_pods(state) if pod["status"].get("running"))


def after_delete(state: AgentState) -> AgentState | None:
    """What to keep of a deleted Agent: what the watches told of its children, if any.

    They can outlive it: orphaned (deleted with propagationPolicy Orphan), or not yet
    collected. An Agent made again under its name adopts them, and its status must
    count the pods already running, which send no event when it does.
    """
    if not (state.pods or state.deployments or state.seen):
        return None
    return AgentState(
        pods=state.pods,
        deployments=state.deployments,
        seen=state.seen,
        child_generations=state.child_generations,
        child_versions=state.child_versions,
    )
