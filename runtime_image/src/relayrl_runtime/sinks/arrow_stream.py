"""The Arrow sink: trajectory messages from JetStream to Parquet or Arrow IPC files.

Run by `relayrl-sink arrow` (one process per Agent, a Deployment the operator renders)
around `sinks.service.SinkService`. Files are partitioned hive-style by agent and date
(`agent=<name>/date=<YYYY-MM-DD>/`; the agent column lives in the path, as hive layouts
do), so the output reads as one pyarrow dataset with `partitioning="hive"` (and in
pandas, polars and duckdb with hive partitioning). A file rotates after `rotate_bytes`
or `rotate_seconds`, when the date or the schema changes, and on shutdown.

Exactly once (issue 4): a file is written under a hidden temporary name, fsynced, then
renamed to `part-<first seq>-<last seq>.<ext>` and its directory fsynced; only then are
its messages acked. The stream sequences in the committed file names are the sink's
record: on start it resumes after the highest one and deletes leftover temporary files,
so a crash at any point neither skips nor repeats a message. The ids of the messages
written (`message_ids`) are kept beside the partitions, in `_ids-<last seq>.json`, made
durable just before the file whose last sequence it names: on start the sink takes the
newest one its files reach.

A file Arrow cannot write for the data in it (no check foresaw it) is dropped: a file of
one message has that message dead-lettered (`service.RowsRefused`), a file of more has
the service take its messages again, in smaller files (`service.WriteRefused`).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc
import pyarrow.parquet as pq

from relayrl_runtime import spec
from relayrl_runtime.sinks import message_ids, service

log = logging.getLogger(__name__)

SUFFIXES: Final = {spec.SinkFormat.PARQUET: ".parquet", spec.SinkFormat.ARROW: ".arrow"}
_COMMITTED: Final = re.compile(r"^part-(\d{20})-(\d{20})\.(parquet|arrow)$")
_TEMP_PREFIX: Final = ".part-"
PARTITION_COLUMN: Final = "agent"
_TEMP_SUFFIX: Final = ".tmp"
# Rows per Parquet row group: big enough for good compression and fast scans.
ROW_GROUP_ROWS: Final = 256 * 1024
# Low-cardinality columns worth a Parquet dictionary, and columns worth min/max stats.
DICTIONARY_COLUMNS: Final = ("actor_id", "segment", "policy_version", "terminated", "truncated")
STATISTICS_COLUMNS: Final = ("episode_id", "step", "actor_id", "policy_version", "obs_time")
# Counters and clocks that grow along a trajectory: delta encoding stores them in next
# to nothing, and saves the codec most of its work (a fifth of the write time with zstd).
DELTA_COLUMNS: Final = ("step", "obs_time", "action_time")
# Message bytes queued to the encode thread before `add` waits (bounds memory; about
# two Parquet row groups of CartPole steps).
_MAX_QUEUED_BYTES: Final = 64 << 20
# A Parquet row group also ends at this many message bytes: wide rows (images) would
# otherwise gather gigabytes before `ROW_GROUP_ROWS` (CartPole's 256k rows are 27 MB).
_ROW_GROUP_BYTES: Final = _MAX_QUEUED_BYTES // 2


@dataclasses.dataclass(frozen=True)
class ParquetSettings:
    """How Parquet files are encoded (`relayrl-sink arrow --compression/--compression-level`).

    Dictionaries, statistics and delta encoding only where they pay: dictionary-encoding
    random floats (obs, logp, aux) costs 2-3x the write time and makes files bigger;
    statistics are kept for the columns queries filter on. The codec is snappy unless
    the Agent says otherwise (`spec.ParquetCompression` says why).
    """

    compression: str = spec.ParquetCompression.SNAPPY.value
    # None: the codec's default (zstd: 1).
    compression_level: int | None = None
    row_group_rows: int = ROW_GROUP_ROWS

    def options(self, schema: pa.Schema) -> dict[str, Any]:
        """Keyword arguments of `pyarrow.parquet.ParquetWriter` for `schema`."""
        names = set(schema.names)
        delta = [
            c
            for c in DELTA_COLUMNS
            if c in names and pa.types.is_integer(_physical(schema.field(c).type))
        ]
        return {
            "compression": self.compression,
            "compression_level": self.compression_level,
            "use_dictionary": [c for c in DICTIONARY_COLUMNS if c in names],
            "write_statistics": [c for c in STATISTICS_COLUMNS if c in names],
            "column_encoding": dict.fromkeys(delta, "DELTA_BINARY_PACKED"),
        }

    def check(self) -> None:
        """Raise ValueError unless pyarrow writes with this codec and level (snappy and
        none take no level): found at startup, not as a refusal of every message."""
        one = pa.table({"x": [1]})
        try:  # pyarrow says no at the first write
            with pq.ParquetWriter(
                pa.BufferOutputStream(),
                one.schema,
                compression=self.compression,
                compression_level=self.compression_level,
            ) as writer:
                writer.write_table(one)
        except (pa.ArrowException, ValueError) as err:
            raise ValueError(
                f"codec {self.compression} with level {self.compression_level}: {err}"
            ) from None


def _physical(t: pa.DataType) -> pa.DataType:
    """The integer type a timestamp is stored as; other types as they are."""
    return pa.int64() if pa.types.is_timestamp(t) else t


# Beside an Agent's date partitions: which stream (name@created) their sequences count
# in. Names starting with "_" are skipped by dataset readers.
_ORIGIN_FILE: Final = "_stream"
# Beside them too: the last sequence done without a file (dead letters after the last
# data message), so that a restart does not dead-letter them again.
_DONE_FILE: Final = "_done"
# Beside them too: the message ids written up to the sequence in the name (MessageIds).
_IDS: Final = re.compile(r"^_ids-(\d{20})\.json$")


def _ids_name(seq: int) -> str:
    return f"_ids-{seq:020d}.json"


def _without_dictionaries(table: pa.Table) -> pa.Table:
    """Dictionary columns as their values' type, for the Arrow IPC file format.

    An IPC file holds one dictionary per column for all its batches (no replacement,
    no delta), so a message whose dictionary differs from an earlier one in the file
    could not be written, after every restart again.
    """
    if not any(pa.types.is_dictionary(t) for t in table.schema.types):
        return table
    for i, f in enumerate(table.schema):
        if pa.types.is_dictionary(f.type):
            plain = f.type.value_type
            table = table.set_column(i, f.with_type(plain), table.column(i).cast(plain))
    return table


def _nested(t: pa.DataType) -> bool:
    return bool(
        pa.types.is_list(t)
        or pa.types.is_large_list(t)
        or pa.types.is_fixed_size_list(t)
        or pa.types.is_dictionary(t)
    )


def _check_seconds(table: pa.Table) -> None:
    """Parquet keeps no seconds: a timestamp[s] or time32[s] column is written in
    milliseconds, which a value far from 1970 overflows (on any row, not just the one
    `check` writes). Such a message is dead-lettered rather than failing its file."""
    for f in table.schema:
        leaf = f.type
        while _nested(leaf):
            leaf = leaf.value_type
        if pa.types.is_timestamp(leaf) and leaf.unit == "s":
            wanted: pa.DataType = pa.timestamp("ms", tz=leaf.tz)
        elif pa.types.is_time32(leaf) and leaf.unit == "s":
            wanted = pa.time32("ms")
        else:
            continue
        col: pa.ChunkedArray | pa.Array = table.column(f.name)
        while _nested(col.type):  # the values, as the writer sees them
            if pa.types.is_dictionary(col.type):
                col = col.cast(col.type.value_type)
            else:
                col = pc.list_flatten(col)
        try:
            col.cast(wanted)
        except pa.ArrowInvalid as err:
            raise service.InvalidMessageError(
                service.DeadLetterReason.SCHEMA_MISMATCH,
                f"column {f.name}: {err}; Parquet keeps milliseconds",
            ) from err


def _check_ipc(table: pa.Table) -> None:
    """Refuse what an IPC file could not take from this message on (see
    `_without_dictionaries`): a dictionary inside a list or struct, whose dictionary
    may differ from the file's, or a dictionary column that cannot be decoded."""
    nested = []
    for f in table.schema:
        if pa.types.is_dictionary(f.type):
            if f.name != PARTITION_COLUMN:  # (that one is not written)
                table.column(f.name).cast(f.type.value_type)  # a bad index fails here
        elif _holds_dictionary(f.type):
            nested.append(f.name)
    if nested:
        raise service.InvalidMessageError(
            service.DeadLetterReason.SCHEMA_MISMATCH,
            f"columns {nested} hold dictionaries inside: an Arrow IPC file keeps one "
            "dictionary per column for all its messages",
        )


class _DataRefused(Exception):
    """A file Arrow could not write for the data in it (not for the storage)."""


# What Arrow raises for data it cannot encode; its errors of the storage (OSError) and
# of memory are not the messages' fault, and leave the sink as before (exit 2).
_DATA_ERRORS: Final = (
    pa.ArrowInvalid,
    pa.ArrowCapacityError,
    pa.ArrowNotImplementedError,
    pa.ArrowTypeError,
    pa.ArrowIndexError,
    pa.ArrowKeyError,
)


def _of_data(err: BaseException | None) -> bool:
    return isinstance(err, _DATA_ERRORS) and not isinstance(err, (OSError, MemoryError))


def _holds_dictionary(t: pa.DataType) -> bool:
    return pa.types.is_dictionary(t) or any(
        _holds_dictionary(t.field(i).type) for i in range(t.num_fields)
    )


def partition_dir(root: Path, agent: str, day: dt.date) -> Path:
    """Where one agent's files of one (UTC) day go."""
    return agent_dir(root, agent) / f"date={day.isoformat()}"


def agent_dir(root: Path, agent: str) -> Path:
    """One agent's partition: its date directories, and what the sink keeps beside them."""
    return root / f"agent={agent}"


def committed_files(root: Path, agent: str = "*") -> list[tuple[int, int, Path]]:
    """(first seq, last seq, path) of the committed files under root, by first seq:
    one Agent's, or (by default) every Agent's."""
    out = []
    for path in root.glob(f"agent={agent}/date=*/part-*"):
        m = _COMMITTED.match(path.name)
        if m:
            out.append((int(m.group(1)), int(m.group(2)), path))
    return sorted(out)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _OpenFile:
    """The file being written: temp path, writer, what it holds.

    Made on the event loop; `create` and `write` run on the sink's encode thread (in the
    order they were handed over), `finish` on its commit thread, never both at once for
    one file (the commit awaits the file's writes first).
    """

    def __init__(
        self,
        directory: Path,
        first_seq: int,
        schema: pa.Schema,
        fmt: spec.SinkFormat,
        parquet: ParquetSettings,
        day: dt.date,
    ) -> None:
        self.directory = directory
        self.first_seq = first_seq
        self.last_seq = first_seq
        self.schema = schema
        self.format = fmt
        self.parquet = parquet
        self.day = day
        self.opened = time.monotonic()
        self.rows = 0
        self.messages = 0
        # Message bytes handed over (event loop) and those already in the file (encode
        # thread): with the file's size, an estimate of how big it is going to be.
        self.added_bytes = 0
        self.encoded_bytes = 0
        self.size = 0
        self.buffered: list[pa.Table] = []
        self.buffered_rows = 0
        self.buffered_bytes = 0
        # A create or write that failed leaves the file unusable: `finish` refuses it.
        self.failed: BaseException | None = None
        self.committed = False
        self.ids: list[tuple[str, float]] = []  # (Nats-Msg-Id, stream time) of its messages
        # The pid alone is not unique across pods (the sink is pid 1 in each): a second
        # writer by mistake must never write into this one's file.
        unique = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.temp = directory / f"{_TEMP_PREFIX}{first_seq:020d}-{unique}{_TEMP_SUFFIX}"
        self.out: pa.NativeFile | None = None
        self.writer: Any = None

    def create(self) -> None:
        """Open the temp file and its writer (encode thread). Failures are kept."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.out = pa.OSFile(str(self.temp), "wb")
            if self.format is spec.SinkFormat.PARQUET:
                options = self.parquet.options(self.schema)
                self.writer = pq.ParquetWriter(self.out, self.schema, **options)
            else:
                self.writer = pyarrow.ipc.new_file(
                    self.out,
                    self.schema,
                    options=pyarrow.ipc.IpcWriteOptions(unify_dictionaries=True),
                )
        except Exception as err:
            log.error("creating %s failed: %s", self.temp, err)
            self.failed = err

    def pending_bytes(self) -> int:
        """Estimated size once everything handed over is written."""
        return self.size + max(0, self.added_bytes - self.encoded_bytes)

    def take(self, table: pa.Table, nbytes: int) -> tuple[list[pa.Table], int] | None:
        """Buffer one message's rows (event loop); what is ready to encode now, if anything.

        Parquet gathers whole row groups here, so the encode thread gets one big piece
        of work while the loop fetches the next, rather than waiting on it per message.
        """
        self.rows += table.num_rows
        self.messages += 1
        self.added_bytes += nbytes
        if self.format is spec.SinkFormat.ARROW:
            return [table], nbytes
        self.buffered.append(table)
        self.buffered_rows += table.num_rows
        self.buffered_bytes += nbytes
        if (
            self.buffered_rows < self.parquet.row_group_rows
            and self.buffered_bytes < _ROW_GROUP_BYTES
        ):
            return None
        ready = (self.buffered, self.buffered_bytes)
        self.buffered, self.buffered_rows, self.buffered_bytes = [], 0, 0
        return ready

    def write(self, tables: list[pa.Table], nbytes: int) -> None:
        """Encode taken rows (encode thread). Failures are kept, not raised."""
        if self.failed is not None or not tables:
            return
        try:
            if self.format is spec.SinkFormat.ARROW:
                for table in tables:
                    self.writer.write_table(table)
            else:
                table = pa.concat_tables(tables).unify_dictionaries()
                self.writer.write_table(table, row_group_size=max(1, table.num_rows))
            self.encoded_bytes += nbytes
            assert self.out is not None
            self.size = int(self.out.tell())
        except Exception as err:
            log.error("writing %s failed: %s", self.temp, err)
            self.failed = err

    def finish(self) -> Path:
        """Close, fsync, rename to the committed name, fsync the directory (commit thread)."""
        rest, nbytes = self.buffered, self.buffered_bytes
        self.buffered, self.buffered_rows, self.buffered_bytes = [], 0, 0
        self.write(rest, nbytes)
        if self.failed is not None:
            raise service.PermanentError(f"{self.temp}: write failed: {self.failed}")
        assert self.out is not None
        self.writer.close()
        if not self.out.closed:
            self.out.close()
        fd = os.open(self.temp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        final = (
            self.directory
            / f"part-{self.first_seq:020d}-{self.last_seq:020d}{SUFFIXES[self.format]}"
        )
        os.replace(self.temp, final)
        _fsync_dir(self.directory)
        return final

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            if self.writer is not None:
                self.writer.close()
        with contextlib.suppress(Exception):
            if self.out is not None:
                self.out.close()
        with contextlib.suppress(FileNotFoundError):
            self.temp.unlink()


@dataclasses.dataclass(frozen=True)
class _Sealed:
    """Files to commit together, in sequence order, and the writes they wait for."""

    files: list[_OpenFile]
    writes: list[asyncio.Future[None]]
    last_seq: int


class ArrowStreamWriter:
    """`service.Writer` for Parquet / Arrow IPC files.

    Pipelined: `seal` hands the open file over to a commit (flush, close, fsync, rename on
    a commit thread) while the next messages are fetched, decoded and encoded into a new
    file on the encode thread. The service runs one commit at a time, in seal order, so
    committed files, and the sequences in their names, only ever grow.
    """

    kind = "arrow"
    pipelined = True

    @property
    def hold_seconds(self) -> float:
        return self.rotate_seconds

    def __init__(
        self,
        root: Path,
        agent: str,
        fmt: spec.SinkFormat = spec.SinkFormat.PARQUET,
        *,
        rotate_bytes: int = 128 << 20,
        rotate_seconds: float = 300.0,
        parquet: ParquetSettings | None = None,
    ) -> None:
        self.root = root
        self.agent = agent
        self.format = fmt
        self.rotate_bytes = rotate_bytes
        self.rotate_seconds = rotate_seconds
        self.parquet = parquet if parquet is not None else ParquetSettings()
        self._file: _OpenFile | None = None
        # Files ended by a new day or schema, committed with the next seal.
        self._ended: list[_OpenFile] = []
        # Writes handed to the encode thread since the last seal and not known to be
        # done, with their message bytes (it runs them in order, so awaiting these
        # awaits every earlier one too).
        self._writes: collections.deque[tuple[asyncio.Future[None], int]] = collections.deque()
        self._queued_bytes = 0
        self._encode = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="arrow-sink-encode"
        )
        self._finish = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="arrow-sink-commit"
        )
        self.files_committed = 0
        self._done = 0  # what the _done file says
        self.committed_ids = message_ids.MessageIds()
        # The last schema found writable as Parquet (messages nearly always share one).
        self._writable: pa.Schema | None = None

    @property
    def pending(self) -> bool:
        return self._file is not None or bool(self._ended)

    async def open(self) -> int:
        """Remove uncommitted temp files; resume after the highest committed sequence.

        Only this Agent's partition counts: a claim may be shared with other Agents'
        sinks, whose files (and temp files being written) are theirs.
        """
        own = agent_dir(self.root, self.agent)
        await asyncio.to_thread(own.mkdir, parents=True, exist_ok=True)
        for tmp in [
            *own.glob(f"date=*/{_TEMP_PREFIX}*{_TEMP_SUFFIX}"),
            *own.glob(f"{_TEMP_PREFIX}*{_TEMP_SUFFIX}"),  # of the small files beside them
        ]:
            log.info("removing uncommitted %s", tmp)
            tmp.unlink()
        files = committed_files(self.root, self.agent)
        done = await self._read_beside(_DONE_FILE) or "0"
        if not (done.isascii() and done.isdigit()):
            raise service.PermanentError(
                f"{agent_dir(self.root, self.agent) / _DONE_FILE}: expected a stream"
                f" sequence, found {done[:40]!r}"
            )
        self._done = int(done)
        committed = max(self._done, max((last for _, last, _ in files), default=0))
        self.committed_ids = await asyncio.to_thread(self._load_ids, committed)
        return committed

    def _snapshots(self) -> list[tuple[int, Path]]:
        """(sequence, path) of the `_ids-*` files beside the partitions, by sequence."""
        found = []
        for path in agent_dir(self.root, self.agent).glob("_ids-*.json"):
            m = _IDS.match(path.name)
            if m:
                found.append((int(m.group(1)), path))
        return sorted(found)

    def _load_ids(self, committed: int) -> message_ids.MessageIds:
        """The newest ids snapshot at or below `committed`; the others are removed (one
        above it was written for a file whose rename never happened)."""
        snapshots = self._snapshots()
        usable = [(seq, path) for seq, path in snapshots if seq <= committed]
        ids = message_ids.MessageIds()
        if usable:
            path = usable[-1][1]
            try:
                ids = message_ids.MessageIds.from_json(path.read_text())
            except ValueError as err:
                raise service.PermanentError(
                    f"{path}: expected the sink's message ids (JSON, version "
                    f"{message_ids.FORMAT_VERSION}): {err}"
                ) from err
        keep = usable[-1][1] if usable else None
        for _, path in snapshots:
            if path != keep:
                path.unlink(missing_ok=True)
        log.info("message ids of %d producer(s) read", len(ids))
        return ids

    async def _read_beside(self, name: str) -> str | None:
        """A small file beside the partitions, stripped (None: absent or empty)."""
        try:
            text = await asyncio.to_thread((agent_dir(self.root, self.agent) / name).read_text)
        except FileNotFoundError:
            return None
        return text.strip() or None

    async def _write_beside(self, name: str, text: str) -> None:
        """Write a small file beside the partitions: temp name, fsync, rename, fsync the
        directory."""
        path = agent_dir(self.root, self.agent) / name

        def write() -> None:
            tmp = path.with_name(f"{_TEMP_PREFIX}{name}-{secrets.token_hex(8)}{_TEMP_SUFFIX}")
            try:
                with open(tmp, "w") as f:
                    f.write(text + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)  # a full disk, say: retried, never left behind
                raise
            _fsync_dir(path.parent)

        await asyncio.to_thread(write)

    async def origin(self) -> str | None:
        """The stream the files' sequences belong to (a small file beside them)."""
        return await self._read_beside(_ORIGIN_FILE)

    async def set_origin(self, origin: str) -> None:
        await self._write_beside(_ORIGIN_FILE, origin)

    async def restart(self, stale: int) -> int:
        """Move this Agent's files of the old stream under `_replaced-<time>` (which
        dataset readers skip, as they skip names starting with "_"); resume from 0."""
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        aside = agent_dir(self.root, self.agent) / f"_replaced-{stamp}"
        # The ids stay: a copy of a message written from the old stream, published again
        # to the new one, is still a copy. Kept under the new stream's position first.
        await self._write_beside(_ids_name(0), self.committed_ids.to_json())

        def move() -> None:
            for _, _, path in committed_files(self.root, self.agent):
                target = aside / path.parent.name / path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
                _fsync_dir(target.parent)
                _fsync_dir(path.parent)
            done = agent_dir(self.root, self.agent) / _DONE_FILE
            if done.exists():
                aside.mkdir(parents=True, exist_ok=True)
                os.replace(done, aside / _DONE_FILE)
                _fsync_dir(done.parent)
            for seq, path in self._snapshots():
                if seq:
                    path.unlink()

        await asyncio.to_thread(move)
        self._done = 0
        log.warning("moved files of sequences up to %d to %s", stale, aside)
        return 0

    def check(self, table: pa.Table) -> None:
        """A new schema starts a new file; for Parquet, it must be one Parquet can hold.

        A column type Parquet has no form for (a union, say) would fail the file's
        commit, after every restart again: such a message is dead-lettered instead.
        Each new schema is tried once, on one row (about 0.1 ms). For Arrow IPC files,
        the dictionary columns `add` writes as values must turn into values.
        """
        if self.format is spec.SinkFormat.ARROW:
            _check_ipc(table)
            return
        _check_seconds(table)
        schema = table.schema
        if self._writable is not None and self._writable.equals(schema, check_metadata=True):
            return
        if PARTITION_COLUMN in schema.names:
            table = table.drop_columns([PARTITION_COLUMN])  # as `add` writes it
        try:
            # A row, with the files' own options: some types fail only on data (a
            # dictionary of lists, say).
            with pq.ParquetWriter(
                pa.BufferOutputStream(), table.schema, **self.parquet.options(table.schema)
            ) as probe:
                probe.write_table(table.slice(0, 1))
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise service.InvalidMessageError(
                service.DeadLetterReason.SCHEMA_MISMATCH, f"no Parquet form: {err}"
            ) from err
        self._writable = schema

    async def add(self, delivery: service.Delivery) -> None:
        day = delivery.time.astimezone(dt.UTC).date()
        table = delivery.table
        if PARTITION_COLUMN in table.schema.names:
            # Hive layout: the agent lives in the path (the service checked every row
            # names this sink's Agent), not in the files.
            table = table.drop_columns([PARTITION_COLUMN])
        if self.format is spec.SinkFormat.ARROW:
            table = _without_dictionaries(table)
        f = self._file
        if f is not None and (
            f.day != day or not f.schema.equals(table.schema, check_metadata=True)
        ):
            # A file holds one day and one schema: it is committed with the next seal.
            self._ended.append(f)
            f = self._file = None
        if f is None:
            directory = partition_dir(self.root, self.agent, day)
            f = _OpenFile(directory, delivery.seq, table.schema, self.format, self.parquet, day)
            self._file = f
            # Created on the encode thread, behind the last file's writes: not awaited,
            # so the loop goes on while they finish.
            self._hand_over(f.create, 0)
        f.last_seq = delivery.seq
        if delivery.msg_id is not None:
            f.ids.append((delivery.msg_id, delivery.time.timestamp()))
        ready = f.take(table, delivery.size)
        if ready is None:
            return
        # Encoded on the encode thread, overlapping with the next fetch; bounded queue.
        tables, nbytes = ready
        self._hand_over(lambda: f.write(tables, nbytes), nbytes)
        while self._writes and (
            self._writes[0][0].done() or self._queued_bytes > _MAX_QUEUED_BYTES
        ):
            done, size = self._writes.popleft()
            self._queued_bytes -= size
            await done

    def due(self, now: float) -> bool:
        if self._ended:
            return True
        f = self._file
        if f is None:
            return False
        return f.pending_bytes() >= self.rotate_bytes or now - f.opened >= self.rotate_seconds

    def seal(self, last_seq: int) -> object:
        """Take the open file (and any ended by a day or schema change) as one commit."""
        files = [*self._ended, *([self._file] if self._file is not None else [])]
        sealed = _Sealed(files, [fut for fut, _ in self._writes], last_seq)
        self._ended, self._file = [], None
        self._writes, self._queued_bytes = collections.deque(), 0
        return sealed

    async def commit(self, sealed: object) -> None:
        """Finish the sealed files in order: each durable under its final name, then the next.

        Safe to retry (the service does on unexpected errors): finished files are skipped.
        """
        assert isinstance(sealed, _Sealed)
        for write in sealed.writes:
            await write  # never raises: a failed write marks its file
        left = [f for f in sealed.files if not f.committed]
        if left:
            # Sequences after the last data message (dead letters) are done too: the
            # name records them, so a restart does not dead-letter them again.
            left[-1].last_seq = max(left[-1].last_seq, sealed.last_seq)
        elif sealed.last_seq > max([self._done, *(f.last_seq for f in sealed.files)]):
            # Only dead letters since the last file (or a file left out, its message
            # dead-lettered): no name to record them in.
            await self._write_beside(_DONE_FILE, str(sealed.last_seq))
            self._done = sealed.last_seq
        loop = asyncio.get_running_loop()
        for i, f in enumerate(sealed.files):
            if f.committed:
                continue
            ids, touched, forgotten = self.committed_ids.merged(f.ids)
            if touched or forgotten:
                # Durable before the file: once its name is there, so are its ids.
                await self._write_beside(_ids_name(f.last_seq), ids.to_json())
            try:
                await asyncio.wrap_future(self._finish.submit(self._finish_file, f), loop=loop)
            except _DataRefused as err:
                if touched or forgotten:
                    await asyncio.to_thread(self._drop_snapshot, f.last_seq)
                raise self._refused(sealed, i, str(err)) from err
            self.committed_ids = ids
            if touched or forgotten:
                await asyncio.to_thread(self._drop_snapshots_before, f.last_seq)

    def _refused(self, sealed: _Sealed, i: int, reason: str) -> Exception:
        """What to raise for file `i` of `sealed`, which Arrow could not write for its
        data: a file of one message names it (RowsRefused: the service dead-letters it
        and commits the rest of the seal); a file of more asks the service to take its
        messages again, half as many to a file (WriteRefused), and what was not committed
        is dropped."""
        f = sealed.files[i]
        if f.messages == 1:
            one = service.RowsRefused([(f.first_seq, f"Arrow could not write it: {reason}")])
            one.rows = {f.first_seq: f.rows}
            one.leave_out = lambda: sealed.files.remove(f)
            return one
        for later in sealed.files[i + 1 :]:
            later.discard()
        refused = service.WriteRefused(f.first_seq, f.last_seq, f.messages, reason, self.reset)
        # Those before it are committed: the service counts them.
        done = sealed.files[:i]
        refused.committed = [
            sum(g.messages for g in done),
            sum(g.rows for g in done),
            sum(g.added_bytes for g in done),
        ]
        refused.committed_seq = done[-1].last_seq if done else 0
        return refused

    def _drop_snapshot(self, seq: int) -> None:
        (agent_dir(self.root, self.agent) / _ids_name(seq)).unlink(missing_ok=True)

    def _drop_snapshots_before(self, seq: int) -> None:
        for older, path in self._snapshots():
            if older < seq:
                path.unlink(missing_ok=True)

    async def probe(self) -> None:
        """The output directory is there and writable (a volume gone, say, is not)."""

        def check() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            if not os.access(self.root, os.W_OK | os.X_OK):
                raise PermissionError(f"{self.root}: not writable")

        await asyncio.to_thread(check)

    async def reset(self) -> None:
        """Drop everything added and not committed (the service takes it again)."""
        for write, _ in list(self._writes):
            with contextlib.suppress(Exception):
                await write
        for f in [*self._ended, *([self._file] if self._file is not None else [])]:
            f.discard()
        self._ended, self._file = [], None
        self._writes, self._queued_bytes = collections.deque(), 0

    async def close(self) -> None:
        # Not committed: the data comes again from the stream after a restart.
        await self.reset()
        self._encode.shutdown(wait=True)
        self._finish.shutdown(wait=True)

    def _finish_file(self, f: _OpenFile) -> None:
        try:
            final = f.finish()
        except Exception as err:
            f.discard()
            cause = f.failed or err  # a write that failed before: finish names it
            if _of_data(cause):
                raise _DataRefused(str(cause)) from cause
            if isinstance(err, service.PermanentError):
                raise
            # Half-finished files are not retried in place: the process exits, and the
            # restart drops the temp file and reads the messages again.
            raise service.PermanentError(f"{f.temp}: {err}") from err
        f.committed = True
        self.files_committed += 1
        log.info("committed %s (%d rows)", final, f.rows)

    def _hand_over(self, fn: Callable[[], None], nbytes: int) -> None:
        """Queue work on the encode thread (in order) as part of the next commit."""
        fut = asyncio.wrap_future(self._encode.submit(fn), loop=asyncio.get_running_loop())
        self._writes.append((fut, nbytes))
        self._queued_bytes += nbytes
