"""The built-in gymnasium driver's environments: vector envs from a registered id.

Used by the process for `environment.gymnasium` and by the demo and benchmark. Copies
step in-process (`sync`) or in subprocesses (`async`); either way with same-step
autoreset, which `driver.EnvDriver` relies on. gymnasium is an extra, imported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from relayrl_runtime import errors, spec
from relayrl_runtime.envs import driver


def make(
    env_id: str,
    num_envs: int,
    *,
    vector_mode: spec.VectorMode = spec.VectorMode.SYNC,
    kwargs: Mapping[str, Any] | None = None,
) -> driver.VecEnv:
    """A gymnasium vector env of `num_envs` copies of `env_id`."""
    try:
        import gymnasium
        from gymnasium.vector import AutoresetMode
    except ImportError as err:  # pragma: no cover - depends on the install
        raise errors.InvalidArgumentError(
            "environment.gymnasium: gymnasium is not installed (pip install relayrl-runtime[gym])"
        ) from err
    if num_envs < 1:
        raise errors.InvalidArgumentError.mismatch("num_envs", ">= 1", num_envs)
    try:
        env: driver.VecEnv = gymnasium.make_vec(
            env_id,
            num_envs=num_envs,
            vectorization_mode=vector_mode.value,
            vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP},
            **dict(kwargs or {}),
        )
    except gymnasium.error.Error as err:
        raise errors.InvalidArgumentError(f"environment.gymnasium.id: {env_id!r}: {err}") from err
    return env


def make_scalar(
    env_id: str, num_envs: int, *, kwargs: Mapping[str, Any] | None = None
) -> driver.VecEnv:
    """`num_envs` scalar gymnasium envs stepped one by one (for envs without vector support)."""
    import gymnasium

    return driver.ScalarEnvs(
        [gymnasium.make(env_id, **dict(kwargs or {})) for _ in range(num_envs)]
    )
