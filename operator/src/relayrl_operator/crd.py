"""Generate the Agent CustomResourceDefinition from the typed spec models.

`make crds` calls `relayrl-operator crd` (see cli.py), which prints what
`build_crd()` returns; the result is committed as `crds/agents.relayrl.io.yaml` and
copied into the chart, and a unit test fails when either copy drifts from it.

pydantic emits JSON Schema (2020-12) with `$ref`s, `anyOf` for optional fields and
titles; the apiserver wants a structural OpenAPI v3 schema: everything inlined, one
type per node, no nulls. `structural()` does that translation, keeping descriptions,
defaults, bounds, patterns, enums and the CEL rules the models declare.
"""

from __future__ import annotations

from typing import Any, Final

import yaml

from relayrl_runtime import spec

CRD_NAME: Final = f"{spec.PLURAL}.{spec.GROUP}"

# JSON Schema keywords that carry no meaning for the apiserver, or that it rejects.
_DROPPED: Final = frozenset({"title", "$defs", "additionalProperties"})


class SchemaError(ValueError):
    """The models use a construct the CRD schema cannot express."""


def structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Translate one pydantic JSON Schema node into a structural OpenAPI v3 node."""
    node = dict(node)
    ref = node.pop("$ref", None)
    if ref is None and len(node.get("allOf", [])) == 1:
        ref = node.pop("allOf")[0]["$ref"]
    if ref is not None:
        target = structural(defs[ref.rsplit("/", 1)[-1]], defs)
        # Field-level keys (its description, default) win over the model's own.
        node = {**target, **node}

    options = node.pop("anyOf", None)
    if options is not None:
        real = [o for o in options if o.get("type") != "null"]
        if len(real) != 1:
            raise SchemaError(f"cannot express a union of {len(real)} types: {real}")
        node = {**structural(real[0], defs), **node}

    if node.get("default", ...) is None:
        del node["default"]

    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED:
            continue
        if key == "properties":
            out[key] = {name: structural(sub, defs) for name, sub in value.items()}
        elif key == "items":
            out[key] = structural(value, defs)
        else:
            out[key] = value

    additional = node.get("additionalProperties")
    if isinstance(additional, dict) and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = structural(additional, defs)
    if "properties" in out:
        out.setdefault("type", "object")
    if "x-kubernetes-validations" in out:
        out["x-kubernetes-validations"] = [
            _ordered(r, _RULE_ORDER) for r in out.pop("x-kubernetes-validations")
        ]
    return _ordered(out, _NODE_ORDER)


# Key order of the emitted YAML, so the committed CRD reads top-down.
_NODE_ORDER: Final = ("type", "description", "default", "enum")
_RULE_ORDER: Final = ("rule", "message", "fieldPath")


def _ordered(node: dict[str, Any], first: tuple[str, ...]) -> dict[str, Any]:
    nested = ("required", "properties", "items", "additionalProperties")
    head = [k for k in first if k in node]
    tail = [k for k in nested if k in node]
    middle = sorted(k for k in node if k not in head and k not in tail)
    return {k: node[k] for k in head + middle + tail}


def _schema_of(model: type[spec.SpecModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return structural(raw, raw.get("$defs", {}))


def openapi_schema() -> dict[str, Any]:
    """The `openAPIV3Schema` of the Agent CRD."""
    return {
        "type": "object",
        "description": (
            "An Agent is a fleet of reinforcement-learning actors: pods that step "
            "environments, run a policy and publish trajectories to NATS JetStream, "
            "with sinks that write them to Arrow/Parquet files and PostgreSQL."
        ),
        "required": ["spec"],
        "properties": {
            "apiVersion": {
                "type": "string",
                "description": "Versioned schema of this object: relayrl.io/v1alpha1.",
            },
            "kind": {"type": "string", "description": "Always Agent."},
            # The apiserver owns metadata's schema: only `type` may be given here.
            "metadata": {"type": "object"},
            "spec": _schema_of(spec.AgentSpec),
            "status": _schema_of(spec.AgentStatus),
        },
        "x-kubernetes-validations": [
            {
                "rule": f"self.metadata.name.size() <= {spec.MAX_NAME_LENGTH}",
                "message": (
                    f"metadata.name must be at most {spec.MAX_NAME_LENGTH} characters "
                    "(child object names are derived from it)"
                ),
            },
            {
                "rule": f"self.metadata.name.matches('{spec.AGENT_NAME}')",
                "message": (
                    "metadata.name must be lower-case letters, digits and '-', starting"
                    " with a letter and ending alphanumeric (it names the Agent's Services"
                    " and NATS subjects)"
                ),
            },
        ],
    }


def _column(name: str, kind: str, path: str, description: str, priority: int = 0) -> dict[str, Any]:
    column: dict[str, Any] = {
        "name": name,
        "type": kind,
        "jsonPath": path,
        "description": description,
    }
    if priority:
        column["priority"] = priority
    return column


def build_crd() -> dict[str, Any]:
    """The whole CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/part-of": "relayrl-fleet"},
        },
        "spec": {
            "group": spec.GROUP,
            "names": {
                "kind": spec.KIND,
                "listKind": f"{spec.KIND}List",
                "plural": spec.PLURAL,
                "singular": spec.SINGULAR,
                "shortNames": ["rla"],
                "categories": ["relayrl"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": spec.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.actors",
                            "statusReplicasPath": ".status.readyActors",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": [
                        _column("Ready", "integer", ".status.readyActors", "Actors in ready pods."),
                        _column("Actors", "integer", ".spec.actors", "Actors asked for."),
                        _column("Device", "string", ".spec.device", "Inference device."),
                        _column(
                            "Model", "integer", ".status.modelVersion", "Model version running."
                        ),
                        _column("Phase", "string", ".status.phase", "Coarse state."),
                        _column(
                            "Age", "date", ".metadata.creationTimestamp", "Time since creation."
                        ),
                        _column("Pods", "integer", ".status.readyPods", "Ready actor pods.", 1),
                    ],
                }
            ],
        },
    }


def build_peering_crds() -> list[dict[str, Any]]:
    """Kopf's peering CRDs: operator replicas use them to let only one of them act."""
    out = []
    for scope, kind, plural in (
        ("Cluster", "ClusterKopfPeering", "clusterkopfpeerings"),
        ("Namespaced", "KopfPeering", "kopfpeerings"),
    ):
        out.append(
            {
                "apiVersion": "apiextensions.k8s.io/v1",
                "kind": "CustomResourceDefinition",
                "metadata": {"name": f"{plural}.kopf.dev"},
                "spec": {
                    "group": "kopf.dev",
                    "scope": scope,
                    "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
                    "versions": [
                        {
                            "name": "v1",
                            "served": True,
                            "storage": True,
                            "schema": {
                                "openAPIV3Schema": {
                                    "type": "object",
                                    "description": "Operators alive and their priorities.",
                                    "properties": {
                                        "status": {
                                            "type": "object",
                                            "x-kubernetes-preserve-unknown-fields": True,
                                        }
                                    },
                                }
                            },
                        }
                    ],
                },
            }
        )
    return out


_HEADER = "# Generated by `make crds` from relayrl_runtime/spec.py: do not edit by hand.\n"


class _PlainDumper(yaml.SafeDumper):
    """Every node written out: no `&id`/`*id` aliases where the schema repeats itself
    (two fields of one model share its defaults)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render() -> str:
    """The Agent CRD as the YAML committed under crds/."""
    return _HEADER + yaml.dump(build_crd(), Dumper=_PlainDumper, sort_keys=False, width=100)


def render_peering() -> str:
    """Kopf's peering CRDs as the YAML committed under crds/."""
    return _HEADER.replace("relayrl_runtime/spec.py", "relayrl_operator/crd.py") + (
        yaml.safe_dump_all(build_peering_crds(), sort_keys=False, width=100)
    )
