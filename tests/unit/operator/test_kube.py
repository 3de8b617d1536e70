"""The API client's request accounting: which resource a path addresses."""

from __future__ import annotations

import pytest

from relayrl_operator import kube


@pytest.mark.parametrize(
    ("path", "resource"),
    [
        ("/api/v1/namespaces/ns/events", "events"),
        ("/api/v1/namespaces/ns/configmaps/cartpole-runtime", "configmaps"),
        ("/apis/apps/v1/namespaces/ns/statefulsets", "statefulsets"),
        ("/apis/relayrl.io/v1alpha1/namespaces/ns/agents/cartpole/status", "agents/status"),
        ("/apis/apps/v1/namespaces/ns/statefulsets/a/scale?dryRun=All", "statefulsets/scale"),
        ("/api/v1/namespaces/ns", "namespaces"),
        ("/api/v1/nodes", "nodes"),
        ("/apis/relayrl.io/v1alpha1/agents", "agents"),
        ("/version", "other"),
    ],
)
def test_resource_of_names_the_resource_and_subresource(path: str, resource: str) -> None:
    assert kube.resource_of(path) == resource


@pytest.mark.parametrize(
    ("status", "message", "transient"),
    [
        (409, "the object has been modified", True),
        (429, "too many requests", True),
        (503, "etcd is away", True),
        (422, "spec.replicas: Invalid value", False),
        (
            500,
            "failed to create typed patch object (fleet/x-actors; apps/v1, Kind=StatefulSet):"
            ' .spec.template.spec.containers[name="runtime"].env: duplicate entries for key'
            ' [name="A"]',
            False,
        ),
    ],
)
def test_which_refusals_are_worth_another_try(status: int, message: str, transient: bool) -> None:
    assert kube.ApiError(status, "", message).transient is transient
