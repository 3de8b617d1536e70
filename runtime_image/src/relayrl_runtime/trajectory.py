"""The trajectory schema: finished trajectories as Arrow record batches (schema version 1).

Single source of the layout every sink and consumer reads (the local file sink here;
the NATS publisher and the Arrow/Postgres sinks of the pipeline build on it). One row is
one step of one actor; the rows of a trajectory are contiguous and in step order, and a
record batch holds one or more whole trajectories. Documented for users in
`runtime_image/docs/trajectory-schema.md`; a change to the columns bumps SCHEMA_VERSION.

Columns, in order:

============== ================================= =========================================
name           type                              meaning
============== ================================= =========================================
agent          dictionary<int32, utf8>           Agent name
actor_id       int64                             actor that took the step
episode_id     int64                             unique per episode: (run prefix << 32) | n
segment        int32                             0, 1, ...: pieces of an episode cut at the
                                                 max length
step           int64                             step index within the episode (from 0)
obs            fixed_size_list<obs dtype>[k]     observation, flattened (shape in metadata)
action         int64 (discrete) or               action taken
               fixed_size_list<float32>[d]
mask           fixed_size_list<bool>[n]          discrete only: allowed actions (all true
                                                 when the caller gave no mask)
reward         float64                           reward received after the action
terminated     bool                              episode ended in a terminal state (last row)
truncated      bool                              episode or trajectory was cut without a
                                                 terminal state: by the environment, at the
                                                 max length, or at shutdown (last row)
cut            bool                              the runtime cut this trajectory (max length
                                                 or drain); the episode may go on in the
                                                 next segment (last row)
policy_version int64                             model version that chose the action
obs_time       timestamp[us, UTC]                when the observation reached the agent
action_time    timestamp[us, UTC]                when the action was returned
logp           float32                           log-probability of the action under the
                                                 policy that chose it (mask applied)
aux_<name>     float32 or fixed_size_list<...>   every model output, in metadata order
                                                 (e.g. aux_logits, aux_value)
============== ================================= =========================================

Schema metadata (bytes keys): `relayrl.schema_version`, `relayrl.obs_shape` (JSON list),
`relayrl.obs_dtype`, `relayrl.action_kind`, `relayrl.action_size`, `relayrl.aux` (JSON
{name: shape}).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Final, cast

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from relayrl_runtime.inference import model, policy

SCHEMA_VERSION: Final = 1

META_SCHEMA_VERSION: Final = b"relayrl.schema_version"
META_OBS_SHAPE: Final = b"relayrl.obs_shape"
META_OBS_DTYPE: Final = b"relayrl.obs_dtype"
META_ACTION_KIND: Final = b"relayrl.action_kind"
META_ACTION_SIZE: Final = b"relayrl.action_size"
META_AUX: Final = b"relayrl.aux"

_TIME = pa.timestamp("us", tz="UTC")

Array = npt.NDArray[Any]


@dataclasses.dataclass(frozen=True)
class AuxField:
    """One aux column: a model output recorded per step."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def width(self) -> int:
        """Values per step."""
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class Layout:
    """What a trajectory of one agent looks like; fixed for the agent's lifetime."""

    agent: str
    obs_shape: tuple[int, ...]
    obs_dtype: str
    action_kind: model.ActionKind
    action_size: int
    aux: tuple[AuxField, ...] = ()
    head: str = "logits"
    log_std_output: str | None = None
    log_std: float = 0.0

    @classmethod
    def from_metadata(cls, agent: str, meta: model.ModelMetadata) -> Layout:
        """The layout an agent running this model records."""
        return cls(
            agent=agent,
            obs_shape=meta.input.item_shape,
            obs_dtype=meta.input.dtype,
            action_kind=meta.action.kind,
            action_size=meta.action.size,
            aux=tuple(AuxField(o.name, o.item_shape, o.dtype) for o in meta.outputs),
            head=meta.action.output,
            log_std_output=meta.action.log_std_output,
            log_std=meta.action.log_std,
        )

    @property
    def discrete(self) -> bool:
        """Whether actions are indices (and masks are recorded)."""
        return self.action_kind is model.ActionKind.DISCRETE

    @property
    def obs_width(self) -> int:
        """Values per observation."""
        return math.prod(self.obs_shape)


def schema(layout: Layout) -> pa.Schema:
    """The Arrow schema of this layout's record batches."""
    obs_type = pa.from_numpy_dtype(np.dtype(layout.obs_dtype))
    fields = [
        pa.field("agent", pa.dictionary(pa.int32(), pa.utf8()), nullable=False),
        pa.field("actor_id", pa.int64(), nullable=False),
        pa.field("episode_id", pa.int64(), nullable=False),
        pa.field("segment", pa.int32(), nullable=False),
        pa.field("step", pa.int64(), nullable=False),
        pa.field("obs", pa.list_(obs_type, layout.obs_width), nullable=False),
        pa.field(
            "action",
            pa.int64() if layout.discrete else pa.list_(pa.float32(), layout.action_size),
            nullable=False,
        ),
    ]
    if layout.discrete:
        fields.append(pa.field("mask", pa.list_(pa.bool_(), layout.action_size), nullable=False))
    fields += [
        pa.field("reward", pa.float64(), nullable=False),
        pa.field("terminated", pa.bool_(), nullable=False),
        pa.field("truncated", pa.bool_(), nullable=False),
        pa.field("cut", pa.bool_(), nullable=False),
        pa.field("policy_version", pa.int64(), nullable=False),
        pa.field("obs_time", _TIME, nullable=False),
        pa.field("action_time", _TIME, nullable=False),
        pa.field("logp", pa.float32(), nullable=False),
    ]
    for aux in layout.aux:
        value_type = pa.from_numpy_dtype(np.dtype(aux.dtype))
        fields.append(
            pa.field(
                f"aux_{aux.name}",
                value_type if aux.width == 1 else pa.list_(value_type, aux.width),
                nullable=False,
            )
        )
    meta = {
        META_SCHEMA_VERSION: str(SCHEMA_VERSION).encode(),
        META_OBS_SHAPE: json.dumps(list(layout.obs_shape)).encode(),
        META_OBS_DTYPE: layout.obs_dtype.encode(),
        META_ACTION_KIND: layout.action_kind.value.encode(),
        META_ACTION_SIZE: str(layout.action_size).encode(),
        META_AUX: json.dumps({a.name: list(a.shape) for a in layout.aux}).encode(),
    }
    return pa.schema(fields, metadata=meta)


@dataclasses.dataclass(frozen=True)
class Steps:
    """Whole trajectories as numpy columns: what routers encode (from `pool.Chunk`s).

    Every array has the same first dimension (rows); `trajectories` counts the
    trajectories in it (each ends at a row whose terminated or truncated is set).
    """

    actor_id: Array
    episode_id: Array
    segment: Array
    step: Array
    obs: Array
    action: Array
    mask: Array | None
    reward: Array
    terminated: Array
    truncated: Array
    cut: Array
    policy_version: Array
    obs_time: Array  # microseconds since the epoch
    action_time: Array
    aux: Mapping[str, Array]
    trajectories: int

    @property
    def rows(self) -> int:
        """Number of steps."""
        return int(self.actor_id.shape[0])


def concat(parts: Sequence[Steps]) -> Steps:
    """Join several `Steps` (same layout) into one."""
    if len(parts) == 1:
        return parts[0]

    def cat(name: str) -> Array:
        return np.concatenate([getattr(p, name) for p in parts])

    first = parts[0]
    return Steps(
        actor_id=cat("actor_id"),
        episode_id=cat("episode_id"),
        segment=cat("segment"),
        step=cat("step"),
        obs=cat("obs"),
        action=cat("action"),
        mask=None if first.mask is None else np.concatenate([cast(Array, p.mask) for p in parts]),
        reward=cat("reward"),
        terminated=cat("terminated"),
        truncated=cat("truncated"),
        cut=cat("cut"),
        policy_version=cat("policy_version"),
        obs_time=cat("obs_time"),
        action_time=cat("action_time"),
        aux={k: np.concatenate([p.aux[k] for p in parts]) for k in first.aux},
        trajectories=sum(p.trajectories for p in parts),
    )


def _arrow(values: npt.NDArray[Any], arrow_type: pa.DataType | None = None) -> pa.Array:
    """A flat numpy array as an Arrow array, zero-copy where the layouts agree.

    Built from buffers rather than with `pa.array`, which imports pandas (seconds, with
    the GIL held) the first time it sees a numpy array, and checks more than needed.
    """
    arr = np.ascontiguousarray(values).reshape(-1)
    if arr.dtype == np.bool_:
        bits = np.packbits(arr, bitorder="little")
        return pa.Array.from_buffers(pa.bool_(), len(arr), [None, pa.py_buffer(bits)])
    target = arrow_type if arrow_type is not None else pa.from_numpy_dtype(arr.dtype)
    return pa.Array.from_buffers(target, len(arr), [None, pa.py_buffer(arr)])


def _fixed_list(values: npt.NDArray[np.generic], width: int) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(_arrow(values), width)


def _utf8(value: str) -> pa.Array:
    data = value.encode()
    offsets = np.array([0, len(data)], dtype=np.int32)
    return pa.Array.from_buffers(pa.utf8(), 1, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def encode(layout: Layout, steps: Steps, arrow_schema: pa.Schema | None = None) -> pa.RecordBatch:
    """Turn `Steps` into a record batch of `schema(layout)` (sharing the arrays' memory)."""
    n = steps.rows
    target = arrow_schema if arrow_schema is not None else schema(layout)
    agent = pa.DictionaryArray.from_arrays(_arrow(np.zeros(n, dtype=np.int32)), _utf8(layout.agent))
    columns: list[pa.Array] = [
        agent,
        _arrow(steps.actor_id.astype(np.int64, copy=False)),
        _arrow(steps.episode_id.astype(np.int64, copy=False)),
        _arrow(steps.segment.astype(np.int32, copy=False)),
        _arrow(steps.step.astype(np.int64, copy=False)),
        _fixed_list(steps.obs, layout.obs_width),
        _arrow(steps.action.astype(np.int64, copy=False))
        if layout.discrete
        else _fixed_list(steps.action.astype(np.float32, copy=False), layout.action_size),
    ]
    if layout.discrete:
        mask = steps.mask if steps.mask is not None else np.ones((n, layout.action_size), bool)
        columns.append(_fixed_list(mask.astype(np.bool_, copy=False), layout.action_size))
    columns += [
        _arrow(steps.reward.astype(np.float64, copy=False)),
        _arrow(steps.terminated.astype(np.bool_, copy=False)),
        _arrow(steps.truncated.astype(np.bool_, copy=False)),
        _arrow(steps.cut.astype(np.bool_, copy=False)),
        _arrow(steps.policy_version.astype(np.int64, copy=False)),
        _arrow(steps.obs_time.astype(np.int64, copy=False), _TIME),
        _arrow(steps.action_time.astype(np.int64, copy=False), _TIME),
        _arrow(log_prob(layout, steps).astype(np.float32, copy=False)),
    ]
    for aux in layout.aux:
        values = steps.aux[aux.name].astype(np.dtype(aux.dtype), copy=False)
        if aux.width == 1:
            columns.append(_arrow(values))
        else:
            columns.append(_fixed_list(values, aux.width))
    return pa.RecordBatch.from_arrays(columns, schema=target)


def log_prob(layout: Layout, steps: Steps) -> Array:
    """The logp column: computed here, in the router, not on the request path."""
    log_std: Array | float = (
        steps.aux[layout.log_std_output] if layout.log_std_output is not None else layout.log_std
    )
    return policy.log_prob(
        layout.action_kind, steps.aux[layout.head], steps.action, steps.mask, log_std
    )


def obs_of(batch: pa.RecordBatch | pa.Table) -> npt.NDArray[np.generic]:
    """The obs column back as an array of shape (rows, *obs_shape)."""
    meta = batch.schema.metadata or {}
    shape = json.loads(meta[META_OBS_SHAPE])
    column = batch.column("obs")
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    flat: Array = column.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(batch), *shape)
