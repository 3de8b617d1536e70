"""What the Dockerfiles install, installed and run without Docker.

Both images build wheels from the repository and install them into a bare Python (see
`Dockerfile` and `runtime_image/Dockerfile`). This does the same into fresh virtual
environments: the wheels must carry every module and file the entry points need, and
the console scripts must work from them, not from the editable checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
UV = Path(sys.executable).parent / "uv"


def run(*argv: str | Path, cwd: Path | None = None, timeout: float = 600) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    result = subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
        env=env,
    )
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The runtime and operator wheels, built as the images' build stage does."""
    out = tmp_path_factory.mktemp("wheels")
    for project in ("runtime_image", "operator"):
        run(UV, "build", "--wheel", "--out-dir", out, REPO / project)
    found = {p.name.split("-")[0]: p for p in out.glob("*.whl")}
    assert set(found) == {"relayrl_runtime", "relayrl_operator"}, found
    return found


def venv(path: Path, *requirements: str) -> Path:
    """A fresh virtual environment with `requirements` installed; returns its bin dir."""
    run(UV, "venv", "--quiet", "--python", sys.executable, path)
    run(UV, "pip", "install", "--quiet", "--python", path / "bin" / "python", *requirements)
    return path / "bin"


@pytest.mark.timeout(900)
def test_operator_image_packages_run(wheels: dict[str, Path], tmp_path: Path) -> None:
    # As the operator image: both wheels, no runtime extras.
    bin_dir = venv(
        tmp_path / "operator", str(wheels["relayrl_runtime"]), str(wheels["relayrl_operator"])
    )
    crd = yaml.safe_load(run(bin_dir / "relayrl-operator", "crd", cwd=tmp_path))
    committed = yaml.safe_load((REPO / "crds" / "agents.relayrl.io.yaml").read_text())
    assert crd == committed
    assert "run" in run(bin_dir / "relayrl-operator", "--help", cwd=tmp_path)
    # No heavy backend came along.
    freeze = run(UV, "pip", "freeze", "--python", bin_dir / "python")
    for heavy in ("torch", "onnxruntime", "gymnasium"):
        assert f"{heavy}==" not in freeze, heavy


@pytest.mark.timeout(900)
def test_runtime_image_packages_run(wheels: dict[str, Path], tmp_path: Path) -> None:
    # As the runtime image: the runtime wheel with every extra.
    bin_dir = venv(tmp_path / "runtime", f"{wheels['relayrl_runtime']}[all]")
    out = tmp_path / "trajectories"
    summary = run(
        bin_dir / "relayrl-runtime",
        "demo",
        "--steps",
        "2000",
        "--seconds",
        "60",
        "--out",
        out,
        cwd=tmp_path,
    )
    assert list(out.rglob("*.parquet")), summary
    assert "arrow" in run(bin_dir / "relayrl-sink", "--help", cwd=tmp_path)
    model = tmp_path / "model"
    run(
        bin_dir / "relayrl-runtime",
        "model",
        "export",
        model,
        "--format",
        "torchscript",
        cwd=tmp_path,
    )
    assert (model / "relayrl-model.json").is_file()
