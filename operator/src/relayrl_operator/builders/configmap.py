"""The ConfigMap with the rendered runtime config every actor pod of an Agent reads.

All pods share it; each finds its actor slice from its pod index. Some fields are
applied by running pods without a restart (`HOT_FIELDS`); the actor pods carry a hash
of the rest (`restart_hash`) so a change there rolls them. While actors move between
pods the config says `sliceHandover` (relayrl_operator.handover).
"""

from __future__ import annotations

from typing import Any, Final

from relayrl_operator import constants, handover
from relayrl_operator.builders import common
from relayrl_runtime import config

# Fields (paths in the rendered config) running runtimes apply from the mounted file
# without a restart; the runtime owns the list (`config.HOT_FIELDS`).
HOT_FIELDS: Final = config.HOT_FIELDS


def layout(agent: common.AgentRef, *, handing_over: bool = False) -> handover.Layout:
    """How the Agent's actors are spread over its pods."""
    return handover.Layout(agent.spec.actors, agent.actors_per_pod, handing_over)


def runtime_config(agent: common.AgentRef, *, handing_over: bool = False) -> config.RuntimeConfig:
    """The runtime config for the Agent's actor pods."""
    s = agent.spec
    return config.RuntimeConfig(
        agent=agent.name,
        namespace=agent.namespace,
        actors=s.actors,
        actors_per_pod=agent.actors_per_pod,
        routers=s.routers,
        device=s.device,
        model=s.model,
        environment=s.environment,
        trajectories=s.trajectories,
        server=config.ServerConfig(port=constants.PORT_METRICS),
        slice_handover=True if handing_over else None,
    )


def _wire(cfg: config.RuntimeConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json", by_alias=True, exclude_none=True)


def restart_hash(agent: common.AgentRef) -> str:
    """Hash of the config fields that need a pod restart to take effect."""
    data = _wire(runtime_config(agent))
    for path in (*HOT_FIELDS, *config.UNUSED_FIELDS):
        node = data
        for key in path[:-1]:
            node = node.get(key, {})
        node.pop(path[-1], None)
    return common.digest(data)


def build(agent: common.AgentRef, *, handing_over: bool = False) -> dict[str, Any]:
    """The ConfigMap manifest (`handing_over`: step 1 of a slice handover)."""
    rendered = config.dump(runtime_config(agent, handing_over=handing_over))
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            **common.metadata(agent, common.configmap_name(agent), constants.COMPONENT_ACTORS),
            "annotations": {
                constants.ANNOTATION_CONFIG_HASH: config.revision(rendered.encode()),
                constants.ANNOTATION_ACTOR_LAYOUT: layout(
                    agent, handing_over=handing_over
                ).encode(),
            },
        },
        "data": {constants.CONFIG_KEY: rendered},
    }
