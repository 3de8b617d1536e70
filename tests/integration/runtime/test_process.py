"""The runtime process end to end: real subprocess, real models, SIGTERM drain."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from integration.runtime import helpers


def _config(model: Path, fmt: str, out: Path, **extra: object) -> dict[str, object]:
    return {
        "agent": "cartpole",
        "actors": 3,
        "routers": 2,
        "model": {"uri": str(model), "format": fmt},
        "environment": {"gymnasium": {"id": "CartPole-v1", "envsPerActor": 2}},
        "trajectories": {"maxLength": 50},
        "localSink": {"path": str(out)},
        "reload": {"pollSeconds": 0.2},
        **extra,
    }


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_run_serves_probes_and_flushes_on_sigterm(
    models: dict[str, Path], tmp_path: Path, fmt: str
) -> None:
    out = tmp_path / "out"
    proc = helpers.RuntimeProcess(tmp_path, _config(models[fmt], fmt, out))
    try:
        proc.wait_ready()
        assert helpers.http_get(proc.port, "/healthz")[0] == 200
        helpers.wait_for(
            "env steps",
            lambda: helpers.metric(proc.metrics(), "relayrl_runtime_env_steps_total") > 500,
        )
        text = proc.metrics()
        assert helpers.metric(text, "relayrl_runtime_model_version") == 1
        assert helpers.metric(text, "relayrl_runtime_actors") == 6
        assert helpers.metric(text, "relayrl_runtime_routers") == 2
        assert helpers.metric(text, "relayrl_runtime_inference_seconds_count") > 0
        assert "relayrl_runtime_batch_size_bucket" in text
        assert "relayrl_runtime_router_queue_depth" in text
        assert helpers.http_get(proc.port, "/nope")[0] == 404
        assert proc.terminate() == 0, proc.logs()
    finally:
        proc.kill()
    files = sorted(out.glob("*.parquet"))
    assert files, proc.logs()
    assert not list(out.glob(".*.tmp"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    assert set(table["actor_id"].to_pylist()) == set(range(6))
    # Every actor's last trajectory was cut by the drain, and nothing is longer than 50.
    rows = table.to_pylist()
    cut_ids = {r["actor_id"] for r in rows if r["cut"] and not r["terminated"]}
    assert cut_ids == set(range(6))
    per_traj: dict[tuple[int, int], int] = {}
    for r in rows:
        key = (r["episode_id"], r["segment"])
        per_traj[key] = per_traj.get(key, 0) + 1
    assert max(per_traj.values()) <= 50
    assert '"msg": "drained: trajectories flushed, sink closed"' in proc.logs()


def test_path_hot_reload_in_running_process(models: dict[str, Path], tmp_path: Path) -> None:
    live = tmp_path / "model"
    shutil.copytree(models["onnx"], live)
    out = tmp_path / "out"
    proc = helpers.RuntimeProcess(tmp_path, _config(live, "onnx", out))
    try:
        proc.wait_ready()
        staged = tmp_path / "staged"
        shutil.copytree(models["onnx_v2"], staged)
        old = tmp_path / "old"
        live.rename(old)
        staged.rename(live)
        helpers.wait_for(
            "model version 2",
            lambda: helpers.metric(proc.metrics(), "relayrl_runtime_model_version") == 2,
        )
        assert proc.terminate() == 0, proc.logs()
    finally:
        proc.kill()
    table = pa.concat_tables([pq.read_table(f) for f in out.glob("*.parquet")])
    assert set(table["policy_version"].to_pylist()) == {1, 2}


def test_bad_config_and_corrupt_model_fail_clearly(models: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(models["onnx"], bad)
    (bad / "model.onnx").write_bytes(b"garbage")
    proc = helpers.RuntimeProcess(tmp_path, _config(bad, "onnx", tmp_path / "out"))
    try:
        assert proc.proc.wait(60) == 2
    finally:
        proc.kill()
    assert "not a loadable ONNX model" in proc.logs()


def test_run_limit_stops_by_itself(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = _config(models["onnx"], "onnx", out, limits={"maxEnvSteps": 600})
    proc = helpers.RuntimeProcess(tmp_path, cfg)
    try:
        assert proc.proc.wait(60) == 0, proc.logs()
    finally:
        proc.kill()
    table = pa.concat_tables([pq.read_table(f) for f in out.glob("*.parquet")])
    assert table.num_rows == 600
