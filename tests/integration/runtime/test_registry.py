"""The model registry on a real nats-server (JetStream object store) and hot reload from it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from integration.runtime import helpers

from support import natsserver


def _cli(*args: str) -> str:
    done = subprocess.run(
        [str(helpers.RUNTIME), *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_push_list_and_hot_reload_from_registry(
    nats_server: natsserver.NatsServer, models: dict[str, Path], tmp_path: Path
) -> None:
    url = nats_server.url
    out = _cli(
        "model", "push", "--nats", url, "--bucket", "models", "--name", "cp", str(models["onnx"])
    )
    assert "version 1" in out
    cfg = {
        "agent": "cartpole",
        "actors": 2,
        "model": {"uri": "objectstore://models/cp", "format": "onnx"},
        "environment": {"gymnasium": {"id": "CartPole-v1"}},
        "trajectories": {"nats": {"url": url}},
        "localSink": {"path": str(tmp_path / "out")},
        "reload": {"pollSeconds": 0.2},
    }
    proc = helpers.RuntimeProcess(tmp_path, cfg)
    try:
        proc.wait_ready()
        assert helpers.metric(proc.metrics(), "relayrl_runtime_model_version") == 1
        _cli(
            "model",
            "push",
            "--nats",
            url,
            "--bucket",
            "models",
            "--name",
            "cp",
            str(models["onnx_v2"]),
        )
        helpers.wait_for(
            "model version 2",
            lambda: helpers.metric(proc.metrics(), "relayrl_runtime_model_version") == 2,
        )
        helpers.wait_for(
            "steps with version 2",
            lambda: helpers.metric(proc.metrics(), "relayrl_runtime_env_steps_total") > 1000,
        )
        assert proc.terminate() == 0, proc.logs()
    finally:
        proc.kill()
    listing = _cli("model", "list", "--nats", url, "--bucket", "models")
    keys = [line.split("\t")[0] for line in listing.splitlines()]
    assert keys == ["cp", "cp@v1", "cp@v2"]
    assert "version=2" in listing.splitlines()[0]
    table = pa.concat_tables([pq.read_table(f) for f in (tmp_path / "out").glob("*.parquet")])
    assert set(table["policy_version"].to_pylist()) == {1, 2}


def test_pinned_version_and_missing_model(
    nats_server: natsserver.NatsServer, models: dict[str, Path], tmp_path: Path
) -> None:
    url = nats_server.url
    for m in ("onnx", "onnx_v2"):
        _cli("model", "push", "--nats", url, "--bucket", "models", "--name", "cp", str(models[m]))
    cfg = {
        "agent": "pinned",
        "actors": 1,
        "model": {"uri": "objectstore://models/cp", "format": "onnx", "version": 1},
        "environment": {"gymnasium": {"id": "CartPole-v1"}},
        "trajectories": {"nats": {"url": url}},
        "localSink": {"path": str(tmp_path / "out")},
    }
    proc = helpers.RuntimeProcess(tmp_path, cfg)
    try:
        proc.wait_ready()
        assert helpers.metric(proc.metrics(), "relayrl_runtime_model_version") == 1
        assert proc.terminate() == 0
    finally:
        proc.kill()
    missing = tmp_path / "missing"
    missing.mkdir()
    cfg["model"] = {"uri": "objectstore://models/nope", "format": "onnx"}
    proc = helpers.RuntimeProcess(missing, cfg)
    try:
        assert proc.proc.wait(60) == 2
    finally:
        proc.kill()
    assert "no object 'nope' in bucket 'models'" in proc.logs()


def test_registry_commands_fail_clearly_and_in_time(models: dict[str, Path]) -> None:
    # Nothing listens on this port: the command must give up, not retry forever.
    unreachable = f"nats://127.0.0.1:{helpers.free_port()}"
    cases = [
        (["push", str(models["onnx"]), "--nats", "nats://nats:42x2"], "nats URL: expected"),
        (["push", "/nonexistent-model", "--nats", unreachable], "relayrl-model.json"),
        (["push", str(models["onnx"]), "--nats", unreachable], "not reachable within 2.0s"),
        (["list", "--nats", unreachable], "not reachable within 2.0s"),
    ]
    for args, message in cases:
        done = subprocess.run(
            [str(helpers.RUNTIME), "model", *args, "--bucket", "models", "--connect-timeout", "2"]
            + (["--name", "cp"] if args[0] == "push" else []),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr, done.stderr
