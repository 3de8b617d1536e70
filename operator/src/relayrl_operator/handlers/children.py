"""Child watch events: keep the reconciler's caches fresh and repair drift quickly.

Kopf watches these kinds filtered server-side by the managed-by label (see
lifecycle.startup), so only objects this operator created arrive here.
"""

from __future__ import annotations

from typing import Any

import kopf


def _forward(event: kopf.RawEvent, memo: kopf.Memo) -> None:
    memo.reconciler.child_event(event["type"] or "ADDED", event["object"])


@kopf.on.event("v1", "pods")
def pod_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """An actor or sink pod changed: status may change."""
    _forward(event, memo)


@kopf.on.event("apps", "v1", "statefulsets")
def statefulset_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """The actor StatefulSet changed: repair drift, refresh status."""
    _forward(event, memo)


@kopf.on.event("apps", "v1", "deployments")
def deployment_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """A sink Deployment changed: repair drift, refresh status."""
    _forward(event, memo)


@kopf.on.event("v1", "configmaps")
def configmap_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """The runtime ConfigMap changed or was deleted: put it back."""
    _forward(event, memo)


@kopf.on.event("v1", "services")
def service_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """A Service changed or was deleted: put it back."""
    _forward(event, memo)


@kopf.on.event("policy", "v1", "poddisruptionbudgets")
def pdb_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """The actor PodDisruptionBudget changed or was deleted: put it back."""
    _forward(event, memo)
