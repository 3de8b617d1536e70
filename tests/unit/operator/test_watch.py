"""The child watch's control flow: resume from the last version seen, list again on Gone.

The apiserver answers a watch from a resourceVersion it no longer keeps with an ERROR
event of code 410; a real one does so only after etcd compacts (every five minutes),
so this client plays the apiserver's answers. The list-and-watch against a real
apiserver is in tests/cluster/test_watch.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

from relayrl_operator import kube, watch


def cm(name: str, version: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ml", "resourceVersion": version}}


class Server:
    """Answers lists from `lists` and watches from `watches`, in order; records params."""

    def __init__(self, lists: list[list[dict[str, Any]]], watches: list[list[dict[str, Any]]]):
        self.lists = lists
        self.watches = watches
        self.watch_params: list[Mapping[str, str]] = []
        self.done = asyncio.Event()

    async def request(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        items = self.lists.pop(0)
        version = max((int(i["metadata"]["resourceVersion"]) for i in items), default=1)
        return {"metadata": {"resourceVersion": str(version)}, "items": items}

    async def watch(
        self, kind: kube.Kind, namespace: str | None, params: Mapping[str, str], accept: str
    ) -> AsyncIterator[dict[str, Any]]:
        self.watch_params.append(params)
        if not self.watches:
            self.done.set()
            await asyncio.Event().wait()  # a quiet watch
        for event in self.watches.pop(0):
            yield event


async def test_resumes_from_bookmarks_and_lists_again_after_gone() -> None:
    server = Server(
        lists=[[cm("a", "10"), cm("b", "11")], [cm("a", "30")]],
        watches=[
            [
                {"type": "MODIFIED", "object": cm("a", "12")},
                {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "20"}}},
            ],
            [{"type": "ERROR", "object": {"code": 410, "reason": "Expired"}}],
        ],
    )
    seen: list[tuple[str, str, str]] = []
    w = watch.Watch(
        server,  # type: ignore[arg-type]
        kube.CONFIGMAP,
        "ml",
        "x=y",
        lambda t, body: seen.append((t, body["kind"], body["metadata"]["name"])),
    )
    task = asyncio.get_running_loop().create_task(w.run())
    try:
        await asyncio.wait_for(server.done.wait(), 10)
    finally:
        task.cancel()
    assert seen == [
        ("ADDED", "ConfigMap", "a"),
        ("ADDED", "ConfigMap", "b"),
        ("MODIFIED", "ConfigMap", "a"),
        # Gone: listed again; b went meanwhile.
        ("DELETED", "ConfigMap", "b"),
        ("ADDED", "ConfigMap", "a"),
    ]
    # The first watch starts at the list's version, the second at the bookmark's, the
    # third at the second list's.
    assert [p["resourceVersion"] for p in server.watch_params] == ["11", "20", "30"]
    assert all(p["labelSelector"] == "x=y" for p in server.watch_params)
