"""The sink protocol every trajectory sink implements (local files, NATS publisher, ...).

Router threads call `write` concurrently, so implementations are thread-safe. `write`
may block (that is the backpressure path: routers stop, their queue fills, actors wait)
but must not drop a batch silently: it raises if the batch cannot be taken, and the
router counts and logs the failure. `flush` makes everything written so far durable or
visible; `close` flushes and releases resources; the agent calls both on drain.
"""

from __future__ import annotations

from typing import Protocol

import pyarrow as pa


class SinkError(Exception):
    """A sink could not take a batch."""


class TrajectorySink(Protocol):
    """Takes record batches of the trajectory schema (`relayrl_runtime.trajectory`)."""

    @property
    def connected(self) -> bool:
        """Whether the sink can take batches now (feeds /readyz)."""
        ...

    def write(self, batch: pa.RecordBatch) -> None:
        """Take one record batch of whole trajectories."""
        ...

    def flush(self) -> None:
        """Make everything written so far durable (or visible to readers)."""
        ...

    def close(self) -> None:
        """Flush and release resources; later writes raise `SinkError`."""
        ...
