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
so a crash at any point neither skips nor repeats a message.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar

import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq

from relayrl_runtime import spec
from relayrl_runtime.sinks import service

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
# Writes queued to the writer thread before `add` waits (bounds memory).
_MAX_QUEUED: Final = 4

_T = TypeVar("_T")


def parquet_options(schema: pa.Schema, compression: str) -> dict[str, Any]:
    """ParquetWriter settings: dictionaries and statistics only where they pay.

    Dictionary-encoding random floats (obs, logp, aux) costs 2-3x the write time and
    makes files bigger; statistics are kept for the columns queries filter on.
    """
    names = set(schema.names)
    return {
        "compression": compression,
        "use_dictionary": [c for c in DICTIONARY_COLUMNS if c in names],
        "write_statistics": [c for c in STATISTICS_COLUMNS if c in names],
    }


def partition_dir(root: Path, agent: str, day: dt.date) -> Path:
    """Where one agent's files of one (UTC) day go."""
    return root / f"agent={agent}" / f"date={day.isoformat()}"


def committed_files(root: Path) -> list[tuple[int, int, Path]]:
    """(first seq, last seq, path) of every committed file under root, by first seq."""
    out = []
    for path in root.glob("agent=*/date=*/part-*"):
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
    """The file being written: temp path, writer, what it holds."""

    def __init__(
        self,
        directory: Path,
        first_seq: int,
        schema: pa.Schema,
        fmt: spec.SinkFormat,
        compression: str,
        day: dt.date,
    ) -> None:
        self.directory = directory
        self.first_seq = first_seq
        self.last_seq = first_seq
        self.schema = schema
        self.format = fmt
        self.day = day
        self.opened = time.monotonic()
        self.rows = 0
        self.buffered: list[pa.Table] = []
        self.buffered_rows = 0
        directory.mkdir(parents=True, exist_ok=True)
        self.temp = directory / f"{_TEMP_PREFIX}{first_seq:020d}-{os.getpid()}{_TEMP_SUFFIX}"
        self.out = pa.OSFile(str(self.temp), "wb")
        self.writer: Any
        if fmt is spec.SinkFormat.PARQUET:
            self.writer = pq.ParquetWriter(self.out, schema, **parquet_options(schema, compression))
        else:
            self.writer = pyarrow.ipc.new_file(
                self.out,
                schema,
                options=pyarrow.ipc.IpcWriteOptions(unify_dictionaries=True),
            )

    @property
    def size(self) -> int:
        return int(self.out.tell())

    def write(self, table: pa.Table, flush: bool) -> None:
        if self.format is spec.SinkFormat.ARROW:
            self.writer.write_table(table)
            return
        self.buffered.append(table)
        self.buffered_rows += table.num_rows
        if flush or self.buffered_rows >= ROW_GROUP_ROWS:
            self.flush_row_group()

    def flush_row_group(self) -> None:
        if self.buffered:
            table = pa.concat_tables(self.buffered).unify_dictionaries()
            self.writer.write_table(table, row_group_size=max(1, table.num_rows))
            self.buffered, self.buffered_rows = [], 0

    def finish(self) -> Path:
        """Close, fsync, rename to the committed name, fsync the directory."""
        self.flush_row_group()
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
            self.writer.close()
        with contextlib.suppress(Exception):
            self.out.close()
        with contextlib.suppress(FileNotFoundError):
            self.temp.unlink()


class ArrowStreamWriter:
    """`service.Writer` for Parquet / Arrow IPC files."""

    kind = "arrow"
    pipelined = False

    def __init__(
        self,
        root: Path,
        agent: str,
        fmt: spec.SinkFormat = spec.SinkFormat.PARQUET,
        *,
        rotate_bytes: int = 128 << 20,
        rotate_seconds: float = 300.0,
        compression: str = "zstd",
    ) -> None:
        self.root = root
        self.agent = agent
        self.format = fmt
        self.rotate_bytes = rotate_bytes
        self.rotate_seconds = rotate_seconds
        self.compression = compression
        self._file: _OpenFile | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="arrow-sink")
        self._queued: list[asyncio.Future[None]] = []
        self._queued_bytes = 0
        self.files_committed = 0

    @property
    def pending(self) -> bool:
        return self._file is not None

    async def open(self) -> int:
        """Remove uncommitted temp files; resume after the highest committed sequence."""
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        for tmp in self.root.glob(f"agent=*/date=*/{_TEMP_PREFIX}*{_TEMP_SUFFIX}"):
            log.info("removing uncommitted %s", tmp)
            tmp.unlink()
        files = committed_files(self.root)
        return max((last for _, last, _ in files), default=0)

    async def add(self, delivery: service.Delivery) -> None:
        day = delivery.time.astimezone(dt.UTC).date()
        table = delivery.table
        if PARTITION_COLUMN in table.column_names:
            # Hive layout: the agent lives in the path (the service checked every row
            # names this sink's Agent), not in the files.
            table = table.drop_columns([PARTITION_COLUMN])
        f = self._file
        if f is not None and (
            f.day != day or not f.schema.equals(table.schema, check_metadata=True)
        ):
            # A file holds one day and one schema: finish it, recording its last seq.
            await self._drain()
            await self._run(self._finish_current)
            f = None
        if f is None:
            directory = partition_dir(self.root, self.agent, day)
            schema, fmt, comp = table.schema, self.format, self.compression
            f = await self._run(lambda: _OpenFile(directory, delivery.seq, schema, fmt, comp, day))
            self._file = f
        f.last_seq = delivery.seq
        f.rows += table.num_rows
        self._queued_bytes += delivery.size
        # Write on the writer thread, overlapping with the next fetch; bounded queue.
        loop = asyncio.get_running_loop()
        opened = f
        self._queued.append(
            asyncio.wrap_future(self._pool.submit(opened.write, table, False), loop=loop)
        )
        if len(self._queued) >= _MAX_QUEUED:
            await self._queued.pop(0)

    def due(self, now: float) -> bool:
        f = self._file
        if f is None:
            return False
        return f.size + self._queued_bytes >= self.rotate_bytes or (
            now - f.opened >= self.rotate_seconds
        )

    def seal(self, last_seq: int) -> object:
        # Not pipelined: the service awaits commit() right after, so nothing is added
        # in between; the file itself is the sealed unit.
        return last_seq

    async def commit(self, sealed: object) -> None:
        assert isinstance(sealed, int)
        last_seq = sealed
        if self._file is None:
            return
        await self._drain()
        # Sequences after the last data message (dead letters) are done too: the name
        # records them, so a restart does not dead-letter them again.
        self._file.last_seq = max(self._file.last_seq, last_seq)
        await self._run(self._finish_current)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._drain()
        if self._file is not None:
            # Not committed: the data comes again from the stream after a restart.
            self._file.discard()
            self._file = None
        self._pool.shutdown(wait=True)

    async def _drain(self) -> None:
        queued, self._queued = self._queued, []
        self._queued_bytes = 0
        for fut in queued:
            await fut

    def _finish_current(self) -> None:
        f = self._file
        assert f is not None
        try:
            final = f.finish()
        except OSError as err:
            # Half-finished files are not retried in place: the process exits, and the
            # restart drops the temp file and reads the messages again.
            f.discard()
            self._file = None
            raise service.PermanentError(f"{f.temp}: {err}") from err
        self._file = None
        self.files_committed += 1
        log.info("committed %s (%d rows)", final, f.rows)

    async def _run(self, fn: Callable[[], _T]) -> _T:
        return await asyncio.wrap_future(self._pool.submit(fn))
