"""What a sink accepts, and the dead-letter reason for what it does not."""

from __future__ import annotations

import pyarrow as pa
import pytest

from relayrl_runtime import streams
from relayrl_runtime.sinks import service
from support import trajectories

V = streams.HEADER_SCHEMA_VERSION


def _ipc(batch: pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as w:
        w.write_batch(batch)
    return bytes(sink.getvalue().to_pybytes())


def test_a_good_message_decodes() -> None:
    batch = trajectories.batch(1, 0)
    table, version = service.decode(_ipc(batch), {V: "1"}, trajectories.AGENT)
    assert version == 1
    assert table.num_rows == batch.num_rows


@pytest.mark.parametrize(
    ("payload", "headers", "reason"),
    [
        (b"garbage", {V: "1"}, "invalid-arrow"),
        (None, {V: "2"}, "unknown-schema-version"),
        (None, {}, "unknown-schema-version"),
        (None, {V: "x"}, "unknown-schema-version"),
        (None, {V: "\u00b2"}, "unknown-schema-version"),  # a digit to str, not to int()
    ],
)
def test_bad_messages_carry_a_reason(
    payload: bytes | None, headers: dict[str, str], reason: str
) -> None:
    data = payload if payload is not None else _ipc(trajectories.batch(1, 0))
    with pytest.raises(service.InvalidMessageError) as err:
        service.decode(data, headers, trajectories.AGENT)
    assert err.value.reason == reason


def test_missing_columns_and_foreign_agent_are_schema_mismatches() -> None:
    batch = trajectories.batch(1, 0)
    no_step = batch.drop_columns(["step"])
    with pytest.raises(service.InvalidMessageError, match="missing columns"):
        service.decode(_ipc(no_step), {V: "1"})
    with pytest.raises(service.InvalidMessageError, match="Agent 'other'"):
        service.decode(_ipc(batch), {V: "1"}, "other")


def test_a_column_twice_is_a_schema_mismatch() -> None:
    batch = trajectories.batch(1, 0)
    schema = pa.schema([*batch.schema, batch.schema.field("reward")], batch.schema.metadata)
    twice = pa.RecordBatch.from_arrays([*batch.columns, batch.column("reward")], schema=schema)
    with pytest.raises(service.InvalidMessageError, match=r"columns \['reward'\] twice") as err:
        service.decode(_ipc(twice), {V: "1"})
    assert err.value.reason == "schema-mismatch"


def _with_agent_column(batch: pa.RecordBatch, indices: list[int], names: list[str]) -> bytes:
    n = batch.num_rows
    idx = pa.array((indices * n)[:n], pa.int32())
    agent = pa.DictionaryArray.from_arrays(idx, pa.array(names), safe=False)
    i = batch.schema.get_field_index("agent")
    return _ipc(batch.set_column(i, batch.schema.field(i).with_type(agent.type), agent))


def test_the_agent_column_is_checked_row_by_row() -> None:
    batch = trajectories.batch(1, 0)
    agent = trajectories.AGENT
    # Another Agent in the dictionary but unused: fine.
    table, _ = service.decode(_with_agent_column(batch, [1], ["other", agent]), {V: "1"}, agent)
    assert table.num_rows == batch.num_rows
    # Some rows of another Agent.
    mixed = _with_agent_column(batch, [0, 1], [agent, "other"])
    with pytest.raises(service.InvalidMessageError, match="Agent 'cartpole'") as err:
        service.decode(mixed, {V: "1"}, agent)
    assert err.value.reason == "schema-mismatch"
    # Indices past the dictionary: not valid Arrow, whether all rows or some.
    for indices in ([3], [0, 3]):
        bad = _with_agent_column(batch, indices, [agent])
        with pytest.raises(service.InvalidMessageError) as err:
            service.decode(bad, {V: "1"}, agent)
        assert err.value.reason == "invalid-arrow"


def test_a_dictionary_index_past_its_dictionary_in_any_column_is_not_valid_arrow() -> None:
    """Not the agent column: an extra one the sinks keep. Its first row is fine, so the
    writers' one-row checks pass it; the write itself would fail, on every restart."""
    batch = trajectories.batch(1, 0)
    n = batch.num_rows
    tag = pa.DictionaryArray.from_arrays(
        pa.array([0] + [7] * (n - 1), pa.int32()), pa.array(["x"]), safe=False
    )
    bad = batch.append_column(pa.field("aux_tag", tag.type), tag)
    with pytest.raises(service.InvalidMessageError, match="Dictionary indices") as err:
        service.decode(_ipc(bad), {V: "1"})
    assert err.value.reason == "invalid-arrow"


@pytest.mark.parametrize("column", ["reward", "logp", "terminated", "obs_time", "obs", "action"])
def test_a_version_1_message_without_a_fixed_column_is_refused(column: str) -> None:
    batch = trajectories.batch(1, 0).drop_columns([column])
    with pytest.raises(service.InvalidMessageError, match=rf"missing columns.*{column}") as err:
        service.decode(_ipc(batch), {V: "1"})
    assert err.value.reason == "schema-mismatch"


def test_a_fixed_column_of_another_type_or_with_nulls_is_refused() -> None:
    batch = trajectories.batch(1, 0)
    i = batch.schema.get_field_index("reward")
    as_float32 = batch.set_column(i, "reward", batch.column(i).cast(pa.float32()))
    with pytest.raises(service.InvalidMessageError, match=r"column reward is float; .* double"):
        service.decode(_ipc(as_float32), {V: "1"})
    nulls = pa.array([None] + [1.0] * (batch.num_rows - 1), pa.float64())
    with_nulls = batch.set_column(i, pa.field("reward", pa.float64()), nulls)
    with pytest.raises(service.InvalidMessageError, match="column reward has 1 null"):
        service.decode(_ipc(with_nulls), {V: "1"})


def test_the_agent_column_is_required_and_text() -> None:
    batch = trajectories.batch(1, 0)
    with pytest.raises(service.InvalidMessageError, match=r"missing columns \['agent'\]"):
        service.decode(_ipc(batch.drop_columns(["agent"])), {V: "1"})
    i = batch.schema.get_field_index("agent")
    numbered = batch.set_column(i, "agent", pa.array([7] * batch.num_rows, pa.int64()))
    with pytest.raises(service.InvalidMessageError, match="column agent is int64"):
        service.decode(_ipc(numbered), {V: "1"})
    plain = batch.set_column(i, "agent", pa.array([trajectories.AGENT] * batch.num_rows))
    service.decode(_ipc(plain), {V: "1"}, trajectories.AGENT)


def _compressed(table: pa.Table, codec: str | None = "zstd") -> bytes:
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=codec)
    with pa.ipc.new_stream(sink, table.schema, options=options) as w:
        w.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def test_what_a_message_decodes_to_is_read_from_its_headers() -> None:
    table = pa.Table.from_batches([trajectories.batch(2, 0)] * 3)
    plain = service.ipc_decoded_bytes(_compressed(table, None))
    assert abs(plain - table.nbytes) < table.nbytes // 10  # its buffers, padded
    for codec in ("zstd", "lz4"):
        assert service.ipc_decoded_bytes(_compressed(table, codec)) == plain
    with pytest.raises(ValueError, match="not Arrow IPC headers"):
        service.ipc_decoded_bytes(_ipc(table.to_batches()[0])[:100])


def test_a_compressed_message_decoding_past_the_bound_is_refused_unread() -> None:
    batch = trajectories.batch(1, 0)
    table = pa.Table.from_batches([batch])
    table, _ = service.decode(_compressed(table), {V: "1"}, trajectories.AGENT)  # fine
    rows = service.MAX_DECODED_BYTES // 8 + 1
    zeros = pa.table({"aux_zeros": pa.nulls(rows, pa.int64()).fill_null(0)})
    bomb = _compressed(zeros)
    assert len(bomb) < 1 << 20
    with pytest.raises(service.InvalidMessageError, match=r"decode to .* bytes, more than") as err:
        service.decode(bomb, {V: "1"}, trajectories.AGENT)
    assert err.value.reason == "invalid-arrow"


def test_a_dead_letter_copy_fits_with_headers_counted_in_bytes() -> None:
    headers = {"Relayrl-Dead-Letter-Detail": "\U0001f600" * 250}  # 1,000 bytes, 250 chars
    data = b"x" * 10_000
    payload = service.fit_dead_letter(data, headers, 10_000 + 600)
    size = len(payload) + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())
    assert size + len(b"NATS/1.0\r\n\r\n") <= 10_000 + 600
    assert streams.HEADER_DEAD_TRUNCATED in headers
