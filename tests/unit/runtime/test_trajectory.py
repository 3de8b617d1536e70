"""The trajectory schema and its encoding (no servers)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from relayrl_runtime import trajectory
from relayrl_runtime.inference import model


def _layout() -> trajectory.Layout:
    return trajectory.Layout(
        agent="cartpole",
        obs_shape=(2, 3),
        obs_dtype="float32",
        action_kind=model.ActionKind.DISCRETE,
        action_size=2,
        aux=(
            trajectory.AuxField("logits", (2,), "float32"),
            trajectory.AuxField("value", (1,), "float32"),
        ),
    )


def test_schema_is_versioned_and_self_describing() -> None:
    schema = trajectory.schema(_layout())
    meta = schema.metadata
    assert meta[trajectory.META_SCHEMA_VERSION] == str(trajectory.SCHEMA_VERSION).encode()
    assert json.loads(meta[trajectory.META_OBS_SHAPE]) == [2, 3]
    assert schema.names == [
        "agent", "actor_id", "episode_id", "segment", "step", "obs", "action", "mask",
        "reward", "terminated", "truncated", "cut", "policy_version", "obs_time",
        "action_time", "logp", "aux_logits", "aux_value",
    ]  # fmt: skip
    assert schema.field("obs").type == pa.list_(pa.float32(), 6)
    assert schema.field("aux_value").type == pa.float32()


def test_encode_round_trips() -> None:
    lay = _layout()
    n = 3
    logits = np.array([[0.0, 1.0], [2.0, 0.0], [0.0, 0.0]], dtype=np.float32)
    steps = trajectory.Steps(
        actor_id=np.array([4, 4, 4]),
        episode_id=np.array([9, 9, 9]),
        segment=np.zeros(n, np.int32),
        step=np.arange(n),
        obs=np.arange(n * 6, dtype=np.float32).reshape(n, 2, 3),
        action=np.array([1, 0, 1]),
        mask=None,
        reward=np.array([1.0, 1.0, 0.5]),
        terminated=np.array([False, False, True]),
        truncated=np.zeros(n, bool),
        cut=np.zeros(n, bool),
        policy_version=np.array([1, 1, 2]),
        obs_time=np.array([1, 2, 3]) * 1_000_000,
        action_time=np.array([1, 2, 3]) * 1_000_000 + 10,
        aux={"logits": logits, "value": np.ones((n, 1), np.float32)},
        trajectories=1,
    )
    batch = trajectory.encode(lay, steps)
    assert batch.schema == trajectory.schema(lay)
    np.testing.assert_array_equal(trajectory.obs_of(batch), steps.obs)
    assert batch.column("mask").to_pylist() == [[True, True]] * 3
    logp = batch.column("logp").to_numpy()
    expected = [
        np.log(np.exp(1) / (1 + np.exp(1))),
        np.log(np.exp(2) / (1 + np.exp(2))),
        np.log(0.5),
    ]
    np.testing.assert_allclose(logp, expected, rtol=1e-5)
    both = trajectory.concat([steps, steps])
    assert both.rows == 6
    assert both.trajectories == 2


def test_the_pool_holds_what_process_md_sizes_a_pod_for() -> None:
    """docs/process.md, "Memory": bytes per step, and rows x (maxLength + 1) of them
    once one trajectory has run to maxLength."""
    from relayrl_runtime.actors import pool

    def layout(obs: tuple[int, ...], dtype: str, actions: int) -> trajectory.Layout:
        logits = trajectory.AuxField("logits", (actions,), "float32")
        return trajectory.Layout("a", obs, dtype, model.ActionKind.DISCRETE, actions, (logits,))

    cartpole = layout((4,), "float32", 2)
    assert pool.record_dtype(cartpole).itemsize == 66
    assert pool.record_dtype(layout((84, 84, 4), "uint8", 6)).itemsize == 28_294
    actors = pool.ActorPool(cartpole, max_length=1000, run_prefix=0)
    sizes: list[int] = []
    actors.on_resize = sizes.append
    actors.add(range(64))
    one = np.array([5], dtype=np.int64)
    for _ in range(700):  # one actor's long episode; the other 63 take no step
        actors.record(
            one,
            np.zeros((1, 4), np.float32),
            np.zeros(1, np.int64),
            None,
            {"logits": np.zeros((1, 2), np.float32)},
            (1, 0, 0),
            0.0,
        )
    assert actors.buffer_bytes == 64 * (1000 + 1) * 66
    # Told of each growth: rows 8 -> 16 -> 32 -> 64, then the horizon 64 -> 128 ... -> 1000.
    assert sizes[-1] == actors.buffer_bytes
    assert sizes == sorted(sizes)
