"""Custom environments from a Python entry point (`module.path:callable`).

The process uses it for `environment.python`. The callable is called with the spec's
kwargs; it returns either one scalar env (gymnasium-style `reset`/`step`; it is called
once per copy and the copies are batched) or a vector env with `num_envs` and same-step
autoreset (then called once, with `num_envs` added to the kwargs).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from relayrl_runtime import errors
from relayrl_runtime.envs import driver


def load_entry_point(entry_point: str) -> Callable[..., Any]:
    """Import `module.path:callable`."""
    module_name, sep, attr = entry_point.partition(":")
    if not sep or not module_name or not attr:
        raise errors.InvalidArgumentError.mismatch(
            "environment.python.entryPoint", "module.path:callable", repr(entry_point)
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise errors.InvalidArgumentError(
            f"environment.python.entryPoint: cannot import {module_name!r}: {err}"
        ) from err
    target = getattr(module, attr, None)
    if not callable(target):
        raise errors.InvalidArgumentError.mismatch(
            "environment.python.entryPoint", f"a callable {attr!r} in {module_name}", target
        )
    return target  # type: ignore[no-any-return]


def make(entry_point: str, num_envs: int, kwargs: Mapping[str, Any] | None = None) -> driver.VecEnv:
    """Build `num_envs` env copies from the entry point."""
    factory = load_entry_point(entry_point)
    first = factory(**dict(kwargs or {}))
    if hasattr(first, "num_envs"):
        close = getattr(first, "close", None)
        if close is not None:
            close()
        env: driver.VecEnv = factory(**{**dict(kwargs or {}), "num_envs": num_envs})
        if env.num_envs != num_envs:
            raise errors.InvalidArgumentError.mismatch(
                "environment.python: vector env num_envs", num_envs, env.num_envs
            )
        _check_same_step(env)
        return env
    rest = [factory(**dict(kwargs or {})) for _ in range(num_envs - 1)]
    return driver.ScalarEnvs([first, *rest])


def _check_same_step(env: Any) -> None:
    """Refuse a vector env that says it resets on the next step (gymnasium's default).

    The driver records the observation a step returns for a finished copy as the first
    of its next episode; with next-step autoreset that step would be a reset whose
    action is ignored, recorded as a real one. An env that does not say is taken at
    its word (the entry point's contract).
    """
    metadata = getattr(env, "metadata", None)
    mode = metadata.get("autoreset_mode") if isinstance(metadata, Mapping) else None
    inner = env
    for _ in range(16):  # or an attribute, on the env or under its wrappers
        if mode is not None or inner is None:
            break
        mode = getattr(inner, "autoreset_mode", None)
        inner = getattr(inner, "env", None)
    if mode is None:
        return
    name = str(getattr(mode, "value", mode))
    if name.replace("_", "").lower() != "samestep":
        close = getattr(env, "close", None)
        if close is not None:
            close()
        raise errors.InvalidArgumentError.mismatch(
            "environment.python: vector env autoreset_mode",
            "same-step autoreset (gymnasium: vector_kwargs={'autoreset_mode': SAME_STEP})",
            name,
        )
