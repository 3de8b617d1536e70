"""The pure builders: what each child manifest says for a given Agent."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from relayrl_localstack import podspec
from relayrl_operator import constants, settings
from relayrl_operator.builders import (
    common,
    configmap,
    monitoring,
    pdb,
    services,
    sinks,
    statefulset,
)
from relayrl_runtime import config, spec
from support import specs

SETTINGS = settings.Settings(runtime_image="registry.example/runtime:1")


def make_agent(patch: dict[str, Any] | None = None) -> common.AgentRef:
    return specs.agent_ref(patch)


def pod_spec(agent: common.AgentRef) -> dict[str, Any]:
    return statefulset.build(agent, SETTINGS)["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def test_configmap_renders_a_runtime_config_each_pod_can_load() -> None:
    agent = make_agent({"spec": {"actors": 10, "actorsPerPod": 4, "routers": 3}})
    rendered = configmap.build(agent)["data"][constants.CONFIG_KEY]
    slices = []
    for index in range(agent.spec.pods()):
        cfg = config.from_mapping(yaml.safe_load(rendered), {constants.ENV_POD_INDEX: str(index)})
        assert cfg.agent == "cartpole"
        assert cfg.namespace == "fleet"
        assert cfg.routers == 3
        slices.append(cfg.actor_slice())
    assert slices == [range(0, 4), range(4, 8), range(8, 10)]


def test_statefulset_has_one_pod_per_actor_slice_and_runs_the_runtime() -> None:
    agent = make_agent({"spec": {"actors": 10, "actorsPerPod": 4}})
    sts = statefulset.build(agent, SETTINGS)
    assert sts["spec"]["replicas"] == 3
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example/runtime:1"
    assert container["command"] == ["relayrl-runtime"]
    assert container["args"] == ["run", "--config", "/etc/relayrl/runtime.yaml"]
    env = {e["name"]: e for e in container["env"]}
    assert env[constants.ENV_POD_INDEX]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['apps.kubernetes.io/pod-index']"
    )
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert sts["spec"]["selector"]["matchLabels"] == {
        constants.LABEL_AGENT: "cartpole",
        constants.LABEL_COMPONENT: constants.COMPONENT_ACTORS,
    }


@pytest.mark.parametrize(
    ("listen", "bind"),
    [
        ("0.0.0.0", {"value": "0.0.0.0"}),
        ("::", {"value": "::"}),
        (settings.LISTEN_POD_IP, {"valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}),
    ],
)
def test_actor_and_sink_pods_listen_where_the_settings_say(
    listen: str, bind: dict[str, Any]
) -> None:
    """Every address by default, so that `kubectl port-forward` reaches a pod; the pod
    IP only where pods share a network namespace (the local stack's process node)."""
    cfg = settings.Settings(pod_listen=listen)
    agent = make_agent(
        {"spec": {"sinks": [{"arrow": {}}, {"postgres": {"dsnSecret": {"name": "pg"}}}]}}
    )
    containers = [statefulset.build(agent, cfg)["spec"]["template"]["spec"]["containers"][0]]
    containers += [
        d["spec"]["template"]["spec"]["containers"][0] for d in sinks.build_all(agent, cfg)
    ]
    assert len(containers) == 3
    for container in containers:
        [env] = [e for e in container["env"] if e["name"] == constants.ENV_BIND_ADDRESS]
        assert env == {"name": constants.ENV_BIND_ADDRESS, **bind}, container["name"]


def test_paused_agent_scales_actor_pods_to_zero() -> None:
    assert (
        statefulset.build(make_agent({"spec": {"paused": True}}), SETTINGS)["spec"]["replicas"] == 0
    )


def test_cuda_agent_requests_gpus_and_tolerates_the_gpu_taint() -> None:
    agent = make_agent({"spec": {"device": "cuda", "gpusPerPod": 2}})
    podspec = pod_spec(agent)
    assert podspec["containers"][0]["resources"]["limits"] == {constants.GPU_RESOURCE: 2}
    assert {"key": constants.GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"} in (
        podspec["tolerations"]
    )


def test_cpu_agent_never_asks_for_gpus() -> None:
    manifest = json.dumps(statefulset.build(make_agent(), SETTINGS))
    assert constants.GPU_RESOURCE not in manifest


def test_cuda_actors_run_the_cuda_image_and_sinks_the_cpu_one() -> None:
    cfg = settings.Settings(runtime_image="rt:1", runtime_image_cuda="rt:1-cuda")
    agent = make_agent({"spec": {"device": "cuda", "gpusPerPod": 1, "sinks": [{"arrow": {}}]}})
    actors = statefulset.build(agent, cfg)["spec"]["template"]["spec"]["containers"][0]
    assert actors["image"] == "rt:1-cuda"
    (arrow,) = sinks.build_all(agent, cfg)
    assert arrow["spec"]["template"]["spec"]["containers"][0]["image"] == "rt:1"
    cpu = statefulset.build(make_agent(), cfg)["spec"]["template"]["spec"]["containers"][0]
    assert cpu["image"] == "rt:1"
    mine = make_agent({"spec": {"device": "cuda", "gpusPerPod": 1, "template": {"image": "m:2"}}})
    assert (
        statefulset.build(mine, cfg)["spec"]["template"]["spec"]["containers"][0]["image"] == "m:2"
    )
    env = {settings.ENV_RUNTIME_IMAGE: "a:1", settings.ENV_RUNTIME_IMAGE_CUDA: "a:1-gpu"}
    assert settings.Settings.from_env(env).runtime_image_cuda == "a:1-gpu"
    # Only the CPU image named: its CUDA build, not the default registry's.
    only = {settings.ENV_RUNTIME_IMAGE: "mine/rt:2"}
    assert settings.Settings.from_env(only).runtime_image_cuda == "mine/rt:2-cuda"


def test_sink_resources_reach_their_container_only() -> None:
    agent = make_agent(
        {
            "spec": {
                "template": {"resources": {"requests": {"cpu": "4"}}},
                "sinks": [
                    {"arrow": {"resources": {"requests": {"memory": "1Gi"}}}},
                    {"postgres": {"dsnSecret": {"name": "pg", "key": "url"}}},
                ],
            }
        }
    )
    arrow, pg = (
        d["spec"]["template"]["spec"]["containers"][0] for d in sinks.build_all(agent, SETTINGS)
    )
    assert arrow["resources"] == {"requests": {"memory": "1Gi"}}
    assert "resources" not in pg  # the template's are the actors'


def test_the_pdb_never_blocks_drains_for_pods_that_are_not_ready() -> None:
    spec_ = pdb.build(make_agent({"spec": {"actors": 8, "actorsPerPod": 2}}))["spec"]
    assert spec_["maxUnavailable"] == 1
    assert spec_["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_a_created_claim_is_kept_with_the_stream_when_the_spec_says_retain() -> None:
    storage = {"sinks": [{"arrow": {"storage": {"size": "5Gi"}}}]}
    owned = sinks.build_all(make_agent({"spec": storage}), SETTINGS)[0]
    assert owned["kind"] == "PersistentVolumeClaim"
    assert owned["metadata"]["ownerReferences"]
    kept = sinks.build_all(
        make_agent({"spec": {**storage, "trajectories": {"nats": {"retainOnDelete": True}}}}),
        SETTINGS,
    )
    assert kept[0]["kind"] == "PersistentVolumeClaim"
    assert "ownerReferences" not in kept[0]["metadata"]
    # The Deployment reading it is still the Agent's.
    assert kept[1]["metadata"]["ownerReferences"]
    podspec = kept[1]["spec"]["template"]["spec"]
    assert podspec["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"


def test_template_overrides_reach_the_pod() -> None:
    agent = make_agent(
        {
            "spec": {
                "template": {
                    "image": "mine:2",
                    "nodeSelector": {"pool": "actors"},
                    "tolerations": [{"key": "dedicated", "operator": "Exists"}],
                    "affinity": {"nodeAffinity": {"x": 1}},
                    "priorityClassName": "high",
                    "runtimeClassName": "nvidia",
                    "serviceAccountName": "actors",
                    "resources": {"requests": {"cpu": "500m"}, "limits": {"memory": "2Gi"}},
                    "env": [
                        {"name": "EXTRA", "value": "1"},
                        {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
                    ],
                    "labels": {"team": "rl"},
                    "annotations": {"note": "x"},
                }
            }
        }
    )
    sts = statefulset.build(agent, SETTINGS)
    podspec = sts["spec"]["template"]["spec"]
    container = podspec["containers"][0]
    assert container["image"] == "mine:2"
    assert podspec["nodeSelector"] == {"pool": "actors"}
    assert podspec["tolerations"] == [{"key": "dedicated", "operator": "Exists"}]
    assert podspec["affinity"] == {"nodeAffinity": {"x": 1}}
    assert podspec["priorityClassName"] == "high"
    assert podspec["runtimeClassName"] == "nvidia"
    assert podspec["serviceAccountName"] == "actors"
    assert "automountServiceAccountToken" not in podspec  # the account's own setting
    assert container["resources"] == {"requests": {"cpu": "500m"}, "limits": {"memory": "2Gi"}}
    assert {"name": "EXTRA", "value": "1"} in container["env"]
    assert {
        "name": "KEY",
        "valueFrom": {"secretKeyRef": {"name": "s", "key": "k", "optional": False}},
    } in container["env"]
    assert sts["spec"]["template"]["metadata"]["labels"]["team"] == "rl"
    assert sts["spec"]["template"]["metadata"]["annotations"]["note"] == "x"


def test_pods_of_the_default_account_get_no_api_token() -> None:
    """The runtime and the sinks never call the Kubernetes API: no token for the
    Agent's own code (its environments) to find."""
    agent = make_agent({"spec": {"sinks": [{"arrow": {}}]}})
    assert pod_spec(agent)["automountServiceAccountToken"] is False
    for built in sinks.build_all(agent, SETTINGS):
        assert built["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


@pytest.mark.parametrize(
    ("patch", "restarts"),
    [
        ({"spec": {"model": {"version": 7}}}, False),
        ({"spec": {"routers": 4}}, False),
        ({"spec": {"actors": 16, "actorsPerPod": 8}}, False),
        ({"spec": {"environment": {"gymnasium": {"envsPerActor": 8}}}}, True),
        ({"spec": {"model": {"format": "torchscript"}}}, True),
        ({"spec": {"trajectories": {"maxLength": 10}}}, True),
        # Read by the operator's finalizer only: toggling it restarts no pod.
        ({"spec": {"trajectories": {"nats": {"retainOnDelete": True}}}}, False),
    ],
)
def test_only_cold_fields_reach_the_pod_template(patch: dict[str, Any], restarts: bool) -> None:
    before = configmap.pod_config(make_agent())
    after = configmap.pod_config(make_agent(patch))
    assert (before != after) is restarts
    assert (
        statefulset.restart_hash(make_agent(), SETTINGS)
        != statefulset.restart_hash(make_agent(patch), SETTINGS)
    ) is restarts
    env = {e["name"]: e for e in pod_spec(make_agent(patch))["containers"][0]["env"]}
    assert env[constants.ENV_POD_CONFIG] == {"name": constants.ENV_POD_CONFIG, "value": after}
    assert (
        configmap.build(make_agent())["metadata"]["annotations"]
        != configmap.build(make_agent(patch))["metadata"]["annotations"]
    )


def test_the_pod_config_reaches_the_process_as_written() -> None:
    """The kubelet expands `$(NAME)` and `$$` in an env value: the operator escapes
    them, so kwargs holding either reach the runtime unchanged."""
    kwargs = {"sep": "$$", "tag": "run-$(RELAYRL_POD_NAME)", "cost": "$5"}
    agent = make_agent({"spec": {"environment": {"gymnasium": {"kwargs": kwargs}}}})
    env = {e["name"]: e.get("value", "") for e in pod_spec(agent)["containers"][0]["env"]}
    seen = {constants.ENV_POD_NAME: "cartpole-actors-1"}
    for name, value in env.items():  # in order, as the kubelet (and the local stack) does
        seen[name] = podspec.expand(value, seen)
    cold = json.loads(seen[constants.ENV_POD_CONFIG])
    assert cold["environment"]["gymnasium"]["kwargs"] == kwargs


def test_environment_kwargs_past_the_bound_are_refused_by_name() -> None:
    big = {"spec": {"environment": {"gymnasium": {"kwargs": {"x": "a" * spec.MAX_KWARGS_BYTES}}}}}
    with pytest.raises(
        spec.InvalidSpecError,
        match=r"spec.environment.gymnasium.kwargs: expected at most 32768 bytes",
    ):
        make_agent(big)
    # At the bound, the pod config stays well inside the kernel's 128 KiB for one
    # variable, even with every character escaped.
    fits = {"x": "$" * (spec.MAX_KWARGS_BYTES - 12)}
    agent = make_agent({"spec": {"environment": {"gymnasium": {"kwargs": fits}}}})
    assert len(configmap.pod_config(agent).encode()) < 128 * 1024


@pytest.mark.parametrize(
    ("patch", "rolls"),
    [
        ({"spec": {"model": {"version": 7}}}, False),
        ({"spec": {"actors": 16, "actorsPerPod": 8}}, False),
        ({"spec": {"template": {"resources": {"limits": {"memory": "4Gi"}}}}}, True),
        ({"spec": {"template": {"nodeSelector": {"pool": "actors"}}}}, True),
        ({"spec": {"template": {"image": "mine:3"}}}, True),
        ({"spec": {"trajectories": {"maxLength": 10}}}, True),
    ],
)
def test_the_pods_restart_hash_follows_the_pod_template(patch: dict[str, Any], rolls: bool) -> None:
    """Template changes roll the pods: status must not count the old ones as updated."""
    before = statefulset.restart_hash(make_agent(), SETTINGS)
    after = statefulset.restart_hash(make_agent(patch), SETTINGS)
    assert (before != after) is rolls
    template = statefulset.build(make_agent(patch), SETTINGS)["spec"]["template"]
    assert template["metadata"]["annotations"][constants.ANNOTATION_RESTART_HASH] == after


def test_nats_secrets_are_mounted() -> None:
    agent = make_agent(
        {
            "spec": {
                "trajectories": {
                    "nats": {"credentialsSecret": {"name": "n"}, "tls": {"secretName": "t"}}
                }
            }
        }
    )
    podspec = pod_spec(agent)
    secrets = {v["secret"]["secretName"] for v in podspec["volumes"] if "secret" in v}
    assert secrets == {"n", "t"}


def test_remote_environment_gets_a_service_and_port() -> None:
    assert services.build_remote(make_agent()) is None
    agent = make_agent({"spec": {"environment": {"gymnasium": None, "remote": {"port": 6000}}}})
    svc = services.build_remote(agent)
    assert svc is not None
    assert svc["spec"]["ports"][0]["port"] == 6000
    ports = pod_spec(agent)["containers"][0]["ports"]
    assert {"name": "remote", "containerPort": 6000} in ports


@pytest.mark.parametrize(
    "manifest",
    [
        lambda a: configmap.build(a),
        lambda a: statefulset.build(a, SETTINGS),
        lambda a: services.build_headless(a),
        lambda a: pdb.build(a),
        lambda a: monitoring.build(a),
    ],
)
def test_every_child_is_owned_by_the_agent_in_its_namespace(manifest: Any) -> None:
    meta = manifest(make_agent())["metadata"]
    assert meta["namespace"] == "fleet"
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "relayrl.io/v1alpha1",
            "kind": "Agent",
            "name": "cartpole",
            "uid": "uid-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert meta["labels"][constants.LABEL_MANAGED_BY] == "relayrl-operator"


def test_sink_deployments_consume_the_stream_and_follow_the_template_placement() -> None:
    agent = make_agent(
        {
            "spec": {
                "device": "cuda",
                "gpusPerPod": 1,
                "template": {
                    "nodeSelector": {"pool": "rl"},
                    "runtimeClassName": "nvidia",
                    "resources": {"requests": {"cpu": "2"}},
                },
                "sinks": [
                    {"arrow": {"format": "arrow", "storage": {"size": "5Gi"}}},
                    {"postgres": {"dsnSecret": {"name": "pg", "key": "url"}, "table": "t"}},
                ],
            }
        }
    )
    objs = sinks.build_all(agent, SETTINGS)
    kinds = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert kinds == [
        ("PersistentVolumeClaim", "cartpole-arrow-sink"),
        ("Deployment", "cartpole-arrow-sink"),
        ("Deployment", "cartpole-postgres-sink"),
    ]
    assert objs[0]["spec"]["resources"]["requests"]["storage"] == "5Gi"
    arrow, pg = objs[1], objs[2]
    arrow_args = arrow["spec"]["template"]["spec"]["containers"][0]["args"]
    assert arrow_args[:2] == ["arrow", "--path"]
    assert "--no-create-stream" in arrow_args
    assert arrow_args[arrow_args.index("--format") + 1] == "arrow"
    assert arrow_args[arrow_args.index("--compression") + 1] == "snappy"
    pg_container = pg["spec"]["template"]["spec"]["containers"][0]
    assert pg_container["args"][pg_container["args"].index("--dsn-file") + 1] == (
        "/etc/relayrl/postgres/url"
    )
    assert pg_container["args"][pg_container["args"].index("--table") + 1] == "t"
    podspec = pg["spec"]["template"]["spec"]
    assert podspec["nodeSelector"] == {"pool": "rl"}
    assert "runtimeClassName" not in podspec
    assert constants.GPU_RESOURCE not in json.dumps(pg)
    assert pg["spec"]["strategy"] == {"type": "Recreate"}
    assert sinks.desired_names(agent) == ["cartpole-arrow-sink", "cartpole-postgres-sink"]


def test_monitor_labels_come_from_the_environment_as_a_json_object() -> None:
    name = settings.ENV_MONITOR_LABELS
    assert settings.Settings.from_env({}).monitor_labels == {}
    cfg = settings.Settings.from_env({name: '{"release": "kube-prometheus"}'})
    assert cfg.monitor_labels == {"release": "kube-prometheus"}
    for bad in ("release=prometheus", '{"replicas": 3}', '["release"]'):
        with pytest.raises(ValueError, match=f"{name}: expected a JSON object"):
            settings.Settings.from_env({name: bad})


def test_monitor_labels_never_replace_the_agents_own() -> None:
    labels = monitoring.build(make_agent(), {constants.LABEL_AGENT: "other", "release": "p"})[
        "metadata"
    ]["labels"]
    assert labels[constants.LABEL_AGENT] == "cartpole"
    assert labels["release"] == "p"


def test_podmonitor_puts_each_pods_agent_and_component_on_its_series() -> None:
    """Without podTargetLabels the series of two Agents in one namespace would only
    differ by pod; the labels it copies are ones every actor and sink pod carries."""
    agent = make_agent(
        {
            "spec": {
                "sinks": [
                    {"arrow": {"storage": {"size": "1Gi"}}},
                    {"postgres": {"dsnSecret": {"name": "pg"}}},
                ]
            }
        }
    )
    monitor = monitoring.build(agent)
    assert monitor["kind"] == "PodMonitor"
    assert monitor["spec"]["selector"] == {"matchLabels": {constants.LABEL_AGENT: "cartpole"}}
    target_labels = monitor["spec"]["podTargetLabels"]
    assert target_labels == ["relayrl.io/agent", "app.kubernetes.io/component"]
    assert target_labels == [constants.LABEL_AGENT, constants.LABEL_COMPONENT]
    templates = [statefulset.build(agent, SETTINGS)["spec"]["template"]] + [
        o["spec"]["template"] for o in sinks.build_all(agent, SETTINGS) if o["kind"] == "Deployment"
    ]
    components = set()
    for template in templates:
        pod_labels = template["metadata"]["labels"]
        selector = monitor["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pod_labels.items()
        assert set(target_labels) <= set(pod_labels)
        assert pod_labels[constants.LABEL_AGENT] == "cartpole"
        components.add(pod_labels[constants.LABEL_COMPONENT])
        ports = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        assert monitor["spec"]["podMetricsEndpoints"][0]["port"] in ports
    assert components == {
        constants.COMPONENT_ACTORS,
        constants.COMPONENT_ARROW_SINK,
        constants.COMPONENT_POSTGRES_SINK,
    }


@pytest.mark.parametrize(
    ("pod_label", "series_label"),
    [
        ("relayrl.io/agent", "relayrl_io_agent"),
        ("app.kubernetes.io/component", "app_kubernetes_io_component"),
        ("team", "team"),
        ("a-b.c/d_e9", "a_b_c_d_e9"),
    ],
)
def test_pod_labels_become_sanitized_series_labels(pod_label: str, series_label: str) -> None:
    """As the Prometheus Operator names them (the names the chart's dashboards query)."""
    assert monitoring.target_label(pod_label) == series_label


def test_containers_have_no_two_env_vars_ports_or_mounts_of_one_name() -> None:
    """Server-side apply refuses a container listing a key twice (a 500 from the
    apiserver); the spec rules keep an Agent's own entries apart from the operator's."""
    agent = make_agent(
        {
            "spec": {
                "environment": {"gymnasium": None, "remote": {"port": 6000}},
                "trajectories": {
                    "nats": {"credentialsSecret": {"name": "n"}, "tls": {"secretName": "t"}}
                },
                "template": {"env": [{"name": "OMP_NUM_THREADS", "value": "1"}]},
                "sinks": [
                    {"arrow": {"path": "/data/t", "storage": {"size": "5Gi"}}},
                    {"postgres": {"dsnSecret": {"name": "pg", "key": "url"}}},
                ],
            }
        }
    )
    workloads = [statefulset.build(agent, SETTINGS), *sinks.build_all(agent, SETTINGS)]
    containers = [
        c
        for w in workloads
        if w["kind"] != "PersistentVolumeClaim"
        for c in w["spec"]["template"]["spec"]["containers"]
    ]
    assert len(containers) == 3
    for c in containers:
        for key, field in (
            ("env", "name"),
            ("ports", "containerPort"),
            ("volumeMounts", "mountPath"),
        ):
            values = [item[field] for item in c[key]]
            assert len(values) == len(set(values)), f"{c['name']} {key}: {values}"
    runtime_env = {e["name"] for e in containers[0]["env"]}
    assert runtime_env - {"OMP_NUM_THREADS"} <= set(spec.OPERATOR_ENV)
    assert set(spec.OPERATOR_ENV) <= runtime_env  # every reserved name is one it sets
