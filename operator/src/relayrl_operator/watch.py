"""List-and-watch of the operator's children, feeding the reconciler's caches.

At a thousand Agents the children produce most of the operator's watch events (a
pod's scheduling steps, a StatefulSet's status counts): about fifteen per Agent on
its way to Ready. Each is one line of JSON the reconciler looks at for a moment.
These watches hand them over directly, without a framework's per-event machinery
(per-object queues, causes, handler kwargs).

One `Watch` per kind and namespace (or all namespaces): it lists the objects, page by
page, then watches from the list's resourceVersion with bookmarks, and watches again
from the last resourceVersion it saw when the server ends a watch. When the server
no longer has that version (410 Gone) it lists again, and reports as deleted what it
knew but the new list lacks, so a deletion missed meanwhile is still seen. Errors are
retried with a jittered, growing, bounded delay; the task never ends by itself.

Kinds whose bodies the reconciler does not read (it needs their generation,
resourceVersion and labels, to tell drift from its own writes) are watched as
metadata only (`PartialObjectMetadata`): smaller answers for the apiserver to encode
and for the operator to decode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

from relayrl_operator import kube, metrics
from relayrl_runtime import aio

log = logging.getLogger(__name__)

Handler = Callable[[str, Mapping[str, Any]], None]

JSON: Final = "application/json"
METADATA_LIST: Final = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
METADATA: Final = kube.METADATA_ONLY

PAGE_SIZE: Final = 500
# A watch that ends sooner than this without an event counts as a failure.
QUICK_END_SECONDS: Final = 1.0
# The server ends a watch after this long (and the client gives up on a silent one
# a minute later); the next one starts from the last resourceVersion seen.
WATCH_SECONDS: Final = 300


class Gone(Exception):
    """The resourceVersion to resume from is no longer available: list again."""


class Watch:
    """Lists and watches one kind in one namespace (None: all), filtered by labels."""

    def __init__(
        self,
        client: kube.Client,
        kind: kube.Kind,
        namespace: str | None,
        selector: str,
        handler: Handler,
        *,
        metadata_only: bool = False,
    ) -> None:
        self.kind = kind
        self.namespace = namespace
        self._client = client
        self._selector = selector
        self._handler = handler
        self._metadata_only = metadata_only
        # (namespace, name) -> a stub of each object seen (kind, name, namespace,
        # labels): what a DELETED event for it needs, should a relist miss it.
        self._known: dict[tuple[str, str], dict[str, Any]] = {}
        self.listed = asyncio.Event()  # set once the first list has been handed over
        self.version: str | None = None  # where the next watch starts; None: list first
        self._progressed = False  # whether the current watch has had an event

    def __repr__(self) -> str:
        where = self.namespace or "all namespaces"
        return f"Watch({self.kind.plural} in {where}, {self._selector})"

    async def run(self) -> None:
        """List, then watch, forever; errors are logged and retried."""
        failures = 0  # errors in a row, with no event in between
        gone = 0  # lists in a row whose watch was gone before its first event
        while True:
            fresh = self.version is None
            self._progressed = False
            try:
                if fresh:
                    self.version = await self._list()
                started = time.monotonic()
                await self._watch()
                if not self._progressed and time.monotonic() - started < QUICK_END_SECONDS:
                    # Ended at once without a single event: not a healthy watch (a
                    # proxy, or a server shutting down); do not hammer it.
                    raise kube.ApiError(503, "Unavailable", "the watch ended at once")
                failures = gone = 0
                continue
            except Gone:
                log.info("%r: resourceVersion %s is gone, listing again", self, self.version)
                self.version = None
                failures = 0  # the server answers
                gone = gone + 1 if fresh and not self._progressed else 0
                if gone < 2:
                    continue  # the usual case: list again now
                delay = kube.retry_delay(gone - 1)  # gone again right after a list
            except asyncio.CancelledError:
                raise
            except Exception as err:  # the watch must outlive any failure
                failures = 1 if self._progressed else failures + 1
                delay = kube.retry_delay(failures)
                metrics.ERRORS.labels("watch").inc()
                log.info("%r: %s; again in %.1fs", self, err, delay)
            await asyncio.sleep(delay)

    def _params(self) -> dict[str, str]:
        return {"labelSelector": self._selector} if self._selector else {}

    async def _list(self) -> str:
        """Hand over every object as ADDED, and as DELETED what has gone; the list's
        resourceVersion, to watch from."""
        items: list[dict[str, Any]] = []
        first_page = {**self._params(), "limit": str(PAGE_SIZE)}
        params = first_page
        while True:
            try:
                page = await self._client.request(
                    "GET",
                    self.kind.path(self.namespace),
                    params=params,
                    accept=METADATA_LIST if self._metadata_only else JSON,
                )
            except kube.ApiError as err:
                if err.status == 410 and "continue" in params:
                    # The paging token expired: start the list over.
                    params = first_page
                    items = []
                    continue
                raise
            items += page.get("items") or []
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                break
            params = {**params, "continue": token}
        version = str(page["metadata"]["resourceVersion"])
        gone = dict(self._known)
        for obj in items:
            gone.pop(self._remember(obj), None)
        for stub in gone.values():
            self._forget(stub)
            self._handler("DELETED", stub)
        for obj in items:
            self._handler("ADDED", obj)
        self.listed.set()
        return version

    async def _watch(self) -> None:
        """Hand over events from `self.version` until the server ends the watch, keeping
        `self.version` at the last one handed over (`_progressed`: any event came)."""
        assert self.version is not None
        params = {
            **self._params(),
            "resourceVersion": self.version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_SECONDS),
        }
        events = self._client.watch(
            self.kind, self.namespace, params, METADATA if self._metadata_only else JSON
        )
        try:
            # Closed here, also on cancellation: the connection goes back at once.
            async with contextlib.aclosing(events):
                async for event in events:
                    kind, obj = event.get("type"), event.get("object") or {}
                    if kind == "ERROR":
                        if obj.get("code") == 410:
                            raise Gone
                        raise kube.ApiError(
                            int(obj.get("code") or 500),
                            str(obj.get("reason", "")),
                            str(obj.get("message", "")),
                        )
                    self._progressed = True
                    version = (obj.get("metadata") or {}).get("resourceVersion")
                    if kind != "BOOKMARK":
                        if kind == "DELETED":
                            self._forget(obj)
                        else:
                            self._remember(obj)
                        self._handler(str(kind), obj)
                    # Kept at once, once handed over: a watch broken off later resumes
                    # after this event.
                    self.version = str(version or self.version)
        except kube.ApiError as err:
            if err.status == 410:
                raise Gone from err
            raise

    def _remember(self, obj: dict[str, Any]) -> tuple[str, str]:
        # List items carry no kind, and metadata-only objects say PartialObjectMetadata.
        obj["kind"] = self.kind.kind
        meta = obj["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        self._known[key] = {
            "kind": self.kind.kind,
            "metadata": {
                "namespace": key[0],
                "name": key[1],
                "labels": meta.get("labels") or {},
            },
        }
        return key

    def _forget(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        self._known.pop((meta.get("namespace", ""), meta["name"]), None)
        obj["kind"] = self.kind.kind


class Watches:
    """Runs a set of watches as tasks; `stop` cancels and awaits them."""

    def __init__(self, watches: Iterable[Watch]) -> None:
        self.watches = list(watches)
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start every watch."""
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(w.run(), name=f"watch-{w.kind.plural}-{w.namespace or 'all'}")
            for w in self.watches
        ]

    @property
    def healthy(self) -> bool:
        """Whether every watch task still runs."""
        return running(self._tasks)

    async def stop(self) -> None:
        """Cancel and await the tasks."""
        await cancel(self._tasks)
        self._tasks = []


def running(tasks: Sequence[asyncio.Task[None]]) -> bool:
    """Whether there are tasks and none of them has ended."""
    return bool(tasks) and not any(t.done() for t in tasks)


async def cancel(tasks: Iterable[asyncio.Task[None]]) -> None:
    """Cancel tasks and wait until each has ended; raise what one of them raised."""
    tasks = list(tasks)
    await aio.cancel_and_wait(*tasks)
    for task in tasks:
        failed = aio.failure(task)
        if failed is not None:
            raise failed
