"""Reconcile passes against a recording stand-in for the apiserver and NATS.

The cluster tests run the operator against a real control plane; these drive single
passes through paths that are slow or awkward to reach there.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import time
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from unit.operator.pods import actor_pod

from relayrl_operator import constants, handover, kube, metrics, reconcile, settings, status, views
from relayrl_operator.builders import common
from relayrl_runtime import config, reporting, spec

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "cartpole-cpu" / "agent.yaml"
KEY = ("ml", "cartpole")


class Applied:
    def __init__(self, obj: dict[str, Any]) -> None:
        self.obj = obj
        self.resource_version = "1"
        self.created = True


class Recorder:
    """Answers every request with success and remembers the writes."""

    def __init__(self) -> None:
        self.applied: list[tuple[str, str]] = []
        self.deleted: list[tuple[str, str]] = []
        self.status: list[dict[str, Any]] = []
        self.patches: list[dict[str, Any]] = []
        # What `get` finds, by (kind, name).
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.looked_up: list[tuple[str, str]] = []

    async def apply(self, obj: dict[str, Any]) -> Applied:
        self.applied.append((obj["kind"], obj["metadata"]["name"]))
        return Applied(obj)

    async def merge_patch(self, *args: Any, sub: str | None = None) -> dict[str, Any]:
        if sub == "status":
            self.status.append(args[-1]["status"])
        else:
            self.patches.append(args[-1])
        return {}

    async def delete(self, kind: kube.Kind, namespace: str, name: str) -> bool:
        self.deleted.append((kind.kind, name))
        return True

    async def request(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {}

    async def has_api(self, api_version: str) -> bool:
        return False

    async def get(self, kind: kube.Kind, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((kind.kind, name))

    async def get_metadata(
        self, kind: kube.Kind, namespace: str, name: str
    ) -> dict[str, Any] | None:
        self.looked_up.append((kind.kind, name))
        return self.objects.get((kind.kind, name))


class FailingStreams:
    """NATS that is never reachable; counts the attempts."""

    def __init__(self) -> None:
        self.attempts = 0

    async def ensure(self, agent: common.AgentRef) -> str:
        self.attempts += 1
        raise ConnectionRefusedError("nats://nats:4222")

    async def remove(self, agent: common.AgentRef) -> None:
        pass

    async def verify(self, agents: Iterable[common.AgentRef]) -> set[tuple[str, str]]:
        return {(a.namespace, a.name) for a in agents}

    async def retain(self, agents: Iterable[common.AgentRef]) -> None:
        pass

    def set_listener(self, listener: Any) -> None:
        pass

    def reports(self, namespace: str, agent: str) -> dict[str, Any]:
        return {}


def agent_body(generation: int = 1, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    body["metadata"].update(
        namespace="ml",
        uid="u1",
        generation=generation,
        resourceVersion=str(generation),
        finalizers=[constants.FINALIZER],
    )
    body["spec"].update(spec)
    return body


# The example Agent's StatefulSet as a watch event carries it (metadata only).
ACTORS_STATEFULSET: dict[str, Any] = {
    "kind": "StatefulSet",
    "metadata": {
        "name": "cartpole-actors",
        "namespace": "ml",
        "labels": {"relayrl.io/agent": "cartpole"},
        "generation": 1,
    },
}


@contextlib.asynccontextmanager
async def running(
    api: Recorder, streams: Any = None, resync_seconds: float = 30.0
) -> AsyncIterator[reconcile.Reconciler]:
    """A started reconciler with one worker, against this stand-in apiserver (and NATS)."""
    cfg = settings.Settings(resync_seconds=resync_seconds)
    rec = reconcile.Reconciler(api, cfg, streams, workers=1)  # type: ignore[arg-type]
    await rec.start()
    try:
        yield rec
    finally:
        await rec.stop()


async def settle(rec: reconcile.Reconciler, seconds: float = 0.3) -> None:
    await asyncio.sleep(seconds)
    assert rec.healthy


async def test_removing_a_sink_with_a_claim_deletes_the_deployment_and_keeps_the_claim() -> None:
    api = Recorder()
    async with running(api, None) as rec:
        first = agent_body()
        first["spec"]["sinks"][0]["arrow"]["storage"] = {"size": "1Gi"}
        rec.agent_event("ADDED", first)
        await settle(rec)
        sink = common.sink_name(
            rec._states[KEY].agent,  # type: ignore[arg-type]
            constants.COMPONENT_ARROW_SINK,
        )
        assert ("PersistentVolumeClaim", sink) in api.applied
        second = copy.deepcopy(first)
        second["metadata"].update(generation=2, resourceVersion="2")
        second["spec"]["sinks"] = []
        rec.agent_event("MODIFIED", second)
        await settle(rec)
        state = rec._states[KEY]
        assert state.failures == 0
        assert state.applied_generation == 2
        assert api.deleted == [("Deployment", sink)]  # once; the claim and its data stay
        assert api.status[-1]["observedGeneration"] == 2


async def test_unreachable_nats_is_retried_with_growing_delays() -> None:
    api = Recorder()
    nats = FailingStreams()
    async with running(api, nats) as rec:
        rec.agent_event("ADDED", agent_body())
        await settle(rec, 3.2)
        # 0.5 s doubling (with jitter 0.8-1.2x): at most 4 attempts in 3.2 s, not one
        # every half second.
        assert 2 <= nats.attempts <= 4
        status = api.status[-1]
        stream = next(c for c in status["conditions"] if c["type"] == "StreamReady")
        assert stream["status"] == "False"
        assert "cannot reach NATS" in stream["message"]


async def test_retries_asked_for_by_many_passes_fire_once() -> None:
    """Each failed pass asks for a retry (one a resync started, one an event started):
    an Agent has one timer, the earliest asked for, not one per failed pass, which
    would multiply for as long as the fault lasts."""
    async with running(Recorder()) as rec:
        fired: list[tuple[str, str]] = []
        rec.enqueue = lambda key, background=False: fired.append(key)  # type: ignore[method-assign]
        key = ("ml", "cartpole")
        for delay in (0.6, 0.2, 0.4, 0.3):
            rec._enqueue_later(key, delay)
        rec._enqueue_later(("ml", "other"), 0.2)
        assert len(rec._timers) == 2
        await asyncio.sleep(0.35)
        assert sorted(fired) == [key, ("ml", "other")]
        await asyncio.sleep(0.5)
        assert len(fired) == 2  # the later ones were not kept
        assert not rec._timers


async def test_a_pass_while_the_last_status_write_is_on_its_way_writes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Status is computed from the operator's last write, not from a body that lags it.

    From the lagging body, a condition's lastTransitionTime would be stamped anew on a
    pass a second later, and written; that write's event, lagging again, would cause
    the next: a loop of status writes that says nothing new.
    """
    clock = [datetime(2026, 11, 22, 1, 0, 0, tzinfo=UTC)]
    monkeypatch.setattr(status, "datetime", SimpleNamespace(now=lambda tz=None: clock[0]))
    api = Recorder()
    async with running(api, None) as rec:
        body = agent_body()
        rec.agent_event("ADDED", body)
        await settle(rec)
        assert len(api.status) == 1
        written = api.status[0]
        # A pass a few seconds later, before the write's watch event: nothing to write.
        clock[0] += timedelta(seconds=5)
        rec.enqueue(KEY)
        await settle(rec)
        assert len(api.status) == 1
        # The write's event arrives: still nothing to write.
        echo = copy.deepcopy(body)
        echo["metadata"]["resourceVersion"] = "2"
        echo["status"] = written
        rec.agent_event("MODIFIED", echo)
        await settle(rec)
        assert len(api.status) == 1
        # A real change is written, and keeps the transition times of what did not change.
        changed = copy.deepcopy(echo)
        changed["metadata"].update(generation=2, resourceVersion="3")
        changed["spec"]["paused"] = True
        rec.agent_event("MODIFIED", changed)
        await settle(rec)
        assert len(api.status) == 2
        before = {c["type"]: c for c in written["conditions"]}
        after = {c["type"]: c for c in api.status[1]["conditions"]}
        kept = [t for t in after if after[t]["status"] == before[t]["status"]]
        assert kept
        for t in kept:
            assert after[t]["lastTransitionTime"] == before[t]["lastTransitionTime"]
        assert after["Paused"]["lastTransitionTime"] == "2026-11-22T01:00:05Z"


def sink_deployment(*conditions: dict[str, str]) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "cartpole-arrow-sink",
            "generation": 1,
            "labels": {constants.LABEL_COMPONENT: constants.COMPONENT_ARROW_SINK},
        },
        "spec": {"replicas": 1},
        "status": {"observedGeneration": 1, "conditions": list(conditions)},
    }


UNAVAILABLE = {
    "type": "Available",
    "status": "False",
    "reason": "MinimumReplicasUnavailable",
    "message": "Deployment does not have minimum availability.",
}


def test_a_crash_loop_reads_the_same_through_its_restarts() -> None:
    """Back-off, running (not ready) after a failed run, back-off again with a longer
    wait: one failure, said the same way, so status and its Events do not flap."""
    last = {"terminated": {"exitCode": 2, "reason": "Error"}}

    def container(state: dict[str, Any], restarts: int, ready: bool = False) -> Any:
        status = {"state": state, "lastState": last, "restartCount": restarts, "ready": ready}
        return {"metadata": {"name": "p"}, "status": {"containerStatuses": [status]}}

    backoff = "back-off {} restarting failed container=runtime pod=p"
    cycle = [
        container({"waiting": {"reason": "CrashLoopBackOff", "message": backoff.format("10s")}}, 1),
        container({"running": {"startedAt": "2026-11-24T08:00:00Z"}}, 2),
        container({"waiting": {"reason": "CrashLoopBackOff", "message": backoff.format("20s")}}, 2),
    ]
    said = {views.waiting_failure(pod) for pod in cycle}
    assert said == {"CrashLoopBackOff: last exit 2 (Error)"}
    # Once it runs and is ready again, it is not failing.
    assert views.waiting_failure(container({"running": {}}, 3, ready=True)) is None


def test_a_sink_is_failing_only_when_its_pod_or_rollout_fails() -> None:
    starting = views.sink_view(sink_deployment(UNAVAILABLE), {})
    assert (starting.ready, starting.failing) == (False, "")
    assert "minimum availability" in starting.message
    pod = {
        "metadata": {"name": "cartpole-arrow-sink-x"},
        "status": {
            "containerStatuses": [
                {"state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}}}
            ]
        },
    }
    crashing = views.sink_view(
        sink_deployment(UNAVAILABLE), {constants.COMPONENT_ARROW_SINK: [pod]}
    )
    assert crashing.failing == "CrashLoopBackOff: back-off"
    stuck = views.sink_view(
        sink_deployment(
            UNAVAILABLE,
            {
                "type": "Progressing",
                "status": "False",
                "reason": "ProgressDeadlineExceeded",
                "message": 'ReplicaSet "x" has timed out progressing.',
            },
        ),
        {},
    )
    assert "timed out progressing" in stuck.failing
    refused = views.sink_view(
        sink_deployment(
            UNAVAILABLE,
            {
                "type": "ReplicaFailure",
                "status": "True",
                "reason": "FailedCreate",
                "message": 'pods "cartpole-arrow-sink-x" is forbidden: exceeded quota: q',
            },
        ),
        {},
    )
    assert refused.failing == 'pods "cartpole-arrow-sink-x" is forbidden: exceeded quota: q'


class Peers:
    priority = 0

    def __init__(self) -> None:
        self.blocking: list[str] = []

    async def blockers(self) -> list[str]:
        return list(self.blocking)


class AgentsOnServer(Recorder):
    """The Recorder, plus the Agents the apiserver holds now (for GETs) and the Events."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict[str, Any]] = []
        self.agents: dict[str, dict[str, Any]] = {}

    async def get(self, kind: kube.Kind, namespace: str, name: str) -> dict[str, Any] | None:
        return self.agents.get(name)

    async def request(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if kwargs.get("body", {}).get("kind") == "Event":
            self.events.append(kwargs["body"])
        return {}


async def test_resuming_reads_each_agent_again_and_forgets_deleted_ones() -> None:
    """While paused, a peer deleted one Agent and changed another; the cache knows neither.
    The peer told of its change (SpecApplied): this operator does not again."""
    api = AgentsOnServer()
    peers = Peers()
    rec = reconcile.Reconciler(
        api,  # type: ignore[arg-type]
        settings.Settings(),
        None,
        workers=1,
        peers=peers,  # type: ignore[arg-type]
    )
    await rec.start()
    try:
        kept, gone = agent_body(), agent_body()
        gone["metadata"]["name"] = "gone"
        for body in (kept, gone):  # one by one: neither's first status is held back
            rec.agent_event("ADDED", body)
            await settle(rec)
        peers.blocking = ["relayrl-operator-peer"]
        await rec._check_peers()
        assert not rec.active
        # Meanwhile the peer: "gone" deleted, "cartpole" scaled to generation 2.
        changed = copy.deepcopy(kept)
        changed["metadata"].update(generation=2, resourceVersion="7")
        changed["spec"]["actors"] = 12
        api.agents = {"cartpole": changed}
        api.applied.clear()
        peers.blocking = []
        await rec._check_peers()
        await settle(rec)
        assert ("ml", "gone") not in rec._states
        assert not any(name.startswith("gone") for _, name in api.applied)
        assert rec._states[KEY].applied_generation == 2
        assert api.status[-1]["desiredActors"] == 12
        assert not [e for e in api.events if e["reason"] == "SpecApplied"]
    finally:
        await rec.stop()


async def test_an_agent_with_an_invalid_spec_can_still_be_deleted() -> None:
    # Stored before a stricter rule: the finalizer must still come off, or the
    # Agent stays Terminating for good. Its stream is left alone (no NATS call).
    api = Recorder()
    nats = FailingStreams()
    async with running(api, nats) as rec:
        body = agent_body()
        body["spec"]["trajectories"] = {"nats": {"url": "nats://:4222"}}
        body["metadata"]["deletionTimestamp"] = "2026-11-22T12:00:00Z"
        rec.agent_event("MODIFIED", body)
        await settle(rec)
        assert {"metadata": {"finalizers": [], "resourceVersion": "1"}} in api.patches
        assert nats.attempts == 0


def _claim(owner_uid: str) -> dict[str, Any]:
    return {"metadata": {"name": "cartpole-arrow-sink", "ownerReferences": [{"uid": owner_uid}]}}


@pytest.mark.parametrize("valid", [True, False])
async def test_retain_set_while_deleting_keeps_the_claim_the_agent_made(valid: bool) -> None:
    """The Agent's owner reference on its claim would have the garbage collector delete
    it with the Agent: it comes off before the finalizer does, also when the rest of
    the spec is invalid (an edit the CRD took and the operator refused)."""
    api = Recorder()
    api.objects[("PersistentVolumeClaim", "cartpole-arrow-sink")] = _claim("u1")
    nats = RemovingStreams()
    async with running(api, nats) as rec:
        body = agent_body()
        body["spec"]["sinks"][0]["arrow"]["storage"] = {"size": "5Gi"}
        body["spec"]["trajectories"]["nats"]["retainOnDelete"] = True
        if not valid:
            body["spec"]["actors"] = -1
        body["metadata"]["deletionTimestamp"] = "2026-11-22T12:00:00Z"
        rec.agent_event("MODIFIED", body)
        await settle(rec)
        assert api.patches[0] == {"metadata": {"ownerReferences": None}}
        assert api.patches[-1]["metadata"]["finalizers"] == []
        assert nats.removed == []


async def test_a_claim_of_another_owner_under_the_sinks_name_is_left_alone() -> None:
    api = Recorder()
    api.objects[("PersistentVolumeClaim", "cartpole-arrow-sink")] = _claim("someone-else")
    async with running(api, Streams()) as rec:
        body = agent_body()
        body["spec"]["trajectories"]["nats"]["retainOnDelete"] = True
        body["metadata"]["deletionTimestamp"] = "2026-11-22T12:00:00Z"
        rec.agent_event("MODIFIED", body)
        await settle(rec)
        assert [p["metadata"].get("finalizers") for p in api.patches] == [[]]


async def test_deleting_an_agent_with_credentials_in_its_nats_url_removes_its_stream() -> None:
    """Stored before user info in the URL was refused: its cleanup connects with them."""
    api = Recorder()
    nats = RemovingStreams()
    async with running(api, nats) as rec:
        body = agent_body()
        body["spec"]["trajectories"]["nats"]["url"] = "nats://relay:s3cret@nats:4222"
        body["metadata"]["deletionTimestamp"] = "2026-11-22T12:00:00Z"
        rec.agent_event("MODIFIED", body)
        await settle(rec)
        assert nats.removed == [("nats://relay:s3cret@nats:4222", "cartpole")]
        assert api.patches[-1]["metadata"]["finalizers"] == []


async def test_deleting_an_agent_the_operator_refused_removes_its_stream() -> None:
    """The CRD takes edits the operator refuses (e.g. kwargs over 32 KiB): the Agent is
    Failed, but its NATS section still says where its stream and bucket are."""
    api = Recorder()
    nats = RemovingStreams()
    async with running(api, nats) as rec:
        body = agent_body()
        body["spec"]["environment"]["gymnasium"]["kwargs"] = {"blob": "x" * 40_000}
        body["metadata"]["deletionTimestamp"] = "2026-11-22T12:00:00Z"
        rec.agent_event("MODIFIED", body)
        await settle(rec)
        assert nats.removed == [("nats://nats:4222", "cartpole")]
        assert api.patches[-1]["metadata"]["finalizers"] == []


async def test_an_invalid_stored_spec_says_why_once() -> None:
    """Stored before a stricter rule: phase Failed with the reason on its conditions,
    one Warning, and no status write at every later pass."""
    api = Rejecting("none")  # records Events
    errors_before = spec_errors()
    async with running(api, Streams(), resync_seconds=0.2) as rec:
        body = agent_body()
        body["spec"]["trajectories"] = {"nats": {"url": "nats://:4222"}}
        rec.agent_event("MODIFIED", body)
        await settle(rec)
        assert len(api.status) == 1
        written = api.status[0]
        assert written["phase"] == "Failed"
        ready = next(c for c in written["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "False"
        assert ready["reason"] == "InvalidSpec"
        assert "invalid spec: spec.trajectories.nats.url" in ready["message"]
        assert [e["reason"] for e in api.events] == ["InvalidSpec"]
        # Later passes (an event, the resyncs) find it said already.
        rec.agent_event("MODIFIED", body)
        await asyncio.sleep(1.0)  # five resyncs
        assert len(api.status) == 1
        assert len(api.events) == 1
        assert not api.applied  # nothing applied meanwhile
        # Counted once too: an alert on the error rate would fire for one bad Agent.
        assert spec_errors() == errors_before + 1
        assert phase_count("Failed") == 1


def spec_errors() -> float:
    value = metrics.REGISTRY.get_sample_value("relayrl_operator_errors_total", {"kind": "spec"})
    return value or 0.0


def phase_count(phase: str) -> float | None:
    return metrics.REGISTRY.get_sample_value("relayrl_operator_agents", {"phase": phase})


async def test_agents_are_counted_by_the_status_they_show_after_a_restart() -> None:
    """A restarted operator writes no status that is as it should be already; the
    Agents it found so are still counted (an alert on Failed Agents must not resolve
    when the operator restarts). A paused operator counts none."""
    api = Rejecting("none")
    body = agent_body()
    body["spec"]["trajectories"] = {"nats": {"url": "nats://:4222"}}
    message = "invalid spec: " + str(_parse_error(body["spec"]))
    body["status"] = status.invalid(1, message, [])  # as the operator before wrote it
    async with running(api, Streams(), resync_seconds=0.2) as rec:
        rec.agent_event("MODIFIED", body)
        await settle(rec, 0.6)  # passes and resyncs
        assert not api.status  # nothing to write
        assert phase_count("Failed") == 1

        async def blockers() -> list[str]:
            return ["relayrl-operator-peer"]

        rec._peers = SimpleNamespace(blockers=blockers, priority=0)  # type: ignore[assignment]
        await rec._check_peers()  # a peer of equal priority appeared
        assert not rec.active
        await asyncio.sleep(0.5)
        assert phase_count("Failed") is None  # a standby exports no counts


def _parse_error(agent_spec: dict[str, Any]) -> Exception:
    try:
        spec.parse_spec(agent_spec)
    except spec.InvalidSpecError as err:
        return err
    raise AssertionError("the spec parsed")


class Rejecting(Recorder):
    """An apiserver that refuses one kind of child for good (a 422, as for a claim
    asked to shrink), until `fixed`."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.fixed = False
        self.events: list[dict[str, Any]] = []

    async def apply(self, obj: dict[str, Any]) -> Applied:
        if obj["kind"] == self.kind and not self.fixed:
            raise kube.ApiError(422, "Invalid", f"{self.kind} is invalid: spec: Forbidden")
        return await super().apply(obj)

    async def request(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if kwargs.get("body", {}).get("kind") == "Event":
            self.events.append(kwargs["body"])
        return {}


class GrownClaim(Rejecting):
    """A claim of 8Gi, last applied for `storage.size` `asked` (None: a claim from
    before the operator noted it): the apiserver refuses any smaller size."""

    def __init__(self, asked: str | None) -> None:
        super().__init__("PersistentVolumeClaim")
        self.claims: list[str] = []
        self.asked = asked

    async def apply(self, obj: dict[str, Any]) -> Applied:
        if obj["kind"] == self.kind:
            size = obj["spec"]["resources"]["requests"]["storage"]
            self.claims.append(size)
            if size != "8Gi":
                raise kube.ApiError(
                    422,
                    "Invalid",
                    "PersistentVolumeClaim is invalid: spec.resources.requests.storage:"
                    " Forbidden: field can not be less than status.capacity",
                )
            self.asked = obj["metadata"]["annotations"][constants.ANNOTATION_STORAGE_SIZE]
        return await Recorder.apply(self, obj)

    async def get(self, kind: kube.Kind, namespace: str, name: str) -> dict[str, Any] | None:
        assert kind == kube.PVC
        annotations = {} if self.asked is None else {constants.ANNOTATION_STORAGE_SIZE: self.asked}
        return {
            "metadata": {"annotations": annotations},
            "spec": {"resources": {"requests": {"storage": "8Gi"}}},
        }


@pytest.mark.parametrize("asked", ["5Gi", None])
async def test_a_claim_grown_by_hand_is_applied_at_its_size_not_failed(asked: str | None) -> None:
    api = GrownClaim(asked)
    async with running(api, Streams()) as rec:
        body = agent_body()
        body["spec"]["sinks"][0]["arrow"]["storage"] = {"size": "5Gi"}
        rec.agent_event("ADDED", body)
        await settle(rec)
        assert api.claims[:2] == ["5Gi", "8Gi"]
        assert api.asked == "5Gi"  # storage.size as it stands, not the claim's size
        assert api.status
        assert api.status[-1]["phase"] != "Failed"
        for condition in api.status[-1]["conditions"]:
            assert "PersistentVolumeClaim is invalid" not in condition["message"]
        assert not [e for e in api.events if e.get("type") == "Warning"]


async def test_a_larger_storage_size_below_a_claim_grown_by_hand_keeps_the_claim() -> None:
    """Applied for 5Gi, grown by hand to 8Gi: storage.size 5Gi -> 6Gi is no shrink."""
    api = GrownClaim("5Gi")
    async with running(api, Streams()) as rec:
        body = agent_body()
        body["spec"]["sinks"][0]["arrow"]["storage"] = {"size": "5Gi"}
        rec.agent_event("ADDED", body)
        await settle(rec)
        second = agent_body(generation=2)
        second["spec"]["sinks"][0]["arrow"]["storage"] = {"size": "6Gi"}
        rec.agent_event("MODIFIED", second)
        await settle(rec)
        assert api.claims[-2:] == ["6Gi", "8Gi"]
        assert api.asked == "6Gi"
        assert api.status[-1]["phase"] != "Failed"


async def test_a_smaller_storage_size_is_a_shrink_and_fails_by_name() -> None:
    """storage.size 8Gi -> 5Gi: the claim refuses it, and so does the Agent (Failed,
    with the apiserver's message), rather than keep 8Gi and say nothing."""
    api = GrownClaim("8Gi")
    async with running(api, Streams()) as rec:
        body = agent_body()
        body["spec"]["sinks"][0]["arrow"]["storage"] = {"size": "8Gi"}
        rec.agent_event("ADDED", body)
        await settle(rec)
        assert api.status[-1]["phase"] != "Failed"
        second = agent_body(generation=2)
        second["spec"]["sinks"][0]["arrow"]["storage"] = {"size": "5Gi"}
        rec.agent_event("MODIFIED", second)
        await settle(rec)
        assert api.claims[-1] == "5Gi"
        last = api.status[-1]
        assert last["phase"] == "Failed"
        degraded = next(c for c in last["conditions"] if c["type"] == "Degraded")
        assert "field can not be less than status.capacity" in degraded["message"]
        assert [e["reason"] for e in api.events if e["type"] == "Warning"] == [
            "ReconcileFailed",
            "PhaseFailed",
        ]


class WebhookDown(Rejecting):
    """An apiserver whose admission webhook for Deployments is down: a 500 every time
    (transient: retried), until `fixed`."""

    async def apply(self, obj: dict[str, Any]) -> Applied:
        if obj["kind"] == "Deployment" and not self.fixed:
            raise kube.ApiError(
                500, "InternalError", 'failed calling webhook "check.example": connection refused'
            )
        return await Recorder.apply(self, obj)


async def test_an_apply_that_keeps_failing_shows_in_status_and_one_warning() -> None:
    api = WebhookDown("Deployment")
    async with running(api, Streams()) as rec:
        rec.agent_event("ADDED", agent_body())
        await asyncio.sleep(2.5)  # the first try and a few backed-off retries
        assert api.status, "status stood still while the applies failed"
        degraded = next(c for c in api.status[-1]["conditions"] if c["type"] == "Degraded")
        assert degraded["status"] == "True"
        assert "applying children keeps failing" in degraded["message"]
        assert 'failed calling webhook "check.example"' in degraded["message"]
        assert [e["reason"] for e in api.events].count("ApplyFailing") == 1
        api.fixed = True
        await asyncio.sleep(3.0)  # the next retry goes through
        degraded = next(c for c in api.status[-1]["conditions"] if c["type"] == "Degraded")
        assert "applying children" not in degraded["message"]
        assert [e["reason"] for e in api.events].count("ApplyFailing") == 1


class Streams(FailingStreams):
    """NATS that answers; remembers the server of each ensure."""

    def __init__(self) -> None:
        super().__init__()
        self.ensured: list[str] = []

    async def ensure(self, agent: common.AgentRef) -> str:
        self.ensured.append(agent.spec.trajectories.nats.url)
        return "stream ok"

    async def verify(self, agents: Iterable[common.AgentRef]) -> set[tuple[str, str]]:
        return set()


class Retaining(Streams):
    """NATS that answers; remembers which Agents each resync said are still there."""

    def __init__(self) -> None:
        super().__init__()
        self.retained: list[set[tuple[str, str]]] = []

    async def retain(self, agents: Iterable[common.AgentRef]) -> None:
        self.retained.append({(a.namespace, a.name) for a in agents})


async def test_each_resync_tells_the_nats_side_which_agents_are_there() -> None:
    """So that it can close connections and drop reports of Agents that are gone."""
    api = Recorder()
    nats = Retaining()
    async with running(api, nats, resync_seconds=0.2) as rec:
        rec.agent_event("MODIFIED", agent_body())
        await settle(rec)
        await asyncio.sleep(0.5)  # resyncs
        assert nats.retained
        assert nats.retained[-1] == {("ml", "cartpole")}


class RemovingStreams(Streams):
    """NATS that answers; remembers the Agents whose stream and bucket it removed."""

    def __init__(self) -> None:
        super().__init__()
        self.removed: list[tuple[str, str]] = []

    async def remove(self, agent: common.AgentRef) -> None:
        self.removed.append((agent.spec.trajectories.nats.url, agent.name))


async def test_a_rejected_child_leaves_the_agent_watched_and_the_rest_applied() -> None:
    api = Rejecting("PersistentVolumeClaim")
    nats = Streams()
    async with running(api, nats) as rec:
        first = agent_body()
        first["spec"]["sinks"][0]["arrow"]["storage"] = {"size": "1Gi"}
        rec.agent_event("ADDED", first)
        await settle(rec)
        state = rec._states[KEY]
        # Every other child is applied; the stream is made; status says what failed.
        assert {kind for kind, _ in api.applied} >= {"ConfigMap", "StatefulSet", "Deployment"}
        assert nats.ensured == ["nats://nats:4222"]
        assert api.status[-1]["phase"] == "Failed"
        degraded = next(c for c in api.status[-1]["conditions"] if c["type"] == "Degraded")
        assert "PersistentVolumeClaim is invalid" in degraded["message"]
        assert [e["reason"] for e in api.events] == ["ReconcileFailed", "PhaseFailed"]

        # A pod failing meanwhile still shows: status is kept up for a failed spec too.
        rec.child_event("ADDED", crashing_pod(state))
        await settle(rec)
        assert (
            "CrashLoopBackOff"
            in next(c for c in api.status[-1]["conditions"] if c["type"] == "Degraded")["message"]
        )

        # A child deleted by hand comes back, though the spec still has the error; the
        # same error is not said again.
        api.applied.clear()
        sts = {"kind": "StatefulSet", "metadata": {**pod_meta(state), "name": "cartpole-actors"}}
        rec.child_event("ADDED", sts)
        rec.child_event("DELETED", sts)
        await settle(rec)
        assert ("StatefulSet", "cartpole-actors") in api.applied
        assert [e["reason"] for e in api.events].count("ReconcileFailed") == 1

        # Once the apiserver takes it (e.g. the claim was fixed by hand), the error goes.
        api.fixed = True
        rec.child_event("DELETED", sts)
        await settle(rec)
        assert api.status[-1]["phase"] != "Failed"
        assert state.error is None


def pod_meta(state: Any) -> dict[str, Any]:
    agent = state.agent
    return {
        "namespace": "ml",
        "labels": {
            constants.LABEL_AGENT: agent.name,
            constants.LABEL_COMPONENT: constants.COMPONENT_ACTORS,
        },
        "generation": 1,
        "resourceVersion": "9",
    }


def crashing_pod(state: Any) -> dict[str, Any]:
    return {
        "kind": "Pod",
        "metadata": {
            **pod_meta(state),
            "name": "cartpole-actors-0",
            "annotations": {constants.ANNOTATION_RESTART_HASH: state.restart_hash},
        },
        "status": {
            "containerStatuses": [
                {"state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}}}
            ]
        },
    }


async def test_another_nats_server_gets_the_stream_in_the_same_pass() -> None:
    api = Recorder()
    nats = Streams()
    async with running(api, nats) as rec:
        first = agent_body()
        rec.agent_event("ADDED", first)
        await settle(rec)
        second = copy.deepcopy(first)
        second["metadata"].update(generation=2, resourceVersion="2")
        second["spec"]["trajectories"] = {"nats": {"url": "nats://nats-b.relayrl-system:4222"}}
        rec.agent_event("MODIFIED", second)
        await settle(rec)
        assert nats.ensured == [
            "nats://nats:4222",
            "nats://nats-b.relayrl-system:4222",
        ]
        # Toggling what only the finalizer reads makes nothing anew.
        third = copy.deepcopy(second)
        third["metadata"].update(generation=3, resourceVersion="3")
        third["spec"]["trajectories"]["nats"]["retainOnDelete"] = True
        rec.agent_event("MODIFIED", third)
        await settle(rec)
        assert len(nats.ensured) == 2
        assert "retainOnDelete false -> true" in rec._states[KEY].applied_message


class Reporting(Streams):
    """NATS that answers, with the pods' reports set by the test."""

    def __init__(self) -> None:
        super().__init__()
        self.pod_reports: dict[str, reporting.PodReport] = {}

    def reports(self, namespace: str, agent: str) -> dict[str, Any]:
        return dict(self.pod_reports)


def refusing(version: int, incompatible: bool, running: int = 2) -> reporting.PodReport:
    reason = "reload refused: inputs: expected [4] float32, got [6] float32"
    if not incompatible:
        reason = "cannot load model.onnx: INVALID_PROTOBUF"
    return reporting.PodReport(
        "cartpole-actors-0",
        running,
        4,
        True,
        time.time(),
        reporting.Refusal(version, reason, incompatible),
    )


def ready_pod(state: Any) -> dict[str, Any]:
    pod = crashing_pod(state)
    pod["status"] = {"conditions": [{"type": "Ready", "status": "True"}]}
    return pod


async def with_a_ready_pod(rec: reconcile.Reconciler) -> Any:
    """The example Agent, reconciled, with its one actor pod ready; its state."""
    rec.agent_event("ADDED", agent_body())
    await settle(rec)
    state = rec._states[KEY]
    rec.child_event("ADDED", ready_pod(state))
    await settle(rec)
    return state


async def test_a_model_the_pods_cannot_take_in_place_rolls_them_once() -> None:
    api = Rejecting("none")
    nats = Reporting()
    async with running(api, nats) as rec:
        state = await with_a_ready_pod(rec)
        hash_before = state.restart_hash
        api.applied.clear()

        nats.pod_reports = {"cartpole-actors-0": refusing(3, incompatible=True)}
        rec._reported(KEY)
        await settle(rec)
        assert ("StatefulSet", "cartpole-actors") in api.applied
        assert state.restart_hash != hash_before  # the pods are replaced
        assert api.status[-1]["modelRollout"] == 3
        assert "rolling update" in state.applied_message
        assert [e["reason"] for e in api.events].count("ModelRollout") == 1
        model = next(c for c in api.status[-1]["conditions"] if c["type"] == "ModelReady")
        assert model["reason"] != "ReloadFailed"  # being rolled, not failing

        # The same refusal again (the old pod's report, until its successor reports):
        # no second rollout.
        api.applied.clear()
        rec._reported(KEY)
        await settle(rec)
        assert ("StatefulSet", "cartpole-actors") not in api.applied
        assert [e["reason"] for e in api.events].count("ModelRollout") == 1

        # An operator started afresh reads the rollout from status: no roll either.
        body = agent_body()
        body["status"] = api.status[-1]
        async with running(api, nats) as again:
            again.agent_event("ADDED", body)
            await settle(again)
            assert again._states[KEY].restart_hash == state.restart_hash

        # Another model: its versions are its own, the rollout of the old one is dropped
        # (null in the status patch), so its version 3 can be rolled for too.
        second = agent_body(generation=2)
        second["spec"]["model"]["uri"] = "objectstore://models/cartpole-big"
        rec.agent_event("MODIFIED", second)
        await settle(rec)
        assert state.model_rollout is None
        assert api.status[-1]["modelRollout"] is None


async def test_a_model_that_does_not_load_is_shown_not_rolled_for() -> None:
    api = Rejecting("none")
    nats = Reporting()
    async with running(api, nats) as rec:
        state = await with_a_ready_pod(rec)
        hash_before = state.restart_hash
        nats.pod_reports = {"cartpole-actors-0": refusing(3, incompatible=False)}
        rec._reported(KEY)
        await settle(rec)
        assert state.restart_hash == hash_before
        assert api.status[-1]["modelRollout"] is None
        conditions = {c["type"]: c for c in api.status[-1]["conditions"]}
        assert conditions["ModelReady"]["reason"] == "ReloadFailed"
        assert "version 3: cannot load model.onnx" in conditions["ModelReady"]["message"]
        assert "they run version 2" in conditions["ModelReady"]["message"]
        assert conditions["Degraded"]["status"] == "True"
        assert api.status[-1]["phase"] == "Degraded"
        # The Event says why, not "1/1 actors ready" (Ready's message).
        await settle(rec)
        [degraded] = [e for e in api.events if e["reason"] == "PhaseDegraded"]
        assert "could not hot-reload model version 3" in degraded["message"]
        assert degraded["type"] == "Warning"


class Timed(Recorder):
    """Records when each apply starts and ends; a ConfigMap apply takes a while."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, str]] = []

    async def apply(self, obj: dict[str, Any]) -> Applied:
        self.log.append(("start", obj["kind"]))
        if obj["kind"] == "ConfigMap":
            await asyncio.sleep(0.05)
        self.log.append(("end", obj["kind"]))
        return await super().apply(obj)


async def test_a_change_writes_the_config_before_the_pods_roll() -> None:
    api = Timed()
    async with running(api, None) as rec:
        first = agent_body()
        rec.agent_event("ADDED", first)
        await settle(rec)
        api.log.clear()
        second = copy.deepcopy(first)
        second["metadata"].update(generation=2, resourceVersion="2")
        second["spec"]["environment"]["gymnasium"]["envsPerActor"] = 8
        rec.agent_event("MODIFIED", second)
        await settle(rec)
        assert api.log.index(("end", "ConfigMap")) < api.log.index(("start", "StatefulSet"))


async def test_a_child_rejected_on_update_is_left_in_place_not_pruned() -> None:
    """E.g. a policy refusing an update of a sink's Deployment: it keeps running."""
    api = Rejecting("Deployment")
    api.fixed = True  # the first apply is taken
    async with running(api, None) as rec:
        first = agent_body()
        rec.agent_event("ADDED", first)
        await settle(rec)
        api.fixed = False
        second = copy.deepcopy(first)
        second["metadata"].update(generation=2, resourceVersion="2")
        second["spec"]["template"] = {"image": "ghcr.io/relayrl-fleet/runtime:0.2.0"}
        rec.agent_event("MODIFIED", second)
        await settle(rec)
        assert api.deleted == []
        assert api.status[-1]["phase"] == "Failed"


async def test_a_config_rejected_on_update_leaves_the_actor_pods_as_they_are() -> None:
    """A template (and so pods) of the new spec beside the old config would run new
    pods on settings their restart hash says they have not."""
    api = Rejecting("ConfigMap")
    api.fixed = True
    async with running(api, None) as rec:
        first = agent_body()
        rec.agent_event("ADDED", first)
        await settle(rec)
        api.fixed = False
        api.applied.clear()
        second = copy.deepcopy(first)
        second["metadata"].update(generation=2, resourceVersion="2")
        second["spec"]["template"] = {"image": "ghcr.io/relayrl-fleet/runtime:0.2.0"}
        rec.agent_event("MODIFIED", second)
        await settle(rec)
        kinds = {kind for kind, _ in api.applied}
        assert "StatefulSet" not in kinds
        assert "Service" in kinds  # the rest is kept up
        assert api.deleted == []
        assert api.status[-1]["phase"] == "Failed"
        assert any("ConfigMap is invalid" in c["message"] for c in api.status[-1]["conditions"])


# ------------------------------------------------------------ slice handover


class Versioned(Rejecting):
    """Keeps each applied object; its resourceVersion moves when its content changes."""

    def __init__(self) -> None:
        super().__init__("none")
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.versions: dict[tuple[str, str], int] = {}
        self.pod_patches: list[tuple[str, dict[str, Any]]] = []
        self.gets: list[tuple[str, str]] = []

    async def get(self, kind: kube.Kind, namespace: str, name: str) -> dict[str, Any] | None:
        self.gets.append((kind.kind, name))
        return copy.deepcopy(self.objects.get((kind.kind, name)))

    async def apply(self, obj: dict[str, Any]) -> Applied:
        key = (obj["kind"], obj["metadata"]["name"])
        created = key not in self.objects
        if created or self.objects[key] != obj:
            self.versions[key] = self.versions.get(key, 0) + 1
        self.objects[key] = copy.deepcopy(obj)
        await super().apply(obj)
        result = Applied(obj)
        result.resource_version = str(self.versions[key])
        result.created = created
        return result

    async def merge_patch(self, *args: Any, sub: str | None = None) -> dict[str, Any]:
        if args[0].kind == "Pod":
            self.pod_patches.append((args[2], args[3]))
            return {}
        return await super().merge_patch(*args, sub=sub)

    def config(self) -> dict[str, Any]:
        return self.objects[("ConfigMap", "cartpole-runtime")]

    def layout(self) -> handover.Layout | None:
        annotations = self.config()["metadata"]["annotations"]
        return handover.Layout.decode(annotations[constants.ANNOTATION_ACTOR_LAYOUT])

    def revision(self) -> str:
        return str(self.config()["metadata"]["annotations"][constants.ANNOTATION_CONFIG_HASH])

    def rendered(self) -> dict[str, Any]:
        data: dict[str, Any] = yaml.safe_load(self.config()["data"][constants.CONFIG_KEY])
        return data


def report(index: int, revision: str | None, actors: int = 4) -> reporting.PodReport:
    """Pod `index`'s status report; a `revision` of None is a runtime older than
    slice handovers (it reports none)."""
    return reporting.PodReport(
        f"cartpole-actors-{index}", 1, actors, True, time.time(), config_revision=revision
    )


def annotated(revision: str) -> dict[str, Any]:
    return {"metadata": {"annotations": {constants.ANNOTATION_CONFIG_HASH: revision}}}


def progressing(api: Versioned) -> dict[str, Any]:
    return next(c for c in api.status[-1]["conditions"] if c["type"] == "Progressing")


def ready(api: Versioned) -> dict[str, Any]:
    return next(c for c in api.status[-1]["conditions"] if c["type"] == "Ready")


async def with_running_pods(rec: reconcile.Reconciler, count: int) -> tuple[dict[str, Any], Any]:
    """The example Agent (16 actors, 4 per pod) reconciled, and `count` of its actor
    pods running: its body and state."""
    body = agent_body()
    rec.agent_event("ADDED", body)
    await settle(rec)
    state = rec._states[KEY]
    for i in range(count):
        rec.child_event("ADDED", actor_pod(i, state.restart_hash))
    await settle(rec)
    return body, state


def change(body: dict[str, Any], generation: int, **spec: Any) -> dict[str, Any]:
    new = copy.deepcopy(body)
    new["metadata"].update(generation=generation, resourceVersion=str(generation))
    new["spec"].update(spec)
    return new


async def test_a_hot_change_is_progress_until_the_pods_report_taking_it() -> None:
    """`kubectl scale` changes the runtime config only: status must not say Converged,
    nor count the new slices, before the pods report the new config."""
    api = Versioned()
    nats = Reporting()
    async with running(api, nats) as rec:
        first, _ = await with_running_pods(rec, 4)  # 16 actors, 4 per pod
        fewer = change(first, 2, actors=14)  # pod 3 runs 2
        rec.agent_event("MODIFIED", fewer)
        await settle(rec)
        taken = api.revision()
        for i in range(4):  # 4 copies per actor (the example's envsPerActor)
            nats.pod_reports[f"cartpole-actors-{i}"] = report(
                i, taken, actors=4 * (4 if i < 3 else 2)
            )
        rec._reported(KEY)
        await settle(rec)
        assert api.status[-1]["readyActors"] == 14
        assert progressing(api)["status"] == "False"

        more = change(fewer, 3, actors=16)  # pod 3 is to run 4
        rec.agent_event("MODIFIED", more)
        await settle(rec)
        assert api.status[-1]["desiredActors"] == 16
        assert api.status[-1]["readyActors"] == 14  # pod 3 still runs its 2
        assert progressing(api)["status"] == "True"
        assert "4 pods applying the new runtime config" in progressing(api)["message"]
        assert "14/16 actors running" in ready(api)["message"]
        for i in range(4):
            nats.pod_reports[f"cartpole-actors-{i}"] = report(i, api.revision(), actors=16)
        rec._reported(KEY)
        await settle(rec)
        assert api.status[-1]["readyActors"] == 16
        assert progressing(api)["status"] == "False"
        assert "applying" not in ready(api)["message"]


async def test_an_actors_per_pod_change_hands_actors_over_before_pods_take_new_ones() -> None:
    api = Versioned()
    nats = Reporting()
    async with running(api, nats) as rec:
        first, state = await with_running_pods(rec, 4)  # 16 actors, 4 per pod
        assert api.layout() == handover.Layout(16, 4)
        assert "sliceHandover" not in api.rendered()
        plain = api.revision()
        assert plain == config.revision(api.config()["data"][constants.CONFIG_KEY].encode())
        for i in range(4):
            nats.pod_reports[f"cartpole-actors-{i}"] = report(i, plain)

        # 8 per pod: actor 4 moves from pod 1 to pod 0 (and so on). Step 1: every pod
        # keeps only what it already runs of its new slice.
        second = change(first, 2, actorsPerPod=8)
        rec.agent_event("MODIFIED", second)
        await settle(rec)
        assert api.layout() == handover.Layout(16, 8, handover=True)
        assert api.rendered()["sliceHandover"] is True
        assert api.rendered()["actorsPerPod"] == 8
        step1 = api.revision()
        # The running pods are asked to mount it at once (their kubelets sync on it).
        patched = {name: patch for name, patch in api.pod_patches}
        assert set(patched) == {f"cartpole-actors-{i}" for i in range(4)}
        assert {
            p["metadata"]["annotations"][constants.ANNOTATION_CONFIG_HASH] for p in patched.values()
        } == {step1}
        message = progressing(api)["message"]
        assert "actors moving between pods" in message
        assert "hand actors over" in message

        # Pods 0 and 1 applied it; pods 2 and 3 (past the new count) still run. Pod 0
        # keeps actors 0-3 of its new 0-7, pod 1 none of its new 8-15: status counts
        # what runs, not the slices. (Pods report environment copies, 4 per actor.)
        assert "moving" not in ready(api)["message"]  # the pods still run their actors
        nats.pod_reports["cartpole-actors-0"] = report(0, step1, actors=4 * 4)
        nats.pod_reports["cartpole-actors-1"] = report(1, step1, actors=0)
        rec._reported(KEY)
        await settle(rec)
        assert api.layout() == handover.Layout(16, 8, handover=True)
        assert "waiting for cartpole-actors-2, cartpole-actors-3" in progressing(api)["message"]
        assert api.status[-1]["readyActors"] == 4
        assert ready(api)["status"] == "False"  # (the example's sinks do not run here)
        assert "4/16 actors running, the rest moving between pods" in ready(api)["message"]

        # Pod 3 is gone; pod 2, terminating, has applied it (it runs nothing now).
        rec.child_event("MODIFIED", actor_pod(2, state.restart_hash, terminating=True))
        rec.child_event("DELETED", actor_pod(3, state.restart_hash))
        await settle(rec)
        assert api.layout() == handover.Layout(16, 8, handover=True)
        nats.pod_reports["cartpole-actors-2"] = report(2, step1)
        rec._reported(KEY)
        await settle(rec)
        # Step 2: each pod takes its whole new slice, and is asked to mount it.
        assert api.layout() == handover.Layout(16, 8)
        assert "sliceHandover" not in api.rendered()
        assert state.handover_since is None
        assert "actors moving" not in progressing(api)["message"]
        step2 = [name for name, p in api.pod_patches if p == annotated(api.revision())]
        assert step2 == ["cartpole-actors-0", "cartpole-actors-1"]
        # What runs until the pods take step 2 (they report the step-1 config).
        assert api.status[-1]["readyActors"] == 4
        assert "2 pods applying the new runtime config" in progressing(api)["message"]
        for i in range(2):
            nats.pod_reports[f"cartpole-actors-{i}"] = report(i, api.revision(), actors=8 * 4)
        rec._reported(KEY)
        await settle(rec)
        assert api.status[-1]["readyActors"] == 16  # their slices, now they took them
        assert "applying" not in progressing(api)["message"]
        assert "moving" not in ready(api)["message"]

        # A late watch event of the step-1 ConfigMap undoes nothing.
        stale = copy.deepcopy(api.config())
        stale["metadata"]["annotations"][constants.ANNOTATION_ACTOR_LAYOUT] = handover.Layout(
            16, 8, handover=True
        ).encode()
        stale["metadata"]["resourceVersion"] = "2"
        api.applied.clear()
        rec.child_event("MODIFIED", stale)
        await settle(rec)
        assert api.layout() == handover.Layout(16, 8)
        assert state.config_layout == handover.Layout(16, 8)

        # A change of actors alone moves no actor: no handover.
        third = change(second, 3, actors=12)
        rec.agent_event("MODIFIED", third)
        await settle(rec)
        assert api.layout() == handover.Layout(12, 8)
        assert not [e for e in api.events if e["reason"] == "SliceHandoverTimeout"]


async def test_a_handover_a_pod_never_confirms_ends_after_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(handover, "TIMEOUT_SECONDS", 0.5)
    monkeypatch.setattr(handover, "CHECK_SECONDS", 0.2)
    api = Versioned()
    nats = Reporting()
    async with running(api, nats) as rec:
        first, _ = await with_running_pods(rec, 4)
        rec.agent_event("MODIFIED", change(first, 2, actorsPerPod=2))
        await settle(rec)
        assert api.layout() == handover.Layout(16, 2, handover=True)
        await settle(rec, 1.0)  # no pod reports (NATS unreachable from the pods, say)
        assert api.layout() == handover.Layout(16, 2)
        warnings = [e for e in api.events if e["reason"] == "SliceHandoverTimeout"]
        assert len(warnings) == 1
        assert warnings[0]["type"] == "Warning"
        assert "cartpole-actors-0, cartpole-actors-1" in warnings[0]["message"]


async def test_a_handover_with_no_pod_running_ends_without_an_event_to_wake_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(handover, "CHECK_SECONDS", 0.2)
    api = Versioned()
    nats = Reporting()
    async with running(api, nats) as rec:
        first = change(agent_body(), 1, paused=True)
        rec.agent_event("ADDED", first)
        await settle(rec)
        rec.agent_event("MODIFIED", change(first, 2, actorsPerPod=2))
        await settle(rec, 0.6)
        assert api.layout() == handover.Layout(16, 2)
        assert not [e for e in api.events if e["reason"] == "SliceHandoverTimeout"]


async def test_no_handover_for_pods_whose_runtime_predates_it() -> None:
    api = Versioned()
    nats = Reporting()
    async with running(api, nats) as rec:
        first, _ = await with_running_pods(rec, 1)
        nats.pod_reports["cartpole-actors-0"] = report(0, None)
        rec.agent_event("MODIFIED", change(first, 2, actorsPerPod=8))
        await settle(rec)
        assert api.layout() == handover.Layout(16, 8)  # it would refuse sliceHandover
        [warning] = [e for e in api.events if e["reason"] == "SliceHandoverUnsupported"]
        assert "cartpole-actors-0 run a runtime too old" in warning["message"]
        [applied] = [e for e in api.events if e["reason"] == "SpecApplied"]
        assert "hand actors over" not in applied["message"]


async def test_a_resumed_operator_finishes_a_handover_a_peer_started() -> None:
    """Paused with 8 per pod applied; meanwhile a peer went to 4 and back to 8, and is
    in step 1 of that. What this operator remembers (8 per pod, no handover) would end
    the peer's step 1 at once: it reads the ConfigMap again."""
    api = Versioned()
    nats = Reporting()
    async with running(api, nats) as rec:
        first, state = await with_running_pods(rec, 0)
        rec.agent_event("MODIFIED", change(first, 2, actorsPerPod=8))  # no pods: at once
        await settle(rec)
        assert api.layout() == handover.Layout(16, 8)
        for i in range(2):
            rec.child_event("ADDED", actor_pod(i, state.restart_hash))
            nats.pod_reports[f"cartpole-actors-{i}"] = report(i, api.revision())
        await settle(rec)

        peers = Peers()
        peers.blocking = ["relayrl-operator-peer"]
        rec._peers = peers  # type: ignore[assignment]
        await rec._check_peers()
        assert not rec.active
        body = change(first, 4, actorsPerPod=8)
        body["status"] = {"observedGeneration": 4}
        api.objects[("Agent", "cartpole")] = body
        api.config()["metadata"]["annotations"][constants.ANNOTATION_ACTOR_LAYOUT] = (
            handover.Layout(16, 8, handover=True).encode()
        )
        api.gets.clear()
        peers.blocking = []
        await rec._check_peers()
        await settle(rec)
        assert ("ConfigMap", "cartpole-runtime") in api.gets
        assert api.layout() == handover.Layout(16, 8, handover=True)


async def test_the_warning_for_an_old_runtime_comes_once_per_change() -> None:
    """Even while every pass meets it again (the config refused, so still the old layout)."""
    api = Versioned()
    nats = Reporting()
    async with running(api, nats) as rec:
        first, _ = await with_running_pods(rec, 1)
        nats.pod_reports["cartpole-actors-0"] = report(0, None)
        api.kind = "ConfigMap"  # refused for good from now on
        rec.agent_event("MODIFIED", change(first, 2, actorsPerPod=8))
        await settle(rec)
        for _ in range(2):
            rec._reported(KEY)
            await settle(rec)
        assert rec._states[KEY].config_layout == handover.Layout(16, 4)
        warnings = [e for e in api.events if e["reason"] == "SliceHandoverUnsupported"]
        assert len(warnings) == 1


async def test_a_restarted_operator_finishes_a_handover_it_did_not_start() -> None:
    api = Versioned()
    nats = Reporting()
    async with running(api, nats) as rec:
        first, _ = await with_running_pods(rec, 1)
        rec.agent_event("MODIFIED", change(first, 2, actorsPerPod=8))
        await settle(rec)
        step1 = api.revision()
        assert api.layout() == handover.Layout(16, 8, handover=True)
    # A new operator process sees the Agent (with status) before any ConfigMap event:
    # it reads the ConfigMap to learn a handover is under way, and keeps it.
    api.pod_patches.clear()
    async with running(api, nats) as rec:
        listed = False
        rec.set_children_listed(lambda: listed)
        body = change(first, 2, actorsPerPod=8)
        body["status"] = {"observedGeneration": 2}
        rec.agent_event("ADDED", body)
        await settle(rec)
        state = rec._states[KEY]
        assert api.gets == [("ConfigMap", "cartpole-runtime")]
        # Its pod watch has not listed the running pods yet: no pod known is no proof.
        assert api.layout() == handover.Layout(16, 8, handover=True)
        for i in range(2):
            rec.child_event("ADDED", actor_pod(i, state.restart_hash))
            nats.pod_reports[f"cartpole-actors-{i}"] = report(i, "older")
        listed = True
        await settle(rec, 1.5)
        assert api.layout() == handover.Layout(16, 8, handover=True)
        # It asks the pods' kubelets to mount step 1 (the operator before it may not have).
        assert sorted(n for n, p in api.pod_patches if p == annotated(step1)) == [
            "cartpole-actors-0",
            "cartpole-actors-1",
        ]
        nats.pod_reports = {f"cartpole-actors-{i}": report(i, step1) for i in range(2)}
        rec._reported(KEY)
        await settle(rec)
        assert api.layout() == handover.Layout(16, 8)


class Pausing(Versioned):
    """Holds every GET until `go` is set: a request a pass awaits, long enough for an
    event to arrive meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = asyncio.Event()
        self.go = asyncio.Event()

    async def get(self, kind: kube.Kind, namespace: str, name: str) -> dict[str, Any] | None:
        self.waiting.set()
        await self.go.wait()
        return await super().get(kind, namespace, name)


async def test_a_spec_change_arriving_while_a_pass_awaits_is_applied() -> None:
    api = Pausing()
    api.go.set()
    async with running(api, Reporting()) as rec:
        first, _ = await with_running_pods(rec, 0)
    # A restarted operator reads the ConfigMap in its first pass (what layout it holds);
    # a new model version arrives while it waits for the answer.
    api.go.clear()
    api.waiting.clear()
    async with running(api, Reporting()) as rec:
        body = change(first, 2)
        body["status"] = {"observedGeneration": 2}
        rec.agent_event("ADDED", body)
        await asyncio.wait_for(api.waiting.wait(), 5)
        rec.agent_event(
            "MODIFIED", change(first, 3, model={**first["spec"]["model"], "version": 7})
        )
        api.go.set()
        await settle(rec)
        assert api.rendered()["model"].get("version") == 7
        assert api.status[-1]["observedGeneration"] == 3


class Unremovable(FailingStreams):
    """NATS that cannot be reached to remove a stream; counts the attempts."""

    def __init__(self) -> None:
        super().__init__()
        self.removals = 0

    async def remove(self, agent: common.AgentRef) -> None:
        self.removals += 1
        # The text varies from one attempt to the next, as a real error's does.
        raise ConnectionRefusedError("connection refused" + " again" * (self.removals - 1))


async def test_a_delete_waiting_on_nats_says_so_once_and_can_be_told_not_to_wait() -> None:
    api = Rejecting("none")
    nats = Unremovable()
    async with running(api, nats) as rec:
        body = agent_body()
        body["metadata"]["deletionTimestamp"] = "2026-11-22T12:00:00Z"
        rec.agent_event("MODIFIED", body)
        await settle(rec, 2.5)
        assert nats.removals >= 2  # tried again, with growing delays
        assert not any("finalizers" in p.get("metadata", {}) for p in api.patches)
        warnings = [e for e in api.events if e["reason"] == "CleanupFailed"]
        assert len(warnings) == 1, warnings
        assert warnings[0]["message"].startswith(
            "cannot remove stream RELAYRL_ml_cartpole and model bucket relayrl-ml-cartpole-models"
            " at nats://nats:4222: connection refused; the delete waits"
        )
        assert "retainOnDelete: true" in warnings[0]["message"]
        # Said in status too, once (a namespace being deleted takes no Events).
        assert len(api.status) == 1, api.status
        assert api.status[0]["phase"] == "Degraded"
        conditions = {c["type"]: c for c in api.status[0]["conditions"]}
        assert conditions["Degraded"]["reason"] == "CleanupFailed"
        assert conditions["Degraded"]["message"] == warnings[0]["message"]
        assert (conditions["Ready"]["status"], conditions["Ready"]["reason"]) == (
            "False",
            "Deleting",
        )
        # The user says to keep the stream and bucket: the delete goes on.
        retained = change(body, 2, trajectories={**body["spec"]["trajectories"]})
        retained["spec"]["trajectories"]["nats"] = {
            **body["spec"]["trajectories"]["nats"],
            "retainOnDelete": True,
        }
        rec.agent_event("MODIFIED", retained)
        await settle(rec)
        assert {"metadata": {"finalizers": [], "resourceVersion": "2"}} in api.patches


async def test_a_child_refused_at_creation_is_not_applied_again_on_every_resync() -> None:
    api = Rejecting("PodDisruptionBudget")
    api_settings = settings.Settings(resync_seconds=0.2)
    rec = reconcile.Reconciler(api, api_settings, Streams(), workers=1)  # type: ignore[arg-type]
    await rec.start()
    try:
        rec.agent_event("ADDED", agent_body())
        await settle(rec)
        state = rec._states[KEY]
        for kind, name in set(api.applied):  # the watch sees each child made
            rec.child_event("ADDED", {"kind": kind, "metadata": {**pod_meta(state), "name": name}})
        await settle(rec)
        assert state.applied - state.seen == {("PodDisruptionBudget", "cartpole-actors")}
        applied = len(api.applied)
        await asyncio.sleep(1.0)  # five resyncs
        assert len(api.applied) == applied
    finally:
        await rec.stop()


def test_a_remote_simulator_pod_applying_a_config_counts_its_slice() -> None:
    """A remote-simulator pod's actors are its clients' (often none): a pod that has
    not taken a new config yet must not count what it reports as its actors."""
    pod = actor_pod(0, "h")
    pod["status"] = {"conditions": [{"type": "Ready", "status": "True"}]}
    remote = report(0, "old", actors=0)
    view = views.pod_view(pod, "h", remote, None, copies=0, config_revision="new")
    assert view.applying
    assert view.reported_actors is None
    env = views.pod_view(pod, "h", remote, None, copies=4, config_revision="new")
    assert env.reported_actors == 0


def test_a_pod_reporting_another_model_uri_runs_the_previous_model() -> None:
    pod = actor_pod(0, "old")
    pod["status"] = {"conditions": [{"type": "Ready", "status": "True"}]}
    spec_uri = "objectstore://relayrl-models/new"

    def view(uri: str | None) -> status.PodView:
        sent = dataclasses.replace(report(0, "r"), model_uri=uri)
        return views.pod_view(pod, "h", sent, None, model_uri=spec_uri)

    assert view("objectstore://relayrl-models/old").previous_model
    assert not view(spec_uri).previous_model
    assert not view(None).previous_model  # a runtime that does not report it


def test_a_pod_refusing_the_version_it_runs_cannot_run_it() -> None:
    """The runtime reports the version it runs as refused when that version failed at
    run time with none before it: the pod view says so; another version refused does
    not."""
    pod = actor_pod(0, "h")
    pod["status"] = {"conditions": [{"type": "Ready", "status": "True"}]}
    stalled = views.pod_view(pod, "h", refusing(2, incompatible=False, running=2), None)
    assert stalled.refused is not None
    assert stalled.runs_refused
    kept = views.pod_view(pod, "h", refusing(3, incompatible=False, running=2), None)
    assert kept.refused is not None
    assert not kept.runs_refused


async def test_events_of_children_after_the_finalizer_came_off_clean_up_nothing_again() -> None:
    """The garbage collector's deletes of the children come before the Agent's own
    DELETED event: the passes they ask for find the Agent finalized already."""
    api = Recorder()
    nats = RemovingStreams()
    async with running(api, nats) as rec:
        body = agent_body()
        rec.agent_event("ADDED", body)
        await settle(rec)
        deleting = copy.deepcopy(body)
        deleting["metadata"]["deletionTimestamp"] = "2026-11-22T12:00:00Z"
        rec.agent_event("MODIFIED", deleting)
        await settle(rec)
        rec.child_event("DELETED", ACTORS_STATEFULSET)
        await settle(rec)
    finalizer_patches = [p for p in api.patches if "finalizers" in p.get("metadata", {})]
    assert len(nats.removed) == 1
    assert [p["metadata"]["finalizers"] for p in finalizer_patches] == [[]]


class Terminating(Rejecting):
    """A namespace being deleted: the apiserver refuses to make anything in it."""

    async def apply(self, obj: dict[str, Any]) -> Applied:
        if self.fixed:
            raise kube.ApiError(
                403,
                "Forbidden",
                f'{obj["kind"].lower()}s "{obj["metadata"]["name"]}" is forbidden: unable to'
                " create new content in namespace ml because it is being terminated",
            )
        return await super().apply(obj)


async def test_children_a_namespace_deletion_took_are_not_fought_for() -> None:
    """The namespace's deletion takes the children before the Agent: their deletes look
    like drift, and the apiserver refuses to make them again. That is no failure."""
    api = Terminating("none")
    async with running(api, Streams()) as rec:
        body = agent_body()
        rec.agent_event("ADDED", body)
        await settle(rec)
        api.fixed = True  # the namespace is now terminating
        statuses = len(api.status)
        rec.child_event("DELETED", ACTORS_STATEFULSET)
        await settle(rec)
        assert all(s["phase"] != "Failed" for s in api.status[statuses:])
        assert [e["reason"] for e in api.events if e["type"] == "Warning"] == []


async def test_an_object_of_another_owner_under_a_childs_name_is_left_alone() -> None:
    """Applied, it would be taken over (and deleted with the Agent by the garbage
    collector): the child is reported instead, the others applied. Once the object is
    gone, the child is made."""
    api = Rejecting("none")  # records Events
    api.objects[("ConfigMap", "cartpole-runtime")] = {
        "metadata": {"name": "cartpole-runtime", "labels": {"team": "a"}}
    }
    async with running(api, Streams(), resync_seconds=0.3) as rec:
        rec.agent_event("ADDED", agent_body())
        await settle(rec)
        assert ("ConfigMap", "cartpole-runtime") not in api.applied
        assert ("StatefulSet", "cartpole-actors") in api.applied
        last = api.status[-1]
        assert last["phase"] == "Failed"
        degraded = next(c for c in last["conditions"] if c["type"] == "Degraded")
        assert (
            "ConfigMap ml/cartpole-runtime exists and is not this Agent's" in (degraded["message"])
        )
        assert [e["reason"] for e in api.events if e["type"] == "Warning"][:1] == [
            "ReconcileFailed"
        ]
        # Resyncs while it is still there: looked up again each time, never applied.
        looked_up = len(api.looked_up)
        for _ in range(100):
            if api.looked_up.count(("ConfigMap", "cartpole-runtime")) >= 3:
                break
            await asyncio.sleep(0.05)
        await settle(rec)
        assert api.looked_up.count(("ConfigMap", "cartpole-runtime")) >= 3
        assert ("ConfigMap", "cartpole-runtime") not in api.applied
        assert api.status[-1]["phase"] == "Failed"
        looked_up = len(api.looked_up)
        del api.objects[("ConfigMap", "cartpole-runtime")]
        for _ in range(100):  # the resync applies it again
            if ("ConfigMap", "cartpole-runtime") in api.applied:
                break
            await asyncio.sleep(0.05)
        await settle(rec)
        assert ("ConfigMap", "cartpole-runtime") in api.applied
        assert api.status[-1]["phase"] != "Failed"
        # Only children never applied are looked up.
        assert set(api.looked_up[looked_up:]) == {("ConfigMap", "cartpole-runtime")}


async def test_an_object_of_another_owner_is_not_pruned_when_the_child_is_dropped() -> None:
    """A user's Deployment under the arrow sink's name: the sink is taken out of the
    spec, and the Deployment, never the Agent's, stays."""
    api = Recorder()
    api.objects[("Deployment", "cartpole-arrow-sink")] = {
        "metadata": {"name": "cartpole-arrow-sink"}
    }
    async with running(api, Streams()) as rec:
        rec.agent_event("ADDED", agent_body())
        await settle(rec)
        assert api.status[-1]["phase"] == "Failed"
        rec.agent_event("MODIFIED", agent_body(generation=2, sinks=[]))
        await settle(rec)
        assert ("Deployment", "cartpole-arrow-sink") not in api.deleted
        assert api.status[-1]["phase"] != "Failed"


async def test_an_agent_stored_under_a_name_the_api_now_refuses_is_failed_not_crashed() -> None:
    api = Rejecting("none")
    async with running(api, Streams()) as rec:
        body = agent_body()
        body["metadata"]["name"] = "cart.pole"
        rec.agent_event("ADDED", body)
        await settle(rec)
        ready = next(c for c in api.status[-1]["conditions"] if c["type"] == "Ready")
        assert ready["reason"] == "InvalidSpec"
        assert "metadata.name: expected lower-case letters" in ready["message"]
        assert api.applied == []


async def test_an_object_labelled_for_an_agent_of_the_name_is_applied() -> None:
    """A claim kept by retainOnDelete, or a child the garbage collector has yet to
    delete: made by this operator for an Agent of this name, so the new one takes it."""
    api = Recorder()
    api.objects[("StatefulSet", "cartpole-actors")] = {
        "metadata": {
            "name": "cartpole-actors",
            "labels": {
                "relayrl.io/agent": "cartpole",
                constants.LABEL_MANAGED_BY: "relayrl-operator",
            },
            "ownerReferences": [{"uid": "an-agent-before"}],
        }
    }
    async with running(api, Streams()) as rec:
        rec.agent_event("ADDED", agent_body())
        await settle(rec)
        assert ("StatefulSet", "cartpole-actors") in api.applied
        assert api.status[-1]["phase"] != "Failed"


class QuotaRefused(Recorder):
    """An apiserver whose namespace quota refuses pods: the StatefulSet says so in
    FailedCreate Events only (one from an hour before, of another problem)."""

    def __init__(self) -> None:
        super().__init__()
        self.event_reads = 0

    async def list(
        self, kind: kube.Kind, namespace: str, field_selector: str
    ) -> list[dict[str, Any]]:
        assert (kind, namespace) == (kube.EVENT, "ml")
        assert "involvedObject.name=cartpole-actors" in field_selector
        self.event_reads += 1
        now = datetime.now(UTC)
        return [
            {
                "message": "an older problem",
                "lastTimestamp": (now - timedelta(hours=1)).isoformat(),
            },
            {
                "message": 'pods "cartpole-actors-0" is forbidden: exceeded quota: q',
                "lastTimestamp": now.isoformat(),
            },
        ]


async def test_actor_pods_the_statefulset_cannot_create_are_said_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reconcile, "_NOT_CREATED_AFTER", 0.0)
    monkeypatch.setattr(reconcile, "_NOT_CREATED_EVERY", 0.0)
    api = QuotaRefused()
    async with running(api, Streams(), resync_seconds=0.2) as rec:
        rec.agent_event("ADDED", agent_body())
        await settle(rec)
        last = api.status[-1]
        degraded = next(c for c in last["conditions"] if c["type"] == "Degraded")
        assert degraded["status"] == "True"
        assert degraded["message"] == (
            '4 actor pods not created: pods "cartpole-actors-0" is forbidden: exceeded quota: q'
        )
        assert last["phase"] == "Degraded"
        # Once the pods are made, it is not said any more, and no Event is read.
        state = rec._states[KEY]
        for index in range(4):
            pod = ready_pod(state)
            pod["metadata"]["name"] = f"cartpole-actors-{index}"
            rec.child_event("ADDED", pod)
            await settle(rec)
            if index == 2:
                assert "1 actor pod not created" in str(api.status[-1])
        reads = api.event_reads
        await asyncio.sleep(0.5)  # resyncs
        await settle(rec)
        assert "actor pod not created" not in str(api.status[-1])
        assert api.status[-1]["phase"] != "Degraded"
        assert api.event_reads == reads


def another_agent() -> dict[str, Any]:
    body = agent_body()
    body["metadata"].update(name="other", uid="u2")
    return body


async def test_a_new_agents_first_status_waits_while_others_wait_for_a_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Applied together, the first Agent's pass finds the second waiting: its first
    status (Progressing) is held back, for FIRST_STATUS_WAIT at most. The second's
    pass finds nothing waiting and writes at once."""
    monkeypatch.setattr(reconcile, "FIRST_STATUS_WAIT", 0.8)
    api = Recorder()
    async with running(api) as rec:
        rec.agent_event("ADDED", agent_body())
        rec.agent_event("ADDED", another_agent())
        await settle(rec)
        assert [s["phase"] for s in api.status] == ["Progressing"]
        assert rec._states[("ml", "other")].last_status is not None
        assert rec._states[KEY].last_status is None
        # No event comes for it: the held status is written when its time is up.
        await settle(rec, 0.8)
        assert [s["phase"] for s in api.status] == ["Progressing", "Progressing"]
        assert rec._states[KEY].last_status is not None
        assert not rec._first_status


async def test_a_held_first_status_is_written_on_a_pass_with_nothing_waiting() -> None:
    api = Recorder()
    async with running(api) as rec:
        rec.agent_event("ADDED", agent_body())
        rec.agent_event("ADDED", another_agent())
        await settle(rec)
        assert len(api.status) == 1
        # A pod of the held Agent: its pass finds no other Agent waiting.
        state = rec._states[KEY]
        rec.child_event("ADDED", actor_pod(0, state.restart_hash))
        await settle(rec)
        assert len(api.status) == 2
        assert state.last_status is not None
        assert not rec._first_status  # its timer went with the write


async def test_the_operators_own_status_write_coming_back_asks_for_no_pass() -> None:
    api = Recorder()
    async with running(api) as rec:
        body = agent_body()
        rec.agent_event("ADDED", body)
        await settle(rec)
        written = api.status[0]
        assert None in written.values()  # status.modelVersion: none known yet
        # As the watch brings it back: the merge patch took the null fields out.
        echo = copy.deepcopy(body)
        echo["metadata"]["resourceVersion"] = "2"
        echo["status"] = {k: v for k, v in written.items() if v is not None}
        rec.agent_event("MODIFIED", echo)
        assert len(rec._queue) == 0
        # The same status with a label changed by hand: a pass.
        labelled = copy.deepcopy(echo)
        labelled["metadata"]["resourceVersion"] = "3"
        labelled["metadata"].setdefault("labels", {})["team"] = "a"
        rec.agent_event("MODIFIED", labelled)
        assert len(rec._queue) == 1
        await settle(rec)
        # Someone else's status write: a pass (its status is computed from the last
        # write, so it finds nothing new to write).
        other = copy.deepcopy(labelled)
        other["metadata"]["resourceVersion"] = "4"
        other["status"] = {"phase": "Ready"}
        rec.agent_event("MODIFIED", other)
        assert len(rec._queue) == 1
        await settle(rec)
        assert len(api.status) == 1  # computed from its last write: nothing new


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.update(generation=2),
        lambda m: m.update(deletionTimestamp="2026-11-24T00:00:00Z"),
        lambda m: m.update(finalizers=[]),
    ],
    ids=["spec", "deletion", "finalizers"],
)
async def test_a_change_arriving_with_the_operators_own_status_asks_for_a_pass(
    edit: Any,
) -> None:
    api = Recorder()
    async with running(api) as rec:
        body = agent_body()
        rec.agent_event("ADDED", body)
        await settle(rec)
        changed = copy.deepcopy(body)
        changed["metadata"]["resourceVersion"] = "2"
        changed["status"] = {k: v for k, v in api.status[0].items() if v is not None}
        edit(changed["metadata"])
        rec.agent_event("MODIFIED", changed)
        assert len(rec._queue) == 1


async def test_a_held_agent_deleted_leaves_no_timer() -> None:
    api = Recorder()
    async with running(api) as rec:
        held = agent_body()
        rec.agent_event("ADDED", held)
        rec.agent_event("ADDED", another_agent())
        await settle(rec)
        assert set(rec._first_status) == {KEY}
        rec.agent_event("DELETED", held)
        assert not rec._first_status
