"""The Arrow sink's file commit protocol, without servers: temp, fsync, rename, resume."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from relayrl_runtime import sink_cli, spec, streams
from relayrl_runtime.sinks import arrow_stream, message_ids, service
from support import trajectories

DAY1 = dt.datetime(2026, 3, 1, 23, 59, tzinfo=dt.UTC)
DAY2 = dt.datetime(2026, 3, 2, 0, 1, tzinfo=dt.UTC)


def _temp_files(root: Path) -> list[Path]:
    return list(root.rglob(".part-*.tmp"))


async def _encoded(w: arrow_stream.ArrowStreamWriter) -> None:
    """Wait until the encode thread has run what was handed to it (it runs in order)."""
    await asyncio.wrap_future(w._encode.submit(lambda: None))


def _delivery(seq: int, when: dt.datetime) -> service.Delivery:
    table = pa.Table.from_batches([trajectories.batch(1, seq)])
    return service.Delivery(seq=seq, time=when, table=table, schema_version=1, size=table.nbytes)


async def test_commit_renames_and_restart_resumes_after_it(tmp_path: Path) -> None:
    w = arrow_stream.ArrowStreamWriter(tmp_path, trajectories.AGENT)
    assert await w.open() == 0
    await w.add(_delivery(1, DAY1))
    await w.add(_delivery(2, DAY1))
    await w.add(_delivery(3, DAY2))  # a new day: the first file is finished
    await w.commit(w.seal(4))  # seq 4 was a dead letter: recorded as done
    await w.add(_delivery(5, DAY2))  # never committed: the process "crashes"
    await _encoded(w)  # the temp file is created there
    assert len(_temp_files(tmp_path)) == 1

    files = arrow_stream.committed_files(tmp_path)
    assert [(first, last) for first, last, _ in files] == [(1, 2), (3, 4)]
    assert files[0][2].parent == tmp_path / "agent=cartpole" / "date=2026-03-01"
    assert files[1][2].parent == tmp_path / "agent=cartpole" / "date=2026-03-02"
    assert pq.read_table(files[0][2]).num_rows == 800
    assert "agent" not in pq.read_schema(files[0][2]).names  # it lives in the path

    again = arrow_stream.ArrowStreamWriter(tmp_path, trajectories.AGENT, spec.SinkFormat.PARQUET)
    assert await again.open() == 4
    assert not _temp_files(tmp_path), "uncommitted temp file removed"
    await again.close()
    await w.close()


async def test_rotation_is_due_by_size_and_time(tmp_path: Path) -> None:
    w = arrow_stream.ArrowStreamWriter(
        tmp_path, trajectories.AGENT, spec.SinkFormat.ARROW, rotate_bytes=50_000, rotate_seconds=60
    )
    await w.open()
    assert not w.due(0)
    await w.add(_delivery(1, DAY1))
    assert not w.due(w._file.opened if w._file else 0)
    await w.add(_delivery(2, DAY1))
    await w.add(_delivery(3, DAY1))
    assert w.due(0.0 + (w._file.opened if w._file else 0))  # size
    await w.commit(w.seal(3))
    await w.add(_delivery(4, DAY1))
    assert w._file is not None
    assert w.due(w._file.opened + 61)  # time
    await w.commit(w.seal(4))
    await w.close()
    tables = [pa.ipc.open_file(p).read_all() for _, _, p in arrow_stream.committed_files(tmp_path)]
    assert sum(t.num_rows for t in tables) == 1600


async def test_parquet_settings_reach_the_files(tmp_path: Path) -> None:
    settings = arrow_stream.ParquetSettings(compression="lz4", row_group_rows=1000)
    w = arrow_stream.ArrowStreamWriter(tmp_path, trajectories.AGENT, parquet=settings)
    await w.open()
    deliveries = [_delivery(seq, DAY1) for seq in range(1, 6)]  # 400 rows each
    for d in deliveries:
        await w.add(d)
    await w.commit(w.seal(5))
    await w.close()

    ((_, _, path),) = arrow_stream.committed_files(tmp_path)
    meta = pq.ParquetFile(path).metadata
    # Whole messages per row group, at least `row_group_rows` each; the rest at the end.
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [1200, 800]
    columns = {
        meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i)
        for i in range(meta.num_columns)
    }
    assert columns["step"].compression.startswith("LZ4")
    assert "DELTA_BINARY_PACKED" in columns["step"].encodings
    assert "DELTA_BINARY_PACKED" in columns["obs_time"].encodings
    want = pa.concat_tables(d.table for d in deliveries).drop_columns(["agent"])
    assert pq.read_table(path).equals(want)


def test_sink_cli_parquet_flags() -> None:
    args = sink_cli._parser().parse_args(
        [
            "arrow",
            "--agent",
            "a",
            "--path",
            "/nonexistent",
            "--compression",
            "zstd",
            "--compression-level",
            "3",
            "--row-group-rows",
            "5000",
        ]
    )
    writer = sink_cli.build(args).writer
    assert isinstance(writer, arrow_stream.ArrowStreamWriter)
    assert writer.parquet == arrow_stream.ParquetSettings("zstd", 3, 5000)


async def test_wide_rows_end_a_row_group_by_bytes_not_only_by_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory held for a Parquet row group is bounded by bytes too: 256k rows of image
    observations would be tens of gigabytes."""
    monkeypatch.setattr(arrow_stream, "_ROW_GROUP_BYTES", 1 << 20)
    w = arrow_stream.ArrowStreamWriter(tmp_path, trajectories.AGENT)
    await w.open()
    most = 0
    for seq in range(1, 13):
        d = _delivery(seq, DAY1)
        d = dataclasses.replace(d, size=300_000)  # as a message of wide rows would be
        await w.add(d)
        assert w._file is not None
        most = max(most, w._file.buffered_bytes)
    assert most < (1 << 20)
    await w.commit(w.seal(12))
    [(_, _, path)] = arrow_stream.committed_files(tmp_path)
    assert pq.ParquetFile(path).metadata.num_row_groups == 3  # 4 messages each
    await w.close()


async def test_a_sealed_file_commits_while_the_next_one_is_written(tmp_path: Path) -> None:
    w = arrow_stream.ArrowStreamWriter(tmp_path, trajectories.AGENT)
    await w.open()
    await w.add(_delivery(1, DAY1))
    first = w.seal(1)
    assert not w.pending  # the next message opens a new file
    await w.add(_delivery(2, DAY1))
    await w.commit(first)
    assert [(a, b) for a, b, _ in arrow_stream.committed_files(tmp_path)] == [(1, 1)]
    await w.commit(w.seal(2))
    assert [(a, b) for a, b, _ in arrow_stream.committed_files(tmp_path)] == [(1, 1), (2, 2)]
    await w.close()


async def test_a_failed_write_is_never_committed(tmp_path: Path) -> None:
    settings = arrow_stream.ParquetSettings(row_group_rows=1)  # every message written at once
    w = arrow_stream.ArrowStreamWriter(tmp_path, trajectories.AGENT, parquet=settings)
    await w.open()
    await w.add(_delivery(1, DAY1))
    await _encoded(w)
    assert w._file is not None

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    w._file.writer.write_table = disk_full
    await w.add(_delivery(2, DAY1))
    with pytest.raises(service.PermanentError, match="No space left") as failed:
        await w.commit(w.seal(2))
    assert type(failed.value) is service.PermanentError  # the disk's: no message to blame
    assert arrow_stream.committed_files(tmp_path) == []
    assert not _temp_files(tmp_path)  # dropped; a restart reads the messages again
    await w.close()


def _snapshots(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("_ids-*.json"))


def _tagged(seq: int, when: dt.datetime, *tags: int) -> service.Delivery:
    """A message of one `trajectories.tagged` batch per count of distinct values in
    `tags`: two batches (or messages) of 100 values are more than one file can take."""
    table = pa.Table.from_batches(
        [trajectories.tagged(1, seq * 10 + k, n, f"{seq}-{k}") for k, n in enumerate(tags)]
    )
    return service.Delivery(
        seq=seq, time=when, table=table, schema_version=1, size=table.nbytes, msg_id=f"p-{seq}"
    )


async def test_a_file_arrow_refuses_of_one_message_is_left_out_and_its_sequence_kept(
    tmp_path: Path,
) -> None:
    """The refused file of one message ends the commit (a new day split it from the
    file before): it is left out, and its sequence is recorded though no file names it."""
    w = arrow_stream.ArrowStreamWriter(tmp_path, trajectories.AGENT)
    await w.open()
    await w.add(_tagged(1, DAY1, 10))
    await w.add(_tagged(2, DAY1, 10))
    await w.add(_tagged(3, DAY2, 100, 100))
    sealed = w.seal(3)
    with pytest.raises(service.RowsRefused) as refused:
        await w.commit(sealed)
    assert [seq for seq, _ in refused.value.messages] == [3]
    assert refused.value.messages[0][1].startswith("Arrow could not write it: ")
    assert refused.value.rows == {3: 200}
    refused.value.leave_out()
    await w.commit(sealed)
    assert [(a, b) for a, b, _ in arrow_stream.committed_files(tmp_path)] == [(1, 2)]
    assert not _temp_files(tmp_path)
    assert "p-3" not in w.committed_ids
    await w.close()
    again = arrow_stream.ArrowStreamWriter(tmp_path, trajectories.AGENT)
    assert await again.open() == 3
    await again.close()


async def test_a_file_arrow_refuses_of_several_messages_asks_for_them_again(
    tmp_path: Path,
) -> None:
    w = arrow_stream.ArrowStreamWriter(tmp_path, trajectories.AGENT)
    await w.open()
    await w.add(_tagged(1, DAY1, 10))
    await w.add(_tagged(2, DAY2, 100))  # each fine alone, not together
    await w.add(_tagged(3, DAY2, 100))
    sealed = w.seal(3)
    with pytest.raises(service.WriteRefused) as refused:
        await w.commit(sealed)
    r = refused.value
    assert (r.first, r.last, r.messages) == (2, 3, 2)
    assert "larger index type" in r.reason
    assert r.committed[:2] == [1, 100]
    assert r.committed_seq == 1
    await w.add(_tagged(4, DAY2, 10))  # taken meanwhile: dropped by the reset
    await r.reset()
    assert not w.pending
    await _encoded(w)
    assert not _temp_files(tmp_path)
    assert [(a, b) for a, b, _ in arrow_stream.committed_files(tmp_path)] == [(1, 1)]
    assert "p-1" in w.committed_ids
    assert "p-2" not in w.committed_ids
    assert _snapshots(tmp_path) == ["_ids-00000000000000000001.json"]  # not the refused one's
    for seq in (2, 3):  # again, one to a file: both fit
        await w.add(_tagged(seq, DAY2, 100))
        await w.commit(w.seal(seq))
    files = arrow_stream.committed_files(tmp_path)
    assert [(a, b) for a, b, _ in files] == [(1, 1), (2, 2), (3, 3)]
    await w.close()


async def test_a_shared_root_holds_each_agents_own_position(tmp_path: Path) -> None:
    """Two Agents' sinks on one claim: each resumes from its own files and leaves the
    other's files, and the temp file it is writing, alone."""
    other = tmp_path / "agent=other" / "date=2026-11-21"
    other.mkdir(parents=True)
    (other / "part-00000000000000000001-00000000000000000900.parquet").write_bytes(b"x")
    writing = (
        other / f"{arrow_stream._TEMP_PREFIX}00000000000000000901-1{arrow_stream._TEMP_SUFFIX}"
    )
    writing.write_bytes(b"x")
    w = arrow_stream.ArrowStreamWriter(tmp_path, trajectories.AGENT)
    try:
        assert await w.open() == 0
        assert writing.exists()
        await w.add(_delivery(1, dt.datetime(2026, 11, 21, tzinfo=dt.UTC)))
        await w.commit(w.seal(1))
    finally:
        await w.close()
    w = arrow_stream.ArrowStreamWriter(tmp_path, trajectories.AGENT)
    try:
        assert await w.open() == 1
    finally:
        await w.close()


def test_a_column_parquet_cannot_hold_is_refused_before_any_file(tmp_path: Path) -> None:
    # Accepted, it would fail the file's commit, and after each restart again.
    good = pa.Table.from_batches([trajectories.batch(2, 0)])
    kinds = pa.array([0, 1] * (good.num_rows // 2) + [0] * (good.num_rows % 2), pa.int8())
    union = pa.UnionArray.from_sparse(
        kinds, [pa.array(range(good.num_rows)), pa.array(["x"] * good.num_rows)]
    )
    odd = good.append_column("aux_union", union)
    parquet = arrow_stream.ArrowStreamWriter(tmp_path, trajectories.AGENT)
    parquet.check(good)
    with pytest.raises(service.InvalidMessageError, match="no Parquet form") as err:
        parquet.check(odd)
    assert err.value.reason == service.DeadLetterReason.SCHEMA_MISMATCH
    parquet.check(good)
    # A dictionary of lists has a Parquet schema, but no writer for its data.
    obs = good.column("obs").combine_chunks()
    nested = pa.DictionaryArray.from_arrays(pa.array(range(len(obs)), pa.int32()), obs)
    with pytest.raises(service.InvalidMessageError, match="no Parquet form"):
        parquet.check(good.set_column(good.schema.get_field_index("obs"), "obs", nested))
    # Arrow IPC files hold any Arrow type.
    ipc = arrow_stream.ArrowStreamWriter(tmp_path, trajectories.AGENT, spec.SinkFormat.ARROW)
    ipc.check(odd)


async def test_after_a_failed_commit_the_final_commit_commits_nothing(tmp_path: Path) -> None:
    """Files commit in order: one that failed must not be skipped by the next one's name.

    A later file committed on the way out would move the position past the failed one's
    messages: resumed after it, they would be lost.
    """
    w = arrow_stream.ArrowStreamWriter(tmp_path, trajectories.AGENT)
    svc = service.SinkService(
        w, streams.ConnectOptions(), service.ServiceConfig(namespace="ml", agent="cartpole")
    )
    assert await w.open() == 0
    real_commit = w.commit
    failed: list[object] = []

    async def commit_fails_once(sealed: object) -> None:
        if not failed:
            failed.append(sealed)
            raise service.PermanentError("disk full")
        await real_commit(sealed)

    w.commit = commit_fails_once  # type: ignore[method-assign]
    await w.add(_delivery(1, DAY1))
    svc._last_seen = 1
    await svc._commit()  # in the background (pipelined); it fails
    await w.add(_delivery(2, DAY1))  # the next file, held by the writer
    svc._last_seen = 2
    with pytest.raises(service.PermanentError, match="disk full"):
        await svc._drain_commits()
    await svc._final_commit()
    assert arrow_stream.committed_files(tmp_path) == []
    with pytest.raises(service.PermanentError, match="a commit failed before"):
        await svc._commit()
    await w.close()
    again = arrow_stream.ArrowStreamWriter(tmp_path, trajectories.AGENT)
    assert await again.open() == 0, "a restart resumes before the failed file's messages"
    await again.close()


async def test_ipc_files_take_dictionaries_that_differ_between_messages(tmp_path: Path) -> None:
    """An IPC file has one dictionary per column: such columns are written as values,
    or the second message's would fail the file (and its commit, after every restart)."""
    w = arrow_stream.ArrowStreamWriter(tmp_path, trajectories.AGENT, spec.SinkFormat.ARROW)
    assert await w.open() == 0
    words = (["left", "right"], ["up", "down", "up"])
    for seq, values in enumerate(words, start=1):
        table = pa.Table.from_batches([trajectories.batch(1, seq)])
        tag = pa.array([values[i % len(values)] for i in range(table.num_rows)])
        table = table.append_column("aux_tag", tag.dictionary_encode())
        w.check(table)
        await w.add(service.Delivery(seq, DAY1, table, 1, table.nbytes))
    await w.commit(w.seal(2))
    [(first, last, path)] = arrow_stream.committed_files(tmp_path)
    assert (first, last) == (1, 2)
    written = pa.ipc.open_file(path).read_all()
    assert written.schema.field("aux_tag").type == pa.string()
    assert set(written.column("aux_tag").to_pylist()) == {"left", "right", "up", "down"}
    await w.close()


def test_ipc_refuses_what_its_files_could_not_take_before_any_file(tmp_path: Path) -> None:
    """Dead-lettered at the check, not failing the file (and the sink) in `add`."""
    w = arrow_stream.ArrowStreamWriter(tmp_path, trajectories.AGENT, spec.SinkFormat.ARROW)
    base = pa.Table.from_batches([trajectories.batch(1, 1)]).slice(0, 2)
    words = pa.array(["a", "b"])
    nested = pa.array([[0], [1]], pa.list_(pa.int32()))
    inner = pa.ListArray.from_arrays(
        pa.array([0, 1, 2]), pa.DictionaryArray.from_arrays(pa.array([0, 1], pa.int32()), words)
    )
    with pytest.raises(service.InvalidMessageError, match=r"\['aux_tags'\] hold dictionaries"):
        w.check(base.append_column("aux_tags", inner))
    bad = pa.DictionaryArray.from_arrays(pa.array([0, 5], pa.int32()), words, safe=False)
    with pytest.raises(IndexError):  # the service dead-letters it (invalid-arrow)
        w.check(base.append_column("aux_tag", bad))
    w.check(base.append_column("aux_list", nested))  # no dictionary: fine
    assert not list(tmp_path.rglob("*"))


async def test_dead_letters_after_the_last_file_are_recorded_beside_it(tmp_path: Path) -> None:
    """A commit with no data (only dead letters since the last file) has no file name to
    record its sequence in: a small file beside the partitions does, which dataset
    readers skip and a stream made anew sets aside with the files."""
    own = arrow_stream.agent_dir(tmp_path, trajectories.AGENT)
    own.mkdir(parents=True)
    crashed = own / f"{arrow_stream._TEMP_PREFIX}_done-0123{arrow_stream._TEMP_SUFFIX}"
    crashed.write_text("7\n")  # a crash while writing the small file
    w = arrow_stream.ArrowStreamWriter(tmp_path, trajectories.AGENT)
    assert await w.open() == 0
    assert not crashed.exists()
    await w.add(_delivery(1, DAY1))
    await w.commit(w.seal(1))
    await w.commit(w.seal(3))  # 2 and 3 were dead letters
    assert not _temp_files(tmp_path)
    await w.close()
    w = arrow_stream.ArrowStreamWriter(tmp_path, trajectories.AGENT)
    assert await w.open() == 3
    await w.commit(w.seal(2))  # an older position never moves it back
    await w.add(_delivery(4, DAY1))
    await w.commit(w.seal(4))
    await w.close()
    w = arrow_stream.ArrowStreamWriter(tmp_path, trajectories.AGENT)
    assert await w.open() == 4
    assert ds.dataset(tmp_path, format="parquet", partitioning="hive").to_table().num_rows == (
        2 * pa.Table.from_batches([trajectories.batch(1, 1)]).num_rows
    )
    assert await w.restart(4) == 0
    await w.close()
    w = arrow_stream.ArrowStreamWriter(tmp_path, trajectories.AGENT)
    assert await w.open() == 0, "the old stream's position went aside with its files"
    await w.close()


@pytest.mark.parametrize("garbled", ["12x", "\u00b2"])  # "²" passes str.isdigit()
async def test_a_garbled_done_file_is_named(tmp_path: Path, garbled: str) -> None:
    done = arrow_stream.agent_dir(tmp_path, trajectories.AGENT) / "_done"
    done.parent.mkdir(parents=True)
    done.write_text(garbled + "\n")
    w = arrow_stream.ArrowStreamWriter(tmp_path, trajectories.AGENT)
    with pytest.raises(service.PermanentError, match=r"_done: expected a stream sequence"):
        await w.open()
    await w.close()


def _with_id(d: service.Delivery, msg_id: str) -> service.Delivery:
    return dataclasses.replace(d, msg_id=msg_id)


async def test_message_ids_are_committed_with_their_file_and_read_back(tmp_path: Path) -> None:
    """The ids snapshot is durable before its file; one whose file never got its name
    (a crash between the two) is not used, else its messages would count as written."""
    own = arrow_stream.agent_dir(tmp_path, trajectories.AGENT)
    w = arrow_stream.ArrowStreamWriter(tmp_path, trajectories.AGENT)
    assert await w.open() == 0
    await w.add(_with_id(_delivery(1, DAY1), "pod-1-a-1"))
    await w.add(_with_id(_delivery(2, DAY1), "pod-1-a-2"))
    await w.add(_with_id(_delivery(3, DAY2), "pod-2-b-1"))  # a new day: two files
    await w.commit(w.seal(3))
    assert sorted(p.name for p in own.glob("_ids-*")) == [arrow_stream._ids_name(3)]
    assert {"pod-1-a-1", "pod-1-a-2", "pod-2-b-1"} <= set(_written(w.committed_ids))
    await w.add(_with_id(_delivery(4, DAY2), "pod-1-a-3"))
    await w.commit(w.seal(5))  # 5 was a dead letter
    await w.close()
    assert sorted(p.name for p in own.glob("_ids-*")) == [arrow_stream._ids_name(5)]

    # A crash after the next snapshot was written and before its file was renamed.
    crashed = own / arrow_stream._ids_name(6)
    crashed.write_text(
        message_ids.MessageIds.from_rows([("pod-1-a", [1, 4], DAY2.timestamp())]).to_json()
    )
    w = arrow_stream.ArrowStreamWriter(tmp_path, trajectories.AGENT)
    assert await w.open() == 5
    assert not crashed.exists()
    assert "pod-1-a-3" in w.committed_ids
    assert "pod-1-a-4" not in w.committed_ids, "its message was never committed"
    assert "pod-2-b-1" in w.committed_ids

    # A stream made anew: the files go aside, the ids stay under position 0.
    assert await w.restart(5) == 0
    assert [p.name for p in own.glob("_ids-*")] == [arrow_stream._ids_name(0)]
    await w.close()
    w = arrow_stream.ArrowStreamWriter(tmp_path, trajectories.AGENT)
    assert await w.open() == 0
    assert "pod-1-a-3" in w.committed_ids
    await w.close()


def _written(ids: message_ids.MessageIds) -> list[str]:
    return [
        f"{p}-{n}"
        for p, runs in ids.producers.items()
        for a, b in zip(runs.starts, runs.ends, strict=True)
        for n in range(a, b + 1)
    ]


async def test_a_garbled_ids_snapshot_is_named(tmp_path: Path) -> None:
    w = arrow_stream.ArrowStreamWriter(tmp_path, trajectories.AGENT)
    await w.open()
    await w.add(_with_id(_delivery(1, DAY1), "pod-1-a-1"))
    await w.commit(w.seal(1))
    await w.close()
    snapshot = arrow_stream.agent_dir(tmp_path, trajectories.AGENT) / arrow_stream._ids_name(1)
    snapshot.write_text("[1, 2")
    w = arrow_stream.ArrowStreamWriter(tmp_path, trajectories.AGENT)
    with pytest.raises(service.PermanentError, match=r"_ids-0+1\.json: expected the sink's"):
        await w.open()
    await w.close()


def test_seconds_parquet_would_overflow_in_milliseconds_are_refused(tmp_path: Path) -> None:
    good = pa.Table.from_batches([trajectories.batch(2, 0)])
    n = good.num_rows
    parquet = arrow_stream.ArrowStreamWriter(tmp_path, trajectories.AGENT)
    fine = pa.array([0] * n, pa.int64()).cast(pa.timestamp("s"))
    parquet.check(good.append_column("aux_t", fine))
    far = pa.array([0] * (n - 1) + [2**62], pa.int64()).cast(pa.timestamp("s"))
    for column in (far, far.dictionary_encode()):
        with pytest.raises(service.InvalidMessageError, match=r"aux_t: .*Parquet keeps milli"):
            parquet.check(good.append_column("aux_t", column))
    # Arrow IPC files keep seconds.
    ipc = arrow_stream.ArrowStreamWriter(tmp_path, trajectories.AGENT, spec.SinkFormat.ARROW)
    ipc.check(good.append_column("aux_t", far))
