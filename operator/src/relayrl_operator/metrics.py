"""Prometheus metrics of the operator, served on /metrics by the CLI's HTTP server."""

from __future__ import annotations

from typing import Final

import prometheus_client as prom

REGISTRY: Final = prom.CollectorRegistry()

RECONCILES: Final = prom.Counter(
    "relayrl_operator_reconciles",
    "Agent reconciles, by result (ok, transient_error, permanent_error).",
    ["result"],
    registry=REGISTRY,
)
RECONCILE_SECONDS: Final = prom.Histogram(
    "relayrl_operator_reconcile_duration_seconds",
    "Time one Agent reconcile takes.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
AGENTS: Final = prom.Gauge(
    "relayrl_operator_agents",
    "Agents known to the operator, by phase (exported while it acts, not on standby).",
    ["phase"],
    registry=REGISTRY,
)
CHILDREN: Final = prom.Counter(
    "relayrl_operator_children",
    "Child objects changed by the operator, by kind and action (created, updated, deleted).",
    ["kind", "action"],
    registry=REGISTRY,
)
ERRORS: Final = prom.Counter(
    "relayrl_operator_errors",
    "Errors while reconciling, by kind (api, nats, spec: once per spec and message,"
    " watch: a child watch failed and is retried).",
    ["kind"],
    registry=REGISTRY,
)
API_REQUESTS: Final = prom.Counter(
    "relayrl_operator_api_requests",
    "Requests the operator made to the Kubernetes API, by verb (its child watches as"
    " 'watch'; Kopf's Agent watch aside), resource (with its subresource) and status code.",
    ["verb", "resource", "code"],
    registry=REGISTRY,
)
ACTIVE: Final = prom.Gauge(
    "relayrl_operator_active",
    "1 while this operator acts, 0 while a peer of higher or equal priority pauses it.",
    registry=REGISTRY,
)
QUEUE_DEPTH: Final = prom.Gauge(
    "relayrl_operator_queue_depth",
    "Agents waiting to be reconciled.",
    registry=REGISTRY,
)
