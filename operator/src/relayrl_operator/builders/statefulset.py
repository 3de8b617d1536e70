"""The StatefulSet running an Agent's actor pods.

pods = ceil(actors / actorsPerPod); pod i runs actors [i*actorsPerPod, ...), read
from its pod index. GPU Agents request `nvidia.com/gpu` = gpusPerPod and tolerate the
usual GPU taint; CPU Agents never ask for GPUs. Scheduling and resources come from
`spec.template`.
"""

from __future__ import annotations

from typing import Any

from relayrl_operator import constants, settings
from relayrl_operator.builders import common, configmap
from relayrl_runtime import spec


def _env(agent: common.AgentRef, cfg: settings.Settings) -> list[dict[str, Any]]:
    env = [
        common.field_env(
            constants.ENV_POD_INDEX, f"metadata.labels['{constants.LABEL_POD_INDEX}']"
        ),
        *common.pod_env(cfg.pod_listen),
    ]
    env += common.nats_env(agent)
    env.append({"name": constants.ENV_POD_CONFIG, "value": configmap.pod_config(agent)})
    template = agent.spec.template
    if template is not None:
        env += [e.manifest() for e in template.env]
    return env


def _resources(agent: common.AgentRef) -> dict[str, Any]:
    template = agent.spec.template
    res = template.resources if template is not None else None
    requests: dict[str, Any] = dict(res.requests) if res is not None else {}
    limits: dict[str, Any] = dict(res.limits) if res is not None else {}
    if agent.spec.device is spec.Device.CUDA:
        # Extended resources are requested through limits (requests default to them).
        limits[constants.GPU_RESOURCE] = agent.spec.gpus_per_pod
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _volumes(agent: common.AgentRef) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": common.configmap_name(agent)}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": constants.CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": constants.SCRATCH_DIR},
    ]
    nats = agent.spec.trajectories.nats
    if nats.credentials_secret is not None:
        volumes.append(
            {"name": "nats-credentials", "secret": {"secretName": nats.credentials_secret.name}}
        )
        mounts.append(
            {
                "name": "nats-credentials",
                "mountPath": constants.NATS_CREDENTIALS_DIR,
                "readOnly": True,
            }
        )
    if nats.tls is not None:
        volumes.append({"name": "nats-tls", "secret": {"secretName": nats.tls.secret_name}})
        mounts.append({"name": "nats-tls", "mountPath": constants.NATS_TLS_DIR, "readOnly": True})
    return volumes, mounts


def _ports(agent: common.AgentRef) -> list[dict[str, Any]]:
    ports = [{"name": constants.PORT_NAME_METRICS, "containerPort": constants.PORT_METRICS}]
    remote = agent.spec.environment.remote
    if remote is not None:
        ports.append({"name": constants.PORT_NAME_REMOTE, "containerPort": remote.port})
    return ports


def _image(agent: common.AgentRef, cfg: settings.Settings) -> str:
    """The operator's runtime image for this Agent's device."""
    if agent.spec.device == spec.Device.CUDA:
        return cfg.runtime_image_cuda
    return cfg.runtime_image


def build(agent: common.AgentRef, cfg: settings.Settings) -> dict[str, Any]:
    """The StatefulSet manifest."""
    template = agent.spec.template or spec.PodTemplate()
    name = common.actors_name(agent)
    component = constants.COMPONENT_ACTORS
    volumes, mounts = _volumes(agent)
    container: dict[str, Any] = {
        "name": constants.CONTAINER_RUNTIME,
        "image": template.image or _image(agent, cfg),
        "imagePullPolicy": str(template.image_pull_policy or cfg.image_pull_policy),
        "command": ["relayrl-runtime"],
        "args": ["run", "--config", f"{constants.CONFIG_DIR}/{constants.CONFIG_KEY}"],
        "env": _env(agent, cfg),
        "ports": _ports(agent),
        "readinessProbe": common.http_probe("/readyz", period=2),
        "livenessProbe": common.http_probe("/healthz", period=10, failures=6),
        "resources": _resources(agent),
        "volumeMounts": mounts,
        "securityContext": common.restricted_security_context(),
    }
    pod_template: dict[str, Any] = {
        "metadata": {
            "labels": common.labels(agent, component, dict(template.labels)),
            "annotations": dict(template.annotations),
        },
        "spec": {
            "containers": [container],
            "volumes": volumes,
            "terminationGracePeriodSeconds": constants.TERMINATION_GRACE_SECONDS,
            "securityContext": {"runAsNonRoot": True, "fsGroup": 10001},
            "enableServiceLinks": False,
            **common.scheduling(agent, actor_pods=True),
        },
    }
    if agent.model_rollout is not None:
        pod_template["metadata"]["annotations"][constants.ANNOTATION_MODEL_ROLLOUT] = str(
            agent.model_rollout
        )
    # What a pod started from this template runs (the runtime config's cold fields
    # are in its env). Status counts a pod as updated when its hash is this one.
    pod_template["metadata"]["annotations"][constants.ANNOTATION_RESTART_HASH] = common.digest(
        pod_template
    )
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": common.metadata(agent, name, component, dict(cfg.extra_labels)),
        "spec": {
            "replicas": agent.spec.pods(),
            "serviceName": name,
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "RollingUpdate"},
            "revisionHistoryLimit": 5,
            "selector": {"matchLabels": common.selector_labels(agent, component)},
            "template": pod_template,
        },
    }


def restart_hash(agent: common.AgentRef, cfg: settings.Settings) -> str:
    """The restart hash the Agent's up-to-date actor pods carry (see `build`)."""
    annotations = build(agent, cfg)["spec"]["template"]["metadata"]["annotations"]
    return str(annotations[constants.ANNOTATION_RESTART_HASH])
