"""The Agent API on a real apiserver: schema, defaults, CEL rules, subresources."""

from __future__ import annotations

import json

import pytest
from kubernetes import client

from relayrl_localstack import testing
from relayrl_runtime import spec
from support import specs

RULE_MESSAGES = {rule.message for model in spec.SpecModel.__subclasses__() for rule in model.rules}


def _create(k8s: testing.ClusterHandle, namespace: str, manifest: dict[str, object]) -> None:
    api = client.CustomObjectsApi(k8s.api)
    api.create_namespaced_custom_object(
        spec.GROUP,
        spec.VERSION,
        namespace,
        spec.PLURAL,
        manifest,
        field_validation="Strict",
    )


def test_explain_reads_the_field_descriptions(agent_crd: testing.ClusterHandle) -> None:
    out = agent_crd.kubectl("explain", "agent.spec").stdout
    assert "The desired state of an actor fleet." in out
    assert "actorsPerPod" in out
    model = agent_crd.kubectl("explain", "agent.spec.model").stdout
    assert "objectstore://<bucket>/<name>" in model
    assert "onnx" in model


def test_valid_agent_is_stored_with_defaults(
    agent_crd: testing.ClusterHandle, namespace: str
) -> None:
    _create(agent_crd, namespace, specs.base_manifest())
    stored = client.CustomObjectsApi(agent_crd.api).get_namespaced_custom_object(
        spec.GROUP, spec.VERSION, namespace, spec.PLURAL, "cartpole"
    )
    s = stored["spec"]
    assert (s["routers"], s["device"], s["gpusPerPod"], s["paused"]) == (1, "cpu", 0, False)
    assert s["trajectories"]["maxLength"] == 1000
    assert s["trajectories"]["nats"]["url"] == "nats://nats:4222"
    assert s["sinks"][0]["arrow"]["format"] == "parquet"
    # What the apiserver stored parses with the models to the same spec.
    assert spec.parse_spec(s) == spec.parse_agent(specs.base_manifest()).spec


@pytest.mark.parametrize("case", specs.invalid_cases(), ids=lambda c: c.id)
def test_invalid_spec_is_rejected_by_the_apiserver(
    agent_crd: testing.ClusterHandle, namespace: str, case: specs.InvalidCase
) -> None:
    with pytest.raises(client.ApiException) as caught:
        _create(agent_crd, namespace, case.manifest)
    # 422 for schema and CEL violations; 400 when strict decoding meets an unknown field.
    assert caught.value.status in (400, 422), caught.value.body
    message = json.loads(caught.value.body)["message"]
    if case.field != "metadata.name":  # a root-level rule names no field path
        assert case.field in message, message
    if case.message in " ".join(RULE_MESSAGES) or case.field == "metadata.name":
        assert case.message in message, message


def test_scale_subresource_sets_actors(agent_crd: testing.ClusterHandle, namespace: str) -> None:
    _create(agent_crd, namespace, specs.base_manifest())
    agent_crd.kubectl("-n", namespace, "scale", "agent/cartpole", "--replicas=12")
    stored = client.CustomObjectsApi(agent_crd.api).get_namespaced_custom_object(
        spec.GROUP, spec.VERSION, namespace, spec.PLURAL, "cartpole"
    )
    assert stored["spec"]["actors"] == 12
    # Below actorsPerPod too (one pod, with fewer actors than it could run): what a
    # HorizontalPodAutoscaler scaling the Agent down may ask for.
    agent_crd.kubectl("-n", namespace, "scale", "agent/cartpole", "--replicas=2")
    stored = client.CustomObjectsApi(agent_crd.api).get_namespaced_custom_object(
        spec.GROUP, spec.VERSION, namespace, spec.PLURAL, "cartpole"
    )
    assert stored["spec"]["actors"] == 2
    assert spec.parse_agent(stored).spec.pods() == 1


def test_printer_columns(agent_crd: testing.ClusterHandle, namespace: str) -> None:
    _create(agent_crd, namespace, specs.base_manifest())
    header = agent_crd.kubectl("-n", namespace, "get", "agents").stdout.splitlines()[0].split()
    assert header == ["NAME", "READY", "ACTORS", "DEVICE", "MODEL", "PHASE", "AGE"]
    short = agent_crd.kubectl("-n", namespace, "get", "rla", "-o", "name").stdout
    assert short.strip() == "agent.relayrl.io/cartpole"


def test_the_stream_name_cannot_change_on_an_existing_agent(
    agent_crd: testing.ClusterHandle, namespace: str
) -> None:
    """A transition rule: the stream holds the trajectories and the sinks' positions."""
    api = client.CustomObjectsApi(agent_crd.api)
    manifest = specs.merge_patch(
        specs.base_manifest(), {"spec": {"trajectories": {"nats": {"stream": "FIRST"}}}}
    )
    _create(agent_crd, namespace, manifest)

    def patch(body: dict[str, object]) -> None:
        api.patch_namespaced_custom_object(
            spec.GROUP, spec.VERSION, namespace, spec.PLURAL, "cartpole", body
        )

    for stream in ("SECOND", None):
        with pytest.raises(client.ApiException) as caught:
            patch({"spec": {"trajectories": {"nats": {"stream": stream}}}})
        assert caught.value.status == 422
        message = json.loads(caught.value.body)["message"]
        assert "spec.trajectories.nats.stream" in message
        assert "stream cannot change on an existing Agent" in message
    patch({"spec": {"actors": 12}})  # other fields still change
    stored = api.get_namespaced_custom_object(
        spec.GROUP, spec.VERSION, namespace, spec.PLURAL, "cartpole"
    )
    assert stored["spec"]["trajectories"]["nats"]["stream"] == "FIRST"
    assert stored["spec"]["actors"] == 12


# NATS URLs and model URIs the models and the apiserver (RE2) must both take; the
# invalid cases cover what both refuse.
ACCEPTED = [
    {"trajectories": {"nats": {"url": url}}}
    for url in (
        "nats://nats.ns.svc.cluster.local.:4222",
        "tls://nats-0.nats:4443/,nats://[fd00::1]:4222,",
        "nats://nats",
    )
] + [
    {"model": {"uri": "objectstore://relayrl-models/cart\u00a0pole@v2", "format": "onnx"}},
    # Secret names are DNS subdomains; quantities in their usual forms.
    {"sinks": [{"postgres": {"dsnSecret": {"name": "pg.credentials"}}}]},
    {
        "template": {
            "resources": {"requests": {"cpu": "1.5", "memory": "1e9"}, "limits": {"cpu": 2}}
        }
    },
    # Beside the operator's own env names, ports and mounts.
    {"template": {"env": [{"name": "A", "value": "1"}, {"name": "RELAYRL_NATS_URL"}]}},
    # A credential the environment needs, from a Secret (or a ConfigMap) of the Agent's.
    {
        "template": {
            "env": [
                {"name": "SIM_KEY", "valueFrom": {"secretKeyRef": {"name": "sim", "key": "k"}}},
                {
                    "name": "SIM_HOST",
                    "valueFrom": {
                        "configMapKeyRef": {"name": "sim", "key": "host", "optional": True}
                    },
                },
            ]
        }
    },
    {"environment": {"gymnasium": None, "remote": {"port": 6000}}},
    {"sinks": [{"arrow": {"path": "/tmp/trajectories"}}]},
]


def test_urls_the_models_take_the_apiserver_takes(
    agent_crd: testing.ClusterHandle, namespace: str
) -> None:
    for i, patch in enumerate(ACCEPTED):
        manifest = specs.merge_patch(specs.base_manifest(), {"spec": patch})
        manifest["metadata"] = {"name": f"accepted-{i}"}
        spec.parse_agent(manifest)
        _create(agent_crd, namespace, manifest)
