"""Locate the control-plane binaries built by ``hack/k8s/build.sh``.

The binaries live outside the repository, in
``${RELAYRL_CACHE:-~/.cache/relayrl}/k8s-<KUBERNETES_VERSION>/bin``. The version comes
from ``hack/k8s/versions.env``. When the binaries are missing, :func:`ensure_binaries`
runs the build script (slow the first time, a no-op afterwards).

Called by :mod:`relayrl_localstack.cluster`, :mod:`relayrl_localstack.kwok` and the CLI.
Environment overrides:

- ``RELAYRL_CACHE``: the cache root (also honoured by build.sh);
- ``RELAYRL_K8S_BIN_DIR``: use this directory of binaries as is, never build;
- ``RELAYRL_REPO``: the repository root, when this package is not installed from
  a checkout (editable install), to find ``hack/k8s``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
from pathlib import Path
from typing import Final

logger = logging.getLogger(__name__)

BINARY_NAMES: Final = (
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "etcd",
    "kwok",
    "helm",
    "actionlint",
)


class BinariesError(RuntimeError):
    """The binaries cannot be found or built; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Binaries:
    """Paths of the pinned control-plane binaries and the kwok stage file."""

    bin_dir: Path
    kubernetes_version: str
    kwok_stages: Path | None

    def path(self, name: str) -> Path:
        """Return the path of one binary, e.g. ``path("kubectl")``."""
        if name not in BINARY_NAMES:
            raise KeyError(name)
        return self.bin_dir / name

    @property
    def kube_apiserver(self) -> Path:
        """kube-apiserver."""
        return self.path("kube-apiserver")

    @property
    def kube_controller_manager(self) -> Path:
        """kube-controller-manager."""
        return self.path("kube-controller-manager")

    @property
    def kube_scheduler(self) -> Path:
        """kube-scheduler."""
        return self.path("kube-scheduler")

    @property
    def kubectl(self) -> Path:
        """kubectl."""
        return self.path("kubectl")

    @property
    def etcd(self) -> Path:
        """etcd."""
        return self.path("etcd")

    @property
    def kwok(self) -> Path:
        """kwok."""
        return self.path("kwok")

    @property
    def helm(self) -> Path:
        """helm."""
        return self.path("helm")

    @property
    def actionlint(self) -> Path:
        """actionlint (the GitHub workflow linter; built with the rest)."""
        return self.path("actionlint")


def cache_root() -> Path:
    """Return the cache root shared with build.sh (``RELAYRL_CACHE`` or ~/.cache/relayrl)."""
    env = os.environ.get("RELAYRL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "relayrl"


def repo_root() -> Path:
    """Return the repository root holding ``hack/k8s``.

    Found from ``RELAYRL_REPO``, else by walking up from this file (an editable
    install from the checkout), else from the current directory.
    """
    env = os.environ.get("RELAYRL_REPO")
    candidates = [Path(env)] if env else []
    candidates += [*Path(__file__).resolve().parents, Path.cwd(), *Path.cwd().parents]
    for candidate in candidates:
        if (candidate / "hack" / "k8s" / "versions.env").is_file():
            return candidate
    raise BinariesError(
        "cannot find hack/k8s/versions.env: set RELAYRL_REPO to the RelayRL Fleet checkout "
        "or RELAYRL_K8S_BIN_DIR to a directory of prebuilt binaries"
    )


def read_versions(root: Path | None = None) -> dict[str, str]:
    """Parse ``hack/k8s/versions.env`` (KEY=VALUE lines, ``#`` comments)."""
    path = (root or repo_root()) / "hack" / "k8s" / "versions.env"
    versions: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        versions[key.strip()] = value.strip().strip("\"'")
    return versions


def _complete(bin_dir: Path) -> bool:
    return all(os.access(bin_dir / name, os.X_OK) for name in BINARY_NAMES)


def ensure_binaries(*, build: bool = True) -> Binaries:
    """Return the binaries, running ``hack/k8s/build.sh`` first when needed.

    build.sh is itself a fast no-op when its stamp matches, so it is always run
    when the repository is available: an edited pin is never silently ignored.
    """
    override = os.environ.get("RELAYRL_K8S_BIN_DIR")
    if override:
        bin_dir = Path(override)
        if not _complete(bin_dir):
            raise BinariesError(f"RELAYRL_K8S_BIN_DIR={bin_dir} lacks one of {BINARY_NAMES}")
        stages = bin_dir.parent / "kwok-stages.yaml"
        version = _probe_version(bin_dir)
        return Binaries(bin_dir, version, stages if stages.is_file() else None)

    root = repo_root()
    version = read_versions(root)["KUBERNETES_VERSION"]
    out_dir = cache_root() / f"k8s-{version}"
    if build:
        script = root / "hack" / "k8s" / "build.sh"
        logger.info("running %s (first run builds for a long while)", script)
        result = subprocess.run(["bash", str(script)], check=False)
        if result.returncode != 0:
            raise BinariesError(f"{script} failed with exit code {result.returncode}")
    bin_dir = out_dir / "bin"
    if not _complete(bin_dir):
        raise BinariesError(f"{bin_dir} is incomplete: run hack/k8s/build.sh (make k8s-bins)")
    stages = out_dir / "kwok-stages.yaml"
    return Binaries(bin_dir, version, stages if stages.is_file() else None)


def _probe_version(bin_dir: Path) -> str:
    out = subprocess.run(
        [str(bin_dir / "kube-apiserver"), "--version"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    # "Kubernetes v1.36.3"
    return out.split()[-1] if out.strip() else "unknown"
