"""The level-based reconciler: desired children vs actual ones, for every Agent.

The watches only feed this module (Kopf's Agent handler in handlers/, and the child
watches of relayrl_operator.watch): they store the latest Agent and child objects in
memory (relayrl_operator.cache) and enqueue the Agent's key. A pool of workers takes keys
from the queue; one key is never worked on by two workers at once, and a key that is
enqueued again while it is worked on is coalesced into one more pass. So one slow
Agent holds one worker, never the others. The periodic resync's routine checks wait
behind every other pass (relayrl_operator.workqueue).

A pass (`_reconcile`):
1. a deleted Agent runs the finalizer (stream and bucket removed unless retained);
2. desired children are built (pure builders) and server-side applied, when the spec
   changed, a child was deleted or edited (the watch tells), or the periodic resync
   finds a child missing from the cache, or comes round to an Agent whose children
   were last applied FULL_APPLY_EVERY periods ago or more (for what a watch can miss:
   a deletion while it was reconnecting, an edited PodMonitor);
   children no longer desired (a removed sink, the remote Service) are deleted
   (relayrl_operator.children);
3. the JetStream stream and model bucket are ensured through NATS: on the Agent's
   first pass, after a failure, and when a resync's listing of the streams (one per
   server for all Agents) finds them missing or changed;
4. status is computed from the cached children (relayrl_operator.views, then
   relayrl_operator.status) and patched when it changed; Events say what happened
   (relayrl_operator.events).
Transient failures are retried with a jittered, growing, bounded delay; permanent
ones are shown in status (phase Failed). A spec the apiserver let through but we
cannot build waits for the next spec change. A child the apiserver rejects is tried
again on the next spec change or drift, while the other children, the stream and
status are kept up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Protocol

import nats.js.errors

from relayrl_operator import (
    cache,
    changes,
    children,
    constants,
    events,
    handover,
    kube,
    metrics,
    peering,
    settings,
    status,
    views,
    watch,
    workqueue,
)
from relayrl_operator.builders import common, configmap, monitoring, statefulset
from relayrl_runtime import config, reporting, spec, streams

log = logging.getLogger(__name__)

Key = cache.Key

# A resync re-applies an Agent's children when it has not applied them for this many
# rounds (each Agent's turn comes once in as many rounds): so every child is compared
# with its desired state at least every 2 x FULL_APPLY_EVERY resync periods.
FULL_APPLY_EVERY = 10

# While other Agents wait for a pass, a new Agent's first status is held back this long
# (seconds) at most, in case its pods are ready by then: one status write (Ready)
# instead of two (Progressing, then Ready). A thousand Agents applied at once take the
# apiserver a thousand writes fewer, each an Agent event for every watcher of Agents.
# With nothing else waiting, the first status is written at once.
FIRST_STATUS_WAIT: Final = 30.0

# Actor pods missing this long (seconds) are explained by the StatefulSet's FailedCreate
# events, read at most once per _NOT_CREATED_EVERY while they are missing.
_NOT_CREATED_AFTER: Final = 30.0
_NOT_CREATED_EVERY: Final = 30.0

# Child kinds the operator watches (relayrl_operator.watch feeds `child_event`), so its
# cache of them is current; PodMonitors are not watched (their API may not exist).
WATCHED_CHILDREN: tuple[kube.Kind, ...] = (
    kube.POD,
    kube.STATEFULSET,
    kube.DEPLOYMENT,
    kube.CONFIGMAP,
    kube.SERVICE,
    kube.PDB,
)
_WATCHED_KINDS = frozenset(k.kind for k in WATCHED_CHILDREN)
# Of those, the kinds `child_event` reads only the metadata of (drift is told by
# generation or resourceVersion): watched as metadata only. Pods and sink Deployments
# are read whole, for status.
METADATA_ONLY: frozenset[kube.Kind] = frozenset(
    {kube.STATEFULSET, kube.CONFIGMAP, kube.SERVICE, kube.PDB}
)


class Streams(Protocol):
    """Creates and removes an Agent's JetStream stream and model bucket."""

    async def ensure(self, agent: common.AgentRef) -> str:
        """Create or update them; return a short description. Raise on failure."""

    async def remove(self, agent: common.AgentRef) -> None:
        """Delete them."""

    async def verify(self, agents: Iterable[common.AgentRef]) -> set[Key]:
        """The Agents whose stream or bucket is missing or differs, or cannot be checked."""

    async def retain(self, agents: Iterable[common.AgentRef]) -> None:
        """Let go of connections and reports no Agent of these (all there are) uses."""

    def set_listener(self, listener: Callable[[Key], None]) -> None:
        """Be told which Agent's pods reported (to refresh its status)."""

    def reports(self, namespace: str, agent: str) -> Mapping[str, reporting.PodReport]:
        """The latest report of each pod of an Agent, by pod name."""


class Reconciler:
    """Owns the queue, the workers and the in-memory view of Agents and children."""

    def __init__(
        self,
        client: kube.Client,
        cfg: settings.Settings,
        streams: Streams | None,
        workers: int = 16,
        peers: peering.Peering | None = None,
    ) -> None:
        self._client = client
        self._peers = peers
        # Set while this operator may act; cleared while a peer pauses it (see peering).
        self._active = asyncio.Event()
        self._active.set()
        self._settings = cfg
        self._streams = streams
        self._workers = workers
        self._states: dict[Key, cache.AgentState] = {}
        self._queue: workqueue.WorkQueue[Key] = workqueue.WorkQueue()
        self._busy: set[Key] = set()
        # Keys enqueued while their pass ran: one more pass each, urgent unless only the
        # resync asked (value: background).
        self._again: dict[Key, bool] = {}
        self._tasks: list[asyncio.Task[None]] = []
        # At most one retry timer per Agent: the earliest asked for. Every failed pass
        # asks for one (a resync's, an event's too), and timers that each fire a pass
        # that fails and asks again would multiply for as long as the fault lasts.
        self._timers: dict[Key, asyncio.TimerHandle] = {}
        # The pass that writes a held-back first status (FIRST_STATUS_WAIT), per Agent.
        self._first_status: dict[Key, asyncio.TimerHandle] = {}
        self._events = events.Events(client)
        self._children = children.Children(client, cfg)
        # Whether the child watches have listed the pods (and ConfigMaps) once: until
        # then the cache may lack running pods (set by the watches' owner).
        self._children_listed: Callable[[], bool] = lambda: True
        self._podmonitor_api = False  # what the last check of the API found
        self._resyncs = 0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the workers and the periodic resync."""
        self._children.podmonitors = await self._client.has_api(monitoring.API_VERSION)
        self._podmonitor_api = self._children.podmonitors
        if self._streams is not None:
            self._streams.set_listener(self._reported)
        loop = asyncio.get_running_loop()
        if self._peers is not None:
            await self._check_peers()
            self._tasks.append(loop.create_task(self._follow_peers(), name="reconcile-peering"))
        metrics.ACTIVE.set(1 if self._active.is_set() else 0)
        self._tasks += [
            loop.create_task(self._worker(), name=f"reconcile-worker-{i}")
            for i in range(self._workers)
        ]
        self._tasks.append(loop.create_task(self._resync(), name="reconcile-resync"))

    async def stop(self) -> None:
        """Cancel and await every task this reconciler owns."""
        for handle in (*self._timers.values(), *self._first_status.values()):
            handle.cancel()
        self._timers.clear()
        self._first_status.clear()
        await watch.cancel(self._tasks)
        self._tasks = []
        await self._events.drain(within=5)  # Events on their way get a moment to land

    def set_children_listed(self, listed: Callable[[], bool]) -> None:
        """Tell the reconciler how to know the child watches have listed everything."""
        self._children_listed = listed

    @property
    def active(self) -> bool:
        """Whether this operator acts now (False while a peer pauses it)."""
        return self._active.is_set()

    async def _follow_peers(self) -> None:
        while True:
            await asyncio.sleep(peering.POLL_SECONDS)
            await self._check_peers()

    async def _check_peers(self) -> None:
        """Pause or resume by the peering objects; an unreadable one changes nothing."""
        assert self._peers is not None
        try:
            blocking = await self._peers.blockers()
        except (kube.ApiError, OSError, TimeoutError) as err:
            log.info("cannot read the peering objects: %s", err)
            return
        if blocking and self._active.is_set():
            log.warning(
                "pausing: peers %s outrank or equal priority %d", blocking, self._peers.priority
            )
            self._active.clear()
            # Counted by the operator that acts: a standby's counts would go stale, and
            # a sum over both would count every Agent twice.
            metrics.AGENTS.clear()
        elif not blocking and not self._active.is_set():
            log.warning("resuming: no peer outranks priority %d now", self._peers.priority)
            # While paused Kopf's Agent watch was stopped, and a peer may have changed
            # or deleted any Agent and child. Each cached Agent is read again before its
            # pass (one deleted meanwhile is forgotten), and its children compared again.
            for key, state in self._states.items():
                state.stale = state.body is not None
                state.needs_apply = True
                state.stream_ready = None
                state.handover_since = None
                state.config_layout = None  # a peer may have moved it: read it again
                self.enqueue(key)
            self._active.set()
            self._count_phases()
        metrics.ACTIVE.set(1 if self._active.is_set() else 0)

    @property
    def healthy(self) -> bool:
        """Whether every worker is still running."""
        return watch.running(self._tasks)

    # -------------------------------------------------------------- watch events

    def agent_event(self, event_type: str, body: Mapping[str, Any]) -> None:
        """An Agent was added, changed or deleted (from the watch stream)."""
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        if event_type == "DELETED":
            self._forget(key)
            return
        if cache.store(self._states.setdefault(key, cache.AgentState()), body):
            self.enqueue(key)

    def _forget(self, key: Key) -> None:
        """Forget a deleted Agent, but not what the watches told of its children."""
        old = self._states.pop(key, None)
        held = self._first_status.pop(key, None)
        if held is not None:
            held.cancel()
        kept = cache.after_delete(old) if old is not None else None
        if kept is not None:
            self._states[key] = kept

    def child_event(self, event_type: str, body: Mapping[str, Any]) -> None:
        """A child object changed; refresh caches, repair drift, recompute status."""
        meta = body["metadata"]
        agent = (meta.get("labels") or {}).get(constants.LABEL_AGENT)
        if agent is None:
            return
        key = (meta["namespace"], agent)
        # After a restart, children can be listed before their Agent: keep them.
        state = self._states.setdefault(key, cache.AgentState())
        relevant = cache.note_child(state, event_type, body)
        if state.body is None:
            if event_type == "DELETED" and not state.pods and not state.deployments:
                self._states.pop(key, None)  # the last child of a deleted Agent
            return
        if relevant:
            self.enqueue(key)

    def _reported(self, key: Key) -> None:
        state = self._states.get(key)
        if state is not None and state.body is not None:
            self.enqueue(key)

    def enqueue(self, key: Key, *, background: bool = False) -> None:
        """Schedule a pass for an Agent; coalesces with a pending or running one.

        Background passes (the periodic resync's) wait behind every other (workqueue).
        """
        if key in self._busy:
            self._again[key] = self._again.get(key, True) and background
        else:
            self._queue.put(key, background=background)
        metrics.QUEUE_DEPTH.set(len(self._queue))

    def _enqueue_later(self, key: Key, delay: float) -> None:
        """A pass for `key` after `delay`, unless one is due sooner already."""
        loop = asyncio.get_running_loop()
        pending = self._timers.get(key)
        if pending is not None:
            if pending.when() <= loop.time() + delay:
                return
            pending.cancel()

        def fire() -> None:
            if self._timers.get(key) is handle:
                del self._timers[key]
            self.enqueue(key)

        handle = loop.call_later(delay, fire)
        self._timers[key] = handle

    # -------------------------------------------------------------------- workers

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self._settings.resync_seconds)
            if not self._active.is_set():
                continue  # standby; resuming compares every Agent anyway
            # The Prometheus Operator may have been installed (or removed) since: then
            # every Agent's children change (a PodMonitor more or less). A PodMonitor
            # apply that found no API (see children.Children.apply) does not count as a change.
            api = self._podmonitor_api
            try:
                api = await self._client.has_api(monitoring.API_VERSION)
            except kube.ApiError as err:
                log.info("cannot check for %s: %s", monitoring.API_VERSION, err)
            monitoring_changed = api != self._podmonitor_api
            self._podmonitor_api = self._children.podmonitors = api
            self._resyncs += 1
            lost = await self._lost_streams()
            await self._retain_streams()
            now = time.monotonic()
            # Children applied within the last period are left alone: their watch events
            # may still be on the way (a busy apiserver lags), and re-applying them
            # would only add no-op writes where the control plane is busiest.
            recent = now - self._settings.resync_seconds
            stale = now - FULL_APPLY_EVERY * self._settings.resync_seconds
            for key, state in list(self._states.items()):
                # The watch keeps the cache of children current and repairs drift as it
                # happens. A resync re-applies an Agent's children when the cache is
                # missing a watched one, and on the Agent's turn (once in
                # FULL_APPLY_EVERY rounds) when they were applied long enough ago.
                unseen = state.applied - state.seen - state.rejected_children
                missing = any(kind in _WATCHED_KINDS for kind, _ in unseen)
                turn = zlib.crc32("/".join(key).encode()) % FULL_APPLY_EVERY
                if (
                    monitoring_changed
                    or ((missing or state.foreign_children) and state.applied_at < recent)
                    or (turn == self._resyncs % FULL_APPLY_EVERY and state.applied_at < stale)
                ):
                    state.needs_apply = True
                if key in lost:
                    state.stream_ready = None  # this pass ensures the stream and bucket again
                # Urgent when there is something to repair; otherwise a check that finds
                # nothing to do nearly always, behind every pass that something asked for.
                self.enqueue(key, background=not (state.needs_apply or key in lost))
            if self._active.is_set():  # not paused while this resync awaited
                self._count_phases()

    async def _lost_streams(self) -> set[Key]:
        """The Agents whose stream or bucket went missing or was changed behind our back.

        One listing per NATS server for all Agents (`Streams.verify`); only Agents whose
        stream was ready are asked about, the others' passes ensure theirs anyway.
        """
        agents = {
            key: state.agent
            for key, state in self._states.items()
            if state.stream_ready and state.agent is not None
        }
        if self._streams is None or not agents:
            return set()
        try:
            return await self._streams.verify(agents.values())
        except Exception:  # never lose the resync loop: check each Agent on its pass
            log.exception("checking the streams failed; each Agent's pass checks its own")
            return set(agents)

    async def _retain_streams(self) -> None:
        """What the NATS side keeps for Agents that are gone goes (see Streams.retain)."""
        if self._streams is None:
            return
        agents = [s.agent for s in self._states.values() if s.agent is not None]
        try:
            await self._streams.retain(agents)
        except Exception:  # never lose the resync loop
            log.exception("letting go of unused NATS connections failed")

    def _count_phases(self) -> None:
        """Agents by the phase their status shows (our last write, else the stored one:
        an unchanged status is not written again after a restart)."""
        counts = dict.fromkeys((p.value for p in spec.Phase), 0)
        for state in self._states.values():
            if state.body is None:
                continue
            phase = _status_now(state, state.body["metadata"].get("uid", ""))[1].get("phase")
            if phase in counts:
                counts[phase] += 1
        for phase, n in counts.items():
            metrics.AGENTS.labels(phase).set(n)

    async def _worker(self) -> None:
        while True:
            # A standby operator keeps its queue and writes nothing until it resumes.
            await self._active.wait()
            key = await self._queue.get()
            if not self._active.is_set():  # paused while this worker waited for a key
                self._queue.put(key)
                continue
            metrics.QUEUE_DEPTH.set(len(self._queue))
            self._busy.add(key)
            try:
                await self._run_one(key)
            finally:
                self._busy.discard(key)
                again = self._again.pop(key, None)
                if again is not None:
                    self.enqueue(key, background=again)

    async def _run_one(self, key: Key) -> None:
        state = self._states.get(key)
        if state is None or state.body is None:
            return
        started = time.perf_counter()
        try:
            if state.stale and not await self._refresh(key, state):
                return
            await self._reconcile(key, state)
        except (kube.ApiError, OSError, TimeoutError) as err:
            transient = not isinstance(err, kube.ApiError) or err.transient
            if not transient:
                metrics.RECONCILES.labels("permanent_error").inc()
                log.warning("reconcile %s/%s failed permanently: %s", *key, err)
                return
            state.failures += 1
            delay = kube.retry_delay(state.failures)
            metrics.RECONCILES.labels("transient_error").inc()
            metrics.ERRORS.labels("api").inc()
            log.info("reconcile %s/%s: %s; retrying in %.1fs", *key, err, delay)
            self._enqueue_later(key, delay)
        except Exception:
            metrics.RECONCILES.labels("transient_error").inc()
            state.failures += 1
            delay = kube.retry_delay(state.failures)
            log.exception("reconcile %s/%s crashed; retrying in %.1fs", *key, delay)
            self._enqueue_later(key, delay)
        else:
            state.failures = 0
            metrics.RECONCILES.labels("ok").inc()
        finally:
            metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)

    async def _refresh(self, key: Key, state: cache.AgentState) -> bool:
        """Read a stale Agent again; False (and forgotten) when it no longer exists."""
        body = await self._client.get(kube.AGENT, *key)
        if body is None:
            log.info("agent %s/%s was deleted while this operator was paused", *key)
            self._forget(key)
            return False
        cache.store(state, body)
        # Another operator may have written status while this one was paused (and
        # rolled the pods for a model: status.modelRollout).
        state.last_status = state.status_uid = None
        state.rollout_read = False
        # And applied changes, with their SpecApplied Events: not told again from the
        # spec this one applied last.
        state.applied_spec = None
        return True

    # ------------------------------------------------------------------ one pass

    async def _reconcile(self, key: Key, state: cache.AgentState) -> None:
        body = state.body
        assert body is not None
        meta = body["metadata"]
        generation = int(meta.get("generation", 0))
        if meta.get("deletionTimestamp"):
            await self._finalize(key, state)
            return
        agent = state.agent
        if agent is None or agent.uid != meta["uid"] or agent.generation != generation:
            try:
                spec.check_name(meta["name"])
                agent_spec = spec.parse_spec(body.get("spec") or {})
            except spec.InvalidSpecError as err:
                state.agent = None
                await self._fail(key, state, generation, f"invalid spec: {err}")
                return
            agent = common.AgentRef(
                name=meta["name"],
                namespace=meta["namespace"],
                uid=meta["uid"],
                generation=generation,
                spec=agent_spec,
            )
            state.agent = agent
            state.restart_hash = statefulset.restart_hash(agent, self._settings)
        if not state.rollout_read:
            stored = (body.get("status") or {}).get("modelRollout")
            state.model_rollout = stored if isinstance(stored, int) else None
            state.rollout_read = True
        before = state.applied_spec
        if before is not None and _model_source(before) != _model_source(agent.spec):
            # Another model (uri, format): the pods roll for it anyway, and its version
            # numbers are its own: a rollout for the old one's says nothing of them.
            state.model_rollout = None
        self._follow_refusals(key, state, agent)
        if agent.model_rollout != state.model_rollout:
            agent = dataclasses.replace(agent, model_rollout=state.model_rollout)
            state.agent = agent
            state.restart_hash = statefulset.restart_hash(agent, self._settings)
        agent_spec = agent.spec
        add_finalizer = constants.FINALIZER not in (meta.get("finalizers") or [])
        if state.error_generation != generation:
            state.error = None  # a new spec: try it
        # Taken before the first await: a spec change that arrives meanwhile asks again
        # (this pass applies the generation it read), and our own writes of this
        # generation coming back do not.
        apply, state.needs_apply = state.needs_apply, False
        if apply:
            state.applying_generation = generation
        try:
            handing_over = await self._handing_over(key, state, agent)
        except BaseException:
            state.applying_generation = None
            state.needs_apply = state.needs_apply or apply
            raise
        layout = configmap.layout(agent, handing_over=handing_over)
        last = state.layout_attempted or state.config_layout
        if last is not None and last != layout:
            apply = True  # a handover's step 1 or 2

        if apply:
            # The finalizer guards the NATS stream and bucket (ensured below), not the
            # children (owner references collect those): both requests go out at once.
            state.applying_generation = generation
            try:
                added, applied = await asyncio.gather(
                    self._add_finalizer(agent, meta) if add_finalizer else asyncio.sleep(0),
                    self._children.apply(agent, state, handing_over=handing_over),
                    return_exceptions=True,
                )
            finally:
                state.applying_generation = None
            rejected = isinstance(applied, kube.ApiError) and not applied.transient
            for result in (added, None if rejected else applied):
                if isinstance(result, BaseException):
                    state.needs_apply = True
                    if state.failures and isinstance(result, Exception):
                        await self._apply_failing(agent, state, result)
                    raise result
            state.apply_failing = state.apply_failing_warned = None
            before = state.applied_spec
            if (
                state.applied_generation != generation
                and before is not None
                and changes.connection(before.trajectories.nats)
                != changes.connection(agent_spec.trajectories.nats)
            ):
                # Another server, stream or credential: this pass makes the stream and
                # bucket there (sinks and runtimes need them), not the next resync.
                state.stream_ready = None
            if rejected:
                # Shown in status, the stream and status kept up; applied again on the
                # next spec change, or when a child is deleted or edited (drift).
                if isinstance(applied, kube.ForeignObjectError):
                    message = f"a child is not applied: {applied.message}"
                else:
                    message = f"apiserver rejected a child: {applied}"
                self._rejected(key, state, agent, message)
            else:
                state.error = state.error_generation = None
            if not rejected and state.applied_generation != generation:
                lines = changes.describe(before, agent_spec, handover=handing_over)
                if lines:
                    state.applied_message = "; ".join(lines)
                    self._events.post(agent, "Normal", "SpecApplied", state.applied_message)
                state.applied_generation = generation
                state.applied_spec = agent_spec
        elif add_finalizer:
            await self._add_finalizer(agent, meta)

        if self._streams is not None and state.stream_ready is not True:
            try:
                state.stream_message = await self._streams.ensure(agent)
                state.stream_ready = True
                state.nats_failures = 0
            except Exception as err:  # any NATS failure is shown and retried
                metrics.ERRORS.labels("nats").inc()
                state.stream_ready = False
                if isinstance(err, streams.StreamConflictError):
                    state.stream_message = str(err)
                elif isinstance(err, nats.js.errors.APIError):
                    state.stream_message = f"NATS refused the stream or bucket: {err}"
                else:
                    state.stream_message = f"cannot reach NATS: {err}"
                # Its own count: the pass itself succeeds (status is written), which
                # resets `failures`, and the retries must still back off.
                state.nats_failures += 1
                self._enqueue_later(key, kube.retry_delay(state.nats_failures))

        await self._check_not_created(agent, state)
        await self._write_status(agent, state)

    async def _check_not_created(self, agent: common.AgentRef, state: cache.AgentState) -> None:
        """Say why actor pods are missing, once they have been for a while: the
        StatefulSet's FailedCreate events (the StatefulSet itself shows nothing), read
        at most once per `_NOT_CREATED_EVERY` while pods are missing."""
        desired = 0 if agent.spec.paused else agent.spec.pods()
        # A terminating pod counts: its replacement is made once it is gone.
        made = len(
            {i for _, pod in cache.actor_pods(state) if (i := views.pod_index(pod)) < desired}
        )
        now = time.monotonic()
        if made >= desired:
            state.pods_missing_since = state.not_created = None
            return
        if state.pods_missing_since is None:
            state.pods_missing_since = now
        if (
            now - state.pods_missing_since < _NOT_CREATED_AFTER
            or now - state.not_created_checked < _NOT_CREATED_EVERY
        ):
            return  # looked at again on a later pass (a resync's, if none comes before)
        state.not_created_checked = now
        name = common.actors_name(agent)
        try:
            found = await self._client.list(
                kube.EVENT,
                agent.namespace,
                f"involvedObject.kind=StatefulSet,involvedObject.name={name},reason=FailedCreate",
            )
        except (kube.ApiError, OSError) as err:  # best effort: said next time
            log.info("agent %s/%s: events not read: %s", agent.namespace, agent.name, err)
            return
        # Of this time pods have been missing (an event's last time is its latest try;
        # the first try may come a little before the pass that saw pods missing).
        since = time.time() - (now - state.pods_missing_since) - _NOT_CREATED_AFTER
        items = [e for e in found if _event_time(e) >= since]
        if not items:
            state.not_created = None
            return
        latest = max(items, key=_event_time)
        missing = desired - made
        state.not_created = (
            f"{missing} actor pod{'' if missing == 1 else 's'} not created: "
            f"{latest.get('message') or 'FailedCreate'}"
        )

    async def _apply_failing(
        self, agent: common.AgentRef, state: cache.AgentState, err: Exception
    ) -> None:
        """Applying the children failed again (a webhook that is down, throttling): say
        so in status and once in a Warning, before the retry backs off. Status would
        otherwise stand still, Ready, for as long as it lasts."""
        state.apply_failing = f"applying children keeps failing: {err}; retrying"
        if state.apply_failing_warned != state.apply_failing:
            state.apply_failing_warned = state.apply_failing
            self._events.post(agent, "Warning", "ApplyFailing", state.apply_failing)
        try:
            await self._write_status(agent, state)
        except Exception as status_err:  # the apiserver may be what fails
            log.debug(
                "agent %s/%s: status not written: %s", agent.namespace, agent.name, status_err
            )

    def _fresh_reports(self, agent: common.AgentRef) -> dict[str, reporting.PodReport]:
        """The pods' reports of the last `reporting.MAX_AGE_SECONDS`, by pod name."""
        if self._streams is None:
            return {}
        fresh_after = time.time() - reporting.MAX_AGE_SECONDS
        reports = self._streams.reports(agent.namespace, agent.name)
        return {pod: r for pod, r in reports.items() if r.time > fresh_after}

    def _follow_refusals(self, key: Key, state: cache.AgentState, agent: common.AgentRef) -> None:
        """Roll the actor pods for a model version the running ones cannot hot-reload.

        A version whose layout differs from the running model's loads fine in a new
        process: the pods are replaced (their template carries the version), the way a
        template change replaces them.
        """
        # Only pods of the current template count: an older pod's refusal is of a
        # version a rollout already answers (its report outlives it by a while).
        current = {
            name
            for name, pod in state.pods.items()
            if not pod["metadata"].get("deletionTimestamp") and views.runs(pod, state.restart_hash)
        }
        wanted = [
            r.refused
            for name, r in self._fresh_reports(agent).items()
            if name in current
            and r.refused is not None
            and r.refused.incompatible
            and r.refused.version is not None
            and r.refused.version != state.model_rollout
        ]
        if not wanted:
            return
        refusal = max(wanted, key=lambda r: r.version or 0)
        state.model_rollout = refusal.version
        state.needs_apply = True
        message = (
            f"model version {refusal.version} cannot replace the running one in place "
            f"({refusal.reason.removeprefix('reload refused: ')}): rolling update of the "
            "actor pods"
        )
        state.applied_message = message
        log.info("agent %s/%s: %s", *key, message)
        self._events.post(agent, "Normal", "ModelRollout", message)

    async def _handing_over(
        self, key: Key, state: cache.AgentState, agent: common.AgentRef
    ) -> bool:
        """Whether the runtime config must say sliceHandover now (relayrl_operator.handover).

        True from a layout change that moves actors between pods until every running
        actor pod has applied the handover config (or TIMEOUT_SECONDS passed).
        """
        current = state.config_layout
        if current is None and cache.has_status(state) and self._streams is not None:
            # An Agent whose ConfigMap this process has not seen (it restarted, or a
            # peer acted while it was paused): read what the pods were given.
            current = state.config_layout = await self._read_layout(agent)
        if (
            self._streams is None  # no pod reports to wait for
            or agent.spec.environment.remote is not None  # remote clients bring actors
            or current is None  # a new ConfigMap: every pod starts with its slice
            or (not current.handover and not handover.moves(current, configmap.layout(agent)))
        ):
            state.handover_since = None
            return False
        revision = self._handover_revision(agent)
        now = time.monotonic()
        if state.handover_since is None or state.handover_revision != revision:
            # A new target (another layout, a new model version...) starts the clock anew.
            state.handover_since, state.handover_revision = now, revision
        if state.handover_check <= now and not state.config_rejected:
            # Looked at again while it lasts: the last pod may go, or the time run out,
            # with no event to say so. (Not while the apiserver refuses the config: that
            # waits for a spec change or a repair, not for time.)
            state.handover_check = now + handover.CHECK_SECONDS
            self._enqueue_later(key, handover.CHECK_SECONDS)
        listed = self._children_listed()
        reports = self._fresh_reports(agent)
        running = cache.running_actor_pods(state)
        if not current.handover:
            if listed and not running:
                state.handover_since = None
                return False  # nothing runs an actor now: every pod starts with its slice
            old = sorted(n for n in running if n in reports and not reports[n].config_revision)
            if old:
                # A runtime older than handovers (a pinned image) would refuse the config.
                message = (
                    f"no actor slice handover: {', '.join(old)} run a runtime too old to "
                    "take one; every pod gets its new slice at once (an actor may run in "
                    "two pods until they all apply it)"
                )
                target = configmap.layout(agent)
                if state.unsupported_warned != target:  # once, not on every pass
                    state.unsupported_warned = target
                    log.warning("agent %s/%s: %s", *key, message)
                    self._events.post(agent, "Warning", "SliceHandoverUnsupported", message)
                state.handover_since = None
                return False
            return True  # step 1
        if state.config_revision is not None:
            await self._children.push_config(agent, state, state.config_revision)
        if listed:
            waiting = views.handover_waiting(running, reports, revision)
        else:
            waiting = ["pods not listed yet"]  # just started: the cache may lack some
        if waiting and now - state.handover_since < handover.TIMEOUT_SECONDS:
            return True
        if waiting:
            message = (
                f"actor slice handover: {', '.join(waiting)} did not report the handover "
                f"config within {handover.TIMEOUT_SECONDS:.0f}s; giving every pod its new "
                "slice anyway (an actor may run in two pods until they apply it)"
            )
            log.warning("agent %s/%s: %s", *key, message)
            self._events.post(agent, "Warning", "SliceHandoverTimeout", message)
        state.handover_since = None
        return False  # step 2

    def _handover_revision(self, agent: common.AgentRef) -> str:
        """The revision of the Agent's handover config (what its pods report applying)."""
        rendered = configmap.build(agent, handing_over=True)["data"][constants.CONFIG_KEY]
        return config.revision(rendered.encode())

    async def _read_layout(self, agent: common.AgentRef) -> handover.Layout | None:
        cm = await self._client.get(kube.CONFIGMAP, agent.namespace, common.configmap_name(agent))
        if cm is None:
            return None
        annotations = cm["metadata"].get("annotations") or {}
        return handover.Layout.decode(annotations.get(constants.ANNOTATION_ACTOR_LAYOUT))

    async def _add_finalizer(self, agent: common.AgentRef, meta: Mapping[str, Any]) -> None:
        finalizers = [*meta.get("finalizers", []), constants.FINALIZER]
        await self._client.merge_patch(
            kube.AGENT,
            agent.namespace,
            agent.name,
            {"metadata": {"finalizers": finalizers, "resourceVersion": meta["resourceVersion"]}},
        )

    async def _finalize(self, key: Key, state: cache.AgentState) -> None:
        assert state.body is not None
        meta = state.body["metadata"]
        finalizers = meta.get("finalizers") or []
        if constants.FINALIZER not in finalizers or state.finalized_uid == meta.get("uid"):
            return
        agent_spec = _spec_to_clean_up(key, state.body.get("spec") or {})
        if agent_spec is not None:
            agent = common.AgentRef(meta["name"], meta["namespace"], meta["uid"], 0, agent_spec)
            nats_spec = agent.spec.trajectories.nats
            if nats_spec.retain_on_delete:
                await self._keep_claims(agent)
            if self._streams is not None and not nats_spec.retain_on_delete:
                try:
                    await self._streams.remove(agent)
                except Exception as err:  # NATS away, a Secret gone: said, and tried again
                    first = self._cleanup_failed(key, state, agent, err)
                    if first is not None:
                        await self._cleanup_status(key, state, first)
                    return
        remaining = [f for f in finalizers if f != constants.FINALIZER]
        try:
            await self._client.merge_patch(
                kube.AGENT,
                *key,
                {"metadata": {"finalizers": remaining, "resourceVersion": meta["resourceVersion"]}},
            )
        except kube.ApiError as err:
            if err.status != 404:
                raise
            log.info("agent %s/%s: gone before its finalizer was taken off", *key)
        state.finalized_uid = meta.get("uid")
        log.info("finalized %s/%s", *key)

    async def _keep_claims(self, agent: common.AgentRef) -> None:
        """retainOnDelete keeps the claims the Agent's sinks made: their owner reference
        goes before the Agent does (set while deleting, no apply has taken it off).
        Only the Arrow sink makes a claim, under its Deployment's name; one the spec
        names (`existingClaim`) is the user's and has no owner reference of ours."""
        name = common.sink_name(agent, constants.COMPONENT_ARROW_SINK)
        try:
            claim = await self._client.get(kube.PVC, agent.namespace, name)
            if claim is None or not common.owned_by(claim["metadata"], agent):
                return
            await self._client.merge_patch(
                kube.PVC, agent.namespace, name, {"metadata": {"ownerReferences": None}}
            )
        except kube.ApiError as err:
            if err.status != 404:
                raise

    def _cleanup_failed(
        self, key: Key, state: cache.AgentState, agent: common.AgentRef, err: Exception
    ) -> str | None:
        """The stream and bucket of a deleted Agent could not be removed: the delete waits
        (tried again with growing delays), and a Warning says how not to wait. Returns
        its message the first time for this delete, None after."""
        nats_spec = agent.spec.trajectories.nats
        stream = streams.stream_name(agent.namespace, agent.name, nats_spec.stream)
        bucket = streams.model_bucket(agent.namespace, agent.name)
        message = (
            f"cannot remove stream {stream} and model bucket {bucket} at {nats_spec.url}:"
            f" {err or type(err).__name__}; the delete waits for it (set"
            " spec.trajectories.nats.retainOnDelete: true to leave them and delete now)"
        )
        metrics.ERRORS.labels("nats").inc()
        state.nats_failures += 1
        delay = kube.retry_delay(state.nats_failures)
        self._enqueue_later(key, delay)
        if not state.cleanup_warned:  # once for the delete: the error's text varies
            state.cleanup_warned = True
            log.warning("agent %s/%s: %s", *key, message)
            self._events.post(agent, "Warning", "CleanupFailed", message)
            return message
        log.info("agent %s/%s: removing its stream failed again; retrying in %.1fs", *key, delay)
        return None

    async def _cleanup_status(self, key: Key, state: cache.AgentState, message: str) -> None:
        """Say in status why the delete waits: in a namespace being deleted the Warning
        Event cannot be made, and the status can still be written. Best effort: the
        log has said it already."""
        assert state.body is not None
        meta = state.body["metadata"]
        _, current = _status_now(state, meta["uid"])
        generation = int(meta.get("generation", 0))
        change = status.cleanup_waiting(generation, message, current.get("conditions") or [])
        try:
            await self._client.merge_patch(kube.AGENT, *key, {"status": change}, sub="status")
        except kube.ApiError as err:
            log.info("agent %s/%s: status not written: %s", *key, err)
            return
        state.last_status, state.status_uid = {**current, **change}, meta["uid"]
        self._status_written(key, state)

    def _rejected(
        self, key: Key, state: cache.AgentState, agent: common.AgentRef, message: str
    ) -> None:
        """A child the apiserver refuses for good: said once per spec and message."""
        if state.error == message and state.error_generation == agent.generation:
            return
        state.error, state.error_generation = message, agent.generation
        metrics.RECONCILES.labels("permanent_error").inc()
        log.warning("agent %s/%s: %s", *key, message)
        self._events.post(agent, "Warning", "ReconcileFailed", message)

    async def _fail(self, key: Key, state: cache.AgentState, generation: int, message: str) -> None:
        """A stored spec the operator cannot read: status says so (once, not at every
        pass), with one Warning Event for each new message. Each pass parses the spec
        again (nothing else can be done with it), but counts and logs it once."""
        if state.error != message or state.error_generation != generation:
            state.error, state.error_generation = message, generation
            metrics.ERRORS.labels("spec").inc()
            metrics.RECONCILES.labels("permanent_error").inc()
            log.warning("agent %s/%s: %s", *key, message)
        assert state.body is not None
        meta = state.body["metadata"]
        _, current = _status_now(state, meta["uid"])
        new = status.invalid(generation, message, current.get("conditions") or [])
        if {k: current.get(k) for k in new} == new:
            return
        await self._client.merge_patch(kube.AGENT, *key, {"status": new}, sub="status")
        state.last_status, state.status_uid = new, meta["uid"]
        self._status_written(key, state)
        subject = events.Subject(meta["name"], meta["namespace"], meta["uid"])
        self._events.post(subject, "Warning", "InvalidSpec", message)

    # -------------------------------------------------------------------- status

    def observe(self, agent: common.AgentRef, state: cache.AgentState) -> status.Observed:
        """Turn cached pods and Deployments into the facts status depends on."""
        restart = (
            state.restart_hash
            if agent is state.agent
            else statefulset.restart_hash(agent, self._settings)
        )
        reports = self._fresh_reports(agent)
        return views.observe(agent, state, restart, reports, streams=self._streams is not None)

    async def _write_status(self, agent: common.AgentRef, state: cache.AgentState) -> None:
        assert state.body is not None
        written, current = _status_now(state, agent.uid)
        selector = ",".join(
            f"{k}={v}" for k, v in common.selector_labels(agent, constants.COMPONENT_ACTORS).items()
        )
        new = status.compute(
            agent.spec,
            agent.generation,
            selector,
            self.observe(agent, state),
            current.get("conditions") or [],
        )
        if new == written:
            return
        key = (agent.namespace, agent.name)
        if not current and self._hold_first_status(key, state, new):
            return
        old_phase = current.get("phase")
        await self._client.merge_patch(
            kube.AGENT, agent.namespace, agent.name, {"status": new}, sub="status"
        )
        state.last_status, state.status_uid = new, agent.uid
        self._status_written(key, state)
        # Phase changes get an Event, except a new Agent's first Progressing: every Agent
        # starts there, and at a thousand Agents those Events are a thousand apiserver
        # writes that say nothing `kubectl get agents` does not.
        first = old_phase is None and new["phase"] == spec.Phase.PROGRESSING
        if old_phase != new["phase"] and not first:
            kind = "Warning" if new["phase"] in ("Degraded", "Failed") else "Normal"
            # The condition that says why: Ready's message would say "8/8 actors ready"
            # of an Agent degraded by a model its pods could not load.
            why = _PHASE_REASON.get(new["phase"], spec.ConditionType.READY)
            said = next(c for c in new["conditions"] if c["type"] == why)
            self._events.post(agent, kind, f"Phase{new['phase']}", said["message"])

    def _status_written(self, key: Key, state: cache.AgentState) -> None:
        state.first_status_settled = True
        held = self._first_status.pop(key, None)
        if held is not None:
            held.cancel()

    def _hold_first_status(self, key: Key, state: cache.AgentState, new: Mapping[str, Any]) -> bool:
        """Whether to hold back a new Agent's first status, `new` (see FIRST_STATUS_WAIT):
        only a plain Progressing one, while other Agents wait for a pass, and for
        FIRST_STATUS_WAIT at most: a pass is queued for when that time is up."""
        if new["phase"] != spec.Phase.PROGRESSING or state.apply_failing is not None:
            return False
        if not state.first_status_settled:
            if not self._queue.urgent:
                return False
            state.first_status_settled = True

            def due() -> None:
                if self._first_status.pop(key, None) is not None:
                    self.enqueue(key)

            self._first_status[key] = asyncio.get_running_loop().call_later(FIRST_STATUS_WAIT, due)
        # Held while its timer waits (not by the clock: a timer may fire a little early).
        return key in self._first_status and self._queue.urgent > 0


def _status_now(
    state: cache.AgentState, uid: str
) -> tuple[dict[str, Any] | None, Mapping[str, Any]]:
    """Our last status write for this Agent (None if none), and the status as it stands:
    that write, else the body's. The body lags our write until its watch event arrives;
    conditions computed from the body then would move a lastTransitionTime back, and
    every write's event would cause another write."""
    assert state.body is not None
    written = state.last_status if state.status_uid == uid else None
    return written, written if written is not None else state.body.get("status") or {}


# The condition whose message a phase's Event carries (Ready's for the others).
_PHASE_REASON: Final = {
    spec.Phase.DEGRADED.value: spec.ConditionType.DEGRADED,
    spec.Phase.FAILED.value: spec.ConditionType.DEGRADED,
    spec.Phase.PAUSED.value: spec.ConditionType.PAUSED,
}


def _model_source(agent_spec: spec.AgentSpec) -> tuple[str, str]:
    return agent_spec.model.uri, agent_spec.model.format.value


def _spec_to_clean_up(key: Key, raw_spec: Mapping[str, Any]) -> spec.AgentSpec | None:
    """The spec a deleted Agent's cleanup reads (its NATS section); None where even that
    is invalid, and its stream and bucket are left in place."""
    try:
        return spec.parse_spec(raw_spec)
    except spec.InvalidSpecError as err:
        # An edit the CRD took and the operator refused (or a spec stored before a
        # stricter rule): its NATS section alone says where the stream is.
        try:
            # Credentials in the URL, refused since, are what this connection needs.
            nats_spec = spec.parse_nats(raw_spec, url_credentials=True)
        except spec.InvalidSpecError as nats_err:
            log.warning(
                "agent %s/%s: deleting with an invalid NATS section; its stream and"
                " model bucket, if any, are left in place (%s)",
                *key,
                nats_err,
            )
            return None
        log.info("agent %s/%s: deleting with an invalid spec (%s)", *key, err)
        # Unvalidated, with its NATS section only: all the removal reads.
        return spec.AgentSpec.model_construct(  # type: ignore[call-arg]
            trajectories=spec.TrajectoriesSpec.model_construct(nats=nats_spec)
        )


def _event_time(event: Mapping[str, Any]) -> float:
    """When an Event last happened (seconds since the epoch; 0 when it says nothing)."""
    for stamp in (
        event.get("lastTimestamp"),
        event.get("eventTime"),
        (event.get("metadata") or {}).get("creationTimestamp"),
    ):
        if stamp:
            try:
                return datetime.datetime.fromisoformat(str(stamp)).timestamp()
            except ValueError:
                continue
    return 0.0
