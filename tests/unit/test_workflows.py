"""The GitHub workflow refers to make targets, files and the chart that exist."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from relayrl_localstack import binaries

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / ".github" / "workflows" / "ci.yaml"


def _runs() -> list[str]:
    data = yaml.safe_load(WORKFLOW.read_text())
    return [step["run"] for job in data["jobs"].values() for step in job["steps"] if "run" in step]


def test_make_targets_in_the_workflow_exist() -> None:
    targets = set(re.findall(r"^([a-zA-Z0-9_-]+):", (REPO / "Makefile").read_text(), re.M))
    used = {
        t
        for run in _runs()
        for line in run.splitlines()
        for t in re.findall(r"\bmake ((?:[\w-]+ ?)+)", line)
    }
    names = {name for group in used for name in group.split()}
    assert names, "the workflow runs no make target"
    assert names <= targets, names - targets


def test_paths_in_the_workflow_exist() -> None:
    text = "\n".join(_runs())
    for path in ("runtime_image/Dockerfile", "helm/relayrl-operator", "crds/", "tests/cluster"):
        assert path in text
        assert (REPO / path).exists(), path


def test_cluster_tests_run_against_the_existing_cluster() -> None:
    data = yaml.safe_load(WORKFLOW.read_text())
    steps = data["jobs"]["e2e-kind"]["steps"]
    cluster = next(s for s in steps if "tests/cluster" in s.get("run", ""))
    assert cluster["env"]["RELAYRL_USE_EXISTING_CLUSTER"] == "1"


def test_actionlint_is_clean() -> None:
    """actionlint (built with the pinned tools) checks syntax, expressions, action inputs
    and, through shellcheck, every run: script of the workflow."""
    bins = binaries.ensure_binaries()
    assert shutil.which("shellcheck"), "shellcheck missing: run hack/system-deps.sh"
    result = subprocess.run(
        [str(bins.actionlint), "-no-color", str(WORKFLOW)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
