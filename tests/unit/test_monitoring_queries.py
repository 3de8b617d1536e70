"""The chart's Grafana dashboards and alert rules query what the code exports.

Read from the files (no helm): every relayrl_* metric a dashboard query, template
variable or alert expression names is registered by the operator, runtime, publisher
or sinks; labels copied from pods are the ones each Agent's PodMonitor sets; the
fleet dashboard can be narrowed to one Agent. (tests/cluster/agents/test_monitoring.py
checks that the queries return data from a running fleet.)
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relayrl_operator import constants
from relayrl_operator import metrics as operator_metrics
from relayrl_operator.builders import monitoring
from relayrl_runtime import metrics as runtime_metrics
from support.metricnames import exported_labels

CHART = Path(__file__).resolve().parents[2] / "helm" / "relayrl-operator"
DASHBOARDS = {p.stem: json.loads(p.read_text()) for p in sorted(CHART.glob("dashboards/*.json"))}
RULES = CHART / "templates" / "prometheusrule.yaml"
# Grafana's own variables a query may use.
GRAFANA_VARIABLES = frozenset({"__rate_interval", "__interval", "__range"})
# Labels Prometheus (and the Prometheus Operator's PodMonitor) put on every target.
TARGET_LABELS = frozenset({"namespace", "pod", "container", "job", "instance", "endpoint"})
POD_LABELS = frozenset(monitoring.target_label(label) for label in monitoring.POD_TARGET_LABELS)
AGENT_LABEL = monitoring.target_label(constants.LABEL_AGENT)


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    for panel in items:
        yield panel
        yield from panels(panel.get("panels") or [])


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and query template variable."""
    out = [
        (f"{dashboard['uid']} '{panel['title']}' [{target['refId']}]", str(target["expr"]))
        for panel in panels(dashboard["panels"])
        for target in panel.get("targets") or []
    ]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            out.append((f"{dashboard['uid']} ${variable['name']}", str(text)))
    return out


def rule_expressions() -> list[tuple[str, str]]:
    """(alert, expr) of every rule in the chart's PrometheusRule template."""
    text = RULES.read_text()
    alerts = re.findall(r"^\s*- alert: (\S+)\n\s*expr: (.+)$", text, re.MULTILINE)
    assert len(alerts) == len(re.findall(r"^\s*expr:", text, re.MULTILINE))
    return alerts


ALL_QUERIES = [q for d in DASHBOARDS.values() for q in dashboard_queries(d)] + rule_expressions()


def variable_free(expr: str) -> str:
    """`expr` with Grafana's variables replaced, label_values() turned into a query."""
    expr = re.sub(r"\$(\w+)|\$\{(\w+)\}", "x", expr)
    lv = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", expr)
    return f"group by ({lv.group(2)}) ({lv.group(1)})" if lv else expr


def label_names(expr: str) -> set[str]:
    """Labels `expr` matches or groups by."""
    expr = variable_free(expr)
    names = set()
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        names |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
    for grouping in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        names |= {n.strip() for n in grouping.split(",") if n.strip()}
    return names


def metric_names(expr: str) -> set[str]:
    """relayrl_* metrics `expr` names (label names and matcher values left out)."""
    expr = variable_free(expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r'"[^"]*"', "", expr)
    return set(re.findall(r"\brelayrl_\w+", expr))


def test_the_chart_has_both_dashboards_and_rules() -> None:
    assert set(DASHBOARDS) == {"fleet", "operator"}
    assert len(rule_expressions()) >= 10


def test_label_and_metric_extraction() -> None:
    expr = (
        "sum by (namespace, relayrl_io_agent) (rate(relayrl_runtime_actions_total"
        '{namespace=~"$namespace", relayrl_io_agent=~"$agent"}[$__rate_interval]))'
    )
    assert metric_names(expr) == {"relayrl_runtime_actions_total"}
    assert label_names(expr) == {"namespace", "relayrl_io_agent"}
    lv = 'label_values(relayrl_runtime_actors{namespace=~"$namespace"}, relayrl_io_agent)'
    assert metric_names(lv) == {"relayrl_runtime_actors"}
    assert label_names(lv) == {"namespace", "relayrl_io_agent"}


@pytest.mark.parametrize(("where", "expr"), ALL_QUERIES, ids=[w for w, _ in ALL_QUERIES])
def test_every_query_names_exported_metrics_and_labels_they_carry(where: str, expr: str) -> None:
    exported = exported_labels()
    names = metric_names(expr)
    assert names, f"{where}: names no RelayRL metric: {expr}"
    unknown = names - set(exported)
    assert not unknown, f"{where}: metrics nothing exports: {sorted(unknown)}"
    # A label is one of the metrics' own, one every target has, or a pod label the
    # Agent's PodMonitor copies onto the series (so the Agent's and its component's).
    known = TARGET_LABELS | POD_LABELS | {label for n in names for label in exported[n]}
    unknown_labels = label_names(expr) - known
    assert not unknown_labels, f"{where}: labels no series carries: {sorted(unknown_labels)}"


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_dashboards_use_their_variables_and_the_rate_interval(name: str) -> None:
    dashboard = DASHBOARDS[name]
    defined = {v["name"] for v in dashboard["templating"]["list"]} | GRAFANA_VARIABLES
    for where, expr in dashboard_queries(dashboard):
        used = {a or b for a, b in re.findall(r"\$(\w+)|\$\{(\w+)\}", expr)}
        assert used <= defined, f"{where}: undefined variables {sorted(used - defined)}"
        for window in re.findall(r"\b(?:rate|irate)\([^\[]*\[([^\]]+)\]", expr):
            assert window == "$__rate_interval", f"{where}: fixed rate window [{window}]"
        if "histogram_quantile" in expr:
            assert re.search(r"sum by \(le\b", expr), f"{where}: quantile not summed by le"
            assert re.search(r"\w_bucket\b", expr), f"{where}: quantile not over buckets"


def test_fleet_dashboard_selects_and_groups_by_agent() -> None:
    fleet = DASHBOARDS["fleet"]
    variables = {v["name"]: v for v in fleet["templating"]["list"]}
    agent = variables["agent"]
    assert agent["query"]["query"] == agent["definition"]
    assert re.fullmatch(
        rf'label_values\(relayrl_\w+\{{namespace=~"\$namespace"\}}, {AGENT_LABEL}\)',
        agent["definition"],
    ), agent["definition"]
    assert agent["includeAll"]
    assert agent["multi"]
    assert agent["allValue"] == ".*"  # All: series without the label too
    for where, expr in dashboard_queries(fleet):
        if where.endswith("$agent") or where.endswith("$namespace"):
            continue
        assert f'{AGENT_LABEL}=~"$agent"' in expr, f"{where}: not filtered by $agent"
        assert 'namespace=~"$namespace"' in expr, f"{where}: not filtered by $namespace"
        grouping = re.findall(r"\bby \(([^)]*)\)", expr)
        assert grouping, f"{where}: not grouped"
        keys = {k.strip() for k in grouping[-1].split(",")}
        assert AGENT_LABEL in keys or "pod" in keys, f"{where}: Agents merged: {expr}"
    titles = {p["title"] for p in panels(fleet["panels"])}
    assert "Sink commit latency" in titles
    steps = next(p for p in panels(fleet["panels"]) if p["title"].startswith("Steps per second"))
    compared = {n for t in steps["targets"] for n in metric_names(t["expr"])}
    assert compared == {"relayrl_runtime_steps_recorded_total", "relayrl_publisher_steps_total"}
    trajectories = next(
        p for p in panels(fleet["panels"]) if p["title"] == "Trajectories per second"
    )
    for target in trajectories["targets"]:
        assert all("trajectories" in n for n in metric_names(target["expr"])), target["expr"]


def test_operator_errors_alert_lists_every_error_kind() -> None:
    [errors] = [
        f for f in operator_metrics.REGISTRY.collect() if f.name == "relayrl_operator_errors"
    ]
    text = RULES.read_text()
    description = re.search(
        r"alert: RelayRLOperatorReconcileErrors\n(?:.*\n)*?\s*description: (.*)", text
    )
    assert description is not None
    for kind in ("api", "nats", "spec", "watch"):
        assert re.search(rf"\b{kind}\b", errors.documentation), kind
        assert re.search(rf"\b{kind}\b", description.group(1)), kind


def test_alerts_cover_operator_standby_runtime_sink_and_publisher_backpressure() -> None:
    rules = dict(rule_expressions())
    assert rules["RelayRLOperatorNotActing"] == "sum(relayrl_operator_active) == 0"
    assert rules["RelayRLOperatorAbsent"] == "absent(relayrl_operator_active)"
    assert "relayrl_runtime_sink_errors_total" in rules["RelayRLRuntimeSinkErrors"]
    assert "relayrl_publisher_blocked_seconds_total" in rules["RelayRLPublisherBlocking"]
    assert "relayrl_publisher_store_full" in rules["RelayRLJetStreamStoreFull"]
    text = RULES.read_text()
    # Prometheus templates reach the rule through Helm only escaped.
    for line in text.splitlines():
        if "$labels" in line or "$value" in line:
            assert "{{`{{" in line, line


def test_inference_latency_buckets_reach_slow_policies() -> None:
    page = runtime_metrics.RuntimeMetrics().exposition().decode()
    bounds = [
        float(b)
        for b in re.findall(r'relayrl_runtime_inference_seconds_bucket\{le="([^"]+)"\}', page)
        if b != "+Inf"
    ]
    assert bounds == sorted(bounds)
    assert {5e-5, 1e-3, 0.1, 0.25, 1.0} <= set(bounds)
    assert max(bounds) >= 10.0
