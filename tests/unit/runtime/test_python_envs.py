"""Custom environments from an entry point: a vector env must reset in the same step."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import pytest
from gymnasium.vector import AutoresetMode

from relayrl_runtime import errors
from relayrl_runtime.envs import python

ENTRY = f"{__name__}:cartpoles"


def cartpoles(num_envs: int = 1, autoreset: str = "SAME_STEP") -> Any:
    """A vector of CartPoles with the autoreset mode asked for."""
    mode = AutoresetMode[autoreset]
    return gym.make_vec(
        "CartPole-v1",
        num_envs=num_envs,
        vectorization_mode="sync",
        vector_kwargs={"autoreset_mode": mode},
    )


def test_a_same_step_vector_env_is_taken() -> None:
    env = python.make(ENTRY, 3)
    assert env.num_envs == 3
    env.close()


@pytest.mark.parametrize("mode", ["NEXT_STEP", "DISABLED"])
def test_a_vector_env_resetting_otherwise_is_refused_by_name(mode: str) -> None:
    # gymnasium's default is next-step autoreset: every episode's first recorded step
    # would be the reset, its action ignored and its reward 0.
    with pytest.raises(errors.InvalidArgumentError) as err:
        python.make(ENTRY, 2, {"autoreset": mode})
    assert str(err.value).startswith(
        "environment.python: vector env autoreset_mode: expected same-step autoreset"
    )
    assert str(err.value).endswith(f"got {AutoresetMode[mode].value}")
