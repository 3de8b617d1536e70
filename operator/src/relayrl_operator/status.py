"""Agent status from what the reconciler observed: counts, conditions, phase.

Pure functions over plain data (`Observed`), so every rule of what the status says
is unit-tested without a cluster. Conditions keep their lastTransitionTime while
their status does not change, as Kubernetes conventions ask.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from relayrl_runtime import spec

Cond = spec.ConditionType
TRUE, FALSE, UNKNOWN = (
    spec.ConditionStatus.TRUE,
    spec.ConditionStatus.FALSE,
    spec.ConditionStatus.UNKNOWN,
)


@dataclass(frozen=True)
class PodView:
    """The facts about one actor pod that status depends on."""

    index: int
    ready: bool
    current: bool  # runs the current pod template (restart hash)
    unschedulable: str | None = None  # the scheduler's message while it cannot place the pod
    failing: str | None = None  # e.g. "CrashLoopBackOff: ..." for a container that keeps failing
    model_version: int | None = None  # reported by the runtime, when it reports
    # It runs another model.uri than the spec's (reported by the runtime): a rollout to
    # the spec's model has not replaced it yet. Its version numbers another model's.
    previous_model: bool = False
    # A model version the pod failed to hot-reload, and why, unless a rolling update
    # for it is under way (reported by the runtime).
    refused: str | None = None
    # The version refused is the one it runs: it failed at run time, with none before
    # it to go back to (the pod waits for another).
    runs_refused: bool = False
    # The actors it runs, as it reports them, when that may be fewer than its slice:
    # during step 1 of an actor slice handover (once the pod applied it), and while it
    # has not applied the current runtime config (`applying`).
    reported_actors: int | None = None
    # Ready, and reporting an older runtime config than the ConfigMap's: a hot change
    # (actors, routers, ...) not taken by this pod yet.
    applying: bool = False


@dataclass(frozen=True)
class SinkView:
    """One sink Deployment."""

    component: str
    ready: bool
    message: str = ""  # why it is not available yet (a starting pod says so too)
    failing: str = ""  # a failure: a crash-looping pod, a rollout past its deadline


@dataclass(frozen=True)
class Observed:
    """Everything one reconcile saw about an Agent's children."""

    pods: Sequence[PodView] = ()
    sinks: Sequence[SinkView] = ()
    stream_ready: bool | None = None  # None: not checked yet
    stream_message: str = ""
    error: str | None = None  # a permanent error applying children (shown, not retried)
    # Applying the children keeps failing, transiently (retried meanwhile).
    apply_failing: str | None = None
    applied: str = ""  # how the last spec change was applied, for the Progressing message
    # Actor pods of an older template that are terminating (not in `pods`): a rollout
    # is replacing them.
    replacing: int = 0
    # Actor pods past the desired count that are terminating (scaled down or paused):
    # they still run, and publish, until they are gone.
    removing: int = 0
    # The model version the actor pods were rolled for (status.modelRollout).
    model_rollout: int | None = None
    # During an actor slice handover (relayrl_operator.handover): the running pods it
    # waits for (empty: about to finish); None otherwise.
    handover: Sequence[str] | None = None
    # Why actor pods the StatefulSet should have made are missing (its FailedCreate
    # events: a quota, Pod Security, an admission webhook); None when none are.
    not_created: str | None = None


@dataclass
class _Conditions:
    previous: Mapping[str, Mapping[str, Any]]
    generation: int
    now: str
    out: list[dict[str, Any]] = field(default_factory=list)

    def set(self, kind: Cond, status: spec.ConditionStatus, reason: str, message: str) -> None:
        before = self.previous.get(kind.value, {})
        changed = before.get("status") != status.value
        self.out.append(
            {
                "type": kind.value,
                "status": status.value,
                "reason": reason,
                "message": message,
                "lastTransitionTime": self.now
                if changed or "lastTransitionTime" not in before
                else before["lastTransitionTime"],
                "observedGeneration": self.generation,
            }
        )


def invalid(
    generation: int,
    message: str,
    previous: Iterable[Mapping[str, Any]] = (),
    now: datetime | None = None,
) -> dict[str, Any]:
    """The status of an Agent whose stored spec the operator cannot read (a rule the
    apiserver did not check when it was stored): Failed, and why, on its conditions.
    The other fields keep what they said: nothing is applied until the spec is fixed."""
    stamp = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    conds = _Conditions({c["type"]: c for c in previous if "type" in c}, generation, stamp)
    conds.set(Cond.READY, FALSE, "InvalidSpec", message)
    conds.set(Cond.PROGRESSING, FALSE, "InvalidSpec", "nothing is applied until the spec is fixed")
    conds.set(Cond.DEGRADED, TRUE, "InvalidSpec", message)
    return {
        "observedGeneration": generation,
        "phase": spec.Phase.FAILED.value,
        "conditions": conds.out,
    }


def cleanup_waiting(
    generation: int,
    message: str,
    previous: Iterable[Mapping[str, Any]] = (),
    now: datetime | None = None,
) -> dict[str, Any]:
    """The phase and conditions of a deleted Agent whose stream and bucket cannot be
    removed yet (its finalizer waits). A namespace being deleted takes no Events, so
    the status says why too. Ready and Degraded change; the other conditions stay, in
    their order."""
    stamp = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    before = [c for c in previous if "type" in c]
    conds = _Conditions({c["type"]: c for c in before}, generation, stamp)
    conds.set(Cond.READY, FALSE, "Deleting", "the Agent is being deleted")
    conds.set(Cond.DEGRADED, TRUE, "CleanupFailed", message)
    changed = {c["type"]: c for c in conds.out}
    kept = [changed.pop(c["type"], c) for c in before]
    return {"phase": spec.Phase.DEGRADED.value, "conditions": [*kept, *changed.values()]}


def _slice_size(index: int, actors: int, per_pod: int) -> int:
    return max(0, min(per_pod, actors - index * per_pod))


def _pod_actors(pod: PodView, actors: int, per_pod: int) -> int:
    size = _slice_size(pod.index, actors, per_pod)
    return size if pod.reported_actors is None else min(size, pod.reported_actors)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def compute(
    agent_spec: spec.AgentSpec,
    generation: int,
    selector: str,
    observed: Observed,
    previous: Iterable[Mapping[str, Any]] = (),
    now: datetime | None = None,
) -> dict[str, Any]:
    """The `status` of an Agent, in wire (camelCase) form."""
    stamp = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    conds = _Conditions({c["type"]: c for c in previous if "type" in c}, generation, stamp)

    desired_pods = agent_spec.pods()
    desired_actors = 0 if agent_spec.paused else agent_spec.actors
    per_pod = agent_spec.actors_per_pod or max(agent_spec.actors, 1)
    wanted = [p for p in observed.pods if p.index < desired_pods]
    ready = [p for p in wanted if p.ready]
    ready_actors = sum(_pod_actors(p, desired_actors, per_pod) for p in ready)
    updated = [p for p in wanted if p.current]
    applying = [p for p in ready if p.applying]
    unschedulable = [p for p in wanted if p.unschedulable]
    failing = [p for p in wanted if p.failing]
    # Versions number one model's builds: a pod still on the model a rollout moves
    # away from says nothing about which version of the spec's model runs.
    on_old_model = [p for p in ready if p.previous_model]
    versions = {
        p.model_version for p in ready if p.model_version is not None and not p.previous_model
    }
    pinned = agent_spec.model.version
    # Pods of an older template are being replaced: what they could not load says
    # nothing about the spec their replacements run (a changed model.uri, say).
    refused = [p for p in ready if p.refused and p.current]
    model_problem = ""
    if refused:
        first = refused[0]
        running = f"; they run version {min(versions)}" if versions else ""
        verb = "could not hot-reload"
        if first.runs_refused:
            verb, running = "cannot run", ""
        model_problem = f"{_plural(len(refused), 'actor pod')} {verb} {first.refused}{running}"

    # Paused
    if agent_spec.paused:
        conds.set(Cond.PAUSED, TRUE, "Paused", "spec.paused is true: actors scaled to zero")
    else:
        conds.set(Cond.PAUSED, FALSE, "Running", "spec.paused is false")

    # StreamReady
    if observed.stream_ready is None:
        conds.set(Cond.STREAM_READY, UNKNOWN, "Pending", "stream not checked yet")
    elif observed.stream_ready:
        conds.set(Cond.STREAM_READY, TRUE, "StreamReady", observed.stream_message)
    else:
        conds.set(Cond.STREAM_READY, FALSE, "StreamUnavailable", observed.stream_message)

    # SinksReady
    sinks_down = [s for s in observed.sinks if not s.ready]
    sinks_ok = not sinks_down and len(observed.sinks) == len(agent_spec.sinks)
    if not agent_spec.sinks:
        conds.set(Cond.SINKS_READY, TRUE, "NoSinks", "no sinks configured")
    elif sinks_ok:
        names = ", ".join(s.component for s in observed.sinks)
        conds.set(Cond.SINKS_READY, TRUE, "SinksAvailable", f"available: {names}")
    else:
        waiting = [
            s.component + (f" ({s.failing or s.message})" if s.failing or s.message else "")
            for s in sinks_down
        ]
        missing = len(agent_spec.sinks) - len(observed.sinks)
        if missing > 0:
            waiting.append(f"{_plural(missing, 'sink')} not created yet")
        conds.set(Cond.SINKS_READY, FALSE, "SinksUnavailable", "waiting for " + "; ".join(waiting))

    # ModelReady: an actor pod is ready only once its runtime has loaded the model.
    if desired_pods == 0:
        conds.set(Cond.MODEL_READY, UNKNOWN, "NoActorPods", "no actor pods to load the model")
    elif not ready:
        conds.set(Cond.MODEL_READY, FALSE, "NotLoaded", "no actor pod has loaded the model yet")
    elif refused:
        conds.set(Cond.MODEL_READY, FALSE, "ReloadFailed", model_problem)
    elif on_old_model:
        others = f"; the others run model version {min(versions)}" if versions else ""
        if len(versions) > 1:
            others = f"; the others run model versions {sorted(versions)}"
        conds.set(
            Cond.MODEL_READY,
            FALSE,
            "Rolling",
            f"{_plural(len(on_old_model), 'ready pod')} still"
            f" run{'s' if len(on_old_model) == 1 else ''} the previous model,"
            f" not {agent_spec.model.uri}{others}",
        )
    elif len(versions) > 1:
        conds.set(
            Cond.MODEL_READY,
            FALSE,
            "Rolling",
            f"pods run model versions {sorted(versions)}",
        )
    elif pinned is not None and versions and versions != {pinned}:
        conds.set(
            Cond.MODEL_READY,
            FALSE,
            "Reloading",
            f"pods run model version {min(versions)}, spec.model.version is {pinned}",
        )
    elif versions:
        conds.set(
            Cond.MODEL_READY,
            TRUE,
            "Loaded",
            f"{_plural(len(ready), 'ready pod')} run model version {min(versions)}",
        )
    else:
        conds.set(Cond.MODEL_READY, TRUE, "Loaded", f"{_plural(len(ready), 'ready pod')} loaded it")

    # Degraded
    problems = []
    if observed.error:
        problems.append(observed.error)
    if observed.apply_failing:
        problems.append(observed.apply_failing)
    if failing:
        problems.append(f"{_plural(len(failing), 'actor pod')} failing: {failing[0].failing}")
    problems += [f"sink {s.component} failing: {s.failing}" for s in sinks_down if s.failing]
    if observed.stream_ready is False:
        problems.append(
            f"stream unavailable: {observed.stream_message}"
            if observed.stream_message
            else "stream unavailable"
        )
    if observed.not_created:
        problems.append(observed.not_created)
    if problems or refused:
        # A model that failed to load leaves the pods on the one they run: degraded,
        # not unready.
        conds.set(
            Cond.DEGRADED, TRUE, "Failing", "; ".join(filter(None, [*problems, model_problem]))
        )
    else:
        conds.set(Cond.DEGRADED, FALSE, "Healthy", "no failures observed")

    # Progressing
    removing = len(observed.pods) - len(wanted) + observed.removing
    # Ready counts the pods wanted; Progressing also waits for those to go to be gone.
    settled = len(ready) == desired_pods and len(updated) == desired_pods
    converged = settled and not removing and observed.handover is None and not applying
    # A sink rolling (its settings changed) or starting is progress too, so that
    # `kubectl wait --for=condition=Progressing=false` does not return before it is up;
    # named only once the actor pods settled, so that a new Agent's status does not
    # change as each of its children comes up. A failing sink is Degraded instead.
    starting_sinks = [s.component for s in sinks_down if not s.failing]
    message: str | None = None
    if not converged:
        message = f"{len(ready)}/{desired_pods} actor pods ready"
        if removing:
            message += f", {removing} being removed"
        if applying:
            message += f", {_plural(len(applying), 'pod')} applying the new runtime config"
        if observed.handover is not None:
            message += ", actors moving between pods"
            if observed.handover:
                message += f" (waiting for {', '.join(observed.handover)} to give up theirs)"
        # The updated count only while pods of an older template remain (running, or
        # terminating to be replaced): a new Agent's pods are current from the start,
        # and counting them as they are created would be one more status write per
        # Agent that says nothing new.
        if len(updated) < len(wanted) or observed.replacing:
            message += f", {len(updated)}/{desired_pods} updated"
    elif starting_sinks:
        message = f"sink pods not available yet: {', '.join(starting_sinks)}"
    if message is not None:
        if observed.applied:
            message = f"{observed.applied}; {message}"
        conds.set(Cond.PROGRESSING, TRUE, "Rolling", message)
    else:
        conds.set(
            Cond.PROGRESSING, FALSE, "Converged", observed.applied or "all actor pods up to date"
        )

    # Ready
    stream_ok = observed.stream_ready is True
    # Step 1 of a slice handover: a moved actor runs nowhere until step 2.
    moving = observed.handover is not None and ready_actors < desired_actors
    # A hot change of actors some pods have not taken yet.
    catching_up = bool(applying) and ready_actors < desired_actors
    all_ok = (
        settled
        and not moving
        and not catching_up
        and stream_ok
        and (sinks_ok or not agent_spec.sinks)
        and not problems
    )
    if all_ok:
        conds.set(Cond.READY, TRUE, "Ready", f"{ready_actors}/{desired_actors} actors ready")
    elif unschedulable:
        conds.set(
            Cond.READY,
            FALSE,
            "Unschedulable",
            f"{_plural(len(unschedulable), 'actor pod')} cannot be scheduled: "
            f"{unschedulable[0].unschedulable}",
        )
    else:
        reasons = []
        if not settled:
            reasons.append(f"{len(ready)}/{desired_pods} actor pods ready")
        elif moving:
            reasons.append(
                f"{ready_actors}/{desired_actors} actors running, the rest moving between pods"
            )
        elif catching_up:
            reasons.append(
                f"{ready_actors}/{desired_actors} actors running,"
                f" {_plural(len(applying), 'pod')} applying the new runtime config"
            )
        if not stream_ok:
            reasons.append("stream not ready")
        if agent_spec.sinks and not sinks_ok:
            reasons.append("sinks not ready")
        reasons += problems
        conds.set(Cond.READY, FALSE, "NotReady", "; ".join(reasons))

    if observed.error:
        phase = spec.Phase.FAILED
    elif agent_spec.paused:
        phase = spec.Phase.PAUSED
    elif all_ok and not refused:
        phase = spec.Phase.READY
    elif problems or refused:
        phase = spec.Phase.DEGRADED
    elif unschedulable and not ready:
        phase = spec.Phase.PENDING
    else:
        phase = spec.Phase.PROGRESSING

    status: dict[str, Any] = {
        "observedGeneration": generation,
        "phase": phase.value,
        "conditions": conds.out,
        "desiredActors": desired_actors,
        "readyActors": ready_actors,
        "desiredPods": desired_pods,
        "readyPods": len(ready),
        "selector": selector,
        "modelVersion": min(versions) if versions else None,
        # null removes a rollout of a model the Agent no longer runs (merge patch).
        "modelRollout": observed.model_rollout,
    }
    return status
