"""Helpers for tests that run against a cluster (the local stack or any KUBECONFIG).

Imported by ``tests/cluster`` (its conftest builds a :class:`ClusterHandle`) and by
the operator's cluster tests. Free of pytest, so failures are plain exceptions
(``TimeoutError`` with what was awaited) that fail the calling test.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from kubernetes import client

from relayrl_localstack import binaries, cluster, processnode

T = TypeVar("T")


def process_node_placement() -> dict[str, Any]:
    """Pod spec fields that send a pod to the process node (merge into ``spec``)."""
    return {
        "nodeSelector": {processnode.NODE_LABEL: "true"},
        "tolerations": [
            {"key": processnode.NODE_LABEL, "operator": "Exists", "effect": "NoSchedule"}
        ],
    }


def wait_for(
    predicate: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.2
) -> T:
    """Poll ``predicate`` until it returns a truthy value and return it.

    Raises ``TimeoutError`` naming ``what`` at the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def process_alive(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process, from /proc."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


class KubectlError(subprocess.CalledProcessError):
    """kubectl failed; the message carries its stderr."""

    def __init__(self, result: subprocess.CompletedProcess[str]) -> None:
        super().__init__(result.returncode, result.args, result.stdout, result.stderr)

    def __str__(self) -> str:
        return f"{super().__str__()}\nstderr: {self.stderr}"


@dataclasses.dataclass(frozen=True)
class ClusterHandle:
    """A cluster for tests: its kubeconfig, an API client and the nodes to use."""

    kubeconfig: Path
    api: Any  # kubernetes.client.ApiClient
    bins: binaries.Binaries
    local: cluster.LocalCluster | None  # None: an existing cluster
    node: processnode.ProcessNode | None  # None: a process node run by someone else
    process_node: str  # the process node's name
    kwok_nodes: tuple[str, ...]

    @property
    def core(self) -> Any:
        """A CoreV1Api on :attr:`api`."""
        return client.CoreV1Api(self.api)

    def kubectl(
        self, *args: str, check: bool = True, input_text: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the pinned kubectl against the cluster; with ``check``, fail with its stderr."""
        result = subprocess.run(
            [str(self.bins.kubectl), "--kubeconfig", str(self.kubeconfig), *args],
            check=False,
            capture_output=True,
            text=True,
            input=input_text,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise KubectlError(result)
        return result

    def get_json(self, reader: Callable[..., Any], *args: Any) -> dict[str, Any]:
        """Call a client ``read_*``/``list_*`` method and return the raw JSON object."""
        data: dict[str, Any] = json.loads(reader(*args, _preload_content=False).data)
        return data

    @staticmethod
    def list_json(lister: Callable[..., Any], *args: Any) -> list[dict[str, Any]]:
        """Call a client ``list_*`` method and return the raw JSON items."""
        data = json.loads(lister(*args, _preload_content=False).data)
        return list(data.get("items") or [])

    def exists(self, reader: Callable[..., Any], *args: Any) -> bool:
        """Whether a ``read_*`` call finds its object (False on 404)."""
        try:
            reader(*args, _preload_content=False)
        except client.ApiException as err:
            if err.status == 404:
                return False
            raise
        return True

    def pod(self, namespace: str, name: str) -> dict[str, Any]:
        """The pod's JSON."""
        return self.get_json(self.core.read_namespaced_pod, name, namespace)


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The status condition of type ``kind`` of an object's JSON, if any."""
    for item in obj.get("status", {}).get("conditions") or []:
        if item.get("type") == kind:
            return dict(item)
    return None
