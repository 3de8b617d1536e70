"""The PodMonitor that lets a Prometheus Operator scrape every pod of an Agent.

Built only when the monitoring.coreos.com CRDs are installed (the reconciler checks);
it selects actor and sink pods alike by the Agent label and their `metrics` port.
Its `podTargetLabels` copy the Agent and component labels of each pod onto every
series scraped from it, so two Agents in one namespace stay apart in queries; the
Prometheus Operator sanitizes their names (`relayrl.io/agent` -> `relayrl_io_agent`,
see `target_label`), the names the chart's dashboards use.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from relayrl_operator import constants
from relayrl_operator.builders import common

API_VERSION: Final = "monitoring.coreos.com/v1"

# Pod labels (set by `common.labels` on every actor and sink pod) copied onto its series.
POD_TARGET_LABELS: Final = (constants.LABEL_AGENT, constants.LABEL_COMPONENT)

_INVALID_LABEL_CHARS: Final = re.compile(r"[^a-zA-Z0-9_]")


def target_label(pod_label: str) -> str:
    """The label a pod label becomes on scraped series: the Prometheus Operator's
    `sanitizeLabelName` (every character not valid in a label name becomes `_`)."""
    return _INVALID_LABEL_CHARS.sub("_", pod_label)


def build(agent: common.AgentRef, labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The PodMonitor manifest; `labels` on it too (those a Prometheus selects by)."""
    meta = common.metadata(agent, agent.name, constants.COMPONENT_ACTORS, dict(labels or {}))
    return {
        "apiVersion": API_VERSION,
        "kind": "PodMonitor",
        "metadata": meta,
        "spec": {
            "selector": {"matchLabels": {constants.LABEL_AGENT: agent.name}},
            "podTargetLabels": list(POD_TARGET_LABELS),
            "podMetricsEndpoints": [
                {"port": constants.PORT_NAME_METRICS, "path": "/metrics", "interval": "15s"}
            ],
        },
    }
