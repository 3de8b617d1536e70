"""The ConfigMap with the rendered runtime config every actor pod of an Agent reads.

All pods share it; each finds its actor slice from its pod index. Some fields are
applied by running pods without a restart (`HOT_FIELDS`); the actor pods' template
carries the rest (`pod_config`), so a change there rolls them and a pod keeps its
template's until it is replaced. While actors move between pods the config says
`sliceHandover` (relayrl_operator.handover).
"""

from __future__ import annotations

import json
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
        # The operator makes the stream (pods publish once it is there) and deletes it
        # with the Agent.
        create_stream=False,
    )


def pod_config(agent: common.AgentRef) -> str:
    """The config's cold fields as JSON, for the actor pods' template
    (`config.ENV_POD_CONFIG`): a change to them rolls the pods, and a pod of an older
    template that restarts runs them as they were, not as the ConfigMap has them now.

    Escaped for an env var's `value`, where the kubelet reads `$(NAME)` as a reference
    to another variable and `$$` as `$`: every `$` is doubled."""
    text = json.dumps(
        config.cold_fields(runtime_config(agent)), sort_keys=True, separators=(",", ":")
    )
    return text.replace("$", "$$")


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
