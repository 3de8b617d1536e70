"""Every Agent manifest under examples/ is valid for the spec models."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from relayrl_runtime import spec

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").rglob("*.yaml"))
AGENTS = [
    (path, doc)
    for path in EXAMPLES
    for doc in yaml.safe_load_all(path.read_text())
    if doc and doc.get("kind") == spec.KIND
]


def test_there_are_examples() -> None:
    assert len(AGENTS) >= 2


@pytest.mark.parametrize(("path", "doc"), AGENTS, ids=[p.parent.name for p, _ in AGENTS])
def test_example_agent_is_valid(path: Path, doc: dict[str, object]) -> None:
    spec.parse_agent(doc)
