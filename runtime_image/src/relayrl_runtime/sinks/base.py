"""The sink protocol every trajectory sink implements (local files, NATS publisher, ...).

Router threads call `write` concurrently, so implementations are thread-safe. `write`
may block (that is the backpressure path: routers stop, their queue fills, actors wait)
but must not drop a batch silently: it raises if the batch cannot be taken. The router
then writes it again, with a growing pause, for as long as `failure` is None; a sink
that can take nothing ever again says why in `failure`, and the runtime stops (exit 3).
`flush` makes everything written so far durable or visible; `close` flushes and
releases resources; the agent calls both on drain.
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

    @property
    def waiting(self) -> str | None:
        """Why the sink cannot take batches now; None when it can."""
        ...

    @property
    def failure(self) -> str | None:
        """Why the sink can take no batch ever again; None while it still may."""
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
