"""Operator-wide settings: read once at startup, passed down explicitly.

Builders never read the environment; the CLI builds a `Settings` from flags and
environment variables and hands it to the reconciler.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

ENV_RUNTIME_IMAGE: Final = "RELAYRL_RUNTIME_IMAGE"
ENV_RUNTIME_IMAGE_CUDA: Final = "RELAYRL_RUNTIME_IMAGE_CUDA"
ENV_IMAGE_PULL_POLICY: Final = "RELAYRL_IMAGE_PULL_POLICY"
ENV_RESYNC_SECONDS: Final = "RELAYRL_RESYNC_SECONDS"
ENV_MONITOR_LABELS: Final = "RELAYRL_MONITOR_LABELS"
ENV_POD_LISTEN: Final = "RELAYRL_POD_LISTEN"
# The operator's own pod IP (the chart's downward API): its family is the cluster's.
ENV_POD_IP: Final = "POD_IP"

# What RELAYRL_POD_LISTEN takes: every address of the pod's family, or its pod IP only.
LISTEN_ALL: Final = "all"
LISTEN_POD_IP: Final = "podIP"

DEFAULT_RUNTIME_IMAGE: Final = "ghcr.io/relayrl-fleet/runtime:0.1.0"
# The CUDA build of an image (runtime_image/Dockerfile, VARIANT=cuda) is tagged so.
CUDA_TAG_SUFFIX: Final = "-cuda"
DEFAULT_RUNTIME_IMAGE_CUDA: Final = DEFAULT_RUNTIME_IMAGE + CUDA_TAG_SUFFIX


@dataclass(frozen=True)
class Settings:
    """What every reconcile needs to know about the operator's installation."""

    runtime_image: str = DEFAULT_RUNTIME_IMAGE
    # For actors of Agents with device cuda (the CPU image's torch and onnxruntime
    # cannot use a GPU); sinks always run the CPU image.
    runtime_image_cuda: str = DEFAULT_RUNTIME_IMAGE_CUDA
    image_pull_policy: str = "IfNotPresent"
    # Level-based resync period: how often actual children are compared with desired.
    resync_seconds: float = 30.0
    # Extra labels on every actor and sink workload (none by default).
    extra_labels: Mapping[str, str] = field(default_factory=dict)
    # Extra labels on each Agent's PodMonitor, for a Prometheus that selects monitors
    # by label (kube-prometheus-stack: release=<its release>); the chart's
    # monitoring.labels.
    monitor_labels: Mapping[str, str] = field(default_factory=dict)
    # Where actor and sink pods listen: an address ("0.0.0.0", or "::" in an IPv6
    # cluster), so that `kubectl port-forward` (which connects to localhost in the pod)
    # reaches them, or LISTEN_POD_IP for nodes whose pods share one network namespace
    # and so need an address each (the local stack's process node).
    pod_listen: str = "0.0.0.0"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from RELAYRL_* environment variables, defaults otherwise."""
        env = os.environ if environ is None else environ
        raw = env.get(ENV_RESYNC_SECONDS, "30")
        try:
            resync = float(raw)
        except ValueError:
            resync = 0.0
        if not resync >= 1:  # also NaN
            raise ValueError(f"{ENV_RESYNC_SECONDS}: expected seconds >= 1, got {raw!r}")
        return cls(
            runtime_image=env.get(ENV_RUNTIME_IMAGE, DEFAULT_RUNTIME_IMAGE),
            # Unset: the CUDA build of whichever image RELAYRL_RUNTIME_IMAGE names.
            runtime_image_cuda=env.get(ENV_RUNTIME_IMAGE_CUDA)
            or env.get(ENV_RUNTIME_IMAGE, DEFAULT_RUNTIME_IMAGE) + CUDA_TAG_SUFFIX,
            image_pull_policy=env.get(ENV_IMAGE_PULL_POLICY, "IfNotPresent"),
            resync_seconds=resync,
            monitor_labels=_labels(ENV_MONITOR_LABELS, env.get(ENV_MONITOR_LABELS, "")),
            pod_listen=_pod_listen(env.get(ENV_POD_LISTEN, ""), env.get(ENV_POD_IP, "")),
        )


def _pod_listen(raw: str, pod_ip: str) -> str:
    """RELAYRL_POD_LISTEN ("all" or "podIP"; empty is "all") as `Settings.pod_listen`.

    "all" is the wildcard of the operator's own pod IP family: a pod in an IPv6 cluster
    cannot listen on 0.0.0.0 for its Service's traffic.
    """
    value = raw.strip() or LISTEN_ALL
    if value == LISTEN_POD_IP:
        return LISTEN_POD_IP
    if value == LISTEN_ALL:
        return "::" if ":" in pod_ip else "0.0.0.0"
    raise ValueError(f"{ENV_POD_LISTEN}: expected {LISTEN_ALL!r} or {LISTEN_POD_IP!r}, got {raw!r}")


def _labels(name: str, raw: str) -> dict[str, str]:
    """A JSON object of label names to string values ("" or "null": none)."""
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except ValueError as err:
        raise ValueError(f"{name}: expected a JSON object of labels, got {raw!r}") from err
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError(f"{name}: expected a JSON object of string labels, got {raw!r}")
    return value
