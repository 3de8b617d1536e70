"""Every label, annotation, finalizer, port and file name the operator writes.

Builders and handlers import these instead of spelling strings, so tracing a field
from the CRD to the pod is one grep away.
"""

from __future__ import annotations

from typing import Final

from relayrl_runtime import config, spec, streams

OPERATOR_NAME: Final = "relayrl-operator"
FIELD_MANAGER: Final = OPERATOR_NAME

# Labels (the recommended app.kubernetes.io set, plus our own selector labels).
LABEL_NAME: Final = "app.kubernetes.io/name"
LABEL_INSTANCE: Final = "app.kubernetes.io/instance"
LABEL_COMPONENT: Final = "app.kubernetes.io/component"
LABEL_PART_OF: Final = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
LABEL_AGENT: Final = f"{spec.GROUP}/agent"
# Set by the StatefulSet controller on each pod (GA in Kubernetes 1.32).
LABEL_POD_INDEX: Final = "apps.kubernetes.io/pod-index"

APP_NAME: Final = "relayrl-agent"
PART_OF: Final = "relayrl-fleet"

COMPONENT_ACTORS: Final = "actors"
COMPONENT_ARROW_SINK: Final = "arrow-sink"
COMPONENT_POSTGRES_SINK: Final = "postgres-sink"

# Annotations.
ANNOTATION_RESTART_HASH: Final = f"{spec.GROUP}/restart-hash"
# On the runtime ConfigMap: the revision of its config (`relayrl_runtime.config.revision`,
# what pods report applying). On an actor pod: the revision the operator last asked its
# kubelet to mount (a pod update makes the kubelet refresh the volume at once).
ANNOTATION_CONFIG_HASH: Final = f"{spec.GROUP}/config-hash"
# On the runtime ConfigMap: the actor layout it holds (relayrl_operator.handover).
ANNOTATION_ACTOR_LAYOUT: Final = f"{spec.GROUP}/actor-layout"
# On the actor pod template: the model version the pods were rolled for, because the
# running ones could not hot-reload it (status.modelRollout).
ANNOTATION_MODEL_ROLLOUT: Final = f"{spec.GROUP}/model-rollout"

# On an Arrow sink's claim: the `storage.size` it was last applied for. A claim larger
# than that was grown by hand (kept at its size); a smaller `storage.size` is a shrink.
ANNOTATION_STORAGE_SIZE: Final = f"{spec.GROUP}/storage-size"

FINALIZER: Final = f"{spec.GROUP}/finalizer"

# The runtime container.
CONTAINER_RUNTIME: Final = "runtime"
CONTAINER_SINK: Final = "sink"
CONFIG_KEY: Final = "runtime.yaml"
CONFIG_DIR: Final = spec.CONFIG_DIR
NATS_CREDENTIALS_DIR: Final = f"{CONFIG_DIR}/nats"
NATS_TLS_DIR: Final = f"{CONFIG_DIR}/nats-tls"
POSTGRES_SECRET_DIR: Final = f"{CONFIG_DIR}/postgres"
SCRATCH_DIR: Final = spec.SCRATCH_DIR

PORT_METRICS: Final = spec.METRICS_PORT
PORT_NAME_METRICS: Final = "metrics"
PORT_NAME_REMOTE: Final = "remote"

# Actor pods drain (flush partial trajectories, wait for acks) on SIGTERM.
TERMINATION_GRACE_SECONDS: Final = 60

ENV_POD_INDEX: Final = config.ENV_POD_INDEX
ENV_POD_NAME: Final = config.ENV_POD_NAME
ENV_NAMESPACE: Final = config.ENV_NAMESPACE
ENV_BIND_ADDRESS: Final = config.ENV_BIND_ADDRESS
ENV_POD_CONFIG: Final = config.ENV_POD_CONFIG

ENV_NATS_CREDENTIALS_DIR: Final = streams.ENV_NATS_CREDENTIALS_DIR
ENV_NATS_TLS_DIR: Final = streams.ENV_NATS_TLS_DIR

GPU_RESOURCE: Final = spec.GPU_RESOURCE
