"""The PodMonitor that lets a Prometheus Operator scrape every pod of an Agent.

Built only when the monitoring.coreos.com CRDs are installed (the reconciler checks);
it selects actor and sink pods alike by the Agent label and their `metrics` port.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from relayrl_operator import constants
from relayrl_operator.builders import common

API_VERSION: Final = "monitoring.coreos.com/v1"


def build(agent: common.AgentRef, labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The PodMonitor manifest; `labels` on it too (those a Prometheus selects by)."""
    meta = common.metadata(agent, agent.name, constants.COMPONENT_ACTORS, dict(labels or {}))
    return {
        "apiVersion": API_VERSION,
        "kind": "PodMonitor",
        "metadata": meta,
        "spec": {
            "selector": {"matchLabels": {constants.LABEL_AGENT: agent.name}},
            "podMetricsEndpoints": [
                {"port": constants.PORT_NAME_METRICS, "path": "/metrics", "interval": "15s"}
            ],
        },
    }
