"""Prometheus metrics of one runtime (agent, routers, drivers, remote endpoint).

Each `RuntimeMetrics` has its own registry, so several agents in one process (tests,
notebooks) do not collide; the process serves its agent's registry on /metrics.
Names start with `relayrl_runtime_`.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from typing import Final

import prometheus_client as prom
from prometheus_client import core, registry

PREFIX: Final = "relayrl_runtime"

# Inference latency buckets: 50us .. 10s (batched CPU MLPs sit at the low end; big
# CNN or GPU policies, cold caches and large batches reach seconds, which a top bucket
# of 1s would show as 1s at any quantile).
_LATENCY_BUCKETS: Final = (
    5e-5,
    1e-4,
    2.5e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    1e-2,
    2.5e-2,
    5e-2,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class FastCounter:
    """A counter for the request path: a bare int, exported by `_HotCollector`.

    prometheus_client's Counter takes a lock per `inc`; at one call per env step that
    is measurable, so hot counters are plain attributes read at scrape time.
    """

    __slots__ = ("doc", "name", "value")

    def __init__(self, name: str, doc: str) -> None:
        self.name = name
        self.doc = doc
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Add to the counter."""
        self.value += amount


class FastHistogram:
    """A histogram for the request path (see `FastCounter`)."""

    __slots__ = ("bounds", "counts", "doc", "name", "total")

    def __init__(self, name: str, doc: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.doc = doc
        self.bounds = tuple(float(b) for b in buckets)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        """Record one observation."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        """Observations so far."""
        return sum(self.counts)


class _HotCollector(registry.Collector):
    def __init__(self, counters: list[FastCounter], histograms: list[FastHistogram]) -> None:
        self._counters = counters
        self._histograms = histograms

    def collect(self) -> Iterator[core.Metric]:
        for c in self._counters:
            yield core.CounterMetricFamily(c.name, c.doc, value=c.value)
        for h in self._histograms:
            cumulative, buckets = 0, []
            for bound, n in zip((*h.bounds, float("inf")), h.counts, strict=True):
                cumulative += n
                buckets.append((_go_float(bound), cumulative))
            yield core.HistogramMetricFamily(h.name, h.doc, buckets=buckets, sum_value=h.total)


def _go_float(value: float) -> str:
    # The text format's bucket labels: "+Inf" and shortest float repr.
    return "+Inf" if value == float("inf") else repr(float(value))


class RuntimeMetrics:
    """The collectors, registered on `registry`."""

    def __init__(self, registry: prom.CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else prom.CollectorRegistry()
        r = self.registry
        self.actions = FastCounter(f"{PREFIX}_actions", "Actions returned.")
        self.requests = FastCounter(f"{PREFIX}_requests", "request_action calls served.")
        self.request_errors = prom.Counter(
            f"{PREFIX}_request_errors", "Rejected requests by kind.", ["kind"], registry=r
        )
        self.inference_seconds = FastHistogram(
            f"{PREFIX}_inference_seconds", "Forward pass latency per batch.", _LATENCY_BUCKETS
        )
        self.batch_size = FastHistogram(
            f"{PREFIX}_batch_size", "Rows per forward pass.", _BATCH_BUCKETS
        )
        self.trajectories = prom.Counter(
            f"{PREFIX}_trajectories", "Finished trajectories handed to routers.", registry=r
        )
        self.steps_recorded = prom.Counter(
            f"{PREFIX}_steps_recorded", "Steps in finished trajectories.", registry=r
        )
        self.trajectories_written = prom.Counter(
            f"{PREFIX}_trajectories_written", "Trajectories a sink accepted.", registry=r
        )
        self.sink_errors = prom.Counter(
            f"{PREFIX}_sink_errors",
            "Batches a sink refused (each once, however often it was tried again).",
            registry=r,
        )
        self.model_version = prom.Gauge(
            f"{PREFIX}_model_version", "Policy version in use.", registry=r
        )
        self.model_reloads = prom.Counter(
            f"{PREFIX}_model_reloads", "Model reload attempts by result.", ["result"], registry=r
        )
        self.actors = prom.Gauge(f"{PREFIX}_actors", "Actors in the pool.", registry=r)
        self.buffer_bytes = prom.Gauge(
            f"{PREFIX}_trajectory_buffer_bytes",
            "Bytes the pool holds for trajectories in progress (grows, never shrinks).",
            registry=r,
        )
        self.routers = prom.Gauge(f"{PREFIX}_routers", "Router workers running.", registry=r)
        self.router_queue = prom.Gauge(
            f"{PREFIX}_router_queue_depth", "Finished batches waiting for a router.", registry=r
        )
        self.env_steps = FastCounter(f"{PREFIX}_env_steps", "Environment steps taken by drivers.")
        self.episodes = FastCounter(f"{PREFIX}_episodes", "Episodes finished in drivers.")
        self.nonfinite_observations = prom.Counter(
            f"{PREFIX}_nonfinite_observations",
            "Env observations (rows) holding NaN or infinity, recorded and acted on as given.",
            registry=r,
        )
        self.nonfinite_rewards = prom.Counter(
            f"{PREFIX}_nonfinite_rewards",
            "Env rewards that are NaN or infinite, recorded as given.",
            registry=r,
        )
        self.remote_requests = prom.Counter(
            f"{PREFIX}_remote_requests", "Remote frames served by op.", ["op"], registry=r
        )
        self.remote_errors = prom.Counter(
            f"{PREFIX}_remote_errors",
            "Remote frames answered with an error.",
            ["reason"],
            registry=r,
        )
        self.remote_clients = prom.Gauge(
            f"{PREFIX}_remote_clients", "Remote clients holding actors.", registry=r
        )
        self.remote_idle_clients = prom.Counter(
            f"{PREFIX}_remote_idle_clients",
            "Remote clients dropped after the idle timeout (their actors removed).",
            registry=r,
        )

        r.register(
            _HotCollector(
                [self.actions, self.requests, self.env_steps, self.episodes],
                [self.inference_seconds, self.batch_size],
            )
        )

    def exposition(self) -> bytes:
        """The text format served on /metrics."""
        return prom.generate_latest(self.registry)
