"""Child watch events: keep the reconciler's caches fresh and repair drift quickly.

Kopf watches these kinds filtered server-side by the managed-by label (see
lifecycle.startup), so only objects this operator created arrive here. Every handler
is a coroutine: Kopf runs plain functions in a thread pool, and the reconciler's
caches and queue belong to the event loop.
"""

from __future__ import annotations

from typing import Any

import kopf


def _forward(event: kopf.RawEvent, memo: kopf.Memo) -> None:
    memo.reconciler.child_event(event["type"] or "ADDED", event["object"])


@kopf.on.event("v1", "pods")
async def pod_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """An actor or sink pod changed: status may change."""
    _forward(event, memo)


@kopf.on.event("apps", "v1", "statefulsets")
async def statefulset_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """The actor StatefulSet changed: repair drift, refresh status."""
    _forward(event, memo)


@kopf.on.event("apps", "v1", "deployments")
async def deployment_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """A sink Deployment changed: repair drift, refresh status."""
    _forward(event, memo)


@kopf.on.event("v1", "configmaps")
async def configmap_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """The runtime ConfigMap changed or was deleted: put it back."""
    _forward(event, memo)


@kopf.on.event("v1", "services")
async def service_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """A Service changed or was deleted: put it back."""
    _forward(event, memo)


@kopf.on.event("policy", "v1", "poddisruptionbudgets")
async def pdb_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """The actor PodDisruptionBudget changed or was deleted: put it back."""
    _forward(event, memo)
