"""The committed Agent CRD on a real apiserver: it applies, explains, and rejects bad specs.

Uses the session cluster of ``conftest.py``; the invalid manifests are the shared
cases of ``tests/data/invalid_agents.yaml`` (the unit tests check the spec models
reject the same ones).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from relayrl_localstack.testing import ClusterHandle, condition, wait_for
from support import specs

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "agents.relayrl.io.yaml"
CRD_NAME = "agents.relayrl.io"


@pytest.fixture(scope="module")
def agent_crd(k8s: ClusterHandle) -> str:
    """The Agent CRD applied and Established (cluster-scoped: shared by the module)."""
    k8s.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))

    def established() -> bool:
        crd = yaml.safe_load(k8s.kubectl("get", "crd", CRD_NAME, "-o", "yaml").stdout)
        return (condition(crd, "Established") or {}).get("status") == "True"

    wait_for(established, timeout=60, what=f"CRD {CRD_NAME} Established")
    return CRD_NAME


@pytest.mark.timeout(120)
def test_crd_applies_and_kubectl_explains_agent_spec(k8s: ClusterHandle, agent_crd: str) -> None:
    def explain() -> subprocess.CompletedProcess[str] | None:
        result = k8s.kubectl("explain", "agent.spec", check=False)
        return result if result.returncode == 0 else None

    # Discovery can lag the Established condition by a moment.
    result = wait_for(explain, timeout=30, what="kubectl explain agent.spec")
    assert "KIND:" in result.stdout
    assert "Agent" in result.stdout
    assert "actors" in result.stdout


@pytest.mark.timeout(120)
def test_valid_agent_is_accepted(k8s: ClusterHandle, agent_crd: str, namespace: str) -> None:
    manifest = specs.base_manifest()
    result = k8s.kubectl("create", "-n", namespace, "-f", "-", input_text=yaml.safe_dump(manifest))
    assert "created" in result.stdout


@pytest.mark.timeout(180)
def test_invalid_agents_are_rejected_by_the_apiserver_on_their_field(
    k8s: ClusterHandle, agent_crd: str, namespace: str
) -> None:
    failures = []
    for case in specs.invalid_cases():
        result = k8s.kubectl(
            "create",
            "-n",
            namespace,
            "--dry-run=server",
            "-f",
            "-",
            check=False,
            input_text=yaml.safe_dump(case.manifest),
        )
        if result.returncode == 0 or case.field not in result.stderr:
            failures.append(f"{case.id}: exit {result.returncode}: {result.stderr.strip()}")
    assert failures == []


@pytest.mark.timeout(180)
def test_the_apiserver_takes_the_label_keys_the_spec_model_takes(
    k8s: ClusterHandle, agent_crd: str, namespace: str
) -> None:
    disagree = []
    for key, valid in specs.LABEL_KEYS:
        manifest = specs.merge_patch(
            specs.base_manifest(), {"spec": {"template": {"nodeSelector": {key: "x"}}}}
        )
        result = k8s.kubectl(
            "create", "-n", namespace, "--dry-run=server", "-f", "-",
            check=False, input_text=yaml.safe_dump(manifest),
        )  # fmt: skip
        if (result.returncode == 0) != valid or (
            not valid and "spec.template.nodeSelector: Invalid value" not in result.stderr
        ):
            disagree.append(f"{key!r}: exit {result.returncode}: {result.stderr.strip()}")
    assert disagree == []
