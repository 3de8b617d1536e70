"""The environment loop: one batched request per step for all env copies.

Called by the process (`app`) in a worker thread, by the demo and the benchmark. Each
env copy is one actor of the agent (ids given by the caller). Per step: one
`request_action` for all copies, carrying the previous step's rewards and the copies
whose episode ended in it (`ended`: `flag_last_action` for them, inside the same call),
then one vector env step. Envs must autoreset in the same step (the observation after a
done step is the next episode's first). When the driver stops, episodes that ended in
its last step are flagged at once. `EnvDriver.resize` (live config) changes the copies
between two steps.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from relayrl_runtime import agent as agent_mod
from relayrl_runtime import errors, trajectory

log = logging.getLogger(__name__)

# How often a driver whose model failed with none to go back to looks for another.
_STALL_POLL_SECONDS = 0.1


class VecEnv(Protocol):
    """A batch of environments with same-step autoreset (gymnasium vector API)."""

    num_envs: int

    def reset(self, *, seed: int | None = None) -> tuple[npt.NDArray[Any], Any]:
        """First observations of every copy."""
        ...

    def step(
        self, actions: npt.NDArray[Any]
    ) -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any], Any]:
        """obs, rewards, terminated, truncated, info; done copies already reset."""
        ...

    def close(self) -> None:
        """Release the environments."""
        ...


@dataclasses.dataclass(frozen=True)
class DriverStats:
    """What a driver run did."""

    steps: int
    episodes: int
    mean_return: float | None
    mean_length: float | None
    seconds: float

    @property
    def steps_per_second(self) -> float:
        """Env steps per wall-clock second."""
        return self.steps / self.seconds if self.seconds > 0 else 0.0


EnvFactory = Callable[[int], VecEnv]


class _Block:
    """One vector env and the actor ids of its copies (in copy order)."""

    __slots__ = ("env", "ids")

    def __init__(self, env: VecEnv, ids: npt.NDArray[np.int64]) -> None:
        self.env = env
        self.ids = ids


class EnvDriver:
    """Steps one or more `VecEnv`s through an agent until told to stop.

    Usually one vector env holds every copy. `resize` (the live config path) changes
    the set of actor ids between two steps: new ids get a new vector env from
    `make_env`; a vector env that loses some of its copies is rebuilt for the rest,
    whose in-progress trajectories are cut first (their episodes restart). All vector
    envs are stepped after one `request_action` for every copy.
    """

    def __init__(
        self,
        agent: agent_mod.Agent,
        env: VecEnv | None,
        actor_ids: npt.NDArray[np.int64] | list[int],
        *,
        seed: int | None = None,
        make_env: EnvFactory | None = None,
        source: str = "environment",
    ) -> None:
        self.source = source  # its errors name it (e.g. "environment.python 'pkg:make'")
        # When the env call running now (a step or a reset) began (monotonic): the
        # liveness probe fails for one that does not return.
        self.env_call_since: float | None = None
        ids = np.asarray(actor_ids, dtype=np.int64).reshape(-1)
        count = 0 if env is None else env.num_envs
        if ids.shape != (count,):
            raise errors.InvalidArgumentError.mismatch(
                "actor_ids", f"one id per env copy ({count})", len(ids)
            )
        if not agent.has_actors(ids):
            missing = [i for i in ids.tolist() if not agent.has_actors([i])]
            raise errors.UnknownActorError(missing)
        self.agent = agent
        self.seed = seed
        self.make_env = make_env
        self._blocks: list[_Block] = [] if env is None else [_Block(env, ids)]
        self._resets = 0
        self._returns: collections.deque[float] = collections.deque(maxlen=1000)
        self._lengths: collections.deque[int] = collections.deque(maxlen=1000)
        # Resize requests from other threads, applied by the stepping thread between steps.
        self._requests: list[tuple[list[int], concurrent.futures.Future[None]]] = []
        self._requests_lock = threading.Lock()
        self._wake = threading.Event()
        self._running = False
        # Episodes that ended in the last env step, flagged with the next request.
        self._ended: agent_mod.Ended | None = None
        # A step recorded whose env step has not returned (see `run`).
        self._pending = False
        # Rows with NaN or infinity so far: of observations, of rewards.
        self._nonfinite_seen: dict[str, int] = {}
        # Per-copy state, aligned with `actor_ids` (the blocks' ids concatenated).
        self._obs: npt.NDArray[Any] | None = None
        self._rewards: npt.NDArray[np.float64] = np.zeros(0, dtype=np.float64)
        self._ep_return = np.zeros(0, dtype=np.float64)
        self._ep_length = np.zeros(0, dtype=np.int64)
        self.actor_ids = ids

    @property
    def env(self) -> VecEnv | None:
        """The vector env, when there is exactly one."""
        return self._blocks[0].env if len(self._blocks) == 1 else None

    # ------------------------------------------------------------------ resize

    def resize(self, actor_ids: list[int] | npt.NDArray[np.int64]) -> None:
        """Step exactly these actor ids from now on (adding and removing agent actors).

        Called from any thread; applied by the stepping thread between two steps (or
        here, when the driver is not running). Kept ids keep their env and episode
        unless their vector env had to be rebuilt.
        """
        wanted = [int(i) for i in np.asarray(actor_ids, dtype=np.int64).reshape(-1)]
        if len(set(wanted)) != len(wanted):
            raise errors.InvalidArgumentError(f"actor_ids: expected unique ids, got {wanted}")
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._requests_lock:
            if not self._running:
                # Not stepping: apply here (holding the lock keeps `run` from starting).
                self._apply(wanted)
                return
            self._requests.append((wanted, future))
            self._wake.set()
        future.result()

    def _apply_requests(self) -> None:
        with self._requests_lock:
            requests, self._requests = self._requests, []
        for wanted, future in requests:
            try:
                self._apply(wanted)
            except BaseException as err:  # handed to the caller of resize
                future.set_exception(err)
            else:
                future.set_result(None)

    def _new_block(self, ids: list[int]) -> _Block:
        if self.make_env is None:
            raise errors.InvalidArgumentError("resize: this driver has no env factory")
        env = self.make_env(len(ids))
        return _Block(env, np.asarray(ids, dtype=np.int64))

    def _apply(self, wanted: list[int]) -> None:
        agent = self.agent
        self._start()
        self._flush_ended()
        current = self.actor_ids.tolist()
        keep = set(wanted)
        removed = [i for i in current if i not in keep]
        known = set(current)
        added = [i for i in wanted if i not in known]
        if not removed and not added:
            return
        old_index = {actor: k for k, actor in enumerate(current)}
        obs_by_id: dict[int, npt.NDArray[Any]] = {}
        if self._obs is not None:
            obs_by_id = {actor: self._obs[k] for actor, k in old_index.items()}
        gone = set(removed)
        blocks: list[_Block] = []
        closing: list[_Block] = []
        rebuilt: list[list[int]] = []
        cut: list[int] = []
        for block in self._blocks:
            ids = block.ids.tolist()
            if not any(i in gone for i in ids):
                blocks.append(block)
                continue
            closing.append(block)
            rest = [i for i in ids if i not in gone]
            if rest:
                # A vector env cannot drop copies: rebuild it, so the kept copies'
                # episodes restart and their in-progress trajectories are cut.
                cut += rest
                rebuilt.append(rest)
        # Every new env first: a factory that fails leaves the driver and the agent as
        # they were (the resize can be tried again), not half resized. For that while,
        # the envs being replaced and their successors exist side by side.
        fresh: list[_Block] = []
        first_obs: list[Any] = []
        try:
            for ids in [*rebuilt, *([added] if added else [])]:
                with self._env_call("make"):
                    fresh.append(self._new_block(ids))
                # Reset here too: an env that fails at its reset fails the resize
                # before anything changed, as one that fails to be made does.
                with self._env_call("reset"):
                    first_obs.append(fresh[-1].env.reset(seed=self._next_seed())[0])
        except BaseException:
            for block in fresh:
                block.env.close()
            raise
        for block in closing:
            block.env.close()
        ends = removed + cut
        if ends:
            rewards = self._rewards
            r = np.asarray([rewards[old_index[i]] for i in ends], dtype=np.float64)
            agent.cut_trajectories(ends, r)
        for actor_id in removed:
            agent.remove_actor(actor_id)
        if added:
            agent.new_actors(len(added), added)
        for block, obs in zip(fresh, first_obs, strict=True):
            for k, actor in enumerate(block.ids.tolist()):
                obs_by_id[actor] = obs[k]
        for actor in cut:
            old_index.pop(actor)
        self._blocks = blocks + fresh
        self._rebuild(old_index, obs_by_id)
        log.info(
            "env driver resized: %d env copies (%d added, %d removed)",
            len(self.actor_ids),
            len(added),
            len(removed),
            extra={"env_copies": len(self.actor_ids)},
        )

    def _flush_ended(self) -> None:
        """Flag the episodes that ended in the last env step and are not flagged yet."""
        ended, self._ended = self._ended, None
        if ended is not None:
            idx, terminated, truncated = ended
            ids = self.actor_ids
            self.agent.flag_last_action(ids[idx], self._rewards[idx], terminated, truncated)

    def _start(self) -> None:
        """Reset the initial vector env (once)."""
        if self._obs is not None or not self._blocks:
            return
        with self._env_call("reset"):
            obs, _ = self._blocks[0].env.reset(seed=self.seed)
        self._resets += 1
        self._obs = np.asarray(obs)
        n = len(self.actor_ids)
        self._rewards = np.zeros(n, dtype=np.float64)
        self._ep_return = np.zeros(n, dtype=np.float64)
        self._ep_length = np.zeros(n, dtype=np.int64)

    def _next_seed(self) -> int | None:
        seed = None if self.seed is None else self.seed + 1_000_003 * self._resets
        self._resets += 1
        return seed

    def _rebuild(self, old_index: dict[int, int], obs_by_id: dict[int, npt.NDArray[Any]]) -> None:
        """Realign the per-copy state with the blocks (by actor id)."""
        ids = (
            np.concatenate([b.ids for b in self._blocks])
            if self._blocks
            else np.zeros(0, dtype=np.int64)
        )
        n = len(ids)
        rewards = np.zeros(n, dtype=np.float64)
        ep_return = np.zeros(n, dtype=np.float64)
        ep_length = np.zeros(n, dtype=np.int64)
        for k, actor in enumerate(ids.tolist()):
            j = old_index.get(actor)
            if j is not None:
                rewards[k] = self._rewards[j]
                ep_return[k] = self._ep_return[j]
                ep_length[k] = self._ep_length[j]
        self.actor_ids = ids
        self._rewards, self._ep_return, self._ep_length = rewards, ep_return, ep_length
        self._obs = np.stack([obs_by_id[a] for a in ids.tolist()]) if n else None

    # --------------------------------------------------------------------- run

    def run(
        self,
        *,
        max_steps: int | None = None,
        max_seconds: float | None = None,
        stop: threading.Event | None = None,
    ) -> DriverStats:
        """Run until `max_steps` env steps, `max_seconds`, or `stop` is set."""
        agent = self.agent
        dtype = agent.current_policy.obs_dtype
        floats = dtype.kind == "f"
        with self._requests_lock:
            self._start()
            self._running = True
        steps = episodes = 0
        env_steps = agent.metrics.env_steps
        episode_counter = agent.metrics.episodes
        request_action = agent.request_action
        held: int | None = None  # the version this step failed on, held (`Agent.hold`)
        start = time.perf_counter()
        deadline = None if max_seconds is None else start + max_seconds
        try:
            while True:
                if self._requests:
                    self._apply_requests()
                if stop is not None and stop.is_set():
                    break
                if max_steps is not None and steps >= max_steps:
                    break
                if deadline is not None and time.perf_counter() >= deadline:
                    break
                blocks = self._blocks
                obs = self._obs
                if obs is None or not blocks:
                    # No env copies in this slice (yet): wait for a resize or the stop.
                    self._wake.wait(0.1)
                    self._wake.clear()
                    continue
                ids = self.actor_ids
                n = len(ids)
                if obs.dtype != dtype:
                    if not np.can_cast(obs.dtype, dtype, "same_kind"):
                        raise errors.InvalidArgumentError.mismatch(
                            f"{self.source}: observations",
                            f"values the model's {dtype} input holds (same kind)",
                            f"{obs.dtype}, which a cast would wrap or truncate",
                        )
                    obs = obs.astype(dtype)
                if floats and not np.isfinite(obs).all():
                    self._nonfinite(ids, obs)
                # Episodes that ended in the last env step are flagged by this request
                # (`ended`): one agent call per step.
                # Each copy's reward for its previous action: 0 after a reset (and an
                # actor without a recorded step ignores it), the held one when a run
                # goes on where an earlier one stopped.
                try:
                    result = request_action(ids, obs, reward=self._rewards, ended=self._ended)
                except errors.ModelRunNoFallbackError as err:
                    # A request that fails records no step, and its episode ends are
                    # flagged: the step is asked for again once another version runs,
                    # unless it failed on one already.
                    self._ended = None
                    if held is not None and held != err.version:
                        raise errors.ModelRunError(
                            f"{err}; the same step failed on model version {held} before"
                            " it, so the step is to blame"
                        ) from err
                    if agent.hold(err.version, err):
                        held = err.version
                        self._await_model(err.version, stop, deadline)
                    continue
                held = None
                self._ended = None
                # Recorded, not stepped yet: an env that raises now leaves steps whose
                # actions never ran (`end_episodes` drops them).
                self._pending = True
                with self._env_call("step"):
                    if len(blocks) == 1:
                        obs, reward, terminated, truncated, _ = blocks[0].env.step(result.actions)
                    else:
                        obs, reward, terminated, truncated = self._step_blocks(result.actions)
                    rewards = self._checked_rewards(reward, n)
                self._pending = False
                self._obs = obs
                self._rewards = rewards
                if not np.isfinite(rewards).all():
                    self._nonfinite_reward(ids, rewards)
                ep_return = self._ep_return
                ep_return += rewards
                self._ep_length += 1
                steps += n
                env_steps.inc(n)
                done = np.logical_or(terminated, truncated)
                if done.any():
                    idx = np.flatnonzero(done)
                    self._ended = (
                        idx,
                        np.asarray(terminated[idx], dtype=np.bool_),
                        np.asarray(truncated[idx], dtype=np.bool_),
                    )
                    self._returns.extend(ep_return[idx].tolist())
                    self._lengths.extend(self._ep_length[idx].tolist())
                    ep_return[idx] = 0.0
                    self._ep_length[idx] = 0
                    episodes += len(idx)
                    episode_counter.inc(len(idx))
        finally:
            # Episodes that ended in the last step are flagged now (not cut at drain).
            self._flush_ended()
            with self._requests_lock:
                self._running = False
            # Requests that raced with the stop are applied here, in this thread.
            self._apply_requests()
        seconds = time.perf_counter() - start
        return DriverStats(
            steps=steps,
            episodes=episodes,
            mean_return=float(np.mean(self._returns)) if self._returns else None,
            mean_length=float(np.mean(self._lengths)) if self._lengths else None,
            seconds=seconds,
        )

    def _await_model(
        self, version: int, stop: threading.Event | None, deadline: float | None
    ) -> None:
        """Wait while the agent runs `version`, held as failed on this step's request
        (the watchers look for another), until a resize, the stop or the deadline."""
        while (
            self.agent.stalled == version
            and not self._requests
            and not (stop is not None and stop.is_set())
            and not (deadline is not None and time.perf_counter() >= deadline)
        ):
            self._wake.wait(_STALL_POLL_SECONDS)
            self._wake.clear()

    @contextlib.contextmanager
    def _env_call(self, what: str) -> Iterator[None]:
        """Time an env call (for the liveness probe); what it raises names the source."""
        self.env_call_since = time.monotonic()
        try:
            yield
        except errors.EnvironmentFailedError:
            raise
        except Exception as err:
            said = (
                str(err) if isinstance(err, errors.RelayRLError) else f"{type(err).__name__}: {err}"
            )
            log.error("%s: %s raised", self.source, what, exc_info=err)
            raise errors.EnvironmentFailedError(f"{self.source}: {what}: {said}") from err
        finally:
            self.env_call_since = None

    @staticmethod
    def _checked_rewards(reward: Any, n: int) -> npt.NDArray[np.float64]:
        """The step's rewards as float64, one per env copy."""
        try:
            rewards = np.asarray(reward, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise errors.InvalidArgumentError.mismatch(
                "reward", "numbers, one per env copy", f"{type(reward).__name__} ({err})"
            ) from None
        if rewards.shape != (n,):
            raise errors.InvalidArgumentError.mismatch(
                "reward.shape", f"[{n}] (one per env copy)", list(rewards.shape)
            )
        return rewards

    def _nonfinite_reward(self, ids: npt.NDArray[np.int64], rewards: npt.NDArray[Any]) -> None:
        """Rewards that are NaN or infinite (recorded as given)."""
        self._count_nonfinite(
            "rewards",
            ids,
            ~np.isfinite(rewards),
            self.agent.metrics.nonfinite_rewards,
            f"{self.source}: rewards NaN or infinite",
        )

    def _nonfinite(self, ids: npt.NDArray[np.int64], obs: npt.NDArray[Any]) -> None:
        """Observations holding NaN or infinity (an env's bug, acted on as given: a
        discrete policy then picks its first action)."""
        self._count_nonfinite(
            "observations",
            ids,
            ~np.isfinite(obs.reshape(len(obs), -1)).all(axis=1),
            self.agent.metrics.nonfinite_observations,
            "environment: observations with NaN or infinity",
        )

    def _count_nonfinite(
        self,
        what: str,
        ids: npt.NDArray[np.int64],
        bad: npt.NDArray[np.bool_],
        counter: Any,
        said: str,
    ) -> None:
        """Count the rows `bad` marks, and say which actors had them, at the first and
        every 1000th of `what`."""
        count = int(bad.sum())
        before = self._nonfinite_seen.get(what, 0)
        seen = self._nonfinite_seen[what] = before + count
        counter.inc(count)
        if before == 0 or seen // 1000 > before // 1000:
            log.warning("%s for actors %s (%d so far)", said, ids[bad].tolist()[:10], seen)

    def _step_blocks(
        self, actions: npt.NDArray[Any]
    ) -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any]]:
        parts = []
        start = 0
        for block in self._blocks:
            end = start + len(block.ids)
            parts.append(block.env.step(actions[start:end])[:4])
            start = end
        return (
            np.concatenate([p[0] for p in parts]),
            np.concatenate([np.asarray(p[1], dtype=np.float64) for p in parts]),
            np.concatenate([np.asarray(p[2], dtype=np.bool_) for p in parts]),
            np.concatenate([np.asarray(p[3], dtype=np.bool_) for p in parts]),
        )

    def end_episodes(self) -> int:
        """Cut every in-progress trajectory, with the reward its last action got.

        For a driver stopping for good: the agent's own flush at shutdown would record
        0 there (it never got that reward; this driver holds it). Returns trajectories
        finished.
        """
        if self._obs is None or not len(self.actor_ids):
            return 0
        if self._pending:  # the env raised in its step: those actions never ran
            self.agent.drop_last_steps(self.actor_ids)
            self._pending = False
        return self.agent.cut_trajectories(self.actor_ids, self._rewards)

    def close(self) -> None:
        """Close the environments."""
        for block in self._blocks:
            block.env.close()


def check_spaces(env: VecEnv, layout: trajectory.Layout, source: str) -> None:
    """Refuse an environment whose spaces the model does not fit (`source` names the
    environment's field): an action the env cannot take would otherwise fail only when
    sampled, and an observation of another shape at the first step.

    Only gymnasium's Box and Discrete spaces are compared (read as their `shape` and
    `n`); an env without spaces, or with others, is taken as it is.
    """
    act_space, obs_space = _spaces(env)
    if layout.discrete:
        model = f"one with {layout.action_size} discrete actions"
    else:
        model = f"one with continuous actions {layout.action_size} wide"
    if act_space is not None:
        shape = getattr(act_space, "shape", None)
        n = getattr(act_space, "n", None)
        if type(act_space).__name__ == "Discrete" and n is not None:
            if not layout.discrete or layout.action_size != int(n):
                raise errors.InvalidArgumentError(
                    f"{source}: its action space is {act_space}: expected a model with "
                    f"{int(n)} discrete actions, got {model}"
                )
            if int(getattr(act_space, "start", 0)) != 0:
                raise errors.InvalidArgumentError(
                    f"{source}: its action space is {act_space}: expected actions "
                    f"numbered from 0 (the model's are 0 to {layout.action_size - 1})"
                )
        elif type(act_space).__name__ == "Box" and isinstance(shape, tuple):
            width = math.prod(shape)
            if layout.discrete or layout.action_size != width:
                raise errors.InvalidArgumentError(
                    f"{source}: its action space is {act_space}: expected a model with "
                    f"continuous actions {width} wide, got {model}"
                )
    if obs_space is not None and type(obs_space).__name__ == "Box":
        shape = getattr(obs_space, "shape", None)
        if isinstance(shape, tuple) and tuple(shape) != tuple(layout.obs_shape):
            raise errors.InvalidArgumentError(
                f"{source}: its observations are {list(shape)}: expected "
                f"{list(layout.obs_shape)}, the model's input"
            )


def _spaces(env: Any) -> tuple[Any, Any]:
    """One copy's action and observation spaces, where the env says them."""
    if isinstance(env, ScalarEnvs):
        first = env.envs[0]
        return getattr(first, "action_space", None), getattr(first, "observation_space", None)
    return (
        getattr(env, "single_action_space", None),
        getattr(env, "single_observation_space", None),
    )


class ScalarEnvs:
    """Batches scalar gymnasium-style envs (reset/step per copy) into a `VecEnv`."""

    def __init__(self, envs: list[Any]) -> None:
        if not envs:
            raise errors.InvalidArgumentError.mismatch("envs", "at least one env", 0)
        self.envs = envs
        self.num_envs = len(envs)

    def reset(self, *, seed: int | None = None) -> tuple[npt.NDArray[Any], Any]:
        obs = [e.reset(seed=None if seed is None else seed + i)[0] for i, e in enumerate(self.envs)]
        return np.stack([np.asarray(o) for o in obs]), {}

    def step(
        self, actions: npt.NDArray[Any]
    ) -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any], Any]:
        obs, rewards, terms, truncs = [], [], [], []
        for env, action in zip(self.envs, actions, strict=True):
            a = action.item() if np.ndim(action) == 0 else action
            o, r, term, trunc, _ = env.step(a)
            if term or trunc:
                o, _ = env.reset()
            obs.append(np.asarray(o))
            try:
                rewards.append(float(r))
            except (TypeError, ValueError):
                raise errors.InvalidArgumentError.mismatch(
                    "reward", "a number", f"{type(r).__name__} {r!r:.80}"
                ) from None
            terms.append(bool(term))
            truncs.append(bool(trunc))
        return (
            np.stack(obs),
            np.asarray(rewards, dtype=np.float64),
            np.asarray(terms, dtype=np.bool_),
            np.asarray(truncs, dtype=np.bool_),
            {},
        )

    def close(self) -> None:
        for env in self.envs:
            close = getattr(env, "close", None)
            if close is not None:
                close()
