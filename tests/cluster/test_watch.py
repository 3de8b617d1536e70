"""The operator's child watches on the real apiserver: list, watch, metadata only, relist.

Runs against the session cluster of ``conftest.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest

from relayrl_localstack.testing import ClusterHandle
from relayrl_operator import kube, watch

LABELS = {"relayrl.io/test": "watch"}
SELECTOR = "relayrl.io/test=watch"


class Recorder:
    """Collects (type, name, body) events, and lets a test wait for one."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, Mapping[str, Any]]] = []
        self._changed = asyncio.Event()

    def __call__(self, event_type: str, body: Mapping[str, Any]) -> None:
        self.events.append((event_type, body["metadata"]["name"], body))
        self._changed.set()

    async def wait(self, event_type: str, name: str) -> Mapping[str, Any]:
        """The first event of this type for this name, waiting for it if need be."""

        async def first() -> Mapping[str, Any]:
            while True:
                for kind, seen, body in self.events:
                    if (kind, seen) == (event_type, name):
                        return body
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(first(), 30)


def configmap(namespace: str, name: str, labels: Mapping[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "data": {"key": "value"},
    }


@contextlib.asynccontextmanager
async def api(k8s: ClusterHandle) -> AsyncIterator[kube.Client]:
    client = kube.Client.from_config(str(k8s.kubeconfig))
    try:
        yield client
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def running(w: watch.Watch) -> AsyncIterator[None]:
    watches = watch.Watches([w])
    watches.start()
    try:
        await asyncio.wait_for(w.listed.wait(), 30)
        yield
        assert watches.healthy
    finally:
        await watches.stop()


@pytest.mark.timeout(120)
async def test_a_watch_lists_then_follows_only_the_selected_objects(
    k8s: ClusterHandle, namespace: str
) -> None:
    async with api(k8s) as client:
        await client.apply(configmap(namespace, "before", LABELS))
        await client.apply(configmap(namespace, "other", {}))
        seen = Recorder()
        w = watch.Watch(client, kube.CONFIGMAP, namespace, SELECTOR, seen, metadata_only=True)
        async with running(w):
            listed = await seen.wait("ADDED", "before")
            # Metadata only: the data never came; the kind is set to the child's own.
            assert listed["kind"] == "ConfigMap"
            assert "data" not in listed
            assert listed["metadata"]["labels"] == LABELS

            created = await client.apply(configmap(namespace, "after", LABELS))
            await seen.wait("ADDED", "after")
            changed = configmap(namespace, "after", LABELS)
            changed["data"] = {"key": "changed"}
            await client.apply(changed)
            modified = await seen.wait("MODIFIED", "after")
            # Watch events too come as metadata only.
            assert modified["apiVersion"] == "meta.k8s.io/v1"
            assert "data" not in modified
            assert modified["metadata"]["resourceVersion"] != created.resource_version
            await client.delete(kube.CONFIGMAP, namespace, "after")
            deleted = await seen.wait("DELETED", "after")
            assert deleted["metadata"]["labels"] == LABELS
        assert all(name != "other" for _, name, _ in seen.events)


@pytest.mark.timeout(120)
async def test_a_list_again_reports_what_went_meanwhile(k8s: ClusterHandle, namespace: str) -> None:
    """After a 410 Gone the watch lists again (see the unit tests): an object deleted
    while it was not watching comes as DELETED, a stub with its labels."""
    async with api(k8s) as client:
        for name in ("kept", "removed"):
            await client.apply(configmap(namespace, name, LABELS))
        seen = Recorder()
        w = watch.Watch(client, kube.CONFIGMAP, namespace, SELECTOR, seen)
        version = await w._list()
        assert {name for _, name, _ in seen.events} == {"kept", "removed"}
        assert "data" in seen.events[0][2]  # a whole object this time

        await client.delete(kube.CONFIGMAP, namespace, "removed")
        seen.events.clear()
        newer = await w._list()
        assert int(newer) > int(version)
        assert [(t, n) for t, n, _ in seen.events] == [("DELETED", "removed"), ("ADDED", "kept")]
        stub = seen.events[0][2]
        assert stub["kind"] == "ConfigMap"
        assert stub["metadata"] == {"namespace": namespace, "name": "removed", "labels": LABELS}


@pytest.mark.timeout(120)
async def test_a_watch_in_every_namespace_sees_pods_whole(
    k8s: ClusterHandle, namespace: str
) -> None:
    async with api(k8s) as client:
        seen = Recorder()
        w = watch.Watch(client, kube.POD, None, SELECTOR, seen)
        async with running(w):
            await client.request(
                "POST",
                kube.POD.path(namespace),
                body={
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": "watched", "labels": LABELS},
                    "spec": {
                        "containers": [{"name": "c", "image": "registry.invalid/none"}],
                        "nodeSelector": {"relayrl.io/no-such-node": "true"},
                    },
                },
            )
            pod = await seen.wait("ADDED", "watched")
            assert pod["kind"] == "Pod"
            assert pod["apiVersion"] == "v1"
            assert pod["metadata"]["namespace"] == namespace
            assert pod["spec"]["containers"][0]["name"] == "c"
