"""The runtime process end to end: real subprocess, real models, SIGTERM drain."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from integration.runtime import helpers

from relayrl_runtime import spec
from relayrl_runtime.inference import export


def _point(link: Path, target: Path) -> None:
    """Point the model link at `target` in one step, as a trainer publishes."""
    tmp = link.with_name(link.name + ".tmp")
    tmp.symlink_to(target)
    tmp.replace(link)


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
    # The drain flushed every recorded step: the files hold exactly the steps the driver
    # took. (An actor whose episode ended on the very last step has nothing in progress,
    # so not every actor necessarily gets a drain-cut trajectory.)
    assert table.num_rows == helpers.logged(proc.logs(), "env_steps"), proc.logs()
    trajectories = helpers.trajectories(table)
    assert max(len(t) for t in trajectories.values()) <= 50
    for rows in trajectories.values():
        first = rows[0]["step"]
        assert [r["step"] for r in rows] == list(range(first, first + len(rows)))
        # Only the last row of a trajectory carries an end flag, and it always does.
        assert all(not (r["terminated"] or r["truncated"]) for r in rows[:-1])
        last = rows[-1]
        assert last["terminated"] or last["truncated"]
        assert not (last["cut"] and last["terminated"])
        assert last["truncated"] or not last["cut"]
    assert '"msg": "drained: trajectories flushed, sink closed"' in proc.logs()


def test_path_hot_reload_in_running_process(models: dict[str, Path], tmp_path: Path) -> None:
    live = tmp_path / "model"
    shutil.copytree(models["onnx"], live)
    out = tmp_path / "out"
    proc = helpers.RuntimeProcess(tmp_path, _config(live, "onnx", out))
    try:
        proc.wait_ready()
        # Version 1 must have answered some steps before the swap.
        helpers.wait_for(
            "env steps",
            lambda: helpers.metric(proc.metrics(), "relayrl_runtime_env_steps_total") > 0,
        )
        staged = tmp_path / "staged"
        shutil.copytree(models["onnx_v2"], staged)
        old = tmp_path / "old"
        live.rename(old)
        staged.rename(live)
        helpers.wait_for_model(proc, 2)
        assert proc.terminate() == 0, proc.logs()
    finally:
        proc.kill()
    table = helpers.written(out)
    assert set(table["policy_version"].to_pylist()) == {1, 2}


def test_a_version_that_fails_at_run_time_gives_way_to_the_one_before(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """Version 2 passes the load check (1 and 3 rows) and fails on the process's
    batches of 6: the process goes back to version 1 and keeps it, loses no step, and
    takes a good version 3 later."""
    live = tmp_path / "model"
    live.symlink_to(models["onnx"])
    out = tmp_path / "out"
    proc = helpers.RuntimeProcess(tmp_path, _config(live, "onnx", out))
    try:
        proc.wait_ready()
        _point(live, models["onnx_v2_failing"])
        helpers.wait_for(
            "the replacement",
            lambda: 'model_reloads_total{result="rolled_back"} 1.0' in proc.metrics(),
        )
        steps = helpers.metric(proc.metrics(), "relayrl_runtime_env_steps_total")
        helpers.wait_for(
            "more steps",
            lambda: helpers.metric(proc.metrics(), "relayrl_runtime_env_steps_total") > steps + 500,
        )
        text = proc.metrics()
        assert helpers.metric(text, "relayrl_runtime_model_version") == 1
        assert 'model_reloads_total{result="ok"} 1.0' in text  # version 2, once
        assert helpers.http_get(proc.port, "/readyz")[0] == 200
        v3 = tmp_path / "v3"
        export.export_mlp(v3, spec.ModelFormat.ONNX, seed=2, version=3)
        _point(live, v3)
        helpers.wait_for_model(proc, 3)
        assert proc.terminate() == 0, proc.logs()
    finally:
        proc.kill()
    logs = proc.logs()
    assert "model version 2 failed at run time, so the agent went back to version 1" in logs
    assert "the forward pass of 6 rows failed" in logs
    table = helpers.written(out)
    assert set(table["policy_version"].to_pylist()) == {1, 3}
    assert table.num_rows == helpers.logged(logs, "env_steps"), logs


def test_a_process_that_starts_on_a_failing_version_waits_for_another(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """Version 2 passes the load check and fails on the process's batches of 6, and the
    process started on it: there is nothing to go back to. It does not exit (a crash
    loop would start it on version 2 again): its steps wait, and go on when the path
    holds version 3. Nothing is recorded twice or lost."""
    live = tmp_path / "model"
    live.symlink_to(models["onnx_v2_failing"])
    out = tmp_path / "out"
    proc = helpers.RuntimeProcess(tmp_path, _config(live, "onnx", out))
    try:
        proc.wait_ready()
        helpers.wait_for(
            "the refused request",
            lambda: 'request_errors_total{kind="model_run"} 1.0' in proc.metrics(),
        )
        time.sleep(1.0)  # several polls of the path: nothing else happens
        text = proc.metrics()
        assert proc.proc.poll() is None, proc.logs()
        assert helpers.metric(text, "relayrl_runtime_env_steps_total") == 0
        assert helpers.metric(text, "relayrl_runtime_model_version") == 2
        assert 'request_errors_total{kind="model_run"} 1.0' in text  # asked once
        v3 = tmp_path / "v3"
        export.export_mlp(v3, spec.ModelFormat.ONNX, seed=2, version=3)
        _point(live, v3)
        helpers.wait_for_model(proc, 3)
        helpers.wait_for(
            "steps on version 3",
            lambda: helpers.metric(proc.metrics(), "relayrl_runtime_env_steps_total") > 500,
        )
        assert proc.terminate() == 0, proc.logs()
    finally:
        proc.kill()
    logs = proc.logs()
    assert "model version 2 failed at run time, with no version before it" in logs
    table = helpers.written(out)
    assert set(table["policy_version"].to_pylist()) == {3}
    assert table.num_rows == helpers.logged(logs, "env_steps"), logs


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

    # An env whose constructor refuses its kwargs is a bad config too (exit 2), named.
    env = {"gymnasium": {"id": "CartPole-v1", "kwargs": {"no_such_option": 1}}}
    cfg = _config(models["onnx"], "onnx", tmp_path / "out2", environment=env)
    (tmp_path / "env").mkdir()
    proc = helpers.RuntimeProcess(tmp_path / "env", cfg)
    try:
        assert proc.proc.wait(60) == 2, proc.logs()
    finally:
        proc.kill()
    assert "environment.gymnasium: the environment could not be made: TypeError" in proc.logs()


def test_run_limit_stops_by_itself(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = _config(models["onnx"], "onnx", out, limits={"maxEnvSteps": 600})
    proc = helpers.RuntimeProcess(tmp_path, cfg)
    try:
        assert proc.proc.wait(60) == 0, proc.logs()
    finally:
        proc.kill()
    table = helpers.written(out)
    assert table.num_rows == 600


_STUCK_ENV = '''
import threading

import numpy as np


class StuckEnv:
    """CartPole-shaped env whose step never returns after `steps` steps."""

    def __init__(self, steps):
        self.left = steps

    def reset(self, seed=None, options=None):
        return np.zeros(4, dtype=np.float32), {}

    def step(self, action):
        if self.left == 0:
            threading.Event().wait()
        self.left -= 1
        return np.zeros(4, dtype=np.float32), 1.0, False, False, {}
'''


def test_drain_that_overruns_exits_3_and_keeps_what_was_recorded(
    models: dict[str, Path], tmp_path: Path
) -> None:
    (tmp_path / "stuck_env.py").write_text(_STUCK_ENV)
    out = tmp_path / "out"
    cfg = _config(models["onnx"], "onnx", out, drainSeconds=6)
    cfg["actors"] = 2
    cfg["environment"] = {
        "python": {"entryPoint": "stuck_env:StuckEnv", "envsPerActor": 1, "kwargs": {"steps": 120}}
    }
    proc = helpers.RuntimeProcess(tmp_path, cfg, env={"PYTHONPATH": str(tmp_path)})
    try:
        proc.wait_ready()
        helpers.wait_for(
            "the env to get stuck",
            lambda: helpers.metric(proc.metrics(), "relayrl_runtime_env_steps_total") == 240,
        )
        # SIGUSR1 shows where a live process is: here, the driver inside the env's step.
        proc.proc.send_signal(signal.SIGUSR1)
        helpers.wait_for("a stack dump", lambda: 'stuck_env.py", line' in proc.logs())
        assert helpers.http_get(proc.port, "/healthz")[0] == 200
        started = time.monotonic()
        code = proc.terminate()
        took = time.monotonic() - started
    finally:
        proc.kill()
    logs = proc.logs()
    assert code == 3, logs
    # The driver had half of drainSeconds to stop; its stuck thread does not hold the exit.
    assert took < 6 + 8, (took, logs)
    assert "drain did not finish in 6s: the environment driver did not stop in time" in logs
    assert "shutdown did not finish" not in logs  # the watchdog was not needed
    # Nothing recorded is lost: 120 steps per actor completed, plus the action each
    # actor was given for the step that never returned.
    table = helpers.written(out)
    assert table.num_rows == 2 * 121, logs
    assert '"msg": "drained: trajectories flushed, sink closed"' in logs


def test_a_hung_env_fails_the_liveness_probe(models: dict[str, Path], tmp_path: Path) -> None:
    """A step that never returns: /healthz (the pod's liveness probe) fails once it has
    run for limits.envCallSeconds, so the kubelet restarts the pod."""
    (tmp_path / "stuck_env.py").write_text(_STUCK_ENV)
    cfg = _config(models["onnx"], "onnx", tmp_path / "out", drainSeconds=4)
    cfg["limits"] = {"envCallSeconds": 1}
    cfg["environment"] = {
        "python": {"entryPoint": "stuck_env:StuckEnv", "envsPerActor": 1, "kwargs": {"steps": 50}}
    }
    proc = helpers.RuntimeProcess(tmp_path, cfg, env={"PYTHONPATH": str(tmp_path)})
    try:
        proc.wait_ready()
        helpers.wait_for(
            "the probe to fail", lambda: helpers.http_get(proc.port, "/healthz")[0] == 503
        )
        body = helpers.http_get(proc.port, "/healthz")[1]
        assert "has not returned for" in body, body
        assert "limits.envCallSeconds: 1" in body, body
        assert proc.terminate() == 3
    finally:
        proc.kill()


_RAISING_ENV = """
import numpy as np


class RaisingEnv:
    def __init__(self, steps, reward=1.0):
        self.left, self.reward = steps, reward

    def reset(self, seed=None, options=None):
        return np.zeros(4, dtype=np.float32), {}

    def step(self, action):
        if self.left == 0:
            raise KeyError("the simulator lost its state")
        self.left -= 1
        return np.zeros(4, dtype=np.float32), self.reward, False, False, {}
"""


@pytest.mark.parametrize(
    ("kwargs", "said"),
    [
        ({"steps": 20}, "step: KeyError: 'the simulator lost its state'"),
        ({"steps": 20, "reward": "x"}, "step: reward: expected a number, got str 'x'"),
    ],
)
def test_an_env_that_raises_ends_the_run_with_exit_2_naming_it(
    models: dict[str, Path], tmp_path: Path, kwargs: dict[str, object], said: str
) -> None:
    (tmp_path / "raising_env.py").write_text(_RAISING_ENV)
    cfg = _config(models["onnx"], "onnx", tmp_path / "out")
    cfg["environment"] = {"python": {"entryPoint": "raising_env:RaisingEnv", "kwargs": kwargs}}
    proc = helpers.RuntimeProcess(tmp_path, cfg, env={"PYTHONPATH": str(tmp_path)})
    try:
        assert proc.proc.wait(60) == 2, proc.logs()
    finally:
        proc.kill()
    assert f"environment.python 'raising_env:RaisingEnv': {said}" in proc.logs()


def test_sigterm_while_starting_is_heeded(models: dict[str, Path], tmp_path: Path) -> None:
    # The model comes from a registry whose NATS is not there: start-up would keep
    # trying to connect for a minute. SIGTERM ends it at once, cleanly.
    url = f"nats://127.0.0.1:{helpers.free_port()}"
    cfg = _config(models["onnx"], "onnx", tmp_path / "out")
    cfg["model"] = {"uri": "objectstore://models/cp", "format": "onnx"}
    cfg["trajectories"] = {"nats": {"url": url}}
    proc = helpers.RuntimeProcess(tmp_path, cfg)
    try:
        helpers.wait_for("the HTTP server", lambda: helpers.http_get(proc.port, "/healthz")[0])
        assert helpers.http_get(proc.port, "/readyz")[0] == 503
        started = time.monotonic()
        code = proc.terminate(timeout=30)
        took = time.monotonic() - started
    finally:
        proc.kill()
    logs = proc.logs()
    assert code == 0, logs
    assert took < 10, (took, logs)
    assert '"msg": "stopped while starting"' in logs
    assert "agent cartpole ready" not in logs
