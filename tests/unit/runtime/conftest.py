"""Fixtures for the runtime unit tests: small models exported into tmp dirs."""

from __future__ import annotations

from pathlib import Path

import pytest

from relayrl_runtime import spec
from relayrl_runtime.inference import export
from support import badmodels


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An ONNX and a TorchScript export of the same 4-64-64-2 MLP (version 1), plus v2 and v3."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for fmt in spec.ModelFormat:
        out[fmt.value] = root / fmt.value
        export.export_mlp(out[fmt.value], fmt, seed=0, version=1)
    out["onnx_v2"] = root / "onnx_v2"
    export.export_mlp(out["onnx_v2"], spec.ModelFormat.ONNX, seed=1, version=2)
    out["onnx_v3"] = root / "onnx_v3"
    export.export_mlp(out["onnx_v3"], spec.ModelFormat.ONNX, seed=2, version=3)
    out["onnx_wide"] = root / "onnx_wide"
    export.export_mlp(out["onnx_wide"], spec.ModelFormat.ONNX, obs_dim=6, version=3)
    # Loads (batches of 1 and 3 rows), then fails on 4 rows or on a value above 100.
    out["failing_v2"] = root / "failing_v2"
    badmodels.export_failing(out["failing_v2"], version=2, max_rows=3, max_abs=100.0)
    return out
