"""What the operator, runtime, publisher and sinks export to Prometheus: every sample
name, with the labels its metric is declared with. The chart's dashboards and alert
rules are checked against it (tests/unit/test_monitoring_queries.py,
tests/cluster/agents/test_chart.py)."""

from __future__ import annotations

import prometheus_client as prom
from prometheus_client import metrics as prom_metrics

from relayrl_operator import metrics as operator_metrics
from relayrl_runtime import metrics as runtime_metrics
from relayrl_runtime.sinks import service as sink_service
from relayrl_runtime.transport import publisher

SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def metric_objects() -> list[object]:
    """The collectors the operator, runtime, publisher and sinks register (fresh ones)."""
    return [
        *vars(operator_metrics).values(),
        *vars(runtime_metrics.RuntimeMetrics(prom.CollectorRegistry())).values(),
        *vars(publisher.PublisherMetrics(prom.CollectorRegistry())).values(),
        *vars(sink_service.SinkMetrics("arrow", prom.CollectorRegistry())).values(),
        *vars(sink_service.SinkMetrics("postgres", prom.CollectorRegistry())).values(),
    ]


def exported_labels() -> dict[str, set[str]]:
    """Every sample name the operator, runtime, publisher and sinks expose: the labels
    its metric is declared with (`le` on a histogram's buckets)."""
    declared = {
        obj._name: set(obj._labelnames)  # no public API lists a metric's label names
        for obj in metric_objects()
        if isinstance(obj, prom_metrics.MetricWrapperBase)
    }
    registries = [
        operator_metrics.REGISTRY,
        *(
            obj
            for obj in metric_objects()
            if isinstance(obj, prom.CollectorRegistry) and obj is not operator_metrics.REGISTRY
        ),
    ]
    names: dict[str, set[str]] = {}
    for registry in registries:
        for family in registry.collect():
            for suffix in SUFFIXES.get(family.type, ("",)):
                name = family.name + suffix
                # The labels of this sample name only: `le` is on a histogram's buckets,
                # not on its _sum and _count.
                labels = declared.get(family.name, set()) | {
                    label
                    for sample in family.samples
                    if sample.name == name
                    for label in sample.labels
                }
                names[name] = labels | ({"le"} if suffix == "_bucket" else set())
    return names
