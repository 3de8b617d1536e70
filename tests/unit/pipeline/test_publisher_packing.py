"""The publisher's messages fit the bound: NATS refuses (and closes the connection
for) a message over its max_payload, so no message may be bigger, headers included.

Packed without a server: `write` seals full messages into the backlog, which is what
these tests read.
"""

from __future__ import annotations

import pyarrow as pa
import pytest

from relayrl_runtime import streams, trajectory
from relayrl_runtime.inference import model
from relayrl_runtime.transport import publisher
from support import trajectories

# Many narrow columns: the framing of each record batch grows with its buffers.
WIDE: trajectory.Layout = trajectory.Layout(
    agent=trajectories.AGENT,
    obs_shape=(4,),
    obs_dtype="float32",
    action_kind=model.ActionKind.DISCRETE,
    action_size=2,
    aux=tuple(trajectory.AuxField(f"head{i}", (), "float32") for i in range(4)),
)


def wide_batch(index: int, length: int) -> pa.RecordBatch:
    """One episode of `length` steps in the wide layout."""
    base = trajectories.batch(1, index, trajectories=1, length=length)
    schema = trajectory.schema(WIDE)
    columns = []
    for field in schema:
        if field.name in base.schema.names:
            columns.append(base.column(field.name))
        else:
            columns.append(pa.array([float(index)] * length, pa.float32()))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def unstarted(**config: int) -> publisher.NatsPublisher:
    return publisher.NatsPublisher(
        streams.ConnectOptions(),
        publisher.PublisherConfig(namespace="ml", agent=trajectories.AGENT, **config),  # type: ignore[arg-type]
    )


def sizes(pub: publisher.NatsPublisher) -> list[int]:
    """Each backlog message as NATS counts it: payload and headers."""
    return [publisher.wire_size(m) for m in pub._backlog]


def test_many_small_batches_of_many_columns_stay_under_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    halved = count_halvings(monkeypatch)
    pub = unstarted(max_message_bytes=1 << 20)
    for i in range(3000):
        pub.write(wide_batch(i, 20))
    assert len(pub._backlog) >= 2
    assert max(sizes(pub)) <= 1 << 20
    assert min(sizes(pub)) > (1 << 20) // 2  # still packed, not one batch a message
    assert not halved, "the estimate alone keeps messages under the bound"


def test_a_message_the_estimate_misjudged_is_split_not_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The estimate is a guess; the encoded size decides.
    monkeypatch.setattr(publisher, "_estimate", lambda batch: 100)
    halved = count_halvings(monkeypatch)
    pub = unstarted(max_message_bytes=64 << 10)
    steps = 0
    for i in range(400):
        batch = wide_batch(i, 20)
        steps += batch.num_rows
        pub.write(batch)
    pub._seal_pending(block=False)
    assert halved
    assert max(sizes(pub)) <= pub.config.max_message_bytes
    assert sum(m.steps for m in pub._backlog) == steps
    ids = [m.msg_id for m in pub._backlog]
    assert ids == [f"{pub.producer_id}-{n}" for n in range(1, len(ids) + 1)]  # no gaps


def count_halvings(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    halves = publisher._halves

    def counted(group: list[pa.RecordBatch]) -> list[list[pa.RecordBatch]] | None:
        calls.append(len(group))
        return halves(group)

    monkeypatch.setattr(publisher, "_halves", counted)
    return calls
