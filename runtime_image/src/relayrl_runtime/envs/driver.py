"""The environment loop: one batched request per step for all env copies.

Called by the process (`app`) in a worker thread, by the demo and the benchmark. Each
env copy is one actor of the agent (ids given by the caller). Per step: one
`request_action` for all copies (carrying the previous step's rewards), one vector env
step, and one `flag_last_action` for the copies whose episode ended. Envs must autoreset
in the same step (the observation after a done step is the next episode's first).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from relayrl_runtime import agent as agent_mod
from relayrl_runtime import errors

log = logging.getLogger(__name__)


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


class EnvDriver:
    """Steps a `VecEnv` through an agent until told to stop."""

    def __init__(
        self,
        agent: agent_mod.Agent,
        env: VecEnv,
        actor_ids: npt.NDArray[np.int64] | list[int],
        *,
        seed: int | None = None,
    ) -> None:
        ids = np.asarray(actor_ids, dtype=np.int64)
        if ids.shape != (env.num_envs,):
            raise errors.InvalidArgumentError.mismatch(
                "actor_ids", f"one id per env copy ({env.num_envs})", len(ids)
            )
        if not agent.has_actors(ids):
            missing = [i for i in ids.tolist() if not agent.has_actors([i])]
            raise errors.UnknownActorError(missing)
        self.agent = agent
        self.env = env
        self.actor_ids = ids
        self.seed = seed
        self._returns: collections.deque[float] = collections.deque(maxlen=1000)
        self._lengths: collections.deque[int] = collections.deque(maxlen=1000)

    def run(
        self,
        *,
        max_steps: int | None = None,
        max_seconds: float | None = None,
        stop: threading.Event | None = None,
    ) -> DriverStats:
        """Run until `max_steps` env steps, `max_seconds`, or `stop` is set."""
        agent, env, ids = self.agent, self.env, self.actor_ids
        n = env.num_envs
        dtype = agent.current_policy.obs_dtype
        obs, _ = env.reset(seed=self.seed)
        rewards: npt.NDArray[np.float64] | float = 0.0
        ep_return = np.zeros(n, dtype=np.float64)
        ep_length = np.zeros(n, dtype=np.int64)
        steps = episodes = 0
        env_steps = agent.metrics.env_steps
        episode_counter = agent.metrics.episodes
        start = time.perf_counter()
        deadline = None if max_seconds is None else start + max_seconds
        while True:
            if stop is not None and stop.is_set():
                break
            if max_steps is not None and steps >= max_steps:
                break
            if deadline is not None and time.perf_counter() >= deadline:
                break
            if obs.dtype != dtype:
                obs = obs.astype(dtype)
            result = agent.request_action(ids, obs, reward=rewards)
            obs, reward, terminated, truncated, _ = env.step(result.actions)
            rewards = np.asarray(reward, dtype=np.float64)
            ep_return += rewards
            ep_length += 1
            steps += n
            env_steps.inc(n)
            done = np.logical_or(terminated, truncated)
            if done.any():
                idx = np.flatnonzero(done)
                agent.flag_last_action(ids[idx], rewards[idx], terminated[idx], truncated[idx])
                self._returns.extend(ep_return[idx].tolist())
                self._lengths.extend(ep_length[idx].tolist())
                ep_return[idx] = 0.0
                ep_length[idx] = 0
                episodes += len(idx)
                episode_counter.inc(len(idx))
        seconds = time.perf_counter() - start
        return DriverStats(
            steps=steps,
            episodes=episodes,
            mean_return=float(np.mean(self._returns)) if self._returns else None,
            mean_length=float(np.mean(self._lengths)) if self._lengths else None,
            seconds=seconds,
        )

    def close(self) -> None:
        """Close the environments."""
        self.env.close()


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
            rewards.append(float(r))
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
