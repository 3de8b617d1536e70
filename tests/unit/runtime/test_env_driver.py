"""What the env driver records when an env misbehaves: a step that raises, a time
limit reached on a terminal step, observations of another dtype, a reset that fails
in a resize, a vector env that resets on the next step (no servers)."""

from __future__ import annotations

import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from relayrl_runtime import agent as agent_mod
from relayrl_runtime import errors, trajectory
from relayrl_runtime.envs import driver, gym, python
from relayrl_runtime.inference import model
from relayrl_runtime.sinks import local
from support import badmodels


def _table(sink: local.LocalFileSink) -> pa.Table:
    table = pa.concat_tables([pq.read_table(f) for f in sink.files])
    return table.sort_by(
        [("actor_id", "ascending"), ("episode_id", "ascending"), ("step", "ascending")]
    )


class Counting:
    """A vector env of `n` copies: obs count the steps, reward is 10 x the step, an
    episode ends after `length` steps (terminated, and truncated too when
    `limit_too`: a time limit reached on the terminal step), and the step numbered
    `raise_at` raises."""

    def __init__(
        self, n: int, length: int = 5, raise_at: int | None = None, limit_too: bool = False
    ) -> None:
        self.num_envs = n
        self.length = length
        self.raise_at = raise_at
        self.limit_too = limit_too
        self.steps = 0
        self.t = np.zeros(n, dtype=np.int64)
        self.dtype: Any = np.float32

    def _obs(self) -> np.ndarray:
        return np.repeat(self.t[:, None], 4, axis=1).astype(self.dtype)

    def reset(self, seed: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        self.t[:] = 0
        return self._obs(), {}

    def step(self, actions: Any) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
        self.steps += 1
        if self.steps == self.raise_at:
            raise RuntimeError("the simulator crashed")
        self.t += 1
        reward = np.full(self.num_envs, 10.0 * self.steps)
        done = self.t >= self.length
        truncated = done.copy() if self.limit_too else np.zeros(self.num_envs, bool)
        self.t[done] = 0  # same-step autoreset
        return self._obs(), reward, done.copy(), truncated, {}

    def close(self) -> None:
        pass


def test_a_step_the_env_raised_in_is_not_recorded(models: dict[str, Path], tmp_path: Path) -> None:
    """Its action never ran: no row for it, and the row before keeps its own reward."""
    sink = local.LocalFileSink(tmp_path / "out")
    a = agent_mod.Agent(models["onnx"], actor_count=2, sink=sink)
    env = Counting(2, length=100, raise_at=4)
    drv = driver.EnvDriver(a, env, [0, 1], seed=0)
    with pytest.raises(
        errors.EnvironmentFailedError,
        match="environment: step: RuntimeError: the simulator crashed",
    ):
        drv.run(max_steps=100)
    drv.end_episodes()  # what the runtime does on its way out
    a.shutdown()
    table = _table(sink)
    rows = table.filter(pa.compute.equal(table["actor_id"], 0)).to_pylist()
    # Steps 1-3 ran (rewards 10, 20, 30); the fourth request's action never did.
    assert [r["reward"] for r in rows] == [10.0, 20.0, 30.0]
    assert rows[-1]["cut"]
    assert table.num_rows == 2 * 3


def test_a_model_that_fails_with_none_before_it_holds_the_steps_until_another_loads(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """The agent started on version 2, which fails once an observation passes 100: the
    driver waits on that step (no error, nothing recorded) until version 1 is loaded,
    then goes on from it. Every step is recorded once, with its own reward."""
    sink = local.LocalFileSink(tmp_path / "out")
    a = agent_mod.Agent(models["failing_v2"], actor_count=2, sink=sink)
    env = Counting(2, length=150)
    drv = driver.EnvDriver(a, env, [0, 1], seed=0)
    stats: list[driver.DriverStats] = []
    runner = threading.Thread(target=lambda: stats.append(drv.run(max_steps=2 * 300)))
    runner.start()
    deadline = time.monotonic() + 30
    while a.stalled is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert a.stalled == 2
    time.sleep(0.3)
    assert runner.is_alive()
    assert env.steps == 101  # observations 0-100 answered; 101 was refused
    a.reload_model(models["onnx"])
    runner.join(30)
    assert [s.steps for s in stats] == [600]
    drv.end_episodes()
    a.shutdown()
    table = _table(sink)
    assert table.num_rows == 600
    for actor in (0, 1):
        rows = table.filter(pa.compute.equal(table["actor_id"], actor)).to_pylist()
        assert [r["reward"] for r in rows] == [10.0 * k for k in range(1, 301)]
        assert [r["policy_version"] for r in rows] == [2] * 101 + [1] * 199
        assert [r["obs"][0] for r in rows] == [float(k % 150) for k in range(300)]
        assert sum(r["terminated"] for r in rows) == 2


def test_a_held_step_that_fails_on_the_next_version_too_is_to_blame(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """Version 2 failed on the step (held); version 1, loaded next, fails on it too: the
    step is to blame, and the driver raises (the process exits 2). Waiting for a model
    heeds the run's time limit."""
    failing_v1 = tmp_path / "failing_v1"
    badmodels.export_failing(failing_v1, version=1, max_abs=100.0)
    a = agent_mod.Agent(models["failing_v2"], actor_count=2)
    drv = driver.EnvDriver(a, Counting(2, length=150), [0, 1], seed=0)
    started = time.monotonic()
    assert drv.run(max_steps=1000, max_seconds=0.5).steps == 2 * 101
    assert time.monotonic() - started < 5
    assert a.stalled == 2
    failed: list[BaseException] = []

    def run() -> None:
        try:
            drv.run(max_steps=1000)
        except BaseException as err:
            failed.append(err)

    runner = threading.Thread(target=run)
    runner.start()
    time.sleep(0.3)
    assert runner.is_alive()  # held on version 2
    a.reload_model(failing_v1)
    runner.join(30)
    [err] = failed
    assert isinstance(err, errors.ModelRunError)
    assert "the same step failed on model version 2 before it, so the step is to blame" in str(err)
    assert a.stalled is None
    a.shutdown()


def test_a_time_limit_on_a_terminal_step_is_terminated_not_truncated(
    models: dict[str, Path], tmp_path: Path
) -> None:
    sink = local.LocalFileSink(tmp_path / "out")
    a = agent_mod.Agent(models["onnx"], actor_count=2, sink=sink)
    drv = driver.EnvDriver(a, Counting(2, length=5, limit_too=True), [0, 1], seed=0)
    drv.run(max_steps=2 * 12)
    drv.end_episodes()
    a.shutdown()
    rows = _table(sink).to_pylist()
    ends = [r for r in rows if r["terminated"]]
    assert ends
    assert not any(r["truncated"] for r in ends)
    # The same through the API: a remote client ending with both flags.
    sink2 = local.LocalFileSink(tmp_path / "api")
    b = agent_mod.Agent(models["onnx"], actor_count=1, sink=sink2)
    b.request_action([0], np.zeros((1, 4), np.float32))
    b.flag_last_action([0], 1.0, terminated=True, truncated=True)
    b.shutdown()
    [last] = _table(sink2).to_pylist()
    assert (last["terminated"], last["truncated"]) == (True, False)


@pytest.mark.parametrize(
    ("dtype", "taken"), [(np.float64, True), (np.int64, True), (np.complex128, False)]
)
def test_observations_of_another_dtype_are_cast_only_within_their_kind(
    models: dict[str, Path], dtype: Any, taken: bool
) -> None:
    a = agent_mod.Agent(models["onnx"], actor_count=1)
    env = Counting(1)
    env.dtype = dtype
    drv = driver.EnvDriver(a, env, [0], seed=0)
    if taken:
        assert drv.run(max_steps=3).steps == 3
    else:
        with pytest.raises(errors.InvalidArgumentError, match=r"^environment: observations"):
            drv.run(max_steps=3)
    a.shutdown()


def test_a_resize_whose_new_env_fails_at_reset_changes_nothing(
    models: dict[str, Path], tmp_path: Path
) -> None:
    sink = local.LocalFileSink(tmp_path / "out")
    a = agent_mod.Agent(models["onnx"], actor_count=2, actor_ids=[10, 11], sink=sink)
    failing = {"on": False}

    class FailsAtReset(Counting):
        def reset(self, seed: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
            if failing["on"]:
                raise RuntimeError("no licence for a new simulator")
            return super().reset(seed)

    def make(count: int) -> driver.VecEnv:
        return FailsAtReset(count)

    drv = driver.EnvDriver(a, make(2), [10, 11], seed=0, make_env=make)
    first = drv.run(max_steps=10)
    failing["on"] = True
    for wanted in ([10], [10, 11, 12]):
        with pytest.raises(errors.EnvironmentFailedError, match="licence"):
            drv.resize(wanted)
        assert a.get_actor_ids() == [10, 11]
        assert drv.actor_ids.tolist() == [10, 11]
    second = drv.run(max_steps=10)  # steps on with the actors it had
    failing["on"] = False
    drv.resize([10])
    assert a.get_actor_ids() == [10]
    third = drv.run(max_steps=5)
    drv.end_episodes()
    drv.close()
    a.shutdown()
    assert _table(sink).num_rows == first.steps + second.steps + third.steps


def test_a_vector_env_that_resets_on_the_next_step_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """It says so by attribute only (its metadata is empty): still refused."""

    def make_env(num_envs: int = 1) -> Any:
        env = gymnasium.vector.SyncVectorEnv(
            [lambda: gymnasium.make("CartPole-v1")] * num_envs,
            autoreset_mode=gymnasium.vector.AutoresetMode.NEXT_STEP,
        )
        env.metadata = {}
        return env

    module = types.ModuleType("next_step_envs")
    module.make = make_env  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "next_step_envs", module)
    with pytest.raises(errors.InvalidArgumentError, match="autoreset_mode"):
        python.make("next_step_envs:make", 2)
    assert gym.make("CartPole-v1", 2).num_envs == 2  # the driver's own are same-step


def test_observations_with_nan_are_counted_and_said(
    models: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    a = agent_mod.Agent(models["onnx"], actor_count=2, actor_ids=[7, 8])

    class OneNan(Counting):
        def _obs(self) -> np.ndarray:
            obs = super()._obs()
            if self.steps == 2:
                obs[1, 2] = np.nan
            return obs

    drv = driver.EnvDriver(a, OneNan(2, length=100), [7, 8], seed=0)
    drv.run(max_steps=2 * 5)
    assert a.metrics.nonfinite_observations._value.get() == 1
    assert "NaN or infinity for actors [8] (1 so far)" in caplog.text
    a.shutdown()


def _layout(kind: str, size: int, obs: tuple[int, ...] = (4,)) -> trajectory.Layout:
    return trajectory.Layout(
        agent="a",
        obs_shape=obs,
        obs_dtype="float32",
        action_kind=model.ActionKind(kind),
        action_size=size,
    )


@pytest.mark.parametrize(
    ("env_id", "layout", "message"),
    [
        ("CartPole-v1", _layout("discrete", 2), None),
        ("Pendulum-v1", _layout("continuous", 1, (3,)), None),
        (
            "CartPole-v1",
            _layout("discrete", 3),
            r"its action space is Discrete\(2\): expected a model with 2 discrete actions, "
            r"got one with 3 discrete actions",
        ),
        (
            "CartPole-v1",
            _layout("continuous", 1),
            r"expected a model with 2 discrete actions, got one with continuous actions 1 wide",
        ),
        (
            "Pendulum-v1",
            _layout("discrete", 1, (3,)),
            r"expected a model with continuous actions 1 wide, got one with 1 discrete",
        ),
        (
            "CartPole-v1",
            _layout("discrete", 2, (6,)),
            r"its observations are \[4\]: expected \[6\], the model's input",
        ),
    ],
)
def test_an_env_the_model_does_not_fit_is_refused_before_a_step(
    env_id: str, layout: trajectory.Layout, message: str | None
) -> None:
    """An action the env cannot take used to fail in `env.step` when first sampled."""
    for env in (gym.make(env_id, 2), gym.make_scalar(env_id, 2)):
        try:
            if message is None:
                driver.check_spaces(env, layout, "environment.gymnasium")
            else:
                with pytest.raises(errors.InvalidArgumentError, match=message):
                    driver.check_spaces(env, layout, "environment.gymnasium")
        finally:
            env.close()


def test_discrete_actions_must_be_numbered_from_zero() -> None:
    env = driver.ScalarEnvs(
        [types.SimpleNamespace(action_space=gymnasium.spaces.Discrete(2, start=1))]
    )
    with pytest.raises(errors.InvalidArgumentError, match=r"expected actions numbered from 0"):
        driver.check_spaces(env, _layout("discrete", 2), "environment.python 'm:f'")
    # An env without spaces is taken as it is.
    driver.check_spaces(driver.ScalarEnvs([object()]), _layout("discrete", 5), "x")


class Rewarding(Counting):
    """Counting, with the rewards of each step given by `reward(step)`."""

    def __init__(self, n: int, reward: Any) -> None:
        super().__init__(n, length=1000)
        self.reward = reward

    def step(self, actions: Any) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
        obs, _, done, truncated, info = super().step(actions)
        return obs, self.reward(self.steps), done, truncated, info


def test_rewards_nan_or_infinite_are_counted_and_said(
    models: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    a = agent_mod.Agent(models["onnx"], actor_count=2)
    env = Rewarding(2, lambda step: np.array([np.nan if step % 2 else 1.0, np.inf]))
    drv = driver.EnvDriver(a, env, [0, 1], seed=0, source="environment.python 'sim:make'")
    drv.run(max_steps=20)
    counted = a.metrics.registry.get_sample_value("relayrl_runtime_nonfinite_rewards_total")
    assert counted == 15  # 10 steps: 5 NaN and 10 infinite
    assert "environment.python 'sim:make': rewards NaN or infinite for actors [0, 1]" in caplog.text
    a.shutdown()


@pytest.mark.parametrize(
    ("reward", "said"),
    [
        (lambda step: "x", r"reward: expected numbers, one per env copy, got str"),
        (
            lambda step: np.zeros(3),
            r"reward\.shape: expected \[2\] \(one per env copy\), got \[3\]",
        ),
    ],
)
def test_rewards_that_cannot_be_recorded_name_the_source(
    models: dict[str, Path], reward: Any, said: str
) -> None:
    a = agent_mod.Agent(models["onnx"], actor_count=2)
    drv = driver.EnvDriver(
        a, Rewarding(2, reward), [0, 1], seed=0, source="environment.python 'sim:make'"
    )
    with pytest.raises(
        errors.EnvironmentFailedError, match=rf"^environment.python 'sim:make': step: {said}"
    ):
        drv.run(max_steps=20)
    a.shutdown()


def test_an_env_call_in_progress_is_timed(models: dict[str, Path]) -> None:
    """What the liveness probe looks at: since when a step (or reset) has been running."""
    release = threading.Event()

    class Hangs(Counting):
        def step(self, actions: Any) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
            if self.steps == 3:
                release.wait(30)
            return super().step(actions)

    a = agent_mod.Agent(models["onnx"], actor_count=2)
    drv = driver.EnvDriver(a, Hangs(2, length=100), [0, 1], seed=0)
    stop = threading.Event()
    runner = threading.Thread(target=lambda: drv.run(stop=stop))
    runner.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            since = drv.env_call_since
            if since is not None and time.monotonic() - since > 0.5:
                break
            time.sleep(0.05)
        assert drv.env_call_since is not None
        assert time.monotonic() - drv.env_call_since > 0.5
    finally:
        stop.set()
        release.set()
        runner.join(30)
    assert drv.env_call_since is None
    a.shutdown()
