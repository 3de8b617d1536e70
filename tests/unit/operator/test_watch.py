"""The child watch's control flow: resume from the last version seen, list again on Gone.

The apiserver answers a watch from a resourceVersion it no longer keeps with an ERROR
event of code 410; a real one does so only after etcd compacts (every five minutes),
so this client plays the apiserver's answers. The list-and-watch against a real
apiserver is in tests/cluster/test_watch.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import pytest

from relayrl_operator import kube, watch
from support import cancels


def cm(name: str, version: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ml", "resourceVersion": version}}


class Server:
    """Answers lists from `lists` and watches from `watches`, in order; records params.

    A watch answer is a list of events, or an ApiError raised as the request's answer.
    """

    def __init__(
        self,
        lists: list[list[dict[str, Any]]],
        watches: list[list[dict[str, Any]] | kube.ApiError],
    ) -> None:
        self.lists = lists
        self.watches = watches
        self.watch_params: list[Mapping[str, str]] = []
        self.accepts: list[str] = []
        self.list_times: list[float] = []
        self.done = asyncio.Event()

    async def request(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        self.accepts.append(kw["accept"])
        self.list_times.append(asyncio.get_running_loop().time())
        items = self.lists.pop(0)
        version = max((int(i["metadata"]["resourceVersion"]) for i in items), default=1)
        return {"metadata": {"resourceVersion": str(version)}, "items": items}

    async def watch(
        self, kind: kube.Kind, namespace: str | None, params: Mapping[str, str], accept: str
    ) -> AsyncGenerator[dict[str, Any], None]:
        self.watch_params.append(params)
        self.accepts.append(accept)
        if not self.watches:
            self.done.set()
            await asyncio.Event().wait()  # a quiet watch
        answer = self.watches.pop(0)
        if isinstance(answer, kube.ApiError):
            raise answer
        for event in answer:
            yield event


def recorder(seen: list[tuple[str, str, str]]) -> watch.Handler:
    return lambda t, body: seen.append((t, body["kind"], body["metadata"]["name"]))


async def run_until_quiet(w: watch.Watch, server: Server) -> None:
    task = asyncio.get_running_loop().create_task(w.run())
    try:
        await asyncio.wait_for(server.done.wait(), 10)
    finally:
        task.cancel()


@pytest.mark.parametrize("gone", ["event", "status"])
async def test_resumes_from_the_last_version_and_lists_again_after_gone(gone: str) -> None:
    expired: list[dict[str, Any]] | kube.ApiError = (
        [{"type": "ERROR", "object": {"code": 410, "reason": "Expired"}}]
        if gone == "event"
        else kube.ApiError(410, "Gone", "too old resource version")
    )
    server = Server(
        lists=[[cm("a", "10"), cm("b", "11")], [cm("a", "30")]],
        watches=[
            [
                {"type": "MODIFIED", "object": cm("a", "12")},
                {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "20"}}},
            ],
            # Broken off after one event: the next watch resumes after it.
            [{"type": "MODIFIED", "object": cm("a", "21")}, {"type": "ERROR", "object": {}}],
            expired,
        ],
    )
    seen: list[tuple[str, str, str]] = []
    w = watch.Watch(
        server,  # type: ignore[arg-type]
        kube.CONFIGMAP,
        "ml",
        "x=y",
        recorder(seen),
        metadata_only=True,
    )
    await run_until_quiet(w, server)
    assert seen == [
        ("ADDED", "ConfigMap", "a"),
        ("ADDED", "ConfigMap", "b"),
        ("MODIFIED", "ConfigMap", "a"),
        ("MODIFIED", "ConfigMap", "a"),
        # Gone: listed again; b went meanwhile.
        ("DELETED", "ConfigMap", "b"),
        ("ADDED", "ConfigMap", "a"),
    ]
    # From the list's version, the bookmark's, the last event's, the second list's.
    assert [p["resourceVersion"] for p in server.watch_params] == ["11", "20", "21", "30"]
    assert all(p["labelSelector"] == "x=y" for p in server.watch_params)
    assert set(server.accepts) == {watch.METADATA_LIST, watch.METADATA}


async def test_a_watch_that_ends_at_once_is_retried_after_a_delay() -> None:
    server = Server(lists=[[cm("a", "10")]], watches=[[], []])
    seen: list[tuple[str, str, str]] = []
    w = watch.Watch(server, kube.POD, None, "", recorder(seen))  # type: ignore[arg-type]
    started = asyncio.get_running_loop().time()
    await run_until_quiet(w, server)
    # Two empty answers: two delays of at least 0.8 x 0.5 s and 0.8 x 1 s.
    assert asyncio.get_running_loop().time() - started >= 1.2
    assert [p["resourceVersion"] for p in server.watch_params] == ["10", "10", "10"]
    assert "labelSelector" not in server.watch_params[0]
    assert set(server.accepts) == {watch.JSON}


async def test_gone_lists_again_at_once_unless_it_follows_a_list_again() -> None:
    """A Gone after a working watch lists again at once, and so does the first Gone of
    a watch just listed; the second in a row waits (the server is not keeping up)."""
    gone = [{"type": "ERROR", "object": {"code": 410}}]
    server = Server(
        lists=[[cm("a", "10")], [cm("a", "20")], [cm("a", "30")], [cm("a", "40")]],
        watches=[[{"type": "MODIFIED", "object": cm("a", "11")}], gone, gone, gone],
    )
    w = watch.Watch(server, kube.CONFIGMAP, "ml", "", recorder([]))  # type: ignore[arg-type]
    await run_until_quiet(w, server)
    first, second, third, fourth = server.list_times
    assert second - first < 0.3  # after a working watch
    assert third - second < 0.3  # the first Gone right after a list
    assert fourth - third >= 0.4  # the second: 0.8 x 0.5 s at least
    assert [p["resourceVersion"] for p in server.watch_params] == ["10", "11", "20", "30", "40"]


async def test_a_failing_handler_does_not_lose_the_event() -> None:
    """The version moves past an event only once it is handed over: a handler that
    fails gets the same event again from the next watch."""
    server = Server(
        lists=[[]],
        watches=[
            [{"type": "ADDED", "object": cm("a", "5")}],
            [{"type": "ADDED", "object": cm("a", "5")}],
        ],
    )
    calls: list[str] = []

    def handler(event_type: str, body: Mapping[str, Any]) -> None:
        calls.append(body["metadata"]["resourceVersion"])
        if len(calls) == 1:
            raise RuntimeError("handler failed")

    w = watch.Watch(server, kube.CONFIGMAP, "ml", "", handler)  # type: ignore[arg-type]
    await run_until_quiet(w, server)
    assert calls == ["5", "5"]
    assert [p["resourceVersion"] for p in server.watch_params] == ["1", "1", "5"]


async def test_stopping_ends_a_task_that_loses_a_cancel_and_reports_a_failure() -> None:
    """The operator stops its watches and NATS watchers with `watch.cancel`: a task whose
    await swallowed the first cancel (asyncio.wait_for on Python 3.11) still ends."""
    stubborn = cancels.LosesOneCancel()

    async def broken() -> None:
        raise RuntimeError("watch failed")

    quiet = asyncio.create_task(stubborn.run())
    await asyncio.sleep(0.01)
    await asyncio.wait_for(watch.cancel([quiet]), 10)
    assert quiet.cancelled()
    assert stubborn.lost
    failing = asyncio.create_task(broken())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="watch failed"):
        await watch.cancel([failing])
