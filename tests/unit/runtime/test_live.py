"""The config-file watcher: which changes are applied, which need a restart (no servers)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from relayrl_runtime import config, live, spec

BASE: dict[str, Any] = {
    "agent": "cartpole",
    "actors": 4,
    "actorsPerPod": 2,
    "podIndex": 1,
    "routers": 1,
    "model": {"uri": "/models/cp", "format": "onnx", "version": 1},
    "environment": {"gymnasium": {"id": "CartPole-v1"}},
}


def _write(path: Path, data: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(data))


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[config.RuntimeConfig, config.RuntimeConfig]] = []

    async def __call__(self, old: config.RuntimeConfig, new: config.RuntimeConfig) -> None:
        self.calls.append((old, new))


def _watcher(path: Path, rec: Recorder) -> live.ConfigWatcher:
    return live.ConfigWatcher(path, config.load(path, environ={}), rec, environ={})


async def test_hot_fields_are_applied_and_cold_ones_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "runtime.yaml"
    _write(path, BASE)
    rec = Recorder()
    w = _watcher(path, rec)
    await w.check()
    assert rec.calls == []
    changed = {
        **BASE,
        "actors": 6,
        "actorsPerPod": 3,
        "routers": 2,
        "model": {**BASE["model"], "version": None},
        # retainOnDelete is the operator's alone: no runtime reads it.
        "trajectories": {"maxLength": 10, "nats": {"retainOnDelete": True}},
    }
    _write(path, changed)
    with caplog.at_level(logging.WARNING):
        await w.check()
    ((old, new),) = rec.calls
    assert (old.actors, old.actors_per_pod, old.routers, old.model.version) == (4, 2, 1, 1)
    assert (new.actors, new.actors_per_pod, new.routers, new.model.version) == (6, 3, 2, None)
    assert list(new.actor_slice()) == [3, 4, 5]
    # The cold field is not applied, only reported.
    assert new.trajectories.max_length == old.trajectories.max_length
    assert "need a restart to take effect: trajectories.maxLength\n" in caplog.text
    # The same bytes again: nothing to do.
    await w.check()
    assert len(rec.calls) == 1


async def test_invalid_or_missing_file_keeps_the_running_config(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "runtime.yaml"
    _write(path, BASE)
    rec = Recorder()
    w = _watcher(path, rec)
    _write(path, {**BASE, "routers": 0})
    with caplog.at_level(logging.ERROR):
        await w.check()
    assert "is invalid" in caplog.text
    path.write_text(": not yaml [")
    await w.check()
    _write(path, {**BASE, True: 1})  # a bare `on:` key, read back as True
    await w.check()
    assert "expected text keys" in caplog.text
    os.unlink(path)
    await w.check()  # mid-swap: no file for a moment
    assert rec.calls == []
    _write(path, {**BASE, "routers": 3})
    await w.check()
    assert [new.routers for _, new in rec.calls] == [3]


async def test_kubelet_symlink_swap_is_seen(tmp_path: Path) -> None:
    mount = tmp_path / "config"
    mount.mkdir()
    first, second = mount / "..v1", mount / "..v2"
    first.mkdir()
    second.mkdir()
    _write(first / "runtime.yaml", BASE)
    _write(second / "runtime.yaml", {**BASE, "actors": 8})
    (mount / "..data").symlink_to(first.name)
    path = mount / "runtime.yaml"
    path.symlink_to(Path("..data") / "runtime.yaml")
    rec = Recorder()
    w = _watcher(path, rec)
    tmp_link = mount / "..data_tmp"
    tmp_link.symlink_to(second.name)
    os.replace(tmp_link, mount / "..data")
    await w.check()
    assert [new.actors for _, new in rec.calls] == [8]


class Failing(Recorder):
    """An apply that fails (a slice the env factory cannot make) until told otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = True

    async def __call__(self, old: config.RuntimeConfig, new: config.RuntimeConfig) -> None:
        await super().__call__(old, new)
        if self.fail:
            raise RuntimeError("env factory failed")


async def test_a_failed_apply_is_not_reported_and_is_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(live, "RETRY_SECONDS", 0.0)
    path = tmp_path / "runtime.yaml"
    _write(path, BASE)
    rec = Failing()
    watcher = _watcher(path, rec)
    started = watcher.revision
    assert started == config.revision(path.read_bytes())
    handover = {**BASE, "actorsPerPod": 4, "sliceHandover": True}
    _write(path, handover)
    await watcher.check()
    assert len(rec.calls) == 1
    assert watcher.revision == started  # not applied: the operator keeps waiting
    # A later file that changes only a cold field still carries the failed hot ones.
    _write(path, {**handover, "trajectories": {"maxLength": 60}})
    await watcher.check()
    assert len(rec.calls) == 2
    assert rec.calls[-1][1].slice_handover is True
    assert watcher.revision == started
    # Tried again with the same file (here at once), and counted once it works.
    rec.fail = False
    await watcher.check()
    assert len(rec.calls) == 3
    assert watcher.revision == config.revision(path.read_bytes())
    assert watcher.running.actors_per_pod == 4
    await watcher.check()
    assert len(rec.calls) == 3  # nothing new


async def test_a_version_of_another_model_waits_for_the_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """model.uri and model.version changed together name a version of the new model:
    the process, on the old model until the rolling update replaces it, must not load
    that number from the old one (its steps would carry the new model's version)."""
    path = tmp_path / "runtime.yaml"
    _write(path, BASE)
    rec = Recorder()
    w = _watcher(path, rec)
    _write(
        path, {**BASE, "routers": 2, "model": {**BASE["model"], "uri": "/models/b", "version": 2}}
    )
    with caplog.at_level(logging.WARNING):
        await w.check()
    [(_, applied)] = rec.calls
    assert applied.routers == 2
    assert applied.model.version == 1
    assert applied.model.uri == "/models/cp"
    assert "model.uri, model.version" in caplog.text
    # The version alone, with the model as it runs: applied.
    _write(path, {**BASE, "routers": 2, "model": {**BASE["model"], "version": 3}})
    await w.check()
    assert rec.calls[-1][1].model.version == 3


def test_changed_fields_use_wire_names() -> None:
    a = config.from_mapping(BASE, environ={})
    b = config.from_mapping({**BASE, "actorsPerPod": 5, "server": {"port": 1}}, environ={})
    assert live.changed_fields(a, b) == [("actorsPerPod",), ("server", "port")]


def test_a_bad_pod_index_from_the_environment_names_the_variable() -> None:
    with pytest.raises(spec.InvalidSpecError, match=r"podIndex \(from RELAYRL_POD_INDEX\)"):
        config.from_mapping(BASE, {"RELAYRL_POD_INDEX": "abc"})
    with pytest.raises(spec.InvalidSpecError, match=r"podIndex: "):
        config.from_mapping({**BASE, "podIndex": "abc"}, {})
    assert config.from_mapping(BASE, {"RELAYRL_POD_INDEX": "3"}).pod_index == 3


def test_a_pod_index_label_the_cluster_does_not_set_is_read_from_the_pod_name() -> None:
    """Before Kubernetes 1.28 pods have no pod-index label: the variable the operator
    sets from it is empty, and every pod would run slice 0."""
    env = {"RELAYRL_POD_INDEX": "", "RELAYRL_POD_NAME": "cartpole-actors-2"}
    assert config.from_mapping(BASE, env).pod_index == 2
    # Not set at all (a process started by hand): the file says.
    assert config.from_mapping({**BASE, "podIndex": 1}, {"RELAYRL_POD_NAME": "x-7"}).pod_index == 1
    # Set: it wins over the name.
    env["RELAYRL_POD_INDEX"] = "1"
    assert config.from_mapping(BASE, env).pod_index == 1


def test_a_step_limit_for_remote_clients_is_refused_by_name() -> None:
    remote = {**BASE, "environment": {"remote": {}}}
    with pytest.raises(
        spec.InvalidSpecError,
        match=r"^limits\.maxEnvSteps: expected unset with environment\.remote",
    ):
        config.from_mapping({**remote, "limits": {"maxEnvSteps": 100}}, {})
    assert config.from_mapping({**remote, "limits": {"maxSeconds": 5}}, {}).limits.max_seconds == 5
    assert config.from_mapping({**BASE, "limits": {"maxEnvSteps": 100}}, {})


@pytest.mark.parametrize("value", [1e10, float("inf"), float("nan"), 0])
def test_a_drain_time_past_an_hour_or_not_a_time_is_refused_by_name(value: float) -> None:
    """1e10 s once made the drain's watchdog raise before anything was flushed."""
    with pytest.raises(spec.InvalidSpecError, match=r"^drainSeconds: "):
        config.from_mapping({**BASE, "drainSeconds": value}, {})
    assert config.from_mapping({**BASE, "drainSeconds": 3600}, {}).drain_seconds == 3600


def _pod(cfg: dict[str, Any]) -> dict[str, str]:
    return {config.ENV_POD_CONFIG: json.dumps(config.cold_fields(config.from_mapping(cfg, {})))}


def _run(file: dict[str, Any], env: dict[str, str]) -> config.RuntimeConfig:
    return config.parse_as_run(yaml.safe_dump(file), "runtime.yaml", env)


def test_a_pod_runs_its_templates_cold_fields_and_the_files_hot_ones() -> None:
    template = {**BASE, "environment": {"gymnasium": {"id": "CartPole-v1", "envsPerActor": 2}}}
    model = {**BASE["model"], "version": 4}
    file = {**BASE, "actors": 6, "actorsPerPod": 3, "routers": 2, "model": model}
    env = {**_pod(template), config.ENV_POD_INDEX: "1"}
    got = _run(file, env)
    assert got.environment.gymnasium is not None
    assert got.environment.gymnasium.envs_per_actor == 2
    assert (got.actors, got.actors_per_pod, got.routers, got.pod_index) == (6, 3, 2, 1)
    assert got.model.version == 4
    assert list(got.actor_slice()) == [3, 4, 5]
    # The file's model run another way (mode): still the pod's model, version and all.
    got = _run({**file, "model": {**model, "mode": "independent"}}, env)
    assert (got.model.mode, got.model.version) == (spec.ModelMode.SHARED, 4)
    # A file of another model: its version is not one of the pod's model.
    got = _run({**file, "model": {**model, "uri": "/models/b"}}, env)
    assert (got.model.uri, got.model.version) == ("/models/cp", None)
    # No pod config (a process started by hand): the file as it is.
    assert _run(file, {}).environment.gymnasium.envs_per_actor == 1  # type: ignore[union-attr]


def test_a_pod_reads_only_the_hot_fields_of_a_file_a_newer_operator_wrote() -> None:
    """An operator upgrade renders fields an older runtime does not know: a pod of the
    old template still starts, and still takes the file's hot fields."""
    file = {**BASE, "routers": 3, "newField": {"x": 1}, "environment": {"newKind": {}}}
    with pytest.raises(spec.InvalidSpecError, match="newField"):
        _run(file, {})
    got = _run(file, _pod(BASE))
    assert got.routers == 3
    assert got.environment.gymnasium is not None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{", r"RELAYRL_POD_CONFIG: not valid JSON"),
        ("[1]", r"RELAYRL_POD_CONFIG: expected a JSON object"),
        (
            json.dumps({**config.cold_fields(config.from_mapping(BASE, {})), "drainSeconds": 0}),
            r"drainSeconds \(from RELAYRL_POD_CONFIG\): ",
        ),
    ],
    ids=["not-json", "not-an-object", "bad-field"],
)
def test_a_bad_pod_config_names_the_variable(value: str, message: str) -> None:
    with pytest.raises(spec.InvalidSpecError, match=message):
        _run(BASE, {config.ENV_POD_CONFIG: value})
    # A bad hot field is the file's.
    with pytest.raises(spec.InvalidSpecError, match=r"^routers: "):
        _run({**BASE, "routers": 0}, _pod(BASE))


async def test_a_pod_with_its_own_fields_is_not_told_of_the_files_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "runtime.yaml"
    newer = {**BASE, "environment": {"gymnasium": {"id": "CartPole-v1", "envsPerActor": 3}}}
    _write(path, newer)
    env = _pod(BASE)
    rec = Recorder()
    w = live.ConfigWatcher(path, config.parse_as_run(path.read_bytes(), "f", env), rec, environ=env)
    _write(path, {**newer, "routers": 2})
    with caplog.at_level(logging.WARNING):
        await w.check()
    [(_, applied)] = rec.calls
    assert applied.routers == 2
    assert applied.environment.gymnasium.envs_per_actor == 1  # type: ignore[union-attr]
    assert "need a restart" not in caplog.text


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"agent": "Cart Pole"}, r"^agent: expected lower-case letters.*\(got 'Cart Pole'\)"),
        ({"namespace": ""}, r"^namespace: String should have at least 1 character"),
        ({"namespace": "a b/c"}, r"^namespace: expected lower-case letters"),
        ({"policy": {"seed": -5}}, r"^policy.seed: Input should be greater than or equal to 0"),
        ({"localSink": {"path": ""}}, r"^localSink.path: String should have at least 1"),
        (
            {"model": {**BASE["model"], "version": 1 << 53}},
            r"^model.version: Input should be less than or equal to 9007199254740991",
        ),
    ],
)
def test_values_that_would_fail_later_are_refused_by_field(
    patch: dict[str, Any], message: str
) -> None:
    with pytest.raises(spec.InvalidSpecError, match=message):
        config.parse(yaml.safe_dump({**BASE, **patch}), "f", {})
