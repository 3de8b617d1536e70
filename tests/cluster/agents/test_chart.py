"""The Helm chart `helm/relayrl-operator`: lint, schema, server-side dry runs, a real install.

- `helm lint` with the defaults and every values file under `ci/`;
- `values.schema.json` refuses bad values with a message naming the key;
- `helm template` with every `ci/` values file, applied with
  `kubectl apply --dry-run=server` to the cluster (the apiserver validates every object
  against its real schema, CRDs included). The Prometheus Operator's kinds
  (ServiceMonitor, PrometheusRule) have no CRD here, so they are checked apart: every
  metric their queries and the dashboards' queries name is one the code exports;
- `helm install` with the operator pod on the process node (a real process with a
  KUBECONFIG holding its ServiceAccount token, so the chart's RBAC is what it gets),
  after which an Agent on kwok nodes becomes Ready; the chart's in-cluster NATS runs
  there too (a real nats-server) and serves JetStream with file storage.
"""

from __future__ import annotations

import ast
import asyncio
import json
import re
import secrets
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml
from nats.js.api import StorageType

from relayrl_localstack import testing
from relayrl_operator import children, cli, constants, kube, reconcile, settings
from relayrl_operator.builders import monitoring
from relayrl_operator.handlers import lifecycle
from relayrl_runtime import spec
from support import fleet, natsserver, specs
from support.metricnames import exported_labels

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "helm" / "relayrl-operator"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
MONITORING_GROUP = "monitoring.coreos.com/"


def test_helm_lint_defaults_and_ci_values() -> None:
    assert CI_VALUES, "helm/relayrl-operator/ci/*.yaml: no values files"
    out = fleet.helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in out
    for values in CI_VALUES:
        out = fleet.helm("lint", "--strict", str(CHART), "--values", str(values))
        assert "0 chart(s) failed" in out, values.name


# Client methods that name their kind as the first argument, and the verb each needs.
_CLIENT_VERBS = {
    "get": "get",
    "get_metadata": "get",
    "list": "list",
    "merge_patch": "patch",
    "delete": "delete",
}


def _client_calls() -> set[tuple[str, kube.Kind]]:
    """(verb, kind) of every call in the operator's code that names a `kube` kind."""
    out: set[tuple[str, kube.Kind]] = set()
    for path in (REPO / "operator" / "src" / "relayrl_operator").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in _CLIENT_VERBS
                and node.args
            ):
                continue
            arg = node.args[0]
            if (
                isinstance(arg, ast.Attribute)
                and isinstance(arg.value, ast.Name)
                and arg.value.id == "kube"
            ):
                out.add((_CLIENT_VERBS[node.func.attr], getattr(kube, arg.attr)))
    return out


def _needed() -> set[tuple[str, kube.Kind]]:
    """Every (verb, kind) the operator asks the apiserver for on Agents' children."""
    needed = _client_calls()
    assert ("get", kube.PVC) in needed, "the scan of the operator's calls found nothing"
    maker = children.Children(None, settings.Settings())  # type: ignore[arg-type]
    maker.podmonitors = True
    ref = specs.agent_ref(
        {
            "spec": {
                "environment": {"gymnasium": None, "remote": {"port": 6000}},
                "sinks": [
                    {"arrow": {"storage": {"size": "1Gi"}}},
                    {"postgres": {"dsnSecret": {"name": "pg"}}},
                ],
            }
        }
    )
    for obj in maker.desired(ref):
        kind = kube.kind_of(obj)
        # Looked up before its first apply (is the name another owner's?); applied
        # (server-side: create or patch); deleted to adopt an orphaned child.
        needed |= {("get", kind), ("create", kind), ("patch", kind), ("delete", kind)}
    needed |= {(verb, kind) for kind in reconcile.WATCHED_CHILDREN for verb in ("list", "watch")}
    return needed


@pytest.mark.parametrize("scope", ["namespaced", "clusterwide"])
def test_the_charts_rbac_grants_every_request_the_operator_makes(
    scope: str, tmp_path: Path
) -> None:
    """Read from the operator's code, not listed by hand: a request added without its
    verb in the chart fails here (the install test below meets only the paths it runs)."""
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump({"watchNamespaces": ["fleet"] if scope == "namespaced" else []})
    )
    role_kind = "Role" if scope == "namespaced" else "ClusterRole"
    roles = [d for d in fleet.render_chart(values, "ops") if d["kind"] == role_kind]
    rules = [r for role in roles for r in role.get("rules") or []]
    assert rules, role_kind

    def granted(verb: str, kind: kube.Kind) -> bool:
        group = kind.api_version.rpartition("/")[0]
        return any(
            group in r.get("apiGroups", [])
            and kind.plural in r.get("resources", [])
            and verb in r.get("verbs", [])
            for r in rules
        )

    missing = sorted(f"{verb} {kind.plural}" for verb, kind in _needed() if not granted(verb, kind))
    assert not missing, f"{role_kind} lacks: {', '.join(missing)}"


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("operator.logFormat=xml", "/operator/logFormat"),
        ("operator.workers=0", "/operator/workers"),
        ("nats.storageSize=lots", "/nats/storageSize"),
        ("nats.syncInterval=sometimes", "/nats/syncInterval"),
        ("operator.bogus=1", "bogus"),
        ("watchNamespaces[0]=Not_A_Namespace", "/watchNamespaces/0"),
    ],
)
def test_schema_refuses_bad_values(setting: str, message: str) -> None:
    out = fleet.helm("template", "x", str(CHART), "--set", setting, check=False)
    assert "values don't meet the specifications of the schema" in out
    assert message in out


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            "operator.metricsPort=8081",
            "operator.metricsPort, operator.healthPort: expected two different ports, got 8081",
        ),
        (
            "commonLabels.app\\.kubernetes\\.io/component=x",
            "commonLabels.app.kubernetes.io/component: expected a label the chart does not set",
        ),
        (
            "commonLabels.release=a,monitoring.labels.release=b",
            "commonLabels.release: expected a label not also set by monitoring.labels",
        ),
        (
            "commonLabels.grafana_dashboard=x",
            "commonLabels.grafana_dashboard: expected a label not also set by monitoring.labels",
        ),
        (
            "monitoring.labels.app\\.kubernetes\\.io/name=x",
            "monitoring.labels.app.kubernetes.io/name: expected a label the chart does not set",
        ),
    ],
)
def test_values_the_schema_cannot_judge_fail_the_render_by_name(setting: str, message: str) -> None:
    """Two ports that must differ; a common label that would duplicate one of the chart's
    own keys in every object (and, for name or instance, override its selectors)."""
    out = fleet.helm("template", "x", str(CHART), "--set", setting, check=False)
    assert message in out, out


def test_large_numbers_from_a_values_file_reach_the_operator_as_integers(
    tmp_path: Path,
) -> None:
    """helm reads a values file's numbers as floats and prints a million as 1e+06, which
    the operator's arguments refuse: the chart renders them as integers."""
    values = tmp_path / "values.yaml"
    values.write_text(
        "operator:\n  peeringPriority: 1000000\n  workers: 2000000\n  resyncSeconds: 3600000\n"
    )
    docs = fleet.render_chart(values, "default")
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "--priority=1000000" in container["args"]
    assert "--workers=2000000" in container["args"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["RELAYRL_RESYNC_SECONDS"] == "3600000"
    args = cli.parser().parse_args(container["args"])
    assert (args.priority, args.workers) == (1_000_000, 2_000_000)


@pytest.mark.parametrize(
    ("values", "command"),
    [
        ((), "kubectl apply -f examples/cartpole-cpu/agent.yaml"),
        (("--set", "watchNamespaces={ml,b}"), "kubectl -n ml apply -f examples/cartpole-cpu/"),
        (
            ("--set", "watchNamespaces={ml}", "--set", "nats.enabled=true"),
            "agent.yaml | kubectl -n ml apply -f -",
        ),
    ],
)
def test_the_notes_apply_the_example_where_the_operator_watches(
    values: tuple[str, ...], command: str
) -> None:
    out = fleet.helm("install", "r", str(CHART), "--dry-run=client", "-n", "x", *values)
    assert command in out, out
    watch = "kubectl -n ml get agents -w" if values else "kubectl get agents -w"
    assert watch in out, out


def test_every_values_key_has_a_schema_entry() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node: dict[str, Any], props: dict[str, Any], path: str) -> None:
        for key, value in node.items():
            assert key in props, f"values.schema.json has no entry for {path}{key}"
            sub = props[key]
            if "$ref" in sub:
                sub = schema["definitions"][sub["$ref"].rsplit("/", 1)[1]]
            if isinstance(value, dict) and "properties" in sub:
                walk(value, sub["properties"], f"{path}{key}.")

    walk(values, schema["properties"], "")
    assert schema.get("additionalProperties") is False


def test_every_values_key_has_a_comment() -> None:
    """Top-level keys and their children carry a `# --` line (resource quantities aside)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    parent = ""
    for i, line in enumerate(lines):
        key = re.match(r"^( {0,2})([A-Za-z][A-Za-z0-9]*):", line)
        if not key:
            continue
        indent, name = key.groups()
        if not indent:
            parent = name
        elif parent == "resources":
            continue
        assert lines[i - 1].strip().startswith("# --"), (
            f"values.yaml:{i + 1}: {name} has no comment"
        )


def test_monitoring_queries_name_exported_metrics() -> None:
    docs = fleet.render_chart(CHART / "ci" / "full-values.yaml", "default")
    exprs = [
        rule["expr"]
        for d in docs
        if d["kind"] == "PrometheusRule"
        for group in d["spec"]["groups"]
        for rule in group["rules"]
    ]
    dashboards = [
        json.loads(text)
        for d in docs
        if d["kind"] == "ConfigMap" and "-dashboard-" in d["metadata"]["name"]
        for text in d["data"].values()
    ]
    assert {d["uid"] for d in dashboards} == {"relayrl-operator", "relayrl-fleet"}
    for dashboard in dashboards:
        for panel in dashboard["panels"]:
            assert panel["targets"], panel["title"]
            exprs += [t["expr"] for t in panel["targets"]]
    names = set()
    for expr in exprs:
        # relayrl_io_agent is a label (the PodMonitor's copy of relayrl.io/agent).
        names |= set(re.findall(r"\brelayrl_(?!io_)[a-z_]+", expr))
    assert names, "no RelayRL metric in the rules and dashboards"
    unknown = names - set(exported_labels())
    assert not unknown, f"queries name metrics nothing exports: {sorted(unknown)}"
    titles = {p["title"] for d in dashboards for p in d["panels"]}
    for wanted in ("Actions per second", "Inference latency", "Trajectories per second"):
        assert any(t.startswith(wanted) for t in titles), wanted
    assert any(t.startswith("Sink lag") for t in titles)
    assert any(t.startswith("Model version") for t in titles)
    alerts = {
        rule["alert"]
        for d in docs
        if d["kind"] == "PrometheusRule"
        for group in d["spec"]["groups"]
        for rule in group["rules"]
    }
    assert {"RelayRLAgentDegraded", "RelayRLPublishFailures", "RelayRLSinkLag"} <= alerts


def test_monitoring_labels_reach_each_agents_podmonitor() -> None:
    """kube-prometheus-stack selects monitors by its release label: the chart's
    monitoring.labels go to the operator, which puts them on every PodMonitor."""
    docs = fleet.render_chart(None, "default", "--set", "monitoring.labels.release=prometheus")
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    env = {
        e["name"]: e["value"]
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        if "value" in e
    }
    cfg = settings.Settings.from_env(env)
    assert cfg.monitor_labels == {"release": "prometheus"}
    agent = specs.agent_ref(namespace="ml")
    labels = monitoring.build(agent, cfg.monitor_labels)["metadata"]["labels"]
    assert labels["release"] == "prometheus"
    assert labels[constants.LABEL_AGENT] == "cartpole"


@pytest.mark.parametrize(
    ("values", "listen"),
    [((), "0.0.0.0"), (("--set", "operator.agentPodsBindPodIP=true"), settings.LISTEN_POD_IP)],
    ids=["default", "pod-ip"],
)
def test_agent_pods_listen_where_the_chart_says(values: tuple[str, ...], listen: str) -> None:
    """By default actor and sink pods listen on every address (`kubectl port-forward`
    reaches them); on nodes whose pods share a network namespace, on their pod IP."""
    docs = fleet.render_chart(None, "default", *values)
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    env = {
        e["name"]: e["value"]
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        if "value" in e
    }
    assert settings.Settings.from_env(env).pod_listen == listen


def test_a_long_release_name_still_gives_valid_names() -> None:
    release = "r" * 53  # the longest helm takes
    rendered = fleet.helm(
        "template", release, str(CHART), "--set", "nats.enabled=true", stderr=False
    )
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    assert docs
    for d in docs:
        name = d["metadata"]["name"]
        if d["kind"] in ("Service", "StatefulSet", "Deployment", "Pod"):
            limit = 52 if d["kind"] == "StatefulSet" else 63  # + "-" + revision hash
            assert len(name) <= limit, (d["kind"], name)


@pytest.mark.parametrize("values", CI_VALUES, ids=[p.stem for p in CI_VALUES])
def test_rendered_chart_passes_server_side_dry_run(
    agent_crd: testing.ClusterHandle, namespace: str, values: Path
) -> None:
    # As on a cluster that serves the admission policy API (helm install asks it).
    docs = fleet.render_chart(values, namespace, "--api-versions", fleet.ADMISSION_POLICY_API)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "ServiceAccount", "Service", "Pod", "MutatingAdmissionPolicy"} <= kinds
    applied = [d for d in docs if not d["apiVersion"].startswith(MONITORING_GROUP)]
    if "full" in values.stem:
        assert {"StatefulSet", "ServiceMonitor", "PrometheusRule"} <= kinds
    out = agent_crd.kubectl(
        "apply",
        "--dry-run=server",
        "-f",
        "-",
        input_text="\n---\n".join(yaml.safe_dump(d) for d in applied),
    ).stdout
    for d in applied:
        assert f"{d['metadata']['name']} " in out or f"{d['metadata']['name']}\n" in out, out


async def jetstream_file_store_works(url: str) -> bool:
    """Create a file-backed stream, publish to it and read the ack."""
    nc = await nats.connect(url, connect_timeout=5)
    try:
        js = nc.jetstream()
        await js.add_stream(name="CHART", subjects=["chart.>"], storage=StorageType.FILE)
        ack = await js.publish("chart.check", b"hello")
        return ack.stream == "CHART" and ack.seq == 1
    finally:
        await nc.close()


async def may_discover(kubeconfig: Path) -> bool:
    """What the operator decides at startup about Kopf's discovery, for these credentials."""
    client = kube.Client.from_config(str(kubeconfig))
    try:
        return await lifecycle._may_discover(client)
    finally:
        await client.close()


@pytest.fixture
def host_operator_paused(operator: fleet.Operator) -> Iterator[None]:
    """Stop the session's host-process operator, so only the chart's one reconciles."""
    operator.stop()
    try:
        yield
    finally:
        operator.start()


@pytest.mark.timeout(420)
@pytest.mark.usefixtures("host_operator_paused")
@pytest.mark.parametrize("scope", ["namespaced", "clusterwide"])
def test_helm_install_runs_the_operator_that_makes_an_agent_ready(
    agent_crd: testing.ClusterHandle,
    namespace: str,
    nats: natsserver.NatsServer,
    tmp_path: Path,
    scope: str,
) -> None:
    """`namespaced`: Roles in the watched namespace; `clusterwide` (the chart's default):
    a ClusterRole, and the operator acts on Agents in every namespace."""
    k8s = agent_crd
    release = f"op-{secrets.token_hex(3)}"
    placement = testing.process_node_placement()
    values = {
        "watchNamespaces": [namespace] if scope == "namespaced" else [],
        # Process-node pods share the host's network: each listens on its own address.
        "nats": {
            "enabled": True,
            "bindPodIP": True,
            # The namespaced install fsyncs every message; the other keeps the default.
            "syncInterval": "always" if scope == "namespaced" else "",
        },
        "nodeSelector": placement["nodeSelector"],
        "tolerations": placement["tolerations"],
        "operator": {
            "bindPodIP": True,
            "agentPodsBindPodIP": True,
            "logFormat": "text",
            "resyncSeconds": 5,
        },
    }
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    fleet.helm(
        "install",
        release,
        str(CHART),
        "--namespace",
        namespace,
        "--values",
        str(values_file),
        "--skip-crds",
        kubeconfig=k8s.kubeconfig,
    )
    try:
        deployment = f"deployment/{release}-relayrl-operator"
        result = k8s.kubectl(
            "rollout", "status", deployment, "-n", namespace, "--timeout=120s", check=False
        )
        agents = fleet.Agents(k8s, namespace)
        assert result.returncode == 0, f"{result.stderr}\n{agents.pod_logs()}"
        pods = k8s.core.list_namespaced_pod(
            namespace,
            label_selector=f"app.kubernetes.io/instance={release},app.kubernetes.io/component=operator",
        ).items
        assert [p.spec.node_name for p in pods] == [k8s.process_node]
        assert pods[0].spec.service_account_name == f"{release}-relayrl-operator"
        # The chart grants no cluster-wide list/watch of namespaces and CRDs, so a
        # namespaced operator switches Kopf's discovery off (it asks the apiserver);
        # with cluster-wide rights, as the admin has, it keeps it.
        token = k8s.kubectl(
            "create", "token", f"{release}-relayrl-operator", "-n", namespace
        ).stdout.strip()
        as_operator = yaml.safe_load(k8s.kubeconfig.read_text())
        for user in as_operator["users"]:
            user["user"] = {"token": token}
        operator_kubeconfig = tmp_path / "operator.kubeconfig"
        operator_kubeconfig.write_text(yaml.safe_dump(as_operator))
        assert asyncio.run(may_discover(operator_kubeconfig)) is False
        assert asyncio.run(may_discover(k8s.kubeconfig)) is True
        # The finalizer policy (the cluster serves its API), scoped to the watched namespace.
        binding = json.loads(
            k8s.kubectl(
                "get",
                "mutatingadmissionpolicybinding",
                f"{release}-relayrl-operator-agent-finalizer",
                "-o",
                "json",
            ).stdout
        )
        if scope == "namespaced":
            selector = binding["spec"]["matchResources"]["namespaceSelector"]
            assert selector["matchExpressions"][0]["values"] == [namespace]
        else:
            matching = binding["spec"].get("matchResources") or {}
            assert not (matching.get("namespaceSelector") or {}).get("matchExpressions")

        # `helm test`: its pod (on the process node) reaches the operator's metrics
        # through the metrics Service's name.
        out = fleet.helm(
            "test",
            release,
            "--namespace",
            namespace,
            "--timeout",
            "120s",
            kubeconfig=k8s.kubeconfig,
        )
        assert "Phase:          Succeeded" in out, out

        # The chart's in-cluster NATS: a real nats-server on the process node.
        statefulset = f"statefulset/{release}-relayrl-operator-nats"
        result = k8s.kubectl(
            "rollout", "status", statefulset, "-n", namespace, "--timeout=120s", check=False
        )
        assert result.returncode == 0, f"{result.stderr}\n{agents.pod_logs()}"
        nats_pod = k8s.pod(namespace, f"{release}-relayrl-operator-nats-0")
        assert asyncio.run(jetstream_file_store_works(f"nats://{nats_pod['status']['podIP']}:4222"))
        with urllib.request.urlopen(f"http://{nats_pod['status']['podIP']}:8222/varz") as r:
            jetstream = json.load(r)["jetstream"]["config"]
        assert jetstream.get("sync_always", False) is (scope == "namespaced"), jetstream

        manifest = specs.merge_patch(
            specs.base_manifest(), {"spec": {"trajectories": {"nats": {"url": nats.url}}}}
        )
        agents.create(manifest)
        agent = agents.wait_phase("cartpole", "Ready", timeout=120)
        st = agent["status"]
        assert st["readyActors"] == st["desiredActors"] > 0
        actor_pods = k8s.core.list_namespaced_pod(
            namespace, label_selector="app.kubernetes.io/component=actors"
        ).items
        assert actor_pods
        assert {p.spec.node_name for p in actor_pods} <= set(k8s.kwok_nodes)

        # Deleted with its children orphaned and made again under its name, the Agent
        # adopts them: a new owner reference takes `delete` on the child too
        # (OwnerReferencesPermissionEnforcement).
        agents.api.delete_namespaced_custom_object(
            spec.GROUP,
            spec.VERSION,
            namespace,
            spec.PLURAL,
            "cartpole",
            propagation_policy="Orphan",
        )
        testing.wait_for(
            lambda: (
                not k8s.exists(
                    agents.api.get_namespaced_custom_object,
                    spec.GROUP,
                    spec.VERSION,
                    namespace,
                    spec.PLURAL,
                    "cartpole",
                )
            ),
            timeout=60,
            what="the Agent gone, its children orphaned",
        )
        uid = agents.create(manifest)["metadata"]["uid"]
        agents.wait_phase("cartpole", "Ready", timeout=120)

        def owners() -> dict[str, set[str]]:
            children = json.loads(
                k8s.kubectl(
                    "get",
                    "configmaps,statefulsets,services,poddisruptionbudgets",
                    "-n",
                    namespace,
                    "-l",
                    f"{constants.LABEL_MANAGED_BY}={constants.OPERATOR_NAME}",
                    "-o",
                    "json",
                ).stdout
            )["items"]
            out: dict[str, set[str]] = {}
            for child in children:
                refs = child["metadata"].get("ownerReferences") or []
                out.setdefault(child["kind"], set()).update(r["uid"] for r in refs)
            return out

        testing.wait_for(
            lambda: (
                owners()
                == {
                    k: {uid} for k in ("ConfigMap", "StatefulSet", "Service", "PodDisruptionBudget")
                }
            ),
            timeout=30,
            what=f"the orphaned children owned by the new Agent {uid}",
        )

        # The chart's RBAC is all the operator asks for: RBAC refused it nothing. (A
        # cluster-wide one may also meet other tests' namespaces being deleted: the
        # apiserver's 403s for those are not RBAC's.)
        operator_log = k8s.node.log_path(namespace, pods[0].metadata.name, "operator")
        assert operator_log is not None
        refused = [
            line
            for line in operator_log.read_text(errors="replace").splitlines()
            if any(
                sign in line
                for sign in (
                    "is forbidden: User",
                    "cannot set blockOwnerDeletion",
                    "cannot set an ownerRef",
                    "Not enough permissions",
                )
            )
        ]
        assert not refused, "\n".join(refused[:5])
        agents.delete("cartpole")
        testing.wait_for(
            lambda: (
                not k8s.core.list_namespaced_pod(
                    namespace, label_selector="app.kubernetes.io/component=actors"
                ).items
            ),
            timeout=60,
            what="actor pods gone after the Agent's deletion",
        )
    finally:
        fleet.helm(
            "uninstall", release, "--namespace", namespace, "--wait", kubeconfig=k8s.kubeconfig
        )
        # The operator's process stops before the test ends, not during session teardown.
        testing.wait_for(
            lambda: (
                not k8s.core.list_namespaced_pod(
                    namespace, label_selector=f"app.kubernetes.io/instance={release}"
                ).items
            ),
            timeout=60,
            what="operator pod gone after helm uninstall",
        )
