"""Kubernetes Events about Agents, posted without holding up a pass.

The reconciler says what happened to an Agent (a spec applied, a phase changed, a
child rejected, a handover timed out) through `Events.post`. Each Event is its own
task, best effort: one the apiserver refuses, or that cannot reach it, is logged at
debug level and never retried. `drain` gives those under way a moment to land when
the operator stops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from relayrl_operator import constants, kube
from relayrl_runtime import spec

log = logging.getLogger(__name__)


class Involved(Protocol):
    """The Agent an Event is about (an `AgentRef`, or one whose spec does not parse)."""

    @property
    def name(self) -> str: ...

    @property
    def namespace(self) -> str: ...

    @property
    def uid(self) -> str: ...


@dataclass(frozen=True)
class Subject:
    """An Agent known by its identity alone."""

    name: str
    namespace: str
    uid: str


class Events:
    """Posts Events about Agents and owns the tasks doing so."""

    def __init__(self, client: kube.Client) -> None:
        self._client = client
        self._tasks: set[asyncio.Task[None]] = set()

    def post(self, agent: Involved, kind: str, reason: str, message: str) -> None:
        """Post an Event (`kind` Normal or Warning) without waiting for it."""
        task = asyncio.get_running_loop().create_task(
            self._post(agent, kind, reason, message), name=f"event {agent.name} {reason}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, within: float) -> None:
        """Wait up to `within` seconds for the Events under way."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=within)

    async def _post(self, agent: Involved, kind: str, reason: str, message: str) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{agent.name}.", "namespace": agent.namespace},
            "involvedObject": {
                "apiVersion": spec.API_VERSION,
                "kind": spec.KIND,
                "name": agent.name,
                "namespace": agent.namespace,
                "uid": agent.uid,
            },
            "type": kind,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": constants.OPERATOR_NAME},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self._client.request(
                "POST", f"/api/v1/namespaces/{agent.namespace}/events", body=event
            )
        except (kube.ApiError, OSError) as err:  # best effort: never retried
            log.debug("event for %s/%s not posted: %s", agent.namespace, agent.name, err)
