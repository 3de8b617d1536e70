"""Sink Deployments (and the Arrow sink's PersistentVolumeClaim) of an Agent.

One Deployment per configured sink, one replica each (a durable JetStream consumer
per sink kind), strategy Recreate so two writers never overlap. The Arrow sink
writes under its path on a claim (created from `storage.size`, or an existing one) or
an emptyDir; the Postgres sink reads its DSN from the named Secret, mounted as a file.
"""

from __future__ import annotations

from typing import Any

from relayrl_operator import constants, settings
from relayrl_operator.builders import common
from relayrl_runtime import spec


def _common_args(agent: common.AgentRef) -> list[str]:
    nats = agent.spec.trajectories.nats
    args = [
        "--agent",
        agent.name,
        "--namespace",
        agent.namespace,
        "--nats-url",
        nats.url,
        # The operator creates and owns the stream; the sink only consumes it.
        "--no-create-stream",
        "--http-host",
        f"$({constants.ENV_BIND_ADDRESS})",
        "--http-port",
        str(constants.PORT_METRICS),
        "--log-format",
        "json",
    ]
    if nats.stream:
        args += ["--stream", nats.stream]
    return args


def _nats_volumes(agent: common.AgentRef) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    nats = agent.spec.trajectories.nats
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    for name, secret, path in (
        (
            "nats-credentials",
            nats.credentials_secret.name if nats.credentials_secret else None,
            constants.NATS_CREDENTIALS_DIR,
        ),
        ("nats-tls", nats.tls.secret_name if nats.tls else None, constants.NATS_TLS_DIR),
    ):
        if secret is not None:
            volumes.append({"name": name, "secret": {"secretName": secret}})
            mounts.append({"name": name, "mountPath": path, "readOnly": True})
    return volumes, mounts


def _deployment(
    agent: common.AgentRef,
    cfg: settings.Settings,
    component: str,
    args: list[str],
    volumes: list[dict[str, Any]],
    mounts: list[dict[str, Any]],
    resources: spec.Resources | None,
) -> dict[str, Any]:
    template = agent.spec.template or spec.PodTemplate()
    nats_volumes, nats_mounts = _nats_volumes(agent)
    container = {
        "name": constants.CONTAINER_SINK,
        "image": template.image or cfg.runtime_image,
        "imagePullPolicy": str(template.image_pull_policy or cfg.image_pull_policy),
        "command": ["relayrl-sink"],
        "args": args + _common_args(agent),
        "env": [*common.pod_env(cfg.pod_listen), *common.nats_env(agent)],
        "ports": [{"name": constants.PORT_NAME_METRICS, "containerPort": constants.PORT_METRICS}],
        "readinessProbe": common.http_probe("/readyz", period=2),
        "livenessProbe": common.http_probe("/healthz", period=10, failures=6),
        "volumeMounts": [
            *mounts,
            *nats_mounts,
            {"name": "tmp", "mountPath": constants.SCRATCH_DIR},
        ],
        "securityContext": common.restricted_security_context(),
    }
    if resources is not None:
        container["resources"] = {
            k: dict(v)
            for k, v in (("requests", resources.requests), ("limits", resources.limits))
            if v
        }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": common.metadata(
            agent, common.sink_name(agent, component), component, dict(cfg.extra_labels)
        ),
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": common.selector_labels(agent, component)},
            "template": {
                "metadata": {"labels": common.labels(agent, component)},
                "spec": {
                    "containers": [container],
                    "volumes": [*volumes, *nats_volumes, {"name": "tmp", "emptyDir": {}}],
                    "terminationGracePeriodSeconds": constants.TERMINATION_GRACE_SECONDS,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "fsGroup": 10001,
                        # Not every file of a full volume at each start: its root tells.
                        "fsGroupChangePolicy": "OnRootMismatch",
                    },
                    "enableServiceLinks": False,
                    **common.scheduling(agent, actor_pods=False),
                },
            },
        },
    }


def build_arrow(
    agent: common.AgentRef, cfg: settings.Settings, sink: spec.ArrowSink
) -> list[dict[str, Any]]:
    """The Arrow sink Deployment, plus its claim when the spec asks for one."""
    component = constants.COMPONENT_ARROW_SINK
    name = common.sink_name(agent, component)
    out: list[dict[str, Any]] = []
    storage = sink.storage
    if storage is not None and storage.existing_claim is not None:
        volume: dict[str, Any] = {
            "name": "data",
            "persistentVolumeClaim": {"claimName": storage.existing_claim},
        }
    elif storage is not None and storage.size is not None:
        meta = common.metadata(agent, name, component)
        meta["annotations"] = {constants.ANNOTATION_STORAGE_SIZE: str(storage.size)}
        if agent.spec.trajectories.nats.retain_on_delete:
            # Kept with the stream: no owner, so deleting the Agent leaves the files
            # (an Agent made again under the name uses the claim again).
            del meta["ownerReferences"]
        claim: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": meta,
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": storage.size}},
            },
        }
        if storage.storage_class_name is not None:
            claim["spec"]["storageClassName"] = storage.storage_class_name
        out.append(claim)
        volume = {"name": "data", "persistentVolumeClaim": {"claimName": name}}
    else:
        volume = {"name": "data", "emptyDir": {}}
    args = [
        "arrow",
        "--path",
        sink.path,
        "--format",
        sink.format.value,
        "--compression",
        sink.compression.value,
        "--rotate-bytes",
        str(sink.rotate_bytes),
        "--rotate-seconds",
        str(sink.rotate_seconds),
    ]
    mounts = [{"name": "data", "mountPath": sink.path}]
    out.append(_deployment(agent, cfg, component, args, [volume], mounts, sink.resources))
    return out


def build_postgres(
    agent: common.AgentRef, cfg: settings.Settings, sink: spec.PostgresSink
) -> dict[str, Any]:
    """The Postgres sink Deployment; its DSN comes from the Secret, as a file."""
    component = constants.COMPONENT_POSTGRES_SINK
    secret = sink.dsn_secret
    args = [
        "postgres",
        "--dsn-file",
        f"{constants.POSTGRES_SECRET_DIR}/{secret.key}",
        "--schema",
        sink.schema_name,
        "--table",
        sink.table,
        "--batch-rows",
        str(sink.batch_rows),
    ]
    volumes = [{"name": "postgres", "secret": {"secretName": secret.name}}]
    mounts = [{"name": "postgres", "mountPath": constants.POSTGRES_SECRET_DIR, "readOnly": True}]
    return _deployment(agent, cfg, component, args, volumes, mounts, sink.resources)


def build_all(agent: common.AgentRef, cfg: settings.Settings) -> list[dict[str, Any]]:
    """Every sink child the spec asks for."""
    out: list[dict[str, Any]] = []
    for sink in agent.spec.sinks:
        if sink.arrow is not None:
            out += build_arrow(agent, cfg, sink.arrow)
        if sink.postgres is not None:
            out.append(build_postgres(agent, cfg, sink.postgres))
    return out


def desired_names(agent: common.AgentRef) -> list[str]:
    """Names of the sink Deployments the spec asks for."""
    names = []
    for sink in agent.spec.sinks:
        component = (
            constants.COMPONENT_ARROW_SINK
            if sink.arrow is not None
            else constants.COMPONENT_POSTGRES_SINK
        )
        names.append(common.sink_name(agent, component))
    return names


def possible_names(agent: common.AgentRef) -> list[str]:
    """Names every sink Deployment of this Agent could have."""
    return [
        common.sink_name(agent, c)
        for c in (constants.COMPONENT_ARROW_SINK, constants.COMPONENT_POSTGRES_SINK)
    ]
