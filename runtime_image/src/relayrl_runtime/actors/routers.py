"""Router workers: encode finished trajectories to Arrow and hand them to the sink.

`RouterPool` owns `router_scale` threads reading one bounded queue. The agent puts
lists of `pool.Chunk` in (finished trajectories as gathered records); a router takes what
is queued (coalescing up to a row and a byte budget), expands the chunks into columns,
encodes one record batch and writes it, so the request path never touches Arrow. The
queue bound is the backpressure: when the sink is slow the queue fills and `submit`
blocks the actors. It counts batches and bytes: the bytes of the batches queued or being
written stay under `queue_bytes` (one batch always goes in), so a sink that takes
nothing (NATS away, its backlog full) holds the memory of large observations to that.
Scaling up starts threads; scaling down retires routers after their current batch.
Threads are joined on shutdown.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Final

from relayrl_runtime import errors, metrics, trajectory
from relayrl_runtime.actors import pool
from relayrl_runtime.sinks import base

log = logging.getLogger(__name__)

# Wakes a router waiting on an empty queue to look at the retire count; never waited
# for: with the queue full every router is busy and looks after its write.
_WAKE: Final = object()
_COALESCE_ROWS: Final = 65_536
# And bytes: a router's batch is copied twice more while it is encoded (columns, Arrow).
_COALESCE_BYTES: Final = 32 << 20
# The default bound of the bytes queued or being written: the order of the publisher's
# backlog (`PublisherConfig.max_backlog_bytes`, 256 MiB), which is where an outage waits.
QUEUE_BYTES: Final = 128 << 20
# A refused write is tried again after these pauses (doubling up to the maximum); the
# first three attempts and every _LOUD_EVERY-th (5 minutes apart at the maximum) are
# logged as errors, the others at debug level.
_RETRY_FIRST_SECONDS: Final = 0.05
_RETRY_MAX_SECONDS: Final = 5.0
_LOUD_EVERY: Final = 60
MAX_ROUTERS: Final = 64


class RouterPool:
    """Router threads between the actor pool and a sink."""

    def __init__(
        self,
        layout: trajectory.Layout,
        sink: base.TrajectorySink | None,
        metrics_: metrics.RuntimeMetrics,
        routers: int = 1,
        queue_size: int = 256,
        queue_bytes: int = QUEUE_BYTES,
    ) -> None:
        check_scale(routers)
        if queue_bytes < 1:
            raise errors.InvalidArgumentError.mismatch("queue_bytes", ">= 1", queue_bytes)
        self.layout = layout
        self.schema = trajectory.schema(layout)
        self.sink = sink
        self._metrics = metrics_
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self._max_bytes = queue_bytes
        # Bytes of the batches submitted and not yet written (or failed): the queue's
        # and what the routers hold. Guarded by _room.
        self._bytes = 0
        self._room = threading.Condition(threading.Lock())
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._next_name = 0
        self._closed = False
        # Routers started and not yet retired, and how many of them are asked to retire:
        # counted under the lock (a retired thread is still alive for a moment).
        self._running = 0
        self._retiring = 0
        metrics_.router_queue.set_function(self._queue.qsize)
        self.scale_to(routers)

    @property
    def size(self) -> int:
        """Routers running (not counting ones asked to retire)."""
        with self._lock:
            return self._running - self._retiring

    def scale_to(self, routers: int) -> int:
        """Run exactly `routers` workers."""
        check_scale(routers)
        with self._lock:
            if self._closed:
                raise errors.AgentClosedError("routers: the agent is shut down")
            self._threads = [t for t in self._threads if t.is_alive()]
            current = self._running - self._retiring
            for _ in range(routers - current):
                self._next_name += 1
                thread = threading.Thread(
                    target=self._run, name=f"relayrl-router-{self._next_name}", daemon=True
                )
                self._threads.append(thread)
                self._running += 1
                thread.start()
            self._ask_to_retire(current - routers)
            self._metrics.routers.set(routers)
        return routers

    @property
    def queued_bytes(self) -> int:
        """Bytes of the batches submitted and not yet written (queued or being written)."""
        return self._bytes

    def submit(self, chunks: list[pool.Chunk]) -> None:
        """Queue finished trajectories; blocks while the queue is full, in batches or
        in bytes (backpressure)."""
        if self._closed:  # no router would take them: refused, not lost unseen
            raise errors.AgentClosedError("routers: the agent is shut down")
        self._metrics.trajectories.inc(sum(c.trajectories for c in chunks))
        self._metrics.steps_recorded.inc(sum(c.rows for c in chunks))
        size = _nbytes(chunks)
        with self._room:
            # One batch always goes in (an empty queue takes any size).
            while self._bytes and self._bytes + size > self._max_bytes:
                self._room.wait()
            self._bytes += size
        self._queue.put(chunks)

    def drain(self) -> None:
        """Wait until every queued batch has been written (or failed)."""
        self._queue.join()

    def shutdown(self) -> None:
        """Drain, then stop and join every router."""
        self.drain()
        with self._lock:
            self._closed = True
            alive = [t for t in self._threads if t.is_alive()]
            self._ask_to_retire(self._running - self._retiring)
        for thread in alive:
            thread.join()
        self._metrics.routers.set(0)

    def _ask_to_retire(self, count: int) -> None:
        """Ask `count` routers to stop (with the lock held). Never blocks: a put on a
        full queue would hold the agent (its lock) until a router finished a write,
        which lasts as long as the sink keeps refusing."""
        self._retiring += max(0, count)
        for _ in range(count):
            try:
                self._queue.put_nowait(_WAKE)
            except queue.Full:
                break  # every router has work: each looks at the count after it

    def _retired(self) -> bool:
        """Whether this router takes one of the retirements asked for (then it stops)."""
        with self._lock:
            if self._retiring == 0:
                return False
            self._retiring -= 1
            self._running -= 1
            return True

    def _run(self) -> None:
        while not self._retired():
            item = self._queue.get()
            if item is _WAKE:
                self._queue.task_done()
                continue
            items: list[list[pool.Chunk]] = [item]  # type: ignore[list-item]
            chunks = list(items[0])
            rows = sum(c.rows for c in chunks)
            size = _nbytes(chunks)
            while rows < _COALESCE_ROWS and size < _COALESCE_BYTES:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _WAKE:
                    self._queue.task_done()
                    break
                items.append(more)  # type: ignore[arg-type]
                chunks += more  # type: ignore[arg-type]
                rows += sum(c.rows for c in more)  # type: ignore[attr-defined]
                size += _nbytes(more)  # type: ignore[arg-type]
            try:
                self._write(chunks)
            finally:
                with self._room:
                    self._bytes -= size
                    self._room.notify_all()
                for _ in items:
                    self._queue.task_done()

    def _write(self, chunks: list[pool.Chunk]) -> None:
        if self.sink is None:
            return  # nowhere to write: nothing to encode
        try:
            steps = pool.to_steps(self.layout, chunks)
            record = trajectory.encode(self.layout, steps, self.schema)
        except Exception:  # a router that died here would leave the queue full for good
            log.exception(
                "router: could not encode %d trajectories", sum(c.trajectories for c in chunks)
            )
            self._metrics.sink_errors.inc()
            return
        # A sink that may still take the batch gets it again and again: the queue fills
        # meanwhile and the actors wait (backpressure), nothing is dropped. One that
        # has failed for good says so, and the runtime stops (the app watches it).
        delay = _RETRY_FIRST_SECONDS
        attempt = 0
        while True:
            attempt += 1
            try:
                self.sink.write(record)
            except Exception as err:
                if attempt == 1:
                    self._metrics.sink_errors.inc()
                failure = _failure(self.sink)
                if failure is not None:
                    log.error(
                        "router: %d trajectories (%d rows) not written: the sink failed (%s)",
                        steps.trajectories,
                        steps.rows,
                        failure,
                    )
                    return
                log.log(
                    logging.ERROR if attempt <= 3 or attempt % _LOUD_EVERY == 0 else logging.DEBUG,
                    "router: sink refused %d trajectories (%d rows), attempt %d (%s);"
                    " trying again in %.2gs",
                    steps.trajectories,
                    steps.rows,
                    attempt,
                    err,
                    delay,
                )
                time.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_SECONDS)
            else:
                self._metrics.trajectories_written.inc(steps.trajectories)
                return


def _nbytes(chunks: list[pool.Chunk]) -> int:
    return sum(c.nbytes for c in chunks)


def _failure(sink: base.TrajectorySink) -> str | None:
    """The sink's `failure`, read so that it cannot end the router thread: a sink
    written before the property existed, or whose property raises, has failed."""
    try:
        return getattr(sink, "failure", "the sink does not say whether it failed for good")
    except Exception as err:
        return f"reading the sink's failure raised {err!r}"


def check_scale(routers: int) -> None:
    """Reject a router count outside 1..MAX_ROUTERS."""
    if not 1 <= routers <= MAX_ROUTERS:
        raise errors.InvalidArgumentError.mismatch(
            "router_scale", f"between 1 and {MAX_ROUTERS} routers", routers
        )
