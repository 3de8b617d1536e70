"""The committed Agent CRD: in sync with the models, structural, and self-describing."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from relayrl_operator import crd
from relayrl_runtime import spec

REPO = Path(__file__).resolve().parents[3]
COMMITTED = REPO / "crds" / "agents.relayrl.io.yaml"
CHART_COPY = REPO / "helm" / "relayrl-operator" / "crds" / "agents.relayrl.io.yaml"


def _nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from _nodes(sub, f"{path}.{name}")
    if "items" in node:
        yield from _nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}{{}}")


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return crd.openapi_schema()


def test_committed_crd_matches_the_models() -> None:
    assert COMMITTED.read_text() == crd.render(), "run `make crds` and commit the result"


def test_chart_copy_matches_the_committed_crd() -> None:
    assert CHART_COPY.read_text() == COMMITTED.read_text(), "run `make crds`"


def test_committed_peering_crds_match_and_are_in_the_chart() -> None:
    committed = REPO / "crds" / "kopf.dev.yaml"
    assert committed.read_text() == crd.render_peering(), "run `make crds`"
    chart = REPO / "helm" / "relayrl-operator" / "crds" / "kopf.dev.yaml"
    assert chart.read_text() == committed.read_text(), "run `make crds`"


def test_every_field_has_a_description(schema: dict[str, Any]) -> None:
    missing = [
        path
        for path, node in _nodes(schema)
        if path not in ("", ".metadata")
        and not path.endswith(("[]", "{}"))
        and not node.get("description")
    ]
    assert not missing


def test_schema_is_structural(schema: dict[str, Any]) -> None:
    for path, node in _nodes(schema):
        assert not {"$ref", "anyOf", "allOf", "oneOf", "title", "$defs"} & node.keys(), path
        assert node.get("type") != "null", path
        typed = "type" in node or node.get("x-kubernetes-int-or-string")
        assert typed, f"{path} has no type"
        if "default" in node:
            assert node["default"] is not None, path


def test_cel_rules_name_existing_fields(schema: dict[str, Any]) -> None:
    rules = 0
    for path, node in _nodes(schema):
        for rule in node.get("x-kubernetes-validations", []):
            rules += 1
            fields = set(re.findall(r"self\.(\w+)", rule["rule"])) - {"metadata"}
            assert fields <= node.get("properties", {}).keys(), (path, rule)
            if "fieldPath" in rule:
                assert rule["fieldPath"].lstrip(".") in node["properties"], (path, rule)
            assert rule["message"]
    assert rules >= 7


def test_every_model_rule_is_in_the_crd(schema: dict[str, Any]) -> None:
    in_crd = {
        rule["rule"]
        for _, node in _nodes(schema)
        for rule in node.get("x-kubernetes-validations", [])
    }
    declared = {rule.cel for model in spec.SpecModel.__subclasses__() for rule in model.rules}
    assert declared <= in_crd


def test_enums_bounds_and_defaults_are_carried(schema: dict[str, Any]) -> None:
    s = schema["properties"]["spec"]["properties"]
    assert s["device"]["enum"] == ["cpu", "cuda"]
    assert s["device"]["default"] == "cpu"
    assert s["model"]["properties"]["format"]["enum"] == ["onnx", "torchscript"]
    assert (s["routers"]["minimum"], s["routers"]["maximum"]) == (1, 64)
    assert s["trajectories"]["default"] == {}
    assert set(schema["properties"]["spec"]["required"]) == {"model", "environment"}


def test_scale_subresource_and_printer_columns_point_at_fields(schema: dict[str, Any]) -> None:
    version = crd.build_crd()["spec"]["versions"][0]
    scale = version["subresources"]["scale"]
    known = {path for path, _ in _nodes(schema)}
    assert scale["specReplicasPath"] == ".spec.actors"
    for key in ("specReplicasPath", "statusReplicasPath", "labelSelectorPath"):
        assert scale[key] in known
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert list(columns)[:5] == ["Ready", "Actors", "Device", "Model", "Phase"]
    for name, path in columns.items():
        assert path in known or path.startswith(".metadata."), name


def test_committed_crd_is_valid_yaml_of_one_object() -> None:
    docs = list(yaml.safe_load_all(COMMITTED.read_text()))
    assert len(docs) == 1
    assert docs[0]["metadata"]["name"] == "agents.relayrl.io"
