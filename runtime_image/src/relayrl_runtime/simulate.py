"""A remote simulator: gymnasium environments stepped through a runtime's ZMQ endpoint.

What `relayrl-runtime simulate` runs, and a worked example of the client library
(:mod:`relayrl_runtime.transport.client`): the environments live in this process,
the policy in the runtime. It creates one remote actor per environment copy, asks
for their actions in one request per step, reports rewards with the next request and
episode ends with ``flag_last_action``, and removes its actors when it stops
(``--steps`` reached, ``--seconds`` passed, or SIGTERM/SIGINT).

A runtime that is not up yet (a simulator Deployment started before the actor pods)
is waited for: connecting is retried with a growing delay up to ``connect_timeout``.
So is one that goes away mid-run (an actor pod restarted, rolled or drained): a
request with no reply, or one for actors the runtime no longer has, makes a new
client with new actors (the same wait) and starts every episode again.
Progress goes to stdout as one JSON line every ``report_seconds``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
import threading
import time
from typing import Any, TextIO

import numpy as np

from relayrl_runtime import errors
from relayrl_runtime.transport import client


@dataclasses.dataclass
class Summary:
    """What one simulator did."""

    steps: int = 0
    episodes: int = 0
    total_return: float = 0.0  # of the finished episodes
    versions: set[int] = dataclasses.field(default_factory=set)
    actor_ids: list[int] = dataclasses.field(default_factory=list)
    reconnects: int = 0

    @property
    def mean_return(self) -> float:
        """Mean return of the finished episodes (0 before the first ends)."""
        return self.total_return / max(1, self.episodes)

    def line(self, event: str, error: str | None = None) -> str:
        """One JSON line (with `error`, what caused the event)."""
        return json.dumps(
            {
                "event": event,
                **({} if error is None else {"error": error}),
                "steps": self.steps,
                "episodes": self.episodes,
                "mean_return": self.mean_return,
                "versions": sorted(self.versions),
                "actor_ids": self.actor_ids,
                "reconnects": self.reconnects,
            },
            sort_keys=True,
        )


def _connect(
    address: str, envs: int, connect_timeout: float, stop: threading.Event
) -> tuple[client.RemoteClient, list[int]] | None:
    """A client with `envs` actors, retrying while the runtime is not there yet or has
    no room for them (another client's actors not yet gone); None once `stop` is set."""
    deadline = time.monotonic() + connect_timeout
    delay = 0.5
    while not stop.is_set():
        remote = client.RemoteClient(address, timeout=5.0)
        try:
            return remote, remote.new_actors(envs)
        except (TimeoutError, errors.RemoteError) as err:
            remote.close()
            if isinstance(err, errors.RemoteError) and err.kind != "invalid_argument":
                raise
            if time.monotonic() + delay > deadline:
                raise TimeoutError(
                    f"no runtime took {envs} actors at {address} within"
                    f" {connect_timeout:.0f} s (last: {err})"
                ) from None
            stop.wait(delay)
            delay = min(delay * 2, 5.0)
    return None


def _let_go(remote: client.RemoteClient, ids: list[int]) -> None:
    """Remove the actors, if the runtime still has them (it was only slow), so that
    they do not count against its bounds until the idle timeout; close the client."""
    remote.timeout_ms = 1000
    with contextlib.suppress(Exception):
        remote.remove_actors(ids)
    remote.close()


def _runtime_gone(err: Exception) -> bool:
    """Whether a failed request means the runtime's actors are gone (or unreachable)."""
    if isinstance(err, errors.RemoteError):
        return err.kind == errors.UnknownActorError.kind
    return isinstance(err, TimeoutError)


def run(
    address: str,
    env_id: str = "CartPole-v1",
    envs: int = 4,
    steps: int | None = None,
    seconds: float | None = None,
    seed: int = 0,
    connect_timeout: float = 300.0,
    report_seconds: float = 10.0,
    stop: threading.Event | None = None,
    out: TextIO = sys.stdout,
) -> Summary:
    """Step `envs` copies of `env_id` through the runtime at `address` until told to stop.

    `steps` counts env steps over all copies; None means no bound (then `seconds` or
    `stop` ends the run).
    """
    import gymnasium

    if envs < 1:
        raise ValueError(f"envs: expected at least 1, got {envs}")
    stop = stop or threading.Event()
    try:
        copies = [gymnasium.make(env_id) for _ in range(envs)]
    except gymnasium.error.Error as err:
        raise ValueError(f"env: {env_id!r}: {err}") from err
    obs = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(copies)])
    connected = _connect(address, envs, connect_timeout, stop)
    if connected is None:  # stopped before the runtime answered
        for env in copies:
            env.close()
        print(Summary().line("done"), file=out, flush=True)
        return Summary()
    remote, ids = connected
    summary = Summary(actor_ids=ids)
    rewards = np.zeros(envs)
    returns = np.zeros(envs)
    terminated = np.zeros(envs, dtype=np.bool_)
    truncated = np.zeros(envs, dtype=np.bool_)
    start = last_report = time.monotonic()
    try:
        while not stop.is_set():
            if steps is not None and summary.steps >= steps:
                break
            now = time.monotonic()
            if seconds is not None and now - start >= seconds:
                break
            try:
                result = remote.request_action(
                    ids, obs.astype(np.float32, copy=False), reward=rewards
                )
            except (TimeoutError, errors.RemoteError) as err:
                if not _runtime_gone(err):
                    raise
                # The runtime restarted or is away: its actors (and their episodes)
                # are gone. New ones, from the start of new episodes.
                print(summary.line("reconnecting", str(err)), file=out, flush=True)
                _let_go(remote, ids)
                connected = _connect(address, envs, connect_timeout, stop)
                if connected is None:
                    ids = []
                    break
                remote, ids = connected
                summary.actor_ids = ids
                summary.reconnects += 1
                print(summary.line("reconnected"), file=out, flush=True)
                obs = np.stack([env.reset()[0] for env in copies])
                rewards[:] = 0.0
                returns[:] = 0.0
                continue
            summary.versions.add(result.version)
            for i, env in enumerate(copies):
                action = result.actions[i]  # a vector for continuous actions
                obs[i], rewards[i], terminated[i], truncated[i], _ = env.step(
                    action.item() if action.ndim == 0 else action
                )
            returns += rewards
            ended = terminated | truncated
            if ended.any():
                # One request ends every episode that ended on this step.
                done = np.flatnonzero(ended)
                try:
                    remote.flag_last_action(
                        np.asarray(ids)[done],
                        reward=rewards[done],
                        terminated=terminated[done],
                        truncated=truncated[done],
                    )
                except (TimeoutError, errors.RemoteError) as err:
                    # The episode is over here either way; the next request finds out
                    # whether the runtime is gone.
                    if not _runtime_gone(err):
                        raise
                summary.episodes += len(done)
                summary.total_return += float(returns[done].sum())
                returns[done] = 0.0
                rewards[done] = 0.0
                for j in done.tolist():
                    obs[j] = copies[j].reset()[0]
            summary.steps += envs
            if now - last_report >= report_seconds:
                last_report = now
                print(summary.line("progress"), file=out, flush=True)
    finally:
        # Whatever ended the run, its actors go now (not at the idle timeout).
        with contextlib.suppress(Exception):
            remote.remove_actors(ids)
        remote.close()
        for env in copies:
            env.close()
    print(summary.line("done"), file=out, flush=True)
    return summary


def main(args: Any) -> int:
    """`relayrl-runtime simulate`: run until done or signalled."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    run(
        args.address,
        env_id=args.env,
        envs=args.envs,
        steps=args.steps,
        seconds=args.seconds,
        seed=args.seed,
        connect_timeout=args.connect_timeout,
        report_seconds=args.report_seconds,
        stop=stop,
    )
    return 0
