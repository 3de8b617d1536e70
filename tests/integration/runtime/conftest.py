"""Fixtures for runtime integration tests: models made by the tests themselves."""

from __future__ import annotations

from pathlib import Path

import pytest

from relayrl_runtime import spec
from relayrl_runtime.inference import export
from support import badmodels


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    out = {}
    for fmt in spec.ModelFormat:
        out[fmt.value] = root / fmt.value
        export.export_mlp(out[fmt.value], fmt, version=1)
    out["onnx_v2"] = root / "onnx_v2"
    export.export_mlp(out["onnx_v2"], spec.ModelFormat.ONNX, seed=1, version=2)
    # Another observation width: no running agent of the others can take it in place.
    out["onnx_v3_wide"] = root / "onnx_v3_wide"
    export.export_mlp(out["onnx_v3_wide"], spec.ModelFormat.ONNX, obs_dim=6, version=3)
    # Loads (batches of 1 and 3 rows), then fails on batches of more than 3 rows.
    out["onnx_v2_failing"] = root / "onnx_v2_failing"
    badmodels.export_failing(out["onnx_v2_failing"], version=2, max_rows=3, seed=1)
    return out
