"""kwok against a local (or any) cluster, and a helper to create fake CPU and GPU nodes.

:class:`Kwok` runs the pinned kwok controller with its default node and pod stages
(node-initialize, node-heartbeat-with-lease, pod-ready, pod-complete, pod-delete,
gathered from the kwok module by ``hack/k8s/build.sh``), so pods bound to kwok nodes
turn Running without running anything, and deleted ones go away.

kwok manages only nodes annotated ``kwok.x-k8s.io/node=fake`` (never the process
node of :mod:`relayrl_localstack.processnode`, which is not annotated).

:func:`create_nodes` creates such nodes: CPU nodes and GPU nodes that advertise
``nvidia.com/gpu`` capacity, with the labels the NVIDIA GPU operator sets
(``nvidia.com/gpu.present=true``, ``nvidia.com/gpu.count``, ``nvidia.com/gpu.product``)
and, optionally, the ``nvidia.com/gpu=present:NoSchedule`` taint cloud providers
put on GPU nodes. kwok nodes are not tainted by default, so ordinary workloads
(Deployments in tests, scale runs) land on them.

Used by the pytest fixtures, the CLI and scale tests.
"""

from __future__ import annotations

import logging
import subprocess
import time
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Self

import yaml
from kubernetes import client

from relayrl_localstack import binaries as binaries_mod
from relayrl_localstack import procs

logger = logging.getLogger(__name__)

KWOK_NODE_ANNOTATION: Final = "kwok.x-k8s.io/node"
KWOK_NODE_ANNOTATION_VALUE: Final = "fake"
GPU_RESOURCE: Final = "nvidia.com/gpu"
GPU_PRESENT_LABEL: Final = "nvidia.com/gpu.present"
GPU_TAINT_KEY: Final = "nvidia.com/gpu"


class KwokError(RuntimeError):
    """kwok could not be started or exited; the message names its log."""


def kwok_configuration(stages_file: Path | None, *, cidr: str = "10.0.0.0/16") -> str:
    """Return kwok's configuration: options and the default stages, as YAML documents."""
    options: dict[str, Any] = {
        "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
        "kind": "KwokConfiguration",
        "options": {
            "manageAllNodes": False,
            "manageNodesWithAnnotationSelector": (
                f"{KWOK_NODE_ANNOTATION}={KWOK_NODE_ANNOTATION_VALUE}"
            ),
            "manageNodesWithLabelSelector": "",
            "manageSingleNode": "",
            # Room for scale tests: kwok hands out one pod IP per pod from this range.
            "cidr": cidr,
            "nodeLeaseDurationSeconds": 40,
            # kwok applies no defaults to a config file's options: these are the values
            # of its own kustomize/kwok/kwok.yaml.
            "nodeLeaseParallelism": 4,
            "podPlayStageParallelism": 4,
            "nodePlayStageParallelism": 4,
            "podsOnNodeSyncParallelism": 1,
            "enablePodsOnNodeSyncListPager": False,
            "enablePodsOnNodeSyncStreamWatch": True,
            "enableProfilingHandler": False,
            "enableContentionProfiling": False,
            "enableDebuggingHandlers": False,
        },
    }
    text = yaml.safe_dump(options, sort_keys=False)
    if stages_file is None:
        raise KwokError(
            "kwok stage file missing (it is written by hack/k8s/build.sh next to bin/): "
            "rerun the build"
        )
    return text + stages_file.read_text()


class Kwok:
    """The kwok controller as a child process; a context manager."""

    def __init__(
        self,
        kubeconfig: Path,
        work_dir: Path,
        *,
        bins: binaries_mod.Binaries | None = None,
    ) -> None:
        self._kubeconfig = kubeconfig
        self._work_dir = work_dir
        self._bins = bins
        self._popen: subprocess.Popen[bytes] | None = None
        self.log = work_dir / "logs" / "kwok.log"

    @property
    def pid(self) -> int | None:
        """Process (group) id while running."""
        return self._popen.pid if self._popen is not None else None

    def start(self) -> Self:
        """Start kwok and check it stays up for a moment (bad config exits at once)."""
        bins = self._bins or binaries_mod.ensure_binaries()
        self._work_dir.mkdir(parents=True, exist_ok=True)
        config_path = self._work_dir / "kwok.yaml"
        config_path.write_text(kwok_configuration(bins.kwok_stages))
        self._popen = procs.spawn(
            [
                str(bins.kwok),
                f"--kubeconfig={self._kubeconfig}",
                f"--config={config_path}",
            ],
            log_path=self.log,
            cwd=self._work_dir,
        )
        time.sleep(0.5)
        code = self._popen.poll()
        if code is not None:
            self._popen = None
            raise KwokError(
                f"kwok exited with code {code}; log: {self.log}\n{procs.tail(self.log)}"
            )
        return self

    def stop(self) -> None:
        """Stop kwok (SIGTERM, then SIGKILL)."""
        if self._popen is not None:
            procs.stop_group(self._popen.pid, grace_seconds=5, popen=self._popen)
            self._popen = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.stop()


def node_manifest(
    name: str,
    *,
    gpus: int = 0,
    cpu: str = "32",
    memory: str = "256Gi",
    pods: str = "110",
    gpu_product: str = "NVIDIA-A100-SXM4-80GB",
    labels: Mapping[str, str] | None = None,
    taints: Sequence[Mapping[str, str]] = (),
    gpu_taint: bool = False,
) -> dict[str, Any]:
    """Return the manifest of one kwok node (capacity and labels as a real one would have)."""
    node_labels = {
        "kubernetes.io/arch": "amd64",
        "kubernetes.io/os": "linux",
        "kubernetes.io/hostname": name,
        "type": "kwok",
    }
    capacity = {"cpu": cpu, "memory": memory, "pods": pods}
    node_taints = [dict(t) for t in taints]
    if gpus:
        capacity[GPU_RESOURCE] = str(gpus)
        node_labels.update(
            {
                GPU_PRESENT_LABEL: "true",
                "nvidia.com/gpu.count": str(gpus),
                "nvidia.com/gpu.product": gpu_product,
            }
        )
        if gpu_taint:
            node_taints.append({"key": GPU_TAINT_KEY, "value": "present", "effect": "NoSchedule"})
    node_labels.update(labels or {})
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": node_labels,
            "annotations": {
                KWOK_NODE_ANNOTATION: KWOK_NODE_ANNOTATION_VALUE,
                "node.alpha.kubernetes.io/ttl": "0",
            },
        },
        "spec": {"taints": node_taints} if node_taints else {},
        # kwok's node-initialize stage keeps capacity/allocatable given at creation.
        "status": {"capacity": capacity, "allocatable": dict(capacity)},
    }


def create_nodes(
    api: Any,
    *,
    cpu: int = 0,
    gpu: int = 0,
    gpus_per_node: int = 8,
    name_prefix: str = "kwok",
    labels: Mapping[str, str] | None = None,
    taints: Sequence[Mapping[str, str]] = (),
    gpu_taint: bool = False,
    wait_ready_seconds: float | None = 60.0,
) -> list[str]:
    """Create ``cpu`` CPU nodes and ``gpu`` GPU nodes managed by kwok; return their names.

    ``api`` is a ``kubernetes.client.ApiClient``. ``labels`` and ``taints`` (dicts with
    key, value, effect) go on every node; GPU nodes also get the GPU labels and, with
    ``gpu_taint``, the ``nvidia.com/gpu=present:NoSchedule`` taint. Names are
    ``<prefix>-cpu-<i>`` and ``<prefix>-gpu-<i>``. With ``wait_ready_seconds``, waits
    until kwok reports every node Ready (kwok must be running).
    """
    core: Any = client.CoreV1Api(api)
    names: list[str] = []
    for kind, count in (("cpu", cpu), ("gpu", gpu)):
        for index in range(count):
            name = f"{name_prefix}-{kind}-{index}"
            body = node_manifest(
                name,
                gpus=gpus_per_node if kind == "gpu" else 0,
                labels=labels,
                taints=taints,
                gpu_taint=gpu_taint,
            )
            core.create_node(body)
            names.append(name)
    if wait_ready_seconds is not None:
        wait_nodes_ready(api, names, timeout=wait_ready_seconds)
    return names


def wait_nodes_ready(api: Any, names: Sequence[str], *, timeout: float) -> None:
    """Wait until every named node has condition Ready=True, or raise TimeoutError."""
    core: Any = client.CoreV1Api(api)
    deadline = time.monotonic() + timeout
    pending = set(names)
    while pending:
        for name in sorted(pending):
            node = core.read_node(name)
            conditions = node.status.conditions or []
            if any(c.type == "Ready" and c.status == "True" for c in conditions):
                pending.discard(name)
        if not pending:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nodes not Ready after {timeout:.0f}s: {sorted(pending)}")
        time.sleep(0.2)
