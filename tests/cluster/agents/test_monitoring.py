"""The chart's monitoring against a real Prometheus (Debian's `prometheus` package).

- `promtool check rules` on the PrometheusRule groups `helm template` renders with
  `monitoring.prometheusRule=true`, and `promtool test rules` of some of them on
  recorded series;
- an Agent runs end to end (actor and sink pods as processes on the process node), a
  real Prometheus scrapes the operator and every pod, and every query of the chart's
  Grafana dashboards returns data for that Agent, as every template variable lists it;
  every alert expression is accepted by the query API.

Prometheus scrapes static targets labelled as the Prometheus Operator labels a
PodMonitor's targets in a cluster: `namespace`, `pod`, and the pod labels the Agent's
PodMonitor copies (`podTargetLabels`, sanitized: `relayrl_io_agent`,
`app_kubernetes_io_component`), which the dashboards and alerts use.
`hack/system-deps.sh` installs the package; the test fails loudly without it.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from relayrl_localstack import testing
from relayrl_operator import constants
from relayrl_operator.builders import monitoring
from support import fleet, natsserver, postgres, specs

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "helm" / "relayrl-operator"
DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))
PROMETHEUS = Path("/usr/bin/prometheus")
PROMTOOL = Path("/usr/bin/promtool")
# Grafana's $__rate_interval is at least four scrape intervals; 30s covers 1s scrapes.
RATE_INTERVAL = "30s"


def require(binary: Path) -> Path:
    """The binary, or a failure that says how to get it (never a skip)."""
    if not binary.is_file():
        pytest.fail(f"{binary} missing: run `make system-deps` (Debian package prometheus)")
    return binary


def promtool(*args: str) -> str:
    """Run promtool; fail with its output."""
    return fleet.run(str(require(PROMTOOL)), *args, timeout=60)


def rule_groups(namespace: str) -> dict[str, Any]:
    """The `spec` (with `groups:`) of the chart's PrometheusRule, rendered by the pinned helm."""
    objects = fleet.render_chart(None, namespace, "--set", "monitoring.prometheusRule=true")
    rules = [o for o in objects if o.get("kind") == "PrometheusRule"]
    assert len(rules) == 1, f"expected one PrometheusRule, got {len(rules)}"
    spec: dict[str, Any] = rules[0]["spec"]
    assert spec.get("groups"), "the PrometheusRule has no groups"
    return spec


def alert_expressions(groups: dict[str, Any]) -> list[str]:
    return [str(r["expr"]) for g in groups["groups"] for r in g["rules"]]


def panel_expressions(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
    """(panel title and target, expr) of every target, rows' nested panels included."""
    for panel in panels:
        for i, target in enumerate(panel.get("targets") or []):
            if target.get("expr"):
                where = f"{panel.get('title', '?')} [{target.get('refId', i)}]"
                yield where, str(target["expr"])
        yield from panel_expressions(panel.get("panels") or [])


def with_values(where: str, expr: str, variables: dict[str, str]) -> str:
    """`expr` with Grafana's variables replaced by concrete values."""
    for name, value in variables.items():
        expr = re.sub(rf"\$(?:{name}\b|\{{{name}\}})", value, expr)
    assert "$" not in expr, f"{where}: unknown variable in {expr}"
    return expr


def dashboard_queries(variables: dict[str, str]) -> list[tuple[str, str]]:
    """Every dashboard query with Grafana's variables replaced by concrete values."""
    out = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for title, expr in panel_expressions(dashboard.get("panels") or []):
            where = f"{path.name} '{title}'"
            out.append((where, with_values(where, expr, variables)))
    assert out, "no dashboard queries found"
    return out


def variable_queries() -> list[tuple[str, str, str, str]]:
    """(dashboard, variable, PromQL, label) of every `label_values(expr, label)` template
    variable: the values Grafana offers are those of `label` in that query's result."""
    out = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for variable in dashboard.get("templating", {}).get("list", []):
            if variable.get("type") != "query":
                continue
            query = variable["query"]
            text = str(query["query"] if isinstance(query, dict) else query)
            found = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", text)
            assert found, f"{path.name} ${variable['name']}: not label_values(expr, label): {text}"
            out.append((path.name, variable["name"], found.group(1), found.group(2)))
    return out


class Prometheus:
    """A real Prometheus as a subprocess on a free loopback port."""

    def __init__(self, config: Path, work: Path) -> None:
        self.port = natsserver.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = work / "prometheus.log"
        self.argv = [
            str(require(PROMETHEUS)),
            f"--config.file={config}",
            f"--storage.tsdb.path={work / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Prometheus:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT)
        testing.wait_for(self._ready, timeout=60, what=f"Prometheus ready (log: {self.log})")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited {self.proc.returncode}:\n{self.logs()}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-10000:]

    def api(self, path: str, **params: str) -> dict[str, Any]:
        """GET an HTTP API endpoint; the JSON body, error responses included."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body: dict[str, Any] = json.loads(resp.read())
        except urllib.error.HTTPError as err:
            body = json.loads(err.read())
        return body

    def targets(self) -> list[dict[str, Any]]:
        body = self.api("targets", state="active")
        assert body["status"] == "success", body
        return list(body["data"]["activeTargets"])

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("query", query=expr)


def scrape_config(operator_port: int, pods: list[tuple[dict[str, str], str]]) -> dict[str, Any]:
    """prometheus.yml: the operator and every (target labels, address) as static targets."""
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "relayrl-operator",
                "static_configs": [{"targets": [f"127.0.0.1:{operator_port}"]}],
            },
            {
                "job_name": "relayrl-pods",
                "static_configs": [
                    {"targets": [address], "labels": labels} for labels, address in pods
                ],
            },
        ],
    }


def target_labels(pod: Any) -> dict[str, str]:
    """The labels the Prometheus Operator gives the pod's target under the Agent's
    PodMonitor: namespace, pod, and each of its podTargetLabels (sanitized)."""
    labels = {"namespace": pod.metadata.namespace, "pod": pod.metadata.name}
    for label in monitoring.POD_TARGET_LABELS:
        assert label in (pod.metadata.labels or {}), f"{pod.metadata.name}: no label {label}"
        labels[monitoring.target_label(label)] = pod.metadata.labels[label]
    return labels


def metrics_address(pod: Any) -> str:
    """podIP:port of the container port named `metrics` (the runtime's and sinks' /metrics)."""
    for container in pod.spec.containers:
        for port in container.ports or []:
            if port.name == constants.PORT_NAME_METRICS:
                return f"{pod.status.pod_ip}:{port.container_port}"
    return f"{pod.status.pod_ip}:{constants.PORT_METRICS}"


@pytest.mark.timeout(120)
def test_promtool_accepts_the_charts_rules(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(rule_groups("relayrl-ci")))
    output = promtool("check", "rules", str(rules))
    assert "SUCCESS" in output, output


def _without_annotations(groups: dict[str, Any]) -> dict[str, Any]:
    """The rule groups with each alert's annotations dropped: `promtool test rules`
    compares them whole, and what an alert says is not what these tests are about."""
    return {
        "groups": [
            {**g, "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]}
            for g in groups["groups"]
        ]
    }


@pytest.mark.timeout(120)
def test_alerts_fire_on_the_series_they_are_for_and_no_others(tmp_path: Path) -> None:
    """`promtool test rules`: recorded series, one minute apart, and the alerts each
    evaluation time must have (and no others)."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(_without_annotations(rule_groups("relayrl-ci"))))
    errors = "relayrl_runtime_request_errors_total"
    sink_errors = "relayrl_sink_errors_total"
    started = "relayrl_sink_start_time_seconds"
    pod = {"namespace": "fleet", "pod": "cp-actors-0"}

    def series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
        inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
        return {"series": f"{name}{{{inner}}}", "values": values}

    def firing(alert: str, labels: dict[str, str], at: str) -> dict[str, Any]:
        return {
            "eval_time": at,
            "alertname": alert,
            "exp_alerts": [{"exp_labels": {"severity": "warning", **labels}}] if labels else [],
        }

    sink = {"namespace": "fleet", "pod": "cp-sink-arrow-0", "sink": "arrow"}
    tests = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    # A model failing on every request, from minute 0 on.
                    series(errors, {**pod, "kind": "model_run"}, "0+3x40"),
                    # Other request errors (a client's bad input), and model errors that
                    # stopped: neither fires.
                    series(
                        errors, {**pod, "pod": "cp-actors-1", "kind": "invalid_argument"}, "0+3x40"
                    ),
                    series(
                        errors, {**pod, "pod": "cp-actors-2", "kind": "model_run"}, "0+1x3 3x37"
                    ),
                    # A sink whose commits keep failing; another that saw the tail lost once.
                    series(sink_errors, {**sink, "where": "commit"}, "0+1x40"),
                    series(
                        sink_errors,
                        {**sink, "pod": "cp-sink-arrow-1", "where": "stream-tail-lost"},
                        "0 0 1x38",
                    ),
                    # One whose stream keeps discarding messages it had not read: that
                    # alert only, not RelayRLSinkErrors too.
                    series(
                        sink_errors,
                        {**sink, "pod": "cp-sink-arrow-2", "where": "stream-head-expired"},
                        "0+1x40",
                    ),
                    # A new pod that found the loss as it started, before its first
                    # scrape: its series starts at 1 and never increases.
                    series(
                        sink_errors,
                        {**sink, "pod": "cp-sink-arrow-3", "where": "stream-head-expired"},
                        "1x80",
                    ),
                    # The same with a dead letter.
                    series(
                        "relayrl_sink_dead_letters_total",
                        {**sink, "pod": "cp-sink-arrow-4", "reason": "invalid_arrow"},
                        "1x80",
                    ),
                    # A sink whose container restarted at 2h and found a loss again as it
                    # started: its counter reads 1 before and after.
                    series(
                        sink_errors,
                        {**sink, "pod": "cp-sink-arrow-5", "where": "stream-head-expired"},
                        "1x150",
                    ),
                    # When each sink process started: all at 0, the restarted one again
                    # at 2h (7200 s).
                    *(
                        series(started, {**sink, "pod": f"cp-sink-arrow-{i}"}, "0x150")
                        for i in (0, 1, 2, 3, 4)
                    ),
                    series(started, {**sink, "pod": "cp-sink-arrow-5"}, "0x119 7200x30"),
                    # A store full from minute 3 to minute 20; another pod's for one minute.
                    series("relayrl_publisher_store_full", pod, "0 0 0 1x17 0x20"),
                    series(
                        "relayrl_publisher_store_full",
                        {**pod, "pod": "cp-actors-1"},
                        "0 0 0 1 0x36",
                    ),
                ],
                "alert_rule_test": [
                    # Failing for 5 minutes: not yet (the alert waits 10).
                    firing("RelayRLModelRunFailures", {}, "5m"),
                    firing("RelayRLModelRunFailures", pod, "15m"),
                    firing("RelayRLModelRunFailures", pod, "40m"),
                    firing("RelayRLSinkErrors", {**sink, "where": "commit"}, "25m"),
                    *(
                        {
                            "eval_time": "10m",
                            "alertname": alert,
                            "exp_alerts": [
                                {"exp_labels": {"severity": "critical", **sink, "pod": pod_name}}
                            ],
                        }
                        for alert, pod_name in (("RelayRLStreamTailLost", "cp-sink-arrow-1"),)
                    ),
                    {
                        "eval_time": "10m",
                        "alertname": "RelayRLStreamHeadExpired",
                        "exp_alerts": [
                            {"exp_labels": {"severity": "critical", **sink, "pod": pod_name}}
                            for pod_name in (
                                "cp-sink-arrow-2",
                                "cp-sink-arrow-3",
                                "cp-sink-arrow-5",
                            )
                        ],
                    },
                    # The restarted sink's new loss, 10 minutes after its restart.
                    {
                        "eval_time": "2h10m",
                        "alertname": "RelayRLStreamHeadExpired",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "critical",
                                    **sink,
                                    "pod": "cp-sink-arrow-5",
                                }
                            }
                        ],
                    },
                    # An hour on, the new pods' losses are old news; the other's goes on.
                    {
                        "eval_time": "70m",
                        "alertname": "RelayRLStreamHeadExpired",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "critical",
                                    **sink,
                                    "pod": "cp-sink-arrow-2",
                                }
                            }
                        ],
                    },
                    firing("RelayRLSinkDeadLetters", {**sink, "pod": "cp-sink-arrow-4"}, "10m"),
                    firing("RelayRLSinkDeadLetters", {}, "20m"),
                    # Full for 1 minute: not yet (the alert waits 2); then, until it has room.
                    *(
                        {
                            "eval_time": at,
                            "alertname": "RelayRLJetStreamStoreFull",
                            "exp_alerts": [{"exp_labels": {"severity": "critical", **pod}}] * n,
                        }
                        for at, n in (("4m", 0), ("10m", 1), ("25m", 0))
                    ),
                ],
            }
        ],
    }
    spec = tmp_path / "tests.yaml"
    spec.write_text(yaml.safe_dump(tests))
    output = promtool("test", "rules", str(spec))
    assert "SUCCESS" in output, output


@pytest.mark.timeout(300)
@pytest.mark.usefixtures("postgres_server")
def test_prometheus_scrapes_a_running_fleet_and_every_dashboard_query_has_data(
    agents: fleet.Agents,
    operator: fleet.Operator,
    nats: natsserver.NatsServer,
    postgres_server: postgres.PostgresServer,
    namespace: str,
    tmp_path: Path,
) -> None:
    k8s = agents.k8s
    bucket = fleet.prepare_fleet(k8s, namespace, nats.url, postgres_server.dsn, tmp_path)
    agents.create(
        specs.merge_patch(
            specs.base_manifest(),
            {
                "spec": {
                    "actors": 2,
                    "actorsPerPod": 1,
                    "model": {"uri": f"objectstore://{bucket}/cartpole", "format": "onnx"},
                    "environment": {"gymnasium": {"id": "CartPole-v1", "envsPerActor": 2}},
                    "trajectories": {"maxLength": 200, "nats": {"url": nats.url}},
                    "sinks": [
                        {"arrow": {"rotateSeconds": 2}},
                        {"postgres": {"dsnSecret": {"name": "pg"}}},
                    ],
                    "template": testing.process_node_placement(),
                }
            },
        )
    )
    # An Agent whose NATS does not answer: the operator's errors panel gets data the way a
    # user would see it, an error by kind (nats). Its pods stay on kwok nodes, unscraped.
    unreachable = f"nats://127.0.0.1:{natsserver.free_port()}"
    agents.create(
        specs.merge_patch(
            specs.base_manifest(),
            {
                "metadata": {"name": "unreachable"},
                "spec": {"actors": 0, "trajectories": {"nats": {"url": unreachable}}},
            },
        )
    )
    agents.wait_phase("cartpole", "Ready", timeout=180)
    pods = k8s.core.list_namespaced_pod(
        namespace, label_selector=f"{constants.LABEL_AGENT}=cartpole"
    ).items
    assert {p.spec.node_name for p in pods} == {k8s.process_node}
    assert len(pods) == 4, [p.metadata.name for p in pods]  # two actor pods, two sinks
    targets = [(target_labels(p), metrics_address(p)) for p in pods]
    components = {
        labels[monitoring.target_label(constants.LABEL_COMPONENT)] for labels, _ in targets
    }
    assert components == {
        constants.COMPONENT_ACTORS,
        constants.COMPONENT_ARROW_SINK,
        constants.COMPONENT_POSTGRES_SINK,
    }

    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(operator.metrics_port, targets)))
    promtool("check", "config", str(config))

    with Prometheus(config, tmp_path) as prom:

        def all_up() -> bool:
            active = prom.targets()
            return len(active) == len(targets) + 1 and all(t["health"] == "up" for t in active)

        try:
            testing.wait_for(all_up, timeout=60, what="every target up", interval=1)
        except TimeoutError as err:
            seen = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in prom.targets()]
            raise AssertionError(f"targets: {seen}\n{prom.logs()}") from err

        variables = {"namespace": namespace, "agent": "cartpole", "__rate_interval": RATE_INTERVAL}
        queries = dashboard_queries(variables)
        empty = dict(queries)
        failed: dict[str, Any] = {}

        def every_query_has_data() -> bool:
            for where, expr in list(empty.items()):
                body = prom.query(expr)
                if body["status"] != "success":
                    failed[where] = body
                    continue
                if body["data"]["result"]:
                    del empty[where]
            return not empty or bool(failed)

        try:
            testing.wait_for(every_query_has_data, timeout=120, what="data", interval=2)
        except TimeoutError as err:
            raise AssertionError(f"dashboard queries without data: {empty}") from err
        assert not failed, f"dashboard queries Prometheus refused: {failed}"

        # Each template variable offers the value the queries above were given.
        for dashboard, name, selector, label in variable_queries():
            where = f"{dashboard} ${name}"
            expr = with_values(where, selector, variables)
            body = prom.query(f"group by ({label}) ({expr})")
            assert body["status"] == "success", f"{where}: {body}"
            offered = {r["metric"].get(label) for r in body["data"]["result"]}
            assert variables[name] in offered, f"{where}: offers {offered}, not {variables[name]}"

        for expr in alert_expressions(rule_groups(namespace)):
            body = prom.query(expr)
            assert body["status"] == "success", f"alert expr {expr!r}: {body}"

    assert prom.proc is not None
    assert prom.proc.poll() is not None, "prometheus still running"

    # Let the operator reach a NATS for the unreachable Agent, so its finalizer completes.
    agents.patch("unreachable", {"spec": {"trajectories": {"nats": {"url": nats.url}}}})
    agents.delete("unreachable")
    agents.delete("cartpole")
    testing.wait_for(
        lambda: not k8s.core.list_namespaced_pod(namespace).items,
        timeout=120,
        what="pods gone",
    )
