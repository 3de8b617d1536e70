"""What every builder shares: the Agent being built for, names, labels, owner refs."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from relayrl_operator import constants, settings
from relayrl_runtime import spec


@dataclass(frozen=True)
class AgentRef:
    """The Agent a reconcile works on: identity plus its validated spec."""

    name: str
    namespace: str
    uid: str
    generation: int
    spec: spec.AgentSpec
    # The model version the actor pods are rolled for (status.modelRollout), if any.
    model_rollout: int | None = None

    @property
    def actors_per_pod(self) -> int:
        """Actors in each pod; the last pod may hold fewer."""
        return self.spec.actors_per_pod or max(self.spec.actors, 1)


# Child names, derived from the Agent name (at most 40 characters, see spec).
def configmap_name(agent: AgentRef) -> str:
    """ConfigMap holding the rendered runtime and sink configs."""
    return f"{agent.name}-runtime"


def actors_name(agent: AgentRef) -> str:
    """StatefulSet, headless Service and PodDisruptionBudget of the actor pods."""
    return f"{agent.name}-actors"


def remote_service_name(agent: AgentRef) -> str:
    """Service in front of the ZMQ endpoint for remote environment clients."""
    return f"{agent.name}-remote"


def sink_name(agent: AgentRef, component: str) -> str:
    """Deployment (and PersistentVolumeClaim) of one sink."""
    return f"{agent.name}-{component}"


def selector_labels(agent: AgentRef, component: str) -> dict[str, str]:
    """Labels that select one component's pods; never change on a live object."""
    return {constants.LABEL_AGENT: agent.name, constants.LABEL_COMPONENT: component}


def labels(agent: AgentRef, component: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """All labels of a child object or pod."""
    return {
        **(extra or {}),
        constants.LABEL_NAME: constants.APP_NAME,
        constants.LABEL_INSTANCE: agent.name,
        constants.LABEL_PART_OF: constants.PART_OF,
        constants.LABEL_MANAGED_BY: constants.OPERATOR_NAME,
        **selector_labels(agent, component),
    }


def owner_reference(agent: AgentRef) -> dict[str, Any]:
    """Makes the Agent the controller of a child, for garbage collection."""
    return {
        "apiVersion": spec.API_VERSION,
        "kind": spec.KIND,
        "name": agent.name,
        "uid": agent.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(
    agent: AgentRef, name: str, component: str, extra_labels: dict[str, str] | None = None
) -> dict[str, Any]:
    """Metadata of a namespaced child owned by the Agent."""
    return {
        "name": name,
        "namespace": agent.namespace,
        "labels": labels(agent, component, extra_labels),
        "ownerReferences": [owner_reference(agent)],
    }


def owned_by(meta: Mapping[str, Any], agent: AgentRef) -> bool:
    """Whether an object's metadata names the Agent (this very one, by uid) as owner."""
    return any(ref.get("uid") == agent.uid for ref in meta.get("ownerReferences") or ())


def digest(data: Any) -> str:
    """A short stable hash of JSON-able data, for change-detecting annotations."""
    raw = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def restricted_security_context() -> dict[str, Any]:
    """Container securityContext meeting the 'restricted' Pod Security Standard."""
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def http_probe(path: str, period: int = 5, failures: int = 3) -> dict[str, Any]:
    """An HTTP probe on the metrics port."""
    return {
        "httpGet": {"path": path, "port": constants.PORT_NAME_METRICS},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 2,
    }


def field_env(name: str, path: str) -> dict[str, Any]:
    """An env var from the downward API."""
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def pod_env(listen: str) -> list[dict[str, Any]]:
    """Who and where the process is: pod name, namespace, and the address to listen on.

    ``listen`` is `Settings.pod_listen`: an address, or "podIP" for the pod's own IP
    (downward API), which lets pods share ports on the local stack's process node (one
    loopback IP per pod) but keeps `kubectl port-forward` out.
    """
    bind = (
        field_env(constants.ENV_BIND_ADDRESS, "status.podIP")
        if listen == settings.LISTEN_POD_IP
        else {"name": constants.ENV_BIND_ADDRESS, "value": listen}
    )
    return [
        field_env(constants.ENV_POD_NAME, "metadata.name"),
        field_env(constants.ENV_NAMESPACE, "metadata.namespace"),
        bind,
    ]


def nats_env(agent: AgentRef) -> list[dict[str, Any]]:
    """Tell the process where the NATS credential and TLS Secrets are mounted."""
    nats = agent.spec.trajectories.nats
    env: list[dict[str, Any]] = []
    if nats.credentials_secret is not None:
        env.append(
            {"name": constants.ENV_NATS_CREDENTIALS_DIR, "value": constants.NATS_CREDENTIALS_DIR}
        )
    if nats.tls is not None:
        env.append({"name": constants.ENV_NATS_TLS_DIR, "value": constants.NATS_TLS_DIR})
    return env


def scheduling(agent: AgentRef, *, actor_pods: bool) -> dict[str, Any]:
    """Pod placement from spec.template, for actor pods and (in part) sink pods.

    Sink pods follow the same node selector, tolerations, affinity, priority and
    service account, so an Agent's pods stay in the pool it was given; GPUs, the GPU
    toleration and the runtime class are for actor pods only.
    """
    template = agent.spec.template or spec.PodTemplate()
    tolerations = [t.model_dump(by_alias=True, exclude_none=True) for t in template.tolerations]
    if actor_pods and agent.spec.device is spec.Device.CUDA:
        gpu_taint = {"key": constants.GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
        if gpu_taint not in tolerations:
            tolerations.append(gpu_taint)
    out: dict[str, Any] = {}
    if template.node_selector:
        out["nodeSelector"] = dict(template.node_selector)
    if tolerations:
        out["tolerations"] = tolerations
    if template.affinity:
        out["affinity"] = dict(template.affinity)
    fields = [
        ("priorityClassName", template.priority_class_name),
        ("serviceAccountName", template.service_account_name),
    ]
    if actor_pods:
        fields.append(("runtimeClassName", template.runtime_class_name))
    for key, value in fields:
        if value is not None:
            out[key] = value
    if template.service_account_name is None:
        # The runtime and the sinks never call the Kubernetes API: no token for the
        # Agent's code (environments run in the actor pods) to find. A service account
        # named in the template keeps its own setting.
        out["automountServiceAccountToken"] = False
    return out
