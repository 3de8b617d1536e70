"""The PodDisruptionBudget of the actor pods: voluntary evictions one pod at a time."""

from __future__ import annotations

from typing import Any

from relayrl_operator import constants
from relayrl_operator.builders import common


def build(agent: common.AgentRef) -> dict[str, Any]:
    """The PodDisruptionBudget manifest."""
    component = constants.COMPONENT_ACTORS
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": common.metadata(agent, common.actors_name(agent), component),
        "spec": {
            "maxUnavailable": 1,
            # Pods that are not ready (NATS away, a model missing, GPUs pending) never
            # count against the budget, or they would block every node drain.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
            "selector": {"matchLabels": common.selector_labels(agent, component)},
        },
    }
