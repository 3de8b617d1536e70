"""Deterministic CartPole-shaped trajectory batches for the pipeline tests and benchmarks.

Built with the runtime's own `trajectory.encode`, so they are exactly what routers hand
a sink. Batch `index` of `producer` is a pure function of those two numbers: a test can
rebuild everything a producer process wrote from the count it reports, and compare what
the sinks stored with it, in count and in content.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import pyarrow as pa

from relayrl_runtime import trajectory
from relayrl_runtime.inference import model

AGENT: Final = "cartpole"
LAYOUT: Final = trajectory.Layout(
    agent=AGENT,
    obs_shape=(4,),
    obs_dtype="float32",
    action_kind=model.ActionKind.DISCRETE,
    action_size=2,
    aux=(
        trajectory.AuxField("logits", (2,), "float32"),
        trajectory.AuxField("value", (), "float32"),
    ),
)
SCHEMA: Final = trajectory.schema(LAYOUT)
# Columns compared between what was produced and what a sink stored.
KEY: Final = ("episode_id", "step")


def _column(field: pa.Field, n: int, rng: np.random.Generator) -> pa.Array:
    """Deterministic values of any column type the schema uses."""
    t = field.type
    if pa.types.is_fixed_size_list(t):
        values = _column(pa.field("v", t.value_type), n * t.list_size, rng)
        return pa.FixedSizeListArray.from_arrays(values, t.list_size)
    if pa.types.is_floating(t):
        return pa.array(rng.standard_normal(n).astype(t.to_pandas_dtype()))
    if pa.types.is_integer(t):
        return pa.array(rng.integers(0, 2, n).astype(t.to_pandas_dtype()))
    if pa.types.is_boolean(t):
        return pa.array(np.ones(n, bool))
    raise TypeError(f"no generator for {field}")


def batch(
    producer: int,
    index: int,
    *,
    trajectories: int = 8,
    length: int = 50,
) -> pa.RecordBatch:
    """Batch number `index` of `producer`: `trajectories` whole episodes of `length` steps."""
    n = trajectories * length
    first_episode = index * trajectories
    local = np.repeat(np.arange(trajectories, dtype=np.int64), length)
    step = np.tile(np.arange(length, dtype=np.int64), trajectories)
    last = step == length - 1
    terminated = last & (local % 2 == 0)
    t0 = 1_700_000_000_000_000 + index * 1_000_000
    time_type = pa.timestamp("us", tz="UTC")
    known: dict[str, pa.Array] = {
        "agent": pa.DictionaryArray.from_arrays(
            pa.array(np.zeros(n, np.int32)), pa.array([AGENT], pa.utf8())
        ),
        "actor_id": pa.array((first_episode + local) % 16),
        "episode_id": pa.array((np.int64(producer) << 32) | (first_episode + local)),
        "segment": pa.array(np.zeros(n, np.int32)),
        "step": pa.array(step),
        "reward": pa.array(np.ones(n, np.float64)),
        "terminated": pa.array(terminated),
        "truncated": pa.array(last & ~terminated),
        "cut": pa.array(np.zeros(n, bool)),
        "policy_version": pa.array(np.full(n, 1 + index // 10, np.int64)),
        "obs_time": pa.array(t0 + np.arange(n, dtype=np.int64)).cast(time_type),
        "action_time": pa.array(t0 + np.arange(n, dtype=np.int64) + 5).cast(time_type),
    }
    rng = np.random.default_rng(producer * 1_000_003 + index)
    columns = [known[f.name] if f.name in known else _column(f, n, rng) for f in SCHEMA]
    return pa.RecordBatch.from_arrays(columns, schema=SCHEMA)


def tagged(producer: int, index: int, distinct: int, label: str) -> pa.RecordBatch:
    """`batch(producer, index, trajectories=2)` with an `aux_tag` column of int8
    dictionary type holding `distinct` values (`<label>-<i>`). Alone a batch of up to
    127 values fits a Parquet file; two of 100 values each cannot share one (their
    unified dictionary needs a larger index type)."""
    b = batch(producer, index, trajectories=2)
    values = [f"{label}-{i % distinct}" for i in range(b.num_rows)]
    return b.append_column("aux_tag", pa.array(values).cast(pa.dictionary(pa.int8(), pa.string())))


def expected(producers: dict[int, int], *, trajectories: int = 8, length: int = 50) -> pa.Table:
    """Everything producers {id: batches} wrote, sorted by (episode_id, step)."""
    batches = [
        batch(p, i, trajectories=trajectories, length=length)
        for p, count in sorted(producers.items())
        for i in range(count)
    ]
    if not batches:
        return SCHEMA.empty_table()
    return sort(pa.Table.from_batches(batches))


def sort(table: pa.Table) -> pa.Table:
    """A table in (episode_id, step) order with plain (non-dictionary) columns."""
    table = table.sort_by([(k, "ascending") for k in KEY])
    if "agent" in table.column_names and pa.types.is_dictionary(table.schema.field("agent").type):
        table = table.set_column(
            table.schema.get_field_index("agent"), "agent", table.column("agent").cast(pa.utf8())
        )
    return table.replace_schema_metadata(None)
