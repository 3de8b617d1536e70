"""Agent manifests for tests: the valid base and the shared invalid cases.

`tests/data/invalid_agents.yaml` is read by the unit tests (the spec models must
reject each case) and by the cluster tests (a real apiserver must reject it too).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from relayrl_operator.builders import common

DATA = Path(__file__).resolve().parent.parent / "data"


def merge_patch(target: Any, patch: Any) -> Any:
    """Apply an RFC 7386 JSON merge patch (null deletes a key) and return the result."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


# Label keys, and whether Kubernetes takes them: the spec model and the CRD must agree.
LABEL_KEYS: list[tuple[str, bool]] = [
    ("team", True),
    ("app.kubernetes.io/name", True),
    ("Team_A.b-1", True),
    ("a" * 63, True),
    ("a" * 64, False),
    ("-team", False),
    ("example.com/", False),
    ("/team", False),
    ("a/b/c", False),
    ("Example.com/team", False),
    (f"{'a' * 253}/team", True),
    (f"{'a' * 254}/team", False),
]


@dataclass(frozen=True)
class InvalidCase:
    """One invalid manifest and where and how it must be rejected."""

    id: str
    manifest: dict[str, Any]
    field: str
    message: str


def base_manifest() -> dict[str, Any]:
    """A valid Agent manifest the invalid cases patch."""
    data = yaml.safe_load((DATA / "invalid_agents.yaml").read_text())
    return dict(data["base"])


def agent_ref(
    patch: dict[str, Any] | None = None, namespace: str = "fleet", uid: str = "uid-1"
) -> common.AgentRef:
    """The base manifest with `patch` merged in, as the operator's builders take it."""
    from relayrl_operator.builders import common
    from relayrl_runtime import spec

    parsed = spec.parse_agent(merge_patch(base_manifest(), patch or {}))
    return common.AgentRef(
        name=parsed.metadata.name, namespace=namespace, uid=uid, generation=3, spec=parsed.spec
    )


def invalid_cases() -> list[InvalidCase]:
    """All invalid cases, as whole manifests."""
    data = yaml.safe_load((DATA / "invalid_agents.yaml").read_text())
    return [
        InvalidCase(
            id=c["id"],
            manifest=merge_patch(data["base"], c["patch"]),
            field=c["field"],
            message=c["message"],
        )
        for c in data["cases"]
    ]
