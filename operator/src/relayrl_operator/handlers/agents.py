"""Agent watch events: hand every added, changed or deleted Agent to the reconciler.

A coroutine, so it runs on the event loop that owns the reconciler's queue (Kopf
would run a plain function in a thread pool).
"""

from __future__ import annotations

from typing import Any

import kopf

from relayrl_runtime import spec


@kopf.on.event(spec.GROUP, spec.VERSION, spec.PLURAL)
async def agent_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """Store the Agent and enqueue it."""
    memo.reconciler.agent_event(event["type"] or "ADDED", event["object"])
