"""Local trajectory files: Parquet or Arrow IPC, rotated, visible only when complete.

The standalone sink (config `localSink`, the demo, tests). Each file is written under a
hidden temporary name and renamed when closed, so a reader never sees a partial file.
Files rotate after `rotate_rows` rows or `rotate_seconds` seconds, and on `flush`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq

from relayrl_runtime import spec
from relayrl_runtime.sinks import base

log = logging.getLogger(__name__)

SUFFIXES = {spec.SinkFormat.PARQUET: ".parquet", spec.SinkFormat.ARROW: ".arrow"}
_DICTIONARY_COLUMNS = ("agent", "policy_version")


class LocalFileSink:
    """Writes record batches to rotating files in one directory."""

    def __init__(
        self,
        directory: Path,
        file_format: spec.SinkFormat = spec.SinkFormat.PARQUET,
        *,
        prefix: str = "trajectories",
        rotate_rows: int = 1_000_000,
        rotate_seconds: float = 300.0,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.format = file_format
        self.prefix = prefix
        self.rotate_rows = rotate_rows
        self.rotate_seconds = rotate_seconds
        self._lock = threading.Lock()
        self._writer: Any = None
        self._tmp: Path | None = None
        self._final: Path | None = None
        self._rows_in_file = 0
        self._opened_at = 0.0
        self._seq = 0
        self._closed = False
        self._failed: str | None = None  # why a write failed (then every later one fails)
        self.files: list[Path] = []
        self.rows_written = 0

    @property
    def connected(self) -> bool:
        return self.waiting is None

    @property
    def waiting(self) -> str | None:
        if self._closed:
            return f"{self.directory}: sink is closed"
        if not os.access(self.directory, os.W_OK):
            return f"{self.directory}: not writable"
        return None

    @property
    def failure(self) -> str | None:
        if self._failed is not None:
            return self._failed
        return f"{self.directory}: sink is closed" if self._closed else None

    def write(self, batch: pa.RecordBatch) -> None:
        with self._lock:
            failure = self.failure
            if failure is not None:
                raise base.SinkError(failure)
            try:
                if self._writer is not None and self._writer_schema != batch.schema:
                    self._close_file()
                if self._writer is None:
                    self._open(batch.schema)
                self._writer.write_batch(batch)
                self._rows_in_file += batch.num_rows
                self.rows_written += batch.num_rows
                if (
                    self._rows_in_file >= self.rotate_rows
                    or time.monotonic() - self._opened_at >= self.rotate_seconds
                ):
                    self._close_file()
            except Exception as err:
                # A file a write or close failed on cannot be trusted, nor written again
                # (what it holds is left under its temp name): this sink is done.
                self._failed = f"{self.directory}: {type(err).__name__}: {err}"
                raise

    def flush(self) -> None:
        with self._lock:
            if self._failed is None:  # a failed file is never renamed into place
                self._close_file()

    def close(self) -> None:
        with self._lock:
            try:
                if self._failed is None:
                    self._close_file()
            finally:
                self._closed = True

    def _open(self, schema: pa.Schema) -> None:
        self._seq += 1
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        name = f"{self.prefix}-{stamp}-{os.getpid()}-{self._seq:06d}{SUFFIXES[self.format]}"
        self._final = self.directory / name
        self._tmp = self.directory / f".{name}.tmp"
        if self.format is spec.SinkFormat.PARQUET:
            # Dictionary pages only where values repeat: on float columns (obs, logits)
            # they cost more than twice the write time and make the file bigger.
            dictionary = [c for c in _DICTIONARY_COLUMNS if c in schema.names]
            self._writer = pq.ParquetWriter(
                str(self._tmp), schema, compression="zstd", use_dictionary=dictionary
            )
        else:
            self._writer = pyarrow.ipc.new_file(str(self._tmp), schema)
        self._writer_schema = schema
        self._rows_in_file = 0
        self._opened_at = time.monotonic()

    def _close_file(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        assert self._tmp is not None
        assert self._final is not None
        os.replace(self._tmp, self._final)
        self.files.append(self._final)
        log.info("wrote %s (%d rows)", self._final, self._rows_in_file)
