"""Actor pods as the apiserver's watch delivers them, for the reconciler's unit tests."""

from __future__ import annotations

from typing import Any

from relayrl_operator import constants


def actor_pod(index: int, restart_hash: str, *, terminating: bool = False) -> dict[str, Any]:
    """Pod `index` of the example Agent `ml/cartpole`: ready, its container running."""
    meta: dict[str, Any] = {
        "namespace": "ml",
        "name": f"cartpole-actors-{index}",
        "labels": {
            constants.LABEL_AGENT: "cartpole",
            constants.LABEL_COMPONENT: constants.COMPONENT_ACTORS,
            constants.LABEL_POD_INDEX: str(index),
        },
        "annotations": {constants.ANNOTATION_RESTART_HASH: restart_hash},
    }
    if terminating:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {
        "kind": "Pod",
        "metadata": meta,
        "status": {
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}],
        },
    }
