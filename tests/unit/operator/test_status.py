"""Agent status: counts, conditions and phase for what the reconciler observed."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

from relayrl_operator import changes, status, views
from relayrl_runtime import reporting, spec
from support import specs

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def make_spec(patch: dict[str, Any] | None = None) -> spec.AgentSpec:
    return spec.parse_agent(specs.merge_patch(specs.base_manifest(), patch or {})).spec


def ready_pods(n: int, **kw: Any) -> list[status.PodView]:
    return [status.PodView(index=i, ready=True, current=True, **kw) for i in range(n)]


def conditions(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in result["conditions"]}


def compute(agent_spec: spec.AgentSpec, observed: status.Observed, previous: Any = ()) -> Any:
    return status.compute(agent_spec, 4, "sel=1", observed, previous, NOW)


ARROW_READY = (status.SinkView("arrow-sink", ready=True),)


def test_all_pods_stream_and_sinks_ready_is_ready() -> None:
    s = make_spec({"spec": {"actors": 10, "actorsPerPod": 4}})
    result = compute(s, status.Observed(ready_pods(3), ARROW_READY, stream_ready=True))
    assert result["phase"] == "Ready"
    assert (result["readyActors"], result["desiredActors"]) == (10, 10)
    assert (result["readyPods"], result["desiredPods"]) == (3, 3)
    assert result["observedGeneration"] == 4
    assert result["selector"] == "sel=1"
    cond = conditions(result)
    assert cond["Ready"]["status"] == "True"
    assert cond["Ready"]["message"] == "10/10 actors ready"
    assert {c["status"] for t, c in cond.items() if t in ("Degraded", "Paused", "Progressing")} == {
        "False"
    }


def test_actors_moving_between_pods_are_not_ready_until_they_run_again() -> None:
    """Step 1 of a slice handover (10 actors, 2 -> 4 per pod): pod 0 keeps actors 0-1
    of its new 0-3, pod 1 none of its new 4-7, pod 2 none of 8-9 (it ran 4-5)."""
    s = make_spec({"spec": {"actors": 10, "actorsPerPod": 4}})
    running = (2, 0, 0)
    pods = [
        status.PodView(i, ready=True, current=True, reported_actors=n)
        for i, n in enumerate(running)
    ]
    moving = status.Observed(pods, ARROW_READY, stream_ready=True, handover=())
    result = compute(s, moving)
    assert result["readyActors"] == 2
    assert result["phase"] == "Progressing"
    ready = conditions(result)["Ready"]
    assert (ready["status"], ready["message"]) == (
        "False",
        "2/10 actors running, the rest moving between pods",
    )
    # Step 2: every pod takes its whole slice.
    result = compute(s, status.Observed(ready_pods(3), ARROW_READY, stream_ready=True))
    assert (result["readyActors"], result["phase"]) == (10, "Ready")


def test_ready_actors_count_only_ready_slices() -> None:
    s = make_spec({"spec": {"actors": 10, "actorsPerPod": 4}})
    pods = [
        status.PodView(0, ready=False, current=True),
        status.PodView(1, ready=True, current=True),
        status.PodView(2, ready=True, current=True),
    ]
    result = compute(s, status.Observed(pods, ARROW_READY, stream_ready=True))
    assert result["readyActors"] == 6  # 4 + the last, partial slice of 2
    assert result["phase"] == "Progressing"
    assert conditions(result)["Progressing"]["status"] == "True"


def test_unschedulable_gpu_pods_leave_the_agent_pending_with_the_scheduler_message() -> None:
    s = make_spec({"spec": {"device": "cuda", "gpusPerPod": 8}})
    message = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    pods = [status.PodView(i, ready=False, current=True, unschedulable=message) for i in range(2)]
    result = compute(s, status.Observed(pods, ARROW_READY, stream_ready=True))
    assert result["phase"] == "Pending"
    ready = conditions(result)["Ready"]
    assert ready["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in ready["message"]


def test_paused_agent_is_paused_with_zero_desired() -> None:
    s = make_spec({"spec": {"paused": True}})
    result = compute(s, status.Observed((), ARROW_READY, stream_ready=True))
    assert result["phase"] == "Paused"
    assert result["desiredActors"] == 0
    assert conditions(result)["Paused"]["status"] == "True"


def test_crashlooping_pod_degrades_the_agent() -> None:
    s = make_spec({"spec": {"actors": 4, "actorsPerPod": 4}})
    pods = [status.PodView(0, ready=False, current=True, failing="CrashLoopBackOff: boom")]
    result = compute(s, status.Observed(pods, ARROW_READY, stream_ready=True))
    assert result["phase"] == "Degraded"
    assert "CrashLoopBackOff" in conditions(result)["Degraded"]["message"]


def test_stream_and_sinks_gate_readiness() -> None:
    s = make_spec({"spec": {"actors": 4, "actorsPerPod": 4}})
    no_stream = compute(s, status.Observed(ready_pods(1), ARROW_READY, stream_ready=None))
    assert conditions(no_stream)["Ready"]["status"] == "False"
    assert conditions(no_stream)["StreamReady"]["status"] == "Unknown"
    no_sink = compute(s, status.Observed(ready_pods(1), (), stream_ready=True))
    assert conditions(no_sink)["SinksReady"]["status"] == "False"
    assert "not created yet" in conditions(no_sink)["SinksReady"]["message"]
    assert no_sink["phase"] == "Progressing"


def test_a_starting_sink_is_progress_and_a_failing_one_degrades() -> None:
    s = make_spec({"spec": {"actors": 4, "actorsPerPod": 4}})
    starting = status.SinkView(
        "arrow-sink", ready=False, message="Deployment does not have minimum availability."
    )
    result = compute(s, status.Observed(ready_pods(1), (starting,), stream_ready=True))
    assert result["phase"] == "Progressing"
    assert conditions(result)["Degraded"]["status"] == "False"
    assert "minimum availability" in conditions(result)["SinksReady"]["message"]
    # Progressing says the same as the phase (a sink rolling after a settings change).
    assert conditions(result)["Progressing"]["status"] == "True"
    assert "arrow-sink" in conditions(result)["Progressing"]["message"]
    crashing = status.SinkView(
        "arrow-sink",
        ready=False,
        message="Deployment does not have minimum availability.",
        failing="CrashLoopBackOff: back-off 40s restarting failed container",
    )
    result = compute(s, status.Observed(ready_pods(1), (crashing,), stream_ready=True))
    assert result["phase"] == "Degraded"
    assert "sink arrow-sink failing: CrashLoopBackOff" in conditions(result)["Degraded"]["message"]


def test_a_refusal_counts_only_from_pods_of_the_current_template() -> None:
    s = make_spec({"spec": {"actors": 8, "actorsPerPod": 4}})
    why = "model version 2: model.version 2 is pinned but /models/a holds version 1"
    rolling = [
        status.PodView(0, ready=True, current=False, model_version=1, refused=why),
        status.PodView(1, ready=True, current=True, model_version=2),
    ]
    result = compute(s, status.Observed(rolling, ARROW_READY, stream_ready=True))
    assert result["phase"] == "Progressing"
    assert conditions(result)["Degraded"]["status"] == "False"
    current = [dataclasses.replace(p, current=True) for p in rolling]
    result = compute(s, status.Observed(current, ARROW_READY, stream_ready=True))
    assert result["phase"] == "Degraded"
    assert "could not hot-reload model version 2" in conditions(result)["Degraded"]["message"]


def test_a_version_failing_where_it_runs_is_said_to_fail_there() -> None:
    """A pod that started on version 2, which failed at run time with none before it:
    it runs version 2 and cannot run it."""
    s = make_spec({"spec": {"actors": 4, "actorsPerPod": 4}})
    why = "model version 2: model version 2 failed at run time, with no version before it"
    pods = [status.PodView(0, True, True, model_version=2, refused=why, runs_refused=True)]
    result = compute(s, status.Observed(pods, ARROW_READY, stream_ready=True))
    model = conditions(result)["ModelReady"]
    assert (model["status"], model["reason"]) == ("False", "ReloadFailed")
    assert model["message"] == f"1 actor pod cannot run {why}"
    assert result["phase"] == "Degraded"


def test_a_refusal_without_a_version_says_the_model_is_missing() -> None:
    """The bucket or the object gone: the pod keeps its model, and status says what is
    missing, not `version None`."""
    s = make_spec({"spec": {"actors": 4, "actorsPerPod": 4}})
    missing = reporting.Refusal(None, "model registry: bucket 'b1' does not exist", False)
    pods = [status.PodView(0, True, True, model_version=3, refused=views._refusal(missing))]
    result = compute(s, status.Observed(pods, ARROW_READY, stream_ready=True))
    message = conditions(result)["ModelReady"]["message"]
    assert message == (
        "1 actor pod could not hot-reload the model: model registry: bucket 'b1' does not"
        " exist; they run version 3"
    )


def test_permanent_error_fails_the_agent() -> None:
    s = make_spec()
    result = compute(s, status.Observed((), ARROW_READY, stream_ready=True, error="rejected"))
    assert result["phase"] == "Failed"


def test_model_version_comes_from_pod_reports() -> None:
    s = make_spec({"spec": {"actors": 8, "actorsPerPod": 4}})
    pods = [status.PodView(i, True, True, model_version=3) for i in range(2)]
    result = compute(s, status.Observed(pods, ARROW_READY, stream_ready=True))
    assert result["modelVersion"] == 3
    mixed = [
        status.PodView(0, True, True, model_version=3),
        status.PodView(1, True, True, model_version=4),
    ]
    rolling = compute(s, status.Observed(mixed, ARROW_READY, stream_ready=True))
    assert conditions(rolling)["ModelReady"]["reason"] == "Rolling"


def test_pods_on_the_model_a_rollout_replaces_do_not_give_the_model_version() -> None:
    # spec.model.uri moved to another model: pod 0, not replaced yet, runs version 7
    # of the old one; pod 1 runs version 2 of the spec's.
    s = make_spec({"spec": {"actors": 8, "actorsPerPod": 4}})
    old = status.PodView(0, True, False, model_version=7, previous_model=True)
    new = status.PodView(1, True, True, model_version=2)
    result = compute(s, status.Observed([old, new], ARROW_READY, stream_ready=True))
    assert result["modelVersion"] == 2
    model = conditions(result)["ModelReady"]
    assert (model["status"], model["reason"]) == ("False", "Rolling")
    assert model["message"] == (
        f"1 ready pod still runs the previous model, not {s.model.uri};"
        " the others run model version 2"
    )
    # None runs the spec's model yet: no version of it runs.
    result = compute(s, status.Observed([old], ARROW_READY, stream_ready=True))
    assert result["modelVersion"] is None
    assert conditions(result)["ModelReady"]["message"] == (
        f"1 ready pod still runs the previous model, not {s.model.uri}"
    )
    done = [dataclasses.replace(new, index=0), new]
    done = compute(s, status.Observed(done, ARROW_READY, stream_ready=True))
    assert done["modelVersion"] == 2
    assert conditions(done)["ModelReady"]["status"] == "True"


def test_transition_time_is_kept_while_status_does_not_change() -> None:
    s = make_spec()
    first = compute(s, status.Observed((), ARROW_READY, stream_ready=True))
    later = status.compute(
        s,
        5,
        "sel=1",
        status.Observed((), ARROW_READY, stream_ready=True),
        first["conditions"],
        datetime(2026, 1, 2, tzinfo=UTC),
    )
    assert conditions(later)["Paused"]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert conditions(later)["Paused"]["observedGeneration"] == 5


def test_changes_say_how_each_field_was_applied() -> None:
    old = make_spec()
    assert changes.describe(None, old) == []
    assert "hot reload" in changes.describe(old, make_spec({"spec": {"model": {"version": 2}}}))[0]
    assert (
        "rolling update"
        in changes.describe(old, make_spec({"spec": {"model": {"format": "torchscript"}}}))[0]
    )
    assert "without a restart" in changes.describe(old, make_spec({"spec": {"actors": 12}}))[0]
    none = make_spec({"spec": {"actors": 0}})
    assert changes.describe(old, none) == [f"actors {old.actors} -> 0: scaled to 0 actor pods"]
    assert changes.describe(none, old) == [
        f"actors 0 -> {old.actors}: scaled to {old.pods()} actor pods"
    ]
    assert changes.describe(old, make_spec({"spec": {"paused": True}})) == [
        "paused: actor pods scaled to zero"
    ]
    added = changes.describe(
        old,
        make_spec(
            {"spec": {"sinks": [{"arrow": {}}, {"postgres": {"dsnSecret": {"name": "pg"}}}]}}
        ),
    )
    assert added == ["sink postgres added"]
    small = make_spec({"spec": {"sinks": [{"arrow": {"storage": {"size": "2Gi"}}}]}})
    large = make_spec({"spec": {"sinks": [{"arrow": {"storage": {"size": "8Gi"}}}]}})
    assert changes.describe(small, large) == [
        "sink arrow storage.size 2Gi -> 8Gi: its claim asked for the new size (a claim"
        " grows, never shrinks); no pod restarts"
    ]
    moved = make_spec(
        {"spec": {"sinks": [{"arrow": {"storage": {"size": "8Gi"}, "format": "arrow"}}]}}
    )
    assert changes.describe(small, moved) == ["sink arrow settings changed: its pods rolled"]


def test_changes_say_what_did_not_happen_yet_or_at_all() -> None:
    old = make_spec({"spec": {"actors": 8, "actorsPerPod": 2}})
    wider = make_spec({"spec": {"actors": 8, "actorsPerPod": 4}})
    [handed] = changes.describe(old, wider, handover=True)
    assert "hand actors over" in handed
    [at_once] = changes.describe(old, wider)  # no pods ran, or they could not take one
    assert "hand actors over" not in at_once
    paused = make_spec({"spec": {"paused": True}})
    for patch in (
        {"actors": 12},
        {"actorsPerPod": 2},
        {"model": {"version": 2}},
        {"device": "cuda", "gpusPerPod": 1},
        {"template": {"env": [{"name": "A", "value": "1"}]}},
        {"trajectories": {"maxLength": 10}},
    ):
        later = make_spec({"spec": {"paused": True, **patch}})
        lines = changes.describe(paused, later)
        assert all("rolling update of the actor pods" not in line for line in lines), lines
        assert any("paused, so the actor pods start with it when resumed" in x for x in lines)
    # What the sinks take while paused still rolls them.
    elsewhere = make_spec(
        {"spec": {"paused": True, "trajectories": {"nats": {"url": "nats://other:4222"}}}}
    )
    assert any(
        line.endswith("; the sink pods roll") for line in changes.describe(paused, elsewhere)
    )


def test_a_new_agents_status_does_not_change_as_its_pods_are_created() -> None:
    # One status write fewer per new Agent: "created, not ready" says what "not created"
    # said. A rollout, where pods of the old template remain, shows the updated count.
    s = make_spec({"spec": {"actors": 8, "actorsPerPod": 4}})
    none_yet = compute(s, status.Observed([], ARROW_READY, stream_ready=True))
    created = [status.PodView(i, ready=False, current=True) for i in range(2)]
    starting = compute(
        s, status.Observed(created, ARROW_READY, stream_ready=True), none_yet["conditions"]
    )
    assert starting == none_yet
    assert conditions(starting)["Progressing"]["message"] == "0/2 actor pods ready"
    rolling = [
        status.PodView(0, ready=True, current=False),
        status.PodView(1, ready=False, current=True),
    ]
    result = compute(s, status.Observed(rolling, ARROW_READY, stream_ready=True))
    assert conditions(result)["Progressing"]["message"] == "1/2 actor pods ready, 1/2 updated"
    # The old pod terminating before its replacement exists: still a rollout.
    replacing = [status.PodView(1, ready=True, current=True)]
    result = compute(s, status.Observed(replacing, ARROW_READY, stream_ready=True, replacing=1))
    assert conditions(result)["Progressing"]["message"] == "1/2 actor pods ready, 1/2 updated"


def test_pods_past_the_desired_count_keep_it_progressing_until_gone() -> None:
    """Scaled down: the pods to go still run and publish until they are gone."""
    s = make_spec({"spec": {"actors": 4, "actorsPerPod": 4}})
    not_deleted_yet = compute(s, status.Observed(ready_pods(2), ARROW_READY, stream_ready=True))
    terminating = compute(
        s, status.Observed(ready_pods(1), ARROW_READY, stream_ready=True, removing=1)
    )
    for result in (not_deleted_yet, terminating):
        progressing = conditions(result)["Progressing"]
        assert progressing["status"] == "True"
        assert progressing["message"] == "1/1 actor pods ready, 1 being removed"
        # The pods wanted are all there: still Ready (a scale-down is no outage).
        assert conditions(result)["Ready"]["status"] == "True"
        assert result["phase"] == "Ready"
    gone = compute(s, status.Observed(ready_pods(1), ARROW_READY, stream_ready=True))
    assert gone["phase"] == "Ready"
    # Paused: Paused at once, and Progressing until the last actor pod is gone.
    paused = make_spec({"spec": {"actors": 4, "actorsPerPod": 4, "paused": True}})
    draining = compute(paused, status.Observed([], ARROW_READY, stream_ready=True, removing=1))
    assert draining["phase"] == "Paused"
    assert conditions(draining)["Progressing"]["status"] == "True"
    done = compute(paused, status.Observed([], ARROW_READY, stream_ready=True))
    assert conditions(done)["Progressing"]["status"] == "False"


def test_degraded_says_why_the_stream_is_unavailable() -> None:
    """Not only that it is: the cause (a missing Secret, NATS away) is what to act on."""
    s = make_spec()
    why = "cannot read NATS credentials: Secret ml/nats-creds not found"
    observed = status.Observed(ready_pods(1), ARROW_READY, stream_ready=False, stream_message=why)
    degraded = conditions(compute(s, observed))["Degraded"]
    assert degraded["status"] == "True"
    assert f"stream unavailable: {why}" in degraded["message"]


def test_a_delete_waiting_on_its_cleanup_changes_ready_and_degraded_only() -> None:
    s = make_spec()
    before = compute(s, status.Observed(ready_pods(1), ARROW_READY, stream_ready=True))
    later = datetime(2026, 1, 2, tzinfo=UTC)
    result = status.cleanup_waiting(4, "cannot remove stream S", before["conditions"], later)
    assert set(result) == {"phase", "conditions"}
    assert result["phase"] == "Degraded"
    assert [c["type"] for c in result["conditions"]] == [c["type"] for c in before["conditions"]]
    got, was = conditions(result), conditions(before)
    assert (got["Ready"]["status"], got["Ready"]["reason"]) == ("False", "Deleting")
    assert (got["Degraded"]["status"], got["Degraded"]["message"]) == (
        "True",
        "cannot remove stream S",
    )
    # A condition whose status changed moved now; the others are as they were.
    assert was["Degraded"]["status"] == "False"
    assert got["Degraded"]["lastTransitionTime"] == "2026-01-02T00:00:00Z"
    assert (got["Ready"]["lastTransitionTime"] == "2026-01-02T00:00:00Z") == (
        was["Ready"]["status"] != "False"
    )
    for kind in set(was) - {"Ready", "Degraded"}:
        assert got[kind] == was[kind]
    # No conditions before (a delete before the first status): the two it sets.
    bare = status.cleanup_waiting(1, "m")
    assert [c["type"] for c in bare["conditions"]] == ["Ready", "Degraded"]
