"""The agent: RelayRL's multi-actor client API over a vectorised actor pool.

What users (and the env drivers, the ZMQ endpoint and the process in `app`) call::

    agent = Agent(model="/models/cartpole", actor_count=4, router_scale=2,
                  sink=LocalFileSink(Path("out")))
    result = agent.request_action([0, 1, 2, 3], obs, reward=rewards)
    agent.flag_last_action([2], reward=[1.0])
    agent.shutdown()

A request for N actors is one forward pass (shared model mode) and a few vectorised
writes into the pool; finished trajectories leave in batches (an outbox of `pool.Chunk`s)
for the router threads, which do the Arrow encoding off the request path. Methods are
thread-safe (one lock around the pool); the `a*` variants run the same calls on the
agent's inference thread for asyncio code. Every method validates its input before
touching state, so an error leaves the agent unchanged.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from relayrl_runtime import errors, metrics, spec, trajectory
from relayrl_runtime.actors import pool as pool_mod
from relayrl_runtime.actors import routers as routers_mod
from relayrl_runtime.inference import loader, model, policy
from relayrl_runtime.sinks import base as sink_base

log = logging.getLogger(__name__)

ActorIds = int | Sequence[int] | npt.NDArray[np.integer[Any]]
Floats = float | Sequence[float] | npt.NDArray[np.floating[Any]]
Bools = bool | Sequence[bool] | npt.NDArray[np.bool_]
ModelRef = Path | str | policy.Policy
# Episodes that ended with the previous action: positions, terminated, truncated.
Ended = tuple[npt.NDArray[np.intp], npt.NDArray[np.bool_], npt.NDArray[np.bool_]]

# Outbox limits: rows, bytes and age before finished trajectories go to a router. Large
# batches keep the routers' per-batch Python work (and their GIL time) small; the byte
# limit (at most an eighth of the routers' queue bound) keeps a batch of large
# observations a fraction of what the routers' queue holds.
_OUTBOX_ROWS = 16384
_OUTBOX_BYTES = 8 << 20
_OUTBOX_SECONDS = 0.5


class ActionResult:
    """Actions for the requested actors, in request order, with what the model gave.

    `aux` holds every model output by name (e.g. logits, value); `logp` is the
    log-probability of each action: given by the policy when choosing the actions
    computed it anyway (a small discrete batch), else computed on first access (it is
    not needed to act, so a large batch's request path does not pay for it).
    """

    __slots__ = ("_kind", "_logp", "_mask", "actions", "aux", "version")

    def __init__(
        self,
        actions: npt.NDArray[np.generic],
        aux: Mapping[str, npt.NDArray[np.generic]],
        version: int,
        layout: trajectory.Layout,
        mask: npt.NDArray[np.bool_] | None,
        logp: npt.NDArray[np.float32] | None = None,
    ) -> None:
        self.actions = actions  # int64 (n,) or float32 (n, size)
        self.aux = aux
        self.version = version  # policy version that chose these actions
        self._kind = layout
        self._mask = mask
        self._logp = logp

    @property
    def logp(self) -> npt.NDArray[np.float32]:
        """Log-probability of each action, shape (n,)."""
        if self._logp is None:
            lay = self._kind
            log_std: Any = (
                self.aux[lay.log_std_output] if lay.log_std_output is not None else lay.log_std
            )
            self._logp = policy.log_prob(
                lay.action_kind, self.aux[lay.head], self.actions, self._mask, log_std
            )
        return self._logp

    def __repr__(self) -> str:
        return f"ActionResult(actions={self.actions!r}, version={self.version})"


class Agent:
    """Actors, a model and routers; see the module docstring."""

    def __init__(
        self,
        model_ref: ModelRef,
        *,
        actor_count: int = 1,
        router_scale: int = 1,
        device: spec.Device | str = spec.Device.CPU,
        model_mode: spec.ModelMode | str = spec.ModelMode.SHARED,
        model_format: spec.ModelFormat | str | None = None,
        model_version: int | None = None,
        model_metadata: model.ModelMetadata | None = None,
        sink: sink_base.TrajectorySink | None = None,
        name: str = "agent",
        max_length: int = 1000,
        sample: bool = True,
        seed: int | None = None,
        metrics_: metrics.RuntimeMetrics | None = None,
        queue_size: int = 256,
        queue_bytes: int = routers_mod.QUEUE_BYTES,
        actor_ids: Sequence[int] | None = None,
    ) -> None:
        if actor_count < 0:
            raise errors.InvalidArgumentError.mismatch("actor_count", ">= 0", actor_count)
        routers_mod.check_scale(router_scale)
        if queue_bytes < 1:
            raise errors.InvalidArgumentError.mismatch("queue_bytes", ">= 1", queue_bytes)
        if max_length < 1:
            raise errors.InvalidArgumentError.mismatch("max_length", ">= 1", max_length)
        ids = list(range(actor_count)) if actor_ids is None else [int(i) for i in actor_ids]
        if len(ids) != actor_count:
            raise errors.InvalidArgumentError.mismatch(
                "actor_ids", f"{actor_count} ids (actor_count)", len(ids)
            )
        self.name = name
        self.device = spec.Device(device)
        self.mode = spec.ModelMode(model_mode)
        self._shared = self.mode is spec.ModelMode.SHARED
        self.sample = sample
        self.metrics = metrics_ if metrics_ is not None else metrics.RuntimeMetrics()
        self._format = None if model_format is None else spec.ModelFormat(model_format)
        self._model_metadata = model_metadata
        self._rng = policy.Sampler(seed)
        self._lock = threading.RLock()
        self._reload_lock = threading.Lock()
        self._closed = False
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._outbox: list[pool_mod.Chunk] = []
        self._outbox_rows = 0
        self._outbox_bytes = 0
        self._outbox_max_bytes = min(_OUTBOX_BYTES, max(1, queue_bytes // 8))
        self._outbox_since = 0.0
        # Batches taken from the outbox under the lock and not yet in the routers' queue
        # (the hand-off happens off the lock); `shutdown` waits for them.
        self._handoffs = 0
        self._handed = threading.Condition(self._lock)

        self._policy = self._load(model_ref, model_version)
        # The version before the running one, kept from a hot reload until the next one
        # swaps in: a version that fails at run time is replaced by it (`_roll_back`).
        self._previous: policy.Policy | None = None
        # Versions that failed at run time, with why: the watchers do not load them again.
        self._run_failures: dict[int, str] = {}
        # The running version, held as failed at run time with none before it to go
        # back to (`hold`), and the error: until another version swaps in.
        self._stalled: tuple[int, str] | None = None
        self._swaps = 0  # models swapped in so far (reloads and replacements)
        self._source = model_ref if not isinstance(model_ref, policy.Policy) else None
        self.layout = trajectory.Layout.from_metadata(name, self._policy.metadata)
        run_prefix = int.from_bytes(os.urandom(4), "little")
        self._pool = pool_mod.ActorPool(
            self.layout, max_length, run_prefix, on_resize=self.metrics.buffer_bytes.set
        )
        self._pool.check_new_ids(ids)
        # Independent mode: one policy instance per actor row (RelayRL's per-actor model).
        self._own: dict[int, policy.Policy] = {}
        rows = self._pool.add(ids)
        if self.mode is spec.ModelMode.INDEPENDENT:
            for row in rows:
                self._own[row] = self._clone_policy()
        self._routers = routers_mod.RouterPool(
            self.layout, sink, self.metrics, router_scale, queue_size, queue_bytes
        )
        self.sink = sink
        self.metrics.model_version.set(self._policy.version)
        self.metrics.actors.set(len(self._pool))
        # Sends what waited in the outbox its time though no call came since (the last
        # episodes of a remote client that went quiet, a slice resized to nothing).
        self._tick_stop = threading.Event()
        # Held by the ticker from taking the outbox to handing it on, so `flush` (which
        # takes it too) never drains the routers before what the ticker took is in.
        self._tick_lock = threading.Lock()
        self._ticker = threading.Thread(target=self._tick, name="relayrl-outbox", daemon=True)
        self._ticker.start()

    # ------------------------------------------------------------------ models

    def _load(self, ref: ModelRef, version: int | None) -> policy.Policy:
        if isinstance(ref, policy.Policy):
            return ref
        path = Path(ref)
        single = path.is_file()
        return loader.load_policy(
            path,
            self.device,
            model_format=self._format,
            version=version,
            # A directory brings its own; a single file takes the start's (its layout).
            metadata=self._model_metadata if single else None,
            # Independent mode copies it for each actor, from the bytes loaded: the file
            # may be rewritten in place while this version runs.
            keep_graph=self.mode is spec.ModelMode.INDEPENDENT,
        )

    def _clone_policy(self) -> policy.Policy:
        return loader.copy_policy(self._policy, self.device)

    @property
    def current_policy(self) -> policy.Policy:
        """The shared policy in use."""
        return self._policy

    def get_model_version(self) -> int:
        """Version of the policy that answers new requests."""
        return self._policy.version

    @property
    def model_swaps(self) -> int:
        """How many times another model took over (a reload, or a failed version's
        replacement): a watcher looks again when it changed."""
        return self._swaps

    @property
    def previous_version(self) -> int | None:
        """The version kept to go back to (None: none kept)."""
        previous = self._previous
        return None if previous is None else previous.version

    def run_failure(self, version: int) -> str | None:
        """Why `version` failed at run time (None: it did not)."""
        return self._run_failures.get(version)

    @property
    def stalled(self) -> int | None:
        """The running version if it is held as failed at run time (`hold`); None: not."""
        stalled = self._stalled
        return None if stalled is None else stalled[0]

    def hold(self, version: int, err: errors.ModelRunError) -> bool:
        """Hold `version`, which failed on a request with none before it to try that
        request on (`ModelRunNoFallbackError`), as failed at run time: `run_failure`
        says so, the watchers report it and look for another version, and `stalled`
        names it until another swaps in. False if another version runs by now.

        The environment driver calls it: its requests are the pod's own. A remote
        client's failing request holds nothing (one client cannot tell the version's
        fault from its request's).
        """
        with self._lock:
            if self._policy.version != version:
                return False
            if self._stalled is None:
                self._stalled = (version, str(err))
                why = (
                    "failed at run time, with no version before it to go back to (waiting"
                    f" for another): {err}"
                )
                self._run_failures[version] = why
                log.error("model version %d %s", version, why)
            return True

    def reload_model(self, model_ref: ModelRef, version: int | None = None) -> int:
        """Swap in a new model version without stopping; returns the new version.

        The new model is loaded and validated off the request path; the swap happens
        between requests, so no request fails and each step records the version that
        chose it. A model with a different observation, action or output layout is
        refused (`ModelIncompatibleError`): the trajectories this agent records have
        the layout of the model it started with.

        The version replaced stays loaded until the next reload swaps in: a new version
        whose forward pass fails on a request the version before answers is replaced by
        it (`run_failure` then says why), and that request is answered by it. A reload
        that fails keeps both. So the agent holds two models between reloads, and three
        while one loads. A version that failed at run time is not kept to go back to.
        """
        if (
            version is None
            and not isinstance(model_ref, policy.Policy)
            and Path(model_ref).is_file()
        ):
            # The metadata given at the start names the version the agent runs: other
            # weights under it would record their steps as the old policy's.
            raise errors.InvalidArgumentError.mismatch(
                "version",
                f"the version of the weights in {model_ref} (a single graph file has no"
                f" {model.METADATA_FILE} to say it)",
                None,
            )
        with self._reload_lock:
            self._check_open()
            new = self._load(model_ref, version)
            why = self._policy.metadata.compatible_with(new.metadata)
            if why is not None:
                new.close()
                self.metrics.model_reloads.labels("rejected").inc()
                raise errors.ModelIncompatibleError(f"reload refused: {why}")
            own: dict[int, policy.Policy] = {}
            dropped: list[policy.Policy] = []
            independent = self.mode is spec.ModelMode.INDEPENDENT

            def copy_for(rows: Iterable[int]) -> None:
                """Per-actor copies into `own`; a failure closes the new model and every
                copy made, and leaves the agent as it was (all on the old model)."""
                try:
                    for row in rows:
                        own[row] = loader.copy_policy(new, self.device)
                except BaseException:
                    for p in [new, *own.values()]:
                        p.close()
                    raise

            if independent:
                with self._lock:
                    rows = list(self._own)
                copy_for(rows)  # slow: off the lock
            with self._lock:
                old, old_own = self._policy, self._own
                if independent:
                    # Actors added or removed while the copies loaded; the new ones get
                    # their copies before the swap.
                    copy_for(row for row in old_own if row not in own)
                    dropped = [own.pop(row) for row in list(own) if row not in old_own]
                    self._own = own
                self._policy = new
                older: policy.Policy | None = old
                if old.version in self._run_failures:  # never gone back to: closed
                    self._back_from_stall(new.version)
                else:
                    older, self._previous = self._previous, old
                self._swaps += 1
            for p in [*old_own.values(), *dropped, *([older] if older is not None else [])]:
                p.close()
            self.metrics.model_version.set(new.version)
            self.metrics.model_reloads.labels("ok").inc()
            log.info("model reloaded: version %d from %s", new.version, new.source)
            return new.version

    # ----------------------------------------------------------------- actions

    def request_action(
        self,
        actor_ids: ActorIds,
        obs: npt.NDArray[np.generic],
        mask: npt.NDArray[np.generic] | None = None,
        reward: Floats = 0.0,
        on_result: Callable[[ActionResult], None] | None = None,
        *,
        ended: Ended | None = None,
    ) -> ActionResult:
        """Actions for these actors from one forward pass.

        `obs` has one row per actor id; `reward` (scalar or one per actor) is the reward
        for each actor's previous action; `mask` (discrete models) marks allowed actions.
        `on_result`, if given, gets the result as soon as the actions are chosen, before
        the step is recorded (still under the agent's lock, so it must be quick and must
        not call the agent): a network reply can leave before the bookkeeping.

        `ended` = (positions, terminated, truncated): the actors at these positions of
        `actor_ids` finished their episode with their previous action (whose reward is
        theirs in `reward`); it is `flag_last_action` for them, done first in the same
        call. Their `obs` row then starts the next episode. Env drivers use it to end
        episodes and step again with one lock and one id lookup.
        """
        # The hot path: keep it to a few calls (no per-request objects beyond the result).
        ids = _ids(actor_ids)
        n = len(ids)
        rewards: Any = reward
        if type(reward) is not np.ndarray or reward.dtype != np.float64 or reward.shape != (n,):
            rewards = _rewards(reward, n)
        with self._lock:
            if self._closed:
                self._check_open()
            try:
                rows = self._pool.rows_for(ids)
                pol = self._policy
                obs = pol.check_obs(obs, n)
                m = pol.check_mask(np.asarray(mask), n) if mask is not None else None
            except errors.RelayRLError as err:
                self.metrics.request_errors.labels(err.kind).inc()
                raise
            if ended is not None:
                # Before the forward pass (about 5% quicker in the env loop than after
                # it): a request that then fails has ended these episodes, and nothing
                # else, so it is made again without `ended` (`envs.driver`).
                self._end_at(rows, rewards, ended)
            t_obs = time.time_ns() // 1000
            t0 = time.perf_counter()
            try:
                if self._shared or n == 0:
                    out = pol.act(obs, m, self._rng, self.sample)
                else:
                    out = self._act_independent(rows, obs, m)
            except errors.ModelRunError as err:
                out = self._roll_back(err, obs, m)  # the version before's answer
                if not (self._shared or n == 0):
                    out = self._act_independent(rows, obs, m)  # by each actor's copy
            elapsed = time.perf_counter() - t0
            stamps = (out.version, t_obs, time.time_ns() // 1000)
            result = ActionResult(out.actions, out.outputs, out.version, self.layout, m, out.logp)
            if on_result is not None:
                on_result(result)
            cut = self._pool.record(rows, obs, out.actions, m, out.outputs, stamps, rewards)
            if cut is not None:
                self._outbox_add(cut)
            ready = self._outbox_take(t0) if self._outbox else None
        mt = self.metrics
        mt.inference_seconds.observe(elapsed)
        mt.batch_size.observe(n)
        mt.requests.value += 1
        mt.actions.value += n
        if ready is not None:
            self._hand_off(ready)
        return result

    def _roll_back(
        self,
        err: errors.ModelRunError,
        obs: npt.NDArray[np.generic],
        mask: npt.NDArray[np.bool_] | None,
    ) -> policy.PolicyOutput:
        """Replace the running version, which failed on a request, by the one before it;
        returns that version's answer to the request.

        `err` is raised instead when that version fails on the request too (then the
        request is to blame, not the new version); with no version before kept (a pod
        that started on this one), `ModelRunNoFallbackError`. Called with the lock held.
        """
        bad, previous = self._policy, self._previous
        try:
            if previous is None:
                raise errors.ModelRunNoFallbackError(bad.version, str(err)) from err
            try:
                answer = previous.act(obs, mask, self._rng, self.sample)
            except errors.ModelRunError:
                raise err from None
        except errors.ModelRunError as raised:
            self.metrics.request_errors.labels(raised.kind).inc()
            raise
        own: dict[int, policy.Policy] = {}
        try:
            for row in self._own:  # independent mode: one copy per actor
                own[row] = loader.copy_policy(previous, self.device)
        except BaseException:
            for p in own.values():
                p.close()
            raise
        old_own = self._own
        self._policy, self._own, self._previous = previous, own, None
        self._swaps += 1
        why = f"failed at run time, so the agent went back to version {previous.version}: {err}"
        self._run_failures[bad.version] = why
        for p in [bad, *old_own.values()]:
            p.close()
        self.metrics.model_version.set(previous.version)
        self.metrics.model_reloads.labels("rolled_back").inc()
        log.error("model version %d %s", bad.version, why)
        return answer

    def _back_from_stall(self, version: int) -> None:
        """`version` took over from a stalled one: its failure says where it went.
        Called with the lock held."""
        stalled, self._stalled = self._stalled, None
        if stalled is not None and version < stalled[0]:
            self._run_failures[stalled[0]] = (
                f"failed at run time, so the agent went back to version {version}: {stalled[1]}"
            )

    def _end_at(self, rows: npt.NDArray[np.int64], rewards: Any, ended: Ended) -> None:
        positions, terminated, truncated = ended
        k = len(positions)
        if (
            terminated.shape != (k,)
            or truncated.shape != (k,)
            or terminated.dtype != np.bool_
            or truncated.dtype != np.bool_
        ):
            raise errors.InvalidArgumentError.mismatch(
                "ended", f"positions and two bool arrays of length {k}", ended
            )
        listed = positions.tolist()
        if k and (min(listed) < 0 or max(listed) >= len(rows)):
            raise errors.InvalidArgumentError.mismatch(
                "ended.positions", f"positions in [0, {len(rows)})", listed
            )
        r = rewards[positions] if isinstance(rewards, np.ndarray) else rewards
        # Truncated means cut without a terminal state: a time limit reached on the
        # terminal step (gymnasium sets both) is terminated.
        done = self._pool.flag_last(rows[positions], r, terminated, truncated & ~terminated)
        if done is not None:
            self._outbox_add(done)

    def _act_independent(
        self,
        rows: npt.NDArray[np.int64],
        obs: npt.NDArray[np.generic],
        mask: npt.NDArray[np.bool_] | None,
    ) -> policy.PolicyOutput:
        outs = [
            self._own[int(row)].act(
                obs[i : i + 1], None if mask is None else mask[i : i + 1], self._rng, self.sample
            )
            for i, row in enumerate(rows.tolist())
        ]
        logps = [o.logp for o in outs if o.logp is not None]
        return policy.PolicyOutput(
            actions=np.concatenate([o.actions for o in outs]),
            outputs={k: np.concatenate([o.outputs[k] for o in outs]) for k in outs[0].outputs},
            mask=mask,
            version=outs[0].version,
            # Only when every actor's policy gave it (`in` would compare arrays with None).
            logp=np.concatenate(logps) if len(logps) == len(outs) else None,
        )

    def flag_last_action(
        self,
        actor_ids: ActorIds,
        reward: Floats = 0.0,
        terminated: Bools = True,
        truncated: Bools = False,
    ) -> int:
        """End these actors' episodes: `reward` is for their last action.

        `terminated`/`truncated` (scalar or one per actor) say how the episode ended.
        Actors without a recorded step are ignored. Returns trajectories finished.
        """
        ids = _ids(actor_ids)
        n = len(ids)
        rewards = _rewards(reward, n)
        term_arr = _flags("terminated", terminated, n)
        trunc_arr = _flags("truncated", truncated, n) & ~term_arr  # as in `_end_at`
        return self._flag_last(ids, rewards, term_arr, trunc_arr, cut=False)

    def drop_last_steps(self, actor_ids: ActorIds) -> None:
        """Forget each actor's last recorded step: its action never reached the env (the
        env raised). The reward of the step before stays as it was given."""
        ids = _ids(actor_ids)
        with self._lock:
            self._check_open()
            self._pool.drop_last(self._pool.rows_for(ids))

    def cut_trajectories(self, actor_ids: ActorIds, reward: Floats = 0.0) -> int:
        """Cut these actors' in-progress trajectories (truncated and cut); episodes end.

        `reward` is for each actor's last action. For a runtime that restarts an
        actor's environment (a resized env driver). Returns trajectories finished.
        """
        ids = _ids(actor_ids)
        n = len(ids)
        rewards = _rewards(reward, n)
        no = np.zeros(n, dtype=np.bool_)
        return self._flag_last(ids, rewards, no, ~no, cut=True)

    def _flag_last(
        self,
        ids: npt.NDArray[np.int64],
        rewards: npt.NDArray[np.float64],
        terminated: npt.NDArray[np.bool_],
        truncated: npt.NDArray[np.bool_],
        *,
        cut: bool,
    ) -> int:
        """End episodes and hand what finished to the routers; returns their count."""
        with self._lock:
            self._check_open()
            rows = self._pool.rows_for(ids)
            done = self._pool.flag_last(rows, rewards, terminated, truncated, cut=cut)
            if done is None:
                return 0
            self._outbox_add(done)
            ready = self._outbox_take(time.perf_counter())
        if ready is not None:
            self._hand_off(ready)
        return done.trajectories

    # Finished trajectories wait in a small outbox and go to the routers in batches of
    # `_OUTBOX_ROWS` rows or after `_OUTBOX_SECONDS`, so the request path pays for one
    # queue hand-off per batch rather than one per trajectory.

    def _take_all(self, cut_partial: bool) -> list[pool_mod.Chunk] | None:
        """Everything queued for the routers, with in-progress trajectories cut if asked.

        Called with the lock held.
        """
        partial = self._pool.flush() if cut_partial else None
        if partial is not None:
            self._outbox_add(partial)
        return self._outbox_take(0.0, force=True)

    def _tick(self) -> None:
        while not self._tick_stop.wait(_OUTBOX_SECONDS):
            with self._tick_lock:
                with self._lock:
                    if self._closed:
                        return
                    ready = self._outbox_take(time.perf_counter())
                if ready is not None:
                    self._hand_off(ready)

    def _outbox_add(self, chunk: pool_mod.Chunk) -> None:
        if not self._outbox:
            self._outbox_since = time.perf_counter()
        self._outbox.append(chunk)
        self._outbox_rows += chunk.rows
        self._outbox_bytes += chunk.nbytes

    def _outbox_take(self, now: float, force: bool = False) -> list[pool_mod.Chunk] | None:
        if not self._outbox:
            return None
        if (
            not force
            and self._outbox_rows < _OUTBOX_ROWS
            and self._outbox_bytes < self._outbox_max_bytes
            and now - self._outbox_since < _OUTBOX_SECONDS
        ):
            return None
        chunks = self._outbox
        self._outbox = []
        self._outbox_rows = 0
        self._outbox_bytes = 0
        self._handoffs += 1  # the caller hands them to `_hand_off` once off the lock
        return chunks

    def _hand_off(self, chunks: list[pool_mod.Chunk]) -> None:
        """Queue chunks taken by `_outbox_take` for the routers (may block: backpressure)."""
        try:
            self._routers.submit(chunks)
        finally:
            with self._lock:
                self._handoffs -= 1
                if not self._handoffs:
                    self._handed.notify_all()

    # ------------------------------------------------------------------ actors

    def new_actor(self, actor_id: int | None = None) -> int:
        """Add one actor (the next free id unless given); returns its id."""
        return self.new_actors(1, None if actor_id is None else [actor_id])[0]

    def new_actors(self, count: int, actor_ids: Sequence[int] | None = None) -> list[int]:
        """Add `count` actors; returns their ids."""
        if count < 0:
            raise errors.InvalidArgumentError.mismatch("count", ">= 0", count)
        with self._lock:
            self._check_open()
            if actor_ids is None:
                start = self._pool.next_free_id()
                ids = list(range(start, start + count))
            else:
                ids = self._pool.check_new_ids(actor_ids)
                if len(ids) != count:
                    raise errors.InvalidArgumentError.mismatch(
                        "actor_ids", f"{count} ids", len(ids)
                    )
            own: list[Any] = []
            try:
                if self.mode is spec.ModelMode.INDEPENDENT:
                    for _ in ids:
                        own.append(self._clone_policy())
                rows = self._pool.add(ids)
            except BaseException:  # e.g. MemoryError: the agent stays as it was
                for p in own:
                    p.close()
                raise
            for row, p in zip(rows, own, strict=False):
                self._own[row] = p
            self.metrics.actors.set(len(self._pool))
            return ids

    def remove_actor(self, actor_id: int) -> None:
        """Remove an actor; its partial trajectory is flushed (cut)."""
        with self._lock:
            self._check_open()
            row = self._pool.row_of(int(actor_id))
            partial = self._pool.remove(int(actor_id))
            p = self._own.pop(row, None)
            if p is not None:
                p.close()
            self.metrics.actors.set(len(self._pool))
            if partial is not None:
                self._outbox_add(partial)
            ready = self._outbox_take(time.perf_counter())
        if ready is not None:
            self._hand_off(ready)

    def set_actor_id(self, current_id: int, new_id: int) -> None:
        """Rename an actor; its in-progress trajectory continues under the new id."""
        with self._lock:
            self._check_open()
            self._pool.rename(int(current_id), int(new_id))

    @property
    def actor_count(self) -> int:
        """Number of actors (no lock: for metrics and status reports)."""
        return len(self._pool)

    def get_actor_ids(self) -> list[int]:
        """Ids of all actors."""
        with self._lock:
            return self._pool.actor_ids

    def has_actors(self, actor_ids: ActorIds) -> bool:
        """Whether every id is an actor of this agent."""
        with self._lock:
            return all(int(i) in self._pool for i in _ids(actor_ids).tolist())

    # ----------------------------------------------------------------- routers

    @property
    def router_scale(self) -> int:
        """Router workers running."""
        return self._routers.size

    @property
    def router_queue_bytes(self) -> int:
        """Bytes of finished trajectories handed to the routers and not yet written."""
        return self._routers.queued_bytes

    def scale_throughput(self, delta: int) -> int:
        """Add (+n) or remove (-n) router workers; returns the new count (at least 1)."""
        with self._lock:
            self._check_open()
            target = self._routers.size + delta
            routers_mod.check_scale(target)
            return self._routers.scale_to(target)

    # --------------------------------------------------------------- lifecycle

    def flush(self) -> None:
        """Write every finished trajectory and flush the sink.

        Episodes in progress go on: their steps are written when they end (or are cut by
        the max length, a removal or `shutdown`), and the reward of their last action
        still comes with the next request.
        """
        with self._tick_lock:
            with self._lock:
                self._check_open()
                ready = self._take_all(cut_partial=False)
            if ready is not None:
                self._hand_off(ready)
        self._routers.drain()
        if self.sink is not None:
            self.sink.flush()

    def shutdown(self, flush: bool = True) -> None:
        """Flush partial trajectories (unless told not to), stop routers, close the sink."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            ready = self._take_all(cut_partial=flush)
            if ready is not None:
                self._handoffs -= 1  # handed on below, by this thread
            # What other threads took from the outbox goes into the queue before it closes.
            while self._handoffs:
                self._handed.wait()
        self._tick_stop.set()
        if self._ticker is not threading.current_thread():
            self._ticker.join()  # what it took goes to the routers before they stop
        if ready is not None:
            self._routers.submit(ready)
        self._routers.shutdown()
        if self.sink is not None:
            self.sink.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        for p in [self._policy, *self._own.values()]:
            p.close()
        if self._previous is not None:
            self._previous.close()

    @property
    def closed(self) -> bool:
        """Whether `shutdown` was called."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise errors.AgentClosedError("agent: expected a running agent, got one shut down")

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ----------------------------------------------------------------- asyncio

    async def _in_thread(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="relayrl-agent"
            )
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    async def arequest_action(
        self,
        actor_ids: ActorIds,
        obs: npt.NDArray[np.generic],
        mask: npt.NDArray[np.generic] | None = None,
        reward: Floats = 0.0,
    ) -> ActionResult:
        """`request_action` for asyncio code (runs on the agent's inference thread)."""
        result: ActionResult = await self._in_thread(
            self.request_action, actor_ids, obs, mask, reward
        )
        return result

    async def aflag_last_action(
        self,
        actor_ids: ActorIds,
        reward: Floats = 0.0,
        terminated: Bools = True,
        truncated: Bools = False,
    ) -> int:
        """`flag_last_action` for asyncio code."""
        done: int = await self._in_thread(
            self.flag_last_action, actor_ids, reward, terminated, truncated
        )
        return done

    async def areload_model(self, model_ref: ModelRef, version: int | None = None) -> int:
        """`reload_model` for asyncio code (loads in a worker thread)."""
        return await asyncio.to_thread(self.reload_model, model_ref, version)

    async def ashutdown(self, flush: bool = True) -> None:
        """`shutdown` for asyncio code."""
        executor, self._executor = self._executor, None
        await asyncio.to_thread(self.shutdown, flush)
        if executor is not None:
            executor.shutdown(wait=True)


def _flags(field: str, value: Bools, n: int) -> npt.NDArray[np.bool_]:
    """One bool per actor from a scalar or an array."""
    if type(value) is np.ndarray and value.dtype == np.bool_ and value.shape == (n,):
        return value
    if np.ndim(value) == 0:
        return np.full(n, bool(value), dtype=np.bool_)
    arr: npt.NDArray[np.bool_] = _per_actor(field, value, n, np.bool_)
    return arr


def _ids(actor_ids: ActorIds) -> npt.NDArray[np.int64]:
    if type(actor_ids) is np.ndarray and actor_ids.dtype == np.int64 and actor_ids.ndim == 1:
        return actor_ids  # type: ignore[return-value]
    arr = np.asarray(actor_ids)
    if arr.size == 0:  # `[]` comes as float64: no ids is still a valid request
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise errors.InvalidArgumentError.mismatch("actor_ids", "integer ids", arr.dtype)
    return arr.astype(np.int64, copy=False).reshape(-1)


def _rewards(value: Floats | None, n: int) -> Any:
    """Rewards as `_per_actor` takes them; None (no reward, as RelayRL's optional last
    reward) is 0.0, and a None among numbers is refused rather than recorded as NaN."""
    if value is None:
        return np.float64(0.0)
    if type(value) is not np.ndarray and np.ndim(value) == 1:
        missing = [i for i, v in enumerate(value) if v is None]  # type: ignore[arg-type]
        if missing:
            raise errors.InvalidArgumentError.mismatch(
                "reward", "a number for each actor", f"None at positions {missing}"
            )
    return _per_actor("reward", value, n, np.float64)


def _per_actor(field: str, value: Any, n: int, dtype: type[np.generic]) -> Any:
    """A scalar, or an array of length n, of dtype."""
    if type(value) is np.ndarray and value.dtype == dtype and value.shape == (n,):
        return value
    try:
        if np.ndim(value) == 0:
            return dtype(value)
        arr = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as err:
        raise errors.InvalidArgumentError.mismatch(
            field, f"a {np.dtype(dtype).name} or {n} of them", repr(value)[:200]
        ) from err
    if arr.shape != (n,):
        raise errors.InvalidArgumentError.mismatch(
            f"{field}.shape", f"scalar or [{n}]", list(arr.shape)
        )
    return arr
