"""Services of an Agent: the actor pods' headless Service, and one for remote clients.

The headless Service gives each actor pod a stable DNS name (StatefulSet
`serviceName`) and lets Prometheus discover the metrics port; the remote Service
exists only when the environment is `remote`, in front of the pods' ZMQ endpoint.
"""

from __future__ import annotations

from typing import Any

from relayrl_operator import constants
from relayrl_operator.builders import common


def build_headless(agent: common.AgentRef) -> dict[str, Any]:
    """The headless Service of the actor pods."""
    component = constants.COMPONENT_ACTORS
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": common.metadata(agent, common.actors_name(agent), component),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": common.selector_labels(agent, component),
            "ports": [
                {
                    "name": constants.PORT_NAME_METRICS,
                    "port": constants.PORT_METRICS,
                    "targetPort": constants.PORT_NAME_METRICS,
                }
            ],
        },
    }


def build_remote(agent: common.AgentRef) -> dict[str, Any] | None:
    """The Service for remote environment clients, or None when none are used."""
    remote = agent.spec.environment.remote
    if remote is None:
        return None
    component = constants.COMPONENT_ACTORS
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": common.metadata(agent, common.remote_service_name(agent), component),
        "spec": {
            "selector": common.selector_labels(agent, component),
            "ports": [
                {
                    "name": constants.PORT_NAME_REMOTE,
                    "port": remote.port,
                    "targetPort": constants.PORT_NAME_REMOTE,
                }
            ],
        },
    }
