"""Live config, bind address: a real runtime process whose mounted config file changes."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from integration.runtime import helpers

from relayrl_runtime import config
from relayrl_runtime.transport import client


def _config(model: Path, out: Path, **extra: Any) -> dict[str, Any]:
    return {
        "agent": "cartpole",
        "actors": 4,
        "actorsPerPod": 2,
        "podIndex": 1,
        "routers": 1,
        "model": {"uri": str(model), "format": "onnx", "version": 1},
        "environment": {"gymnasium": {"id": "CartPole-v1", "envsPerActor": 2}},
        "trajectories": {"maxLength": 50},
        "localSink": {"path": str(out)},
        "reload": {"pollSeconds": 0.2},
        **extra,
    }


def _steps(proc: helpers.RuntimeProcess) -> float:
    return helpers.metric(proc.metrics(), "relayrl_runtime_env_steps_total")


def test_config_file_changes_apply_without_restart(models: dict[str, Path], tmp_path: Path) -> None:
    live = tmp_path / "model"
    shutil.copytree(models["onnx"], live)
    out = tmp_path / "out"
    cfg = _config(live, out)
    proc = helpers.RuntimeProcess(tmp_path, cfg, mounted=True)
    try:
        proc.wait_ready()
        # Pod 1 of 2 actors per pod runs global actors 2 and 3: ids 4..7 (2 envs each).
        assert helpers.metric(proc.metrics(), "relayrl_runtime_actors") == 4
        helpers.wait_for("env steps", lambda: _steps(proc) > 100)
        pid = proc.proc.pid

        # Scale: 6 actors, 3 per pod -> this pod runs global actors 3, 4, 5 (ids 6..11);
        # actor 2 (ids 4, 5) goes away; 3 routers.
        cfg = {**cfg, "actors": 6, "actorsPerPod": 3, "routers": 3}
        proc.update_config(cfg)
        helpers.wait_for(
            "6 actors and 3 routers",
            lambda: (
                helpers.metric(proc.metrics(), "relayrl_runtime_actors") == 6
                and helpers.metric(proc.metrics(), "relayrl_runtime_routers") == 3
            ),
        )
        before = _steps(proc)
        helpers.wait_for("env steps after the resize", lambda: _steps(proc) > before + 100)

        # A cold field: logged as needing a restart, nothing else happens.
        cfg = {**cfg, "trajectories": {"maxLength": 60}}
        proc.update_config(cfg)
        helpers.wait_for(
            "restart warning",
            lambda: "need a restart to take effect: trajectories.maxLength" in proc.logs(),
        )

        # A pinned version ignores a newer model in the path until the pin moves.
        staged = tmp_path / "staged"
        shutil.copytree(models["onnx_v2"], staged)
        live.rename(tmp_path / "old")
        staged.rename(live)
        helpers.wait_for(
            "pinned-version warning", lambda: "model.version 1 is pinned" in proc.logs()
        )
        assert helpers.metric(proc.metrics(), "relayrl_runtime_model_version") == 1
        cfg = {**cfg, "model": {**cfg["model"], "version": 2}}
        proc.update_config(cfg)
        helpers.wait_for_model(proc, 2)
        before = _steps(proc)
        helpers.wait_for("env steps with version 2", lambda: _steps(proc) > before + 100)
        assert proc.proc.pid == pid
        assert proc.proc.poll() is None
        assert proc.terminate() == 0, proc.logs()
    finally:
        proc.kill()
    logs = proc.logs()
    assert "routers scaled to 3" in logs
    assert "actors: now running global actors [3, 4, 5]" in logs
    table = helpers.written(out)
    # Every step taken was written, by the ids of the global actors (stable across the
    # resize: actor a's copies are ids 2a and 2a+1).
    assert table.num_rows == helpers.logged(logs, "env_steps")
    assert set(table["actor_id"].to_pylist()) == set(range(4, 12))
    assert set(table["policy_version"].to_pylist()) == {1, 2}
    trajectories = helpers.trajectories(table)
    for rows in trajectories.values():
        assert rows[-1]["terminated"] or rows[-1]["truncated"]
    # The removed actor's copies stopped at the resize: their last trajectory was cut.
    for actor_id in (4, 5):
        mine = [t for t in trajectories.values() if t[0]["actor_id"] == actor_id]
        last = max(mine, key=lambda t: t[-1]["action_time"])
        assert last[-1]["cut"] or last[-1]["terminated"]
        assert all(r["policy_version"] == 1 for t in mine for r in t)


def test_a_slice_handover_gives_actors_up_and_takes_none_until_cleared(
    models: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    # Pod 0 of 2 actors per pod: global actors 0 and 1.
    cfg = _config(models["onnx"], out, podIndex=0)
    proc = helpers.RuntimeProcess(tmp_path, cfg, mounted=True)

    def running(actors: list[int]) -> bool:
        return f"now running global actors {actors}" in proc.logs()

    try:
        proc.wait_ready()
        assert helpers.metric(proc.metrics(), "relayrl_runtime_actors") == 4
        # 1 per pod, handing over: its new slice is actor 0, which it runs: it gives up 1.
        proc.update_config({**cfg, "actorsPerPod": 1, "sliceHandover": True})
        helpers.wait_for("actor 1 given up", lambda: running([0]))
        # 4 per pod, still handing over: actors 1-3 may run elsewhere; it takes none.
        proc.update_config({**cfg, "actorsPerPod": 4, "sliceHandover": True})
        helpers.wait_for(
            "the handover config applied",
            lambda: proc.logs().count("applying") >= 2,
        )
        before = _steps(proc)
        helpers.wait_for("env steps", lambda: _steps(proc) > before + 100)
        assert helpers.metric(proc.metrics(), "relayrl_runtime_actors") == 2
        # Cleared: it takes its whole slice.
        proc.update_config({**cfg, "actorsPerPod": 4})
        helpers.wait_for("actors 0-3", lambda: running([0, 1, 2, 3]))
        assert helpers.metric(proc.metrics(), "relayrl_runtime_actors") == 8
        assert proc.terminate() == 0, proc.logs()
    finally:
        proc.kill()
    table = helpers.written(out)
    assert set(table["actor_id"].to_pylist()) == set(range(8))

    # A process that starts during a handover runs nothing until it is cleared.
    cfg = _config(models["onnx"], tmp_path / "out2", podIndex=1, sliceHandover=True)
    (tmp_path / "second").mkdir()
    second = helpers.RuntimeProcess(tmp_path / "second", cfg, mounted=True)
    try:
        second.wait_ready()
        assert helpers.metric(second.metrics(), "relayrl_runtime_actors") == 0
        second.update_config({**cfg, "sliceHandover": None})
        helpers.wait_for("actors 2-3", lambda: "now running global actors [2, 3]" in second.logs())
        assert second.terminate() == 0, second.logs()
    finally:
        second.kill()


@pytest.mark.parametrize("newer_operator", [False, True], ids=["same-runtime", "newer-fields"])
def test_a_pod_of_an_older_template_keeps_its_settings_when_it_restarts(
    models: dict[str, Path], tmp_path: Path, newer_operator: bool
) -> None:
    """During a rolling update the mounted file already holds the new config; a pod of
    the old template that restarts runs its template's cold fields (here the sink path
    and envs per actor) and the file's hot ones (actors, routers). With `newer_operator`
    the file also holds a field this runtime does not know (an operator upgrade)."""
    out_old, out_new = tmp_path / "old", tmp_path / "new"
    old = _config(models["onnx"], out_old)
    new = {
        **_config(models["onnx"], out_new),
        "actors": 6,
        "actorsPerPod": 3,
        "routers": 2,
        "environment": {"gymnasium": {"id": "CartPole-v1", "envsPerActor": 3}},
        **({"newField": {"x": 1}} if newer_operator else {}),
    }
    proc = helpers.RuntimeProcess(tmp_path, new, mounted=True, template=old)
    try:
        proc.wait_ready()
        # Pod 1 of 3 actors per pod: global actors 3, 4 and 5, with 2 envs each (not 3).
        text = proc.metrics()
        assert helpers.metric(text, "relayrl_runtime_actors") == 6
        assert helpers.metric(text, "relayrl_runtime_routers") == 2
        if newer_operator:
            assert "this runtime cannot read all of it (newField: unknown field" in proc.logs()
        else:
            assert (
                "differs from this pod's template in environment.gymnasium.envsPerActor,"
                " localSink.path" in proc.logs()
            )
        helpers.wait_for("env steps", lambda: _steps(proc) > 100)
        assert proc.terminate() == 0, proc.logs()
    finally:
        proc.kill()
    assert helpers.written(out_old).num_rows > 0
    assert not out_new.exists()


def test_invalid_config_change_is_ignored(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = _config(models["onnx"], out)
    proc = helpers.RuntimeProcess(tmp_path, cfg, mounted=True)
    try:
        proc.wait_ready()
        proc.update_config({**cfg, "routers": 0})
        helpers.wait_for("invalid config error", lambda: "is invalid" in proc.logs())
        proc.update_config({**cfg, "routers": 2})
        helpers.wait_for(
            "2 routers", lambda: helpers.metric(proc.metrics(), "relayrl_runtime_routers") == 2
        )
        assert proc.terminate() == 0, proc.logs()
    finally:
        proc.kill()


@pytest.mark.parametrize(
    ("address", "reached_at"),
    [
        ("127.0.0.2", ["127.0.0.2"]),
        ("::1", ["[::1]"]),
        # What the operator passes by default: `kubectl port-forward` connects to
        # localhost inside the pod, so that must answer too (IPv4 and IPv6 for "::").
        ("0.0.0.0", ["127.0.0.1"]),
        ("::", ["[::1]", "127.0.0.1"]),
    ],
    ids=["ipv4", "ipv6", "ipv4-any", "ipv6-any"],
)
def test_bind_address_from_environment(
    models: dict[str, Path], tmp_path: Path, address: str, reached_at: list[str]
) -> None:
    """The address the operator passes moves both servers: a pod IP (IPv6 too, as in an
    IPv6 cluster) or every address of a family."""
    zport = helpers.free_port()
    cfg = {
        "agent": "remote",
        "actors": 0,
        "model": {"uri": str(models["onnx"]), "format": "onnx"},
        "environment": {"remote": {"port": zport}},
        "localSink": {"path": str(tmp_path / "out")},
    }
    # server.host is 127.0.0.1 in the config; the environment moves both servers.
    proc = helpers.RuntimeProcess(
        tmp_path, cfg, env={config.ENV_BIND_ADDRESS: address}, host=reached_at[0]
    )
    try:
        proc.wait_ready()
        if "127.0.0.1" not in reached_at:
            # Nothing listens on the config's host: the connection is refused.
            assert helpers.http_get(proc.port, "/healthz", "127.0.0.1")[0] == 0
        for host in reached_at:
            assert helpers.http_get(proc.port, "/healthz", host)[0] == 200, host
            with client.RemoteClient(f"tcp://{host}:{zport}", timeout=30) as c:
                ids = c.new_actors(1)
                result = c.request_action(ids, np.zeros((1, 4), np.float32))
                assert result.version == 1
                c.remove_actors(ids)
        assert proc.terminate() == 0, proc.logs()
    finally:
        proc.kill()


def test_bind_host_prefers_the_environment() -> None:
    cfg = config.from_mapping(
        {
            "agent": "a",
            "actors": 1,
            "model": {"uri": "/m", "format": "onnx"},
            "environment": {"gymnasium": {"id": "CartPole-v1"}},
            "server": {"host": "0.0.0.0"},
        },
        environ={},
    )
    assert config.bind_host(cfg, {}) == "0.0.0.0"
    assert config.bind_host(cfg, {config.ENV_BIND_ADDRESS: "127.0.0.7"}) == "127.0.0.7"
    assert config.bind_host(cfg, {config.ENV_BIND_ADDRESS: " "}) == "0.0.0.0"


def test_a_pinned_version_the_path_does_not_hold_is_waited_for(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """The path moved on while the pod was down (a trainer publishing there): a pod
    restarted with the old pin waits, not ready and saying why, instead of exiting
    into a crash loop; a new pin starts it. Its model cache, one per pod under TMPDIR,
    is emptied of what a killed process before it left, and removed at exit."""
    live = tmp_path / "model"
    shutil.copytree(models["onnx_v2"], live)
    tmp = tmp_path / "podtmp"
    left = tmp / "relayrl-models-default-cartpole-1" / "cp-v1-left-by-a-killed-process"
    left.mkdir(parents=True)
    cfg = _config(live, tmp_path / "out")
    proc = helpers.RuntimeProcess(tmp_path, cfg, mounted=True, env={"TMPDIR": str(tmp)})
    try:
        proc.wait_waiting("model.version 1 is pinned")
        assert not left.exists()
        proc.update_config({**cfg, "model": {**cfg["model"], "version": 2}})
        proc.wait_ready(timeout=90)
        assert helpers.metric(proc.metrics(), "relayrl_runtime_model_version") == 2
        assert proc.terminate() == 0, proc.logs()
    finally:
        proc.kill()
    assert list(tmp.glob("relayrl-models-*")) == []
