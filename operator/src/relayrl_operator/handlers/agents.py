"""Agent watch events: hand every added, changed or deleted Agent to the reconciler."""

from __future__ import annotations

from typing import Any

import kopf

from relayrl_runtime import spec


@kopf.on.event(spec.GROUP, spec.VERSION, spec.PLURAL)
def agent_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """Store the Agent and enqueue it."""
    memo.reconciler.agent_event(event["type"] or "ADDED", event["object"])
