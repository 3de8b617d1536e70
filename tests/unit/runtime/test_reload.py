"""The path watcher over real models (no servers)."""

from __future__ import annotations

import asyncio
import contextlib
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from relayrl_runtime import agent as agent_mod
from relayrl_runtime import errors, registry, reload, spec
from relayrl_runtime.inference import export, model
from support import badmodels


def test_a_pinned_path_never_loads_another_version(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The directory is replaced between the watcher's look at its metadata (the pinned
    version 3) and the load (version 2 by then): the pin holds, the model stays."""
    agent = agent_mod.Agent(models["onnx"], actor_count=1)
    try:
        watcher = reload.PathWatcher(agent, models["onnx_v2"], poll_seconds=60, version=3)
        real = model.read_metadata(models["onnx_v2"])
        # What the watcher reads; the loader reads the directory as it is.
        seen = types.SimpleNamespace(
            METADATA_FILE=model.METADATA_FILE,
            read_metadata=lambda path: real.model_copy(update={"version": 3}),
        )
        monkeypatch.setattr(reload, "model", seen)
        asyncio.run(watcher.check())
        assert agent.get_model_version() == 1
        assert watcher.refused is not None
        assert "version: expected 3, got 2" in watcher.refused.reason
    finally:
        agent.shutdown()


def _link(path: Path, target: Path) -> None:
    """Point `path` at `target` in one step, as a trainer publishes (ln -s + mv -T)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.symlink_to(target)
    tmp.replace(path)


def _poll_until(watcher: reload.PathWatcher, done: Callable[[], bool]) -> None:
    async def main() -> None:
        task = asyncio.create_task(watcher.run())
        try:
            for _ in range(200):
                if done():
                    return
                await asyncio.sleep(0.02)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(main())


def test_a_version_published_while_the_agent_loads_is_taken(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """The path moves to version 2 after the agent loaded version 1 and before the
    watcher starts (a pod starting while its trainer publishes): the first poll sees it."""
    live = tmp_path / "model"
    _link(live, models["onnx"])
    agent = agent_mod.Agent(live, actor_count=1)
    try:
        _link(live, models["onnx_v2"])
        watcher = reload.PathWatcher(agent, live, poll_seconds=0.02)
        _poll_until(watcher, lambda: agent.get_model_version() == 2)
        assert agent.get_model_version() == 2
        assert watcher.refused is None
    finally:
        agent.shutdown()


def test_a_pin_is_reported_missing_or_met_by_what_runs(
    models: dict[str, Path], tmp_path: Path
) -> None:
    live = tmp_path / "model"
    _link(live, models["onnx"])
    agent = agent_mod.Agent(live, actor_count=1)
    try:
        watcher = reload.PathWatcher(agent, live, poll_seconds=60)
        # Pinned to 2 while the path holds the running 1: version 2 is missing.
        asyncio.run(watcher.follow(2))
        assert agent.get_model_version() == 1
        assert watcher.refused is not None
        assert "model.version 2 is pinned" in watcher.refused.reason
        # Pinned to the running 1 while the path moves on to 2: nothing is wrong.
        asyncio.run(watcher.follow(1))
        _link(live, models["onnx_v2"])
        asyncio.run(watcher.check())
        assert agent.get_model_version() == 1
        assert watcher.refused is None
    finally:
        agent.shutdown()


def test_an_incompatible_version_counts_once(models: dict[str, Path], tmp_path: Path) -> None:
    live = tmp_path / "model"
    _link(live, models["onnx"])
    agent = agent_mod.Agent(live, actor_count=1)
    try:
        watcher = reload.PathWatcher(agent, live, poll_seconds=60)
        _link(live, models["onnx_wide"])
        asyncio.run(watcher.check())
        assert watcher.refused is not None
        assert watcher.refused.incompatible
        reloads = agent.metrics.model_reloads
        assert reloads.labels("rejected")._value.get() == 1
        assert reloads.labels("failed")._value.get() == 0
    finally:
        agent.shutdown()


def test_a_version_that_failed_at_run_time_is_reported_and_not_loaded_again(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """The path moves to version 2, which loads and then fails on a request: the agent
    goes back to version 1, the watcher reports version 2 (the path has not changed
    since) and does not load it again; version 3 is loaded as usual."""
    live = tmp_path / "model"
    _link(live, models["onnx"])
    agent = agent_mod.Agent(live, actor_count=4)
    obs = np.zeros((4, 4), np.float32)
    try:
        watcher = reload.PathWatcher(agent, live, poll_seconds=0.02)
        _link(live, models["failing_v2"])
        _poll_until(watcher, lambda: agent.get_model_version() == 2)
        assert agent.request_action([0, 1, 2, 3], obs).version == 1
        _poll_until(watcher, lambda: watcher.refused is not None)
        assert watcher.refused is not None
        assert watcher.refused.version == 2
        assert not watcher.refused.incompatible
        assert watcher.refused.reason.startswith(
            "model version 2 failed at run time, so the agent went back to version 1:"
        )
        _poll_until(watcher, lambda: False)  # more polls: nothing more happens
        assert agent.get_model_version() == 1
        assert agent.metrics.model_reloads.labels("ok")._value.get() == 1
        export.export_mlp(tmp_path / "v3", spec.ModelFormat.ONNX, seed=2, version=3)
        _link(live, tmp_path / "v3")
        _poll_until(watcher, lambda: agent.get_model_version() == 3)
        assert agent.request_action([0, 1, 2, 3], obs).version == 3
        assert watcher.refused is None
    finally:
        agent.shutdown()


def test_a_version_that_failed_with_none_before_it_is_reported_until_another_comes(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """The agent started on version 2 and it fails on a request: nothing to go back to.
    Held, the watcher reports it (the path has not changed), also while version 2 is
    pinned, and loads version 3 once the path holds it; the report clears."""
    live = tmp_path / "model"
    _link(live, models["failing_v2"])
    agent = agent_mod.Agent(live, actor_count=4)
    obs = np.zeros((4, 4), np.float32)
    try:
        watcher = reload.PathWatcher(agent, live, poll_seconds=0.02)
        _poll_until(watcher, lambda: False)  # the path checked: nothing to say
        assert watcher.refused is None
        with pytest.raises(errors.ModelRunNoFallbackError) as failed:
            agent.request_action([0, 1, 2, 3], obs)
        _poll_until(watcher, lambda: False)  # a failure not held: nothing to say
        assert watcher.refused is None
        assert agent.hold(2, failed.value)  # what the env driver does
        _poll_until(watcher, lambda: watcher.refused is not None)
        assert watcher.refused is not None
        assert watcher.refused.version == 2
        assert watcher.refused.reason.startswith(
            "model version 2 failed at run time, with no version before it to go back to"
        )
        asyncio.run(watcher.follow(2))  # pinned to what runs: still reported
        assert watcher.refused is not None
        asyncio.run(watcher.follow(None))
        _link(live, models["onnx_v3"])
        _poll_until(watcher, lambda: agent.get_model_version() == 3)
        assert agent.stalled is None
        assert agent.request_action([0, 1, 2, 3], obs).version == 3
        assert watcher.refused is None
    finally:
        agent.shutdown()


def test_the_registry_watcher_knows_which_object_a_rollback_goes_back_to(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 2 (after 1) fails on a request while version 3 loads: the agent goes back
    to 1, then takes 3, whose version before is 1. The watcher must name version 1's
    object as the one to go back to, not version 2's."""
    cache = tmp_path / "cache"
    cache.mkdir()
    agent = agent_mod.Agent(models["onnx"], actor_count=4)
    v3 = tmp_path / "v3"
    export.export_mlp(v3, spec.ModelFormat.ONNX, seed=2, version=3)
    ref = registry.ModelRef("b", "cp")
    watcher = reload.RegistryWatcher(agent, None, ref, cache, 60.0, "d1", cache / "p1")
    try:
        asyncio.run(watcher._take(models["failing_v2"], registry.Entry("cp", 2, "onnx", 1, "d2")))
        assert watcher._before == ("d1", 1)
        real = agent.areload_model

        async def failing_meanwhile(path: Path, version: int | None = None) -> int:
            agent.request_action([0, 1, 2, 3], np.zeros((4, 4), np.float32))  # back to 1
            return await real(path, version)

        monkeypatch.setattr(agent, "areload_model", failing_meanwhile)
        asyncio.run(watcher._take(v3, registry.Entry("cp", 3, "onnx", 1, "d3")))
        assert agent.get_model_version() == 3
        assert agent.previous_version == 1
        assert watcher._before == ("d1", 1)
    finally:
        agent.shutdown()


def test_a_rollback_before_the_reload_returns_is_followed(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 2 fails on a request just after it swapped in, before the watcher's
    load returns: the watcher still knows the agent went back to version 1's object."""
    cache = tmp_path / "cache"
    cache.mkdir()
    agent = agent_mod.Agent(models["onnx"], actor_count=4)
    ref = registry.ModelRef("b", "cp")
    watcher = reload.RegistryWatcher(agent, None, ref, cache, 60.0, "d1", cache / "p1")
    real = agent.areload_model

    async def failing_at_once(path: Path, version: int | None = None) -> int:
        loaded = await real(path, version)
        agent.request_action([0, 1, 2, 3], np.zeros((4, 4), np.float32))  # back to 1
        return loaded

    monkeypatch.setattr(agent, "areload_model", failing_at_once)
    try:
        asyncio.run(watcher._take(models["failing_v2"], registry.Entry("cp", 2, "onnx", 1, "d2")))
        assert agent.get_model_version() == 1
        assert agent.previous_version is None
        assert watcher._before == ("d1", 1)
    finally:
        agent.shutdown()


class _Bucket:
    """The registry functions the watcher calls, over model directories: `objects` maps
    object keys to (entry, directory); `cp` is the newest version."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.objects: dict[str, tuple[registry.Entry, Path]] = {}
        self.fetched: list[str] = []
        self.timeouts: set[str] = set()  # keys whose next fetch times out
        monkeypatch.setattr(registry, "info", self.info)
        monkeypatch.setattr(registry, "list_models", self.list_models)
        monkeypatch.setattr(registry, "fetch", self.fetch)
        monkeypatch.setattr(registry, "prune", lambda cache, keep: None)

    def push(self, version: int, directory: Path) -> None:
        digest = f"d{version}"
        key = registry.versioned_key("cp", version)
        self.objects[key] = (registry.Entry(key, version, "onnx", 1, digest), directory)
        self.objects["cp"] = (registry.Entry("cp", version, "onnx", 1, digest), directory)

    async def info(self, nc: object, ref: registry.ModelRef) -> registry.Entry:
        return self.objects[ref.key][0]

    async def list_models(self, nc: object, bucket: str) -> list[registry.Entry]:
        return [entry for entry, _ in self.objects.values()]

    async def fetch(
        self, nc: object, ref: registry.ModelRef, cache: Path
    ) -> tuple[Path, registry.Entry]:
        self.fetched.append(ref.key)
        if ref.key in self.timeouts:
            self.timeouts.discard(ref.key)
            raise TimeoutError(f"{ref.key} not read in time")
        entry, directory = self.objects[ref.key]
        return directory, entry


def test_a_held_version_gives_way_to_the_newest_earlier_one_that_loads(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pod started on version 3 (newest), which failed with none before it and is
    held. Version 2 has another layout: skipped, and never reported (an incompatible
    refusal would have the operator roll the pods onto version 3 again). Version 1's
    fetch times out once: tried again at the next poll, then loaded."""
    bucket = _Bucket(monkeypatch)
    failing_v3 = tmp_path / "failing_v3"
    badmodels.export_failing(failing_v3, version=3, max_rows=3)
    wide_v2 = tmp_path / "wide_v2"
    export.export_mlp(wide_v2, spec.ModelFormat.ONNX, obs_dim=6, version=2)
    bucket.push(1, models["onnx"])
    bucket.push(2, wide_v2)
    bucket.push(3, failing_v3)
    agent = agent_mod.Agent(failing_v3, actor_count=4)
    ref = registry.ModelRef("b", "cp")
    watcher = reload.RegistryWatcher(agent, None, ref, tmp_path, 60.0, "d3", failing_v3)
    try:
        with pytest.raises(errors.ModelRunNoFallbackError) as failed:
            agent.request_action([0, 1, 2, 3], np.zeros((4, 4), np.float32))
        assert agent.hold(3, failed.value)
        bucket.timeouts.add("cp@v1")
        asyncio.run(watcher.check())
        assert bucket.fetched == ["cp@v2", "cp@v1"]
        assert agent.get_model_version() == 3
        assert watcher.refused is not None
        assert (watcher.refused.version, watcher.refused.incompatible) == (3, False)
        assert "with no version before it to go back to" in watcher.refused.reason
        asyncio.run(watcher.check())
        assert bucket.fetched == ["cp@v2", "cp@v1", "cp@v1"]  # version 2 not again
        assert agent.get_model_version() == 1
        assert agent.stalled is None
        assert watcher.refused is not None
        assert watcher.refused.reason.startswith(
            "model version 3 failed at run time, so the agent went back to version 1:"
        )
        asyncio.run(watcher.check())  # nothing new: nothing fetched
        assert len(bucket.fetched) == 3
        assert agent.get_model_version() == 1
    finally:
        agent.shutdown()


def test_going_back_keeps_reporting_a_newest_version_that_did_not_load(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pod started on version 2; version 3 was pushed and could not load (reported).
    Version 2 then fails with none before it: the watcher goes back to version 1 though
    the newest object is not the failed one, and version 3's refusal stays reported."""
    bucket = _Bucket(monkeypatch)
    corrupt = tmp_path / "corrupt_v3"
    export.export_mlp(corrupt, spec.ModelFormat.ONNX, seed=2, version=3)
    (corrupt / "model.onnx").write_bytes(b"not onnx")
    bucket.push(1, models["onnx"])
    bucket.push(2, models["failing_v2"])
    agent = agent_mod.Agent(models["failing_v2"], actor_count=4)
    ref = registry.ModelRef("b", "cp")
    watcher = reload.RegistryWatcher(agent, None, ref, tmp_path, 60.0, "d2", models["failing_v2"])
    try:
        bucket.push(3, corrupt)
        asyncio.run(watcher.check())
        assert watcher.refused is not None
        assert watcher.refused.version == 3
        with pytest.raises(errors.ModelRunNoFallbackError) as failed:
            agent.request_action([0, 1, 2, 3], np.zeros((4, 4), np.float32))
        assert agent.hold(2, failed.value)
        asyncio.run(watcher.check())
        assert agent.get_model_version() == 1
        assert bucket.fetched == ["cp", "cp@v1"]  # version 3 not fetched again
        assert watcher.refused is not None
        assert (watcher.refused.version, watcher.refused.incompatible) == (3, False)
        assert "not a loadable ONNX model" in watcher.refused.reason
        asyncio.run(watcher.check())
        assert bucket.fetched == ["cp", "cp@v1"]
        assert watcher.refused is not None
        assert watcher.refused.version == 3
    finally:
        agent.shutdown()
