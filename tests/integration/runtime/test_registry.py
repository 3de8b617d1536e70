"""The model registry on a real nats-server (JetStream object store) and hot reload from it."""

from __future__ import annotations

import asyncio
import datetime
import multiprocessing
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.api
import pytest
from integration.runtime import helpers

from relayrl_runtime import agent as agent_mod
from relayrl_runtime import config, registry, reload, reporting, spec, streams
from relayrl_runtime.inference import export, model
from support import natsserver


def _cli(*args: str, code: int = 0) -> str:
    """Run the runtime's command; its stdout (its stderr when `code` is not 0)."""
    done = subprocess.run(
        [str(helpers.RUNTIME), *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == code, done.stderr
    return done.stdout if code == 0 else done.stderr


_POLL = {"pollSeconds": 0.2}


def _config(
    agent: str,
    uri: str,
    url: str,
    tmp_path: Path,
    *,
    actors: int = 1,
    version: int | None = None,
    **extra: object,
) -> dict[str, object]:
    """A CartPole runtime on a registry model (ONNX; `version` pins it), publishing
    through `url` and recording under tmp_path/out; `extra` adds top-level fields."""
    model: dict[str, object] = {"uri": uri, "format": "onnx"}
    if version is not None:
        model["version"] = version
    return {
        "agent": agent,
        "actors": actors,
        "model": model,
        "environment": {"gymnasium": {"id": "CartPole-v1"}},
        "trajectories": {"nats": {"url": url}},
        "localSink": {"path": str(tmp_path / "out")},
        **extra,
    }


def _reports(url: str, namespace: str, agent: str) -> dict[str, reporting.PodReport]:
    async def read() -> dict[str, reporting.PodReport]:
        nc = await nats.connect(url)
        try:
            return await reporting.read_reports(nc.jetstream(), namespace, agent)
        finally:
            await nc.close()

    return asyncio.run(read())


def _pod(
    tmp_path: Path, cfg: dict[str, Any], url: str, env: dict[str, str] | None = None
) -> tuple[helpers.RuntimeProcess, Callable[[], reporting.PodReport | None]]:
    """The runtime as pod `<agent>-0` of namespace ns (config mounted), and a reader of
    its latest status report."""
    agent = str(cfg["agent"])
    pod = f"{agent}-0"
    proc = helpers.RuntimeProcess(
        tmp_path, cfg, env={config.ENV_POD_NAME: pod, **(env or {})}, mounted=True
    )
    return proc, lambda: _reports(url, "ns", agent).get(pod)


def test_push_list_and_hot_reload_from_registry(
    nats_server: natsserver.NatsServer, models: dict[str, Path], tmp_path: Path
) -> None:
    url = nats_server.url
    out = _cli(
        "model", "push", "--nats", url, "--bucket", "models", "--name", "cp", str(models["onnx"])
    )
    assert "version 1" in out
    cfg = _config("cartpole", "objectstore://models/cp", url, tmp_path, actors=2, reload=_POLL)
    tmp = tmp_path / "tmp"  # where the process unpacks the versions it fetches
    tmp.mkdir()
    proc = helpers.RuntimeProcess(tmp_path, cfg, env={"TMPDIR": str(tmp)})

    def unpacked() -> list[str]:
        return sorted(p.name for p in tmp.glob("relayrl-models-*/*"))

    try:
        proc.wait_ready()
        assert helpers.metric(proc.metrics(), "relayrl_runtime_model_version") == 1
        assert [name.split("-")[:2] for name in unpacked()] == [["cp", "v1"]]
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
        helpers.wait_for_model(proc, 2)
        helpers.wait_for(
            "steps with version 2",
            lambda: helpers.metric(proc.metrics(), "relayrl_runtime_env_steps_total") > 1000,
        )
        # Past versions leave the disk once the next one runs (just after the swap), and
        # so does one refused.
        helpers.wait_for(
            "version 1 off the disk",
            lambda: [name.split("-")[:2] for name in unpacked()] == [["cp", "v2"]],
        )
        _cli("model", "push", "--nats", url, "--bucket", "models", "--name", "cp",
             str(models["onnx_v3_wide"]))  # fmt: skip
        helpers.wait_for(
            "the refusal", lambda: 'model_reloads_total{result="rejected"} 1.0' in proc.metrics()
        )
        # Counted once, under the result that says why.
        assert 'model_reloads_total{result="failed"}' not in proc.metrics()
        helpers.wait_for(  # counted as the load is refused, removed just after
            "version 3 off the disk",
            lambda: [name.split("-")[:2] for name in unpacked()] == [["cp", "v2"]],
        )
        assert proc.terminate() == 0, proc.logs()
    finally:
        proc.kill()
    listing = _cli("model", "list", "--nats", url, "--bucket", "models")
    keys = [line.split("\t")[0] for line in listing.splitlines()]
    assert keys == ["cp", "cp@v1", "cp@v2", "cp@v3"]
    assert "version=3" in listing.splitlines()[0]
    table = helpers.written(tmp_path / "out")
    assert set(table["policy_version"].to_pylist()) == {1, 2}


def test_pinned_version_and_missing_model(
    nats_server: natsserver.NatsServer, models: dict[str, Path], tmp_path: Path
) -> None:
    url = nats_server.url
    for m in ("onnx", "onnx_v2"):
        _cli("model", "push", "--nats", url, "--bucket", "models", "--name", "cp", str(models[m]))
    cfg = _config("pinned", "objectstore://models/cp", url, tmp_path, version=1)
    proc = helpers.RuntimeProcess(tmp_path, cfg)
    try:
        proc.wait_ready()
        assert helpers.metric(proc.metrics(), "relayrl_runtime_model_version") == 1
        assert proc.terminate() == 0, proc.logs()
    finally:
        proc.kill()
    # A model not pushed yet (an Agent applied first): the pod waits for it, not
    # ready and saying why, instead of exiting into a crash loop; then starts on it.
    missing = tmp_path / "missing"
    missing.mkdir()
    cfg["model"] = {"uri": "objectstore://models/nope", "format": "onnx"}
    proc = helpers.RuntimeProcess(missing, cfg)
    try:
        proc.wait_waiting("waiting for the model")
        assert "no object 'nope' in bucket 'models'" in helpers.http_get(proc.port, "/readyz")[1]
        _cli("model", "push", "--nats", url, "--bucket", "models", "--name", "nope",
             str(models["onnx_v2"]))  # fmt: skip
        proc.wait_ready(timeout=90)
        assert helpers.metric(proc.metrics(), "relayrl_runtime_model_version") == 2
        assert proc.terminate() == 0, proc.logs()
    finally:
        proc.kill()
    # A pinned version that is not there: SIGTERM ends the wait at once (exit 0).
    unpinned = tmp_path / "unpinned"
    unpinned.mkdir()
    cfg["model"] = {"uri": "objectstore://models/cp", "format": "onnx", "version": 9}
    proc = helpers.RuntimeProcess(unpinned, cfg)
    try:
        helpers.wait_for("the wait", lambda: "no object 'cp@v9'" in proc.logs())
        assert proc.terminate(timeout=15) == 0
    finally:
        proc.kill()


def test_a_pinned_version_missing_from_the_registry_is_reported_and_kept_out(
    nats_server: natsserver.NatsServer, models: dict[str, Path], tmp_path: Path
) -> None:
    """Changed live to a version nobody pushed: the pod keeps its model and its status
    report names the version it could not take; pushed, it is taken."""
    url = nats_server.url
    _cli("model", "push", "--nats", url, "--bucket", "m2", "--name", "cp", str(models["onnx"]))
    cfg = _config(
        "pinned", "objectstore://m2/cp", url, tmp_path, version=1, namespace="ns", reload=_POLL
    )
    proc, report = _pod(tmp_path, cfg, url)

    try:
        proc.wait_ready()
        proc.update_config({**cfg, "model": {**cfg["model"], "version": 2}})
        refused = helpers.wait_for(
            "a report of version 2 missing",
            lambda: (r := report()) is not None and r.refused is not None and r,
        )
        assert refused.model_version == 1
        assert refused.model_uri == "objectstore://m2/cp"
        assert refused.refused is not None
        assert (refused.refused.version, refused.refused.incompatible) == (2, False)
        assert "no object 'cp@v2'" in refused.refused.reason
        assert helpers.metric(proc.metrics(), "relayrl_runtime_model_version") == 1
        assert proc.logs().count("no object 'cp@v2'") == 1  # said once, not every poll
        _cli("model", "push", "--nats", url, "--bucket", "m2", "--name", "cp",
             str(models["onnx_v2"]))  # fmt: skip
        helpers.wait_for(
            "a version 2 report, nothing refused",
            lambda: (r := report()) is not None and r.model_version == 2 and r.refused is None,
        )
        assert proc.terminate() == 0, proc.logs()
    finally:
        proc.kill()


def test_a_config_changed_while_waiting_for_the_model_is_followed_after(
    nats_server: natsserver.NatsServer, models: dict[str, Path], tmp_path: Path
) -> None:
    """Pinned to a version not pushed yet, then moved to one that is: the pod starts on
    it and still follows the pin when it comes back to the first version."""
    url = nats_server.url
    _cli("model", "push", "--nats", url, "--bucket", "m4", "--name", "cp", str(models["onnx"]))
    cfg = _config("back", "objectstore://m4/cp", url, tmp_path, version=2, reload=_POLL)
    proc = helpers.RuntimeProcess(tmp_path, cfg, mounted=True)
    try:
        helpers.wait_for("the wait", lambda: "no object 'cp@v2'" in proc.logs())
        proc.update_config({**cfg, "model": {**cfg["model"], "version": 1}})
        proc.wait_ready(timeout=90)
        assert helpers.metric(proc.metrics(), "relayrl_runtime_model_version") == 1
        _cli("model", "push", "--nats", url, "--bucket", "m4", "--name", "cp",
             str(models["onnx_v2"]))  # fmt: skip
        proc.update_config(cfg)  # version 2 again, the bytes the pod started waiting on
        helpers.wait_for_model(proc, 2)
        assert proc.terminate() == 0, proc.logs()
    finally:
        proc.kill()


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


def test_other_weights_under_the_running_version_are_not_loaded(
    nats_server: natsserver.NatsServer, models: dict[str, Path], tmp_path: Path
) -> None:
    """A version number names one model (the steps record it): re-pushed with other
    weights, the running pod keeps what it runs and says why."""
    url = nats_server.url
    _cli("model", "push", "--nats", url, "--bucket", "m3", "--name", "cp", str(models["onnx"]))
    cfg = _config("same", "objectstore://m3/cp", url, tmp_path, reload=_POLL)
    other = tmp_path / "other"
    export.export_mlp(other, spec.ModelFormat.ONNX, seed=7, version=1)
    proc = helpers.RuntimeProcess(tmp_path, cfg)
    try:
        proc.wait_ready()
        # Refused unless forced: the number already names other weights.
        push = ["model", "push", "--nats", url, "--bucket", "m3", "--name", "cp", str(other)]
        assert "cp@v1 in bucket 'm3' holds other content" in _cli(*push, code=2)
        _cli(
            "model", "push", "--nats", url, "--bucket", "m3", "--name", "cp", "--force", str(other)
        )
        helpers.wait_for("the warning", lambda: "holds other content for version 1" in proc.logs())
        time.sleep(1.0)  # several polls
        assert proc.logs().count("holds other content") == 1
        assert helpers.metric(proc.metrics(), "relayrl_runtime_model_version") == 1
        assert 'model_reloads_total{result="ok"}' not in proc.metrics()  # none loaded
        assert proc.terminate() == 0, proc.logs()
    finally:
        proc.kill()


def test_a_push_keeps_versions_apart_and_goes_forward(
    nats_server: natsserver.NatsServer, tmp_path: Path
) -> None:
    """The same directory again is a no-op; a version below the newest is refused
    unless forced (a rollback), and then is the newest."""
    url = nats_server.url
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    export.export_mlp(v1, spec.ModelFormat.ONNX, seed=1, version=1)
    export.export_mlp(v2, spec.ModelFormat.ONNX, seed=2, version=2)
    push = ["model", "push", "--nats", url, "--bucket", "m5", "--name", "cp"]
    _cli(*push, str(v1))
    _cli(*push, str(v2))
    listing = _cli("model", "list", "--nats", url, "--bucket", "m5")
    _cli(*push, str(v2))  # again: nothing changes
    assert _cli("model", "list", "--nats", url, "--bucket", "m5") == listing
    assert "cp is at version 2 in bucket 'm5', above 1" in _cli(*push, str(v1), code=2)
    # The versioned object gone (deleted by hand): other bytes as the newest's version
    # are still refused.
    other2 = tmp_path / "other2"
    export.export_mlp(other2, spec.ModelFormat.ONNX, seed=9, version=2)

    async def delete_versioned() -> None:
        nc = await nats.connect(url)
        try:
            await (await nc.jetstream().object_store("m5")).delete("cp@v2")
        finally:
            await nc.close()

    asyncio.run(delete_versioned())
    assert "holds other content as version 2" in _cli(*push, str(other2), code=2)
    _cli(*push, str(v2))  # the same bytes again: the versioned object is back
    _cli(*push, "--force", str(v1))
    lines = _cli("model", "list", "--nats", url, "--bucket", "m5").splitlines()
    assert [line.split("\t")[:2] for line in lines] == [
        ["cp", "version=1"],
        ["cp@v1", "version=1"],
        ["cp@v2", "version=2"],
    ]


async def _stream_messages(nc: Any, bucket: str) -> int:
    info = await nc.jetstream().stream_info(f"OBJ_{bucket}")
    return int(info.state.messages)


def test_a_push_overtaken_by_another_reads_again_and_never_goes_back(
    nats_server: natsserver.NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another push lands between a push's read of the newest version and its write:
    the write is refused by NATS, and the push checks again against what is there."""
    dirs = {}
    for version in (1, 2, 3, 4):
        dirs[version] = tmp_path / f"v{version}"
        export.export_mlp(dirs[version], spec.ModelFormat.ONNX, seed=version, version=version)
    real_read = registry._read
    # Versions to push (forced) from elsewhere after the next read of "cp".
    cut_in: list[int] = []

    async def main() -> None:
        nc, other = await nats.connect(nats_server.url), await nats.connect(nats_server.url)

        async def read(js: Any, bucket: str, key: str) -> Any:
            current = await real_read(js, bucket, key)
            if key == "cp" and cut_in:
                await registry.push(other, bucket, "cp", dirs[cut_in.pop()], force=True)
            return current

        monkeypatch.setattr(registry, "_read", read)
        try:
            await registry.push(nc, "race", "cp", dirs[1])
            cut_in.append(3)
            with pytest.raises(registry.VersionConflictError, match=r"at version 3 .* above 2"):
                await registry.push(nc, "race", "cp", dirs[2])
            assert not cut_in
            newest = await registry.info(nc, registry.ModelRef("race", "cp"))
            assert newest.version == 3
            # Overtaken by a rollback to 2: checked again, and written as the newest.
            cut_in.append(2)
            entry = await registry.push(nc, "race", "cp", dirs[4])
            newest = await registry.info(nc, registry.ModelRef("race", "cp"))
            assert (newest.version, newest.digest) == (4, entry.digest)
            fetched, _ = await registry.fetch(nc, registry.ModelRef("race", "cp"), tmp_path / "c")
            assert model.read_metadata(fetched).version == 4
            keys = [e.key for e in await registry.list_models(nc, "race")]
            assert keys == ["cp", "cp@v1", "cp@v2", "cp@v3", "cp@v4"]
            # One meta message and one chunk each: the refused writes' chunks and the
            # replaced objects' are gone.
            assert await _stream_messages(nc, "race") == 2 * len(keys)
        finally:
            await nc.close()
            await other.close()

    asyncio.run(main())


def test_pushes_at_once_leave_the_highest_version_newest(
    nats_server: natsserver.NatsServer, tmp_path: Path
) -> None:
    versions = range(1, 7)
    for version in versions:
        export.export_mlp(tmp_path / f"v{version}", spec.ModelFormat.ONNX, seed=version,
                          version=version)  # fmt: skip

    async def push(version: int) -> str:
        nc = await nats.connect(nats_server.url)
        try:
            await registry.push(nc, "many", "cp", tmp_path / f"v{version}")
            return "pushed"
        except registry.VersionConflictError as err:
            return str(err)
        finally:
            await nc.close()

    async def main() -> None:
        said = dict(zip(versions, await asyncio.gather(*(push(v) for v in versions)), strict=True))
        assert said[6] == "pushed"
        for version, outcome in said.items():  # pushed, or refused for a higher one
            assert outcome == "pushed" or f", above {version}:" in outcome, outcome
        nc = await nats.connect(nats_server.url)
        try:
            newest = await registry.info(nc, registry.ModelRef("many", "cp"))
            assert newest.version == 6
            keys = [e.key for e in await registry.list_models(nc, "many")]
            assert await _stream_messages(nc, "many") == 2 * len(keys)
        finally:
            await nc.close()

    asyncio.run(main())


def test_a_write_whose_answer_is_lost_keeps_what_was_stored(
    nats_server: natsserver.NatsServer, tmp_path: Path
) -> None:
    """The meta message's ack does not come back (a timeout under load): stored, the
    object keeps its chunks and the push succeeds; not stored, the push fails and its
    chunks are removed."""
    dirs = {}
    for version in (1, 2):
        dirs[version] = tmp_path / f"v{version}"
        export.export_mlp(dirs[version], spec.ModelFormat.ONNX, seed=version, version=version)

    async def main() -> None:
        nc = await nats.connect(nats_server.url)
        real_jetstream = nc.jetstream
        lose: dict[str, bool] = {}  # meta subject -> stored before the answer is lost

        class LossyJetStream:
            def __init__(self) -> None:
                self._js = real_jetstream()

            def __getattr__(self, name: str) -> Any:
                return getattr(self._js, name)

            async def publish(self, subject: str, payload: bytes = b"", **kw: Any) -> Any:
                if subject in lose:
                    if lose.pop(subject):
                        await self._js.publish(subject, payload, **kw)
                    raise nats.errors.TimeoutError
                return await self._js.publish(subject, payload, **kw)

        nc.jetstream = LossyJetStream  # type: ignore[method-assign]
        try:
            await registry.push(nc, "lossy", "cp", dirs[1])
            lose[registry._meta_subject("lossy", "cp@v2")] = False
            with pytest.raises(nats.errors.TimeoutError):
                await registry.push(nc, "lossy", "cp", dirs[2])
            # cp and cp@v1: a meta message and a chunk each; nothing of the lost write.
            assert await _stream_messages(nc, "lossy") == 4
            lose[registry._meta_subject("lossy", "cp@v2")] = True
            assert (await registry.push(nc, "lossy", "cp", dirs[2])).version == 2
            for ref in (registry.ModelRef("lossy", "cp"), registry.ModelRef("lossy", "cp", 2)):
                _, entry = await registry.fetch(nc, ref, tmp_path / "cache")
                assert entry.version == 2, ref
        finally:
            await nc.close()

    asyncio.run(main())


def _push_in_a_forked_child(url: str, name: str, directory: Path) -> None:
    async def push() -> None:
        nc = await nats.connect(url)
        try:
            await registry.push(nc, "forked", name, directory)
        finally:
            await nc.close()

    asyncio.run(push())


def test_trainers_forked_from_one_process_write_apart(
    nats_server: natsserver.NatsServer, tmp_path: Path
) -> None:
    """Two trainers forked from one launcher (multiprocessing's default on Linux) push a
    model each: each object reads back as its own bytes."""
    for version in (1, 2):
        export.export_mlp(tmp_path / f"v{version}", spec.ModelFormat.ONNX, seed=version,
                          version=version)  # fmt: skip
    fork = multiprocessing.get_context("fork")
    for name, version in (("a", 1), ("b", 2)):
        child = fork.Process(
            target=_push_in_a_forked_child, args=(nats_server.url, name, tmp_path / f"v{version}")
        )
        child.start()
        child.join(60)
        assert child.exitcode == 0, name

    async def fetch_both() -> list[int | None]:
        nc = await nats.connect(nats_server.url)
        try:
            got = []
            for name in ("a", "b"):
                ref = registry.ModelRef("forked", name)
                got.append((await registry.fetch(nc, ref, tmp_path / "cache"))[1].version)
            return got
        finally:
            await nc.close()

    assert asyncio.run(fetch_both()) == [1, 2]


def test_an_object_no_runtime_can_unpack_is_reported_and_fetched_once(
    nats_server: natsserver.NatsServer, models: dict[str, Path], tmp_path: Path
) -> None:
    """Put by hand (not through `model push`): the pod keeps its model, reports the
    refusal, and does not download the object again at every poll."""
    url = nats_server.url
    _cli("model", "push", "--nats", url, "--bucket", "m6", "--name", "cp", str(models["onnx"]))
    cfg = _config("unpack", "objectstore://m6/cp", url, tmp_path, namespace="ns", reload=_POLL)
    proc, report = _pod(tmp_path, cfg, url)
    try:
        proc.wait_ready()

        async def put_garbage() -> None:
            nc = await nats.connect(url)
            try:
                store = await nc.jetstream().object_store("m6")
                meta = nats.js.api.ObjectMeta(
                    name="cp", description='{"version": 2, "format": "onnx"}'
                )
                await store.put("cp", b"not a tar archive", meta=meta)
            finally:
                await nc.close()

        asyncio.run(put_garbage())
        helpers.wait_for("the refusal", lambda: "not a packed model directory" in proc.logs())
        time.sleep(1.0)  # several polls
        assert proc.logs().count("not a packed model directory") == 1
        sent = report()
        assert sent is not None
        assert sent.refused is not None
        assert sent.refused.version == 2
        assert helpers.metric(proc.metrics(), "relayrl_runtime_model_version") == 1
        assert proc.terminate() == 0, proc.logs()
    finally:
        proc.kill()


def test_an_object_labelled_with_another_version_than_it_holds_is_refused(
    nats_server: natsserver.NatsServer, models: dict[str, Path], tmp_path: Path
) -> None:
    """An object whose description and metadata disagree (a push that read its directory
    while a trainer wrote the next version, by an older `model push`): the pod keeps its
    model rather than record steps under the wrong version. A description that is not a
    JSON object (put by hand) is no version: listed, not crashed on."""
    url = nats_server.url
    _cli("model", "push", "--nats", url, "--bucket", "m11", "--name", "cp", str(models["onnx"]))
    cfg = _config("label", "objectstore://m11/cp", url, tmp_path, namespace="ns", reload=_POLL)
    proc, report = _pod(tmp_path, cfg, url)
    try:
        proc.wait_ready()
        # Version 1's files, and one more: other bytes than the object the pod runs.
        copy = tmp_path / "copy"
        shutil.copytree(models["onnx"], copy)
        (copy / "NOTES").write_text("trained further\n")
        data, held = registry.pack(copy)
        assert held.version == 1

        async def put(key: str, description: str) -> None:
            nc = await nats.connect(url)
            try:
                store = await nc.jetstream().object_store("m11")
                meta = nats.js.api.ObjectMeta(name=key, description=description)
                await store.put(key, data, meta=meta)
            finally:
                await nc.close()

        asyncio.run(put("other", "2"))
        assert "other" in _cli("model", "list", "--nats", url, "--bucket", "m11")
        asyncio.run(put("cp", '{"version": 2, "format": "onnx"}'))
        said = "cp in 'm11' is labelled version 2 but its relayrl-model.json says 1"
        helpers.wait_for("the refusal", lambda: said in proc.logs())
        helpers.wait_for("its report", lambda: (sent := report()) is not None and sent.refused)
        sent = report()
        assert sent is not None
        assert sent.refused is not None
        assert sent.refused.version == 2
        assert helpers.metric(proc.metrics(), "relayrl_runtime_model_version") == 1
        assert proc.terminate() == 0, proc.logs()
    finally:
        proc.kill()


def test_a_pin_set_while_a_newer_version_downloads_keeps_it_out(
    nats_server: natsserver.NatsServer,
    models: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A poll is fetching the newest version (2) when the operator pins version 1 (to
    keep 2 out): 2 is never swapped in, not even for a moment, and the download
    unpacks off the event loop."""
    unpacked_on: list[str] = []
    real_unpack = registry.unpack

    def unpack(data: bytes, destination: Path) -> Path:
        unpacked_on.append(threading.current_thread().name)
        return real_unpack(data, destination)

    monkeypatch.setattr(registry, "unpack", unpack)

    async def main() -> list[int]:
        nc = await nats.connect(nats_server.url)
        try:
            await registry.push(nc, "pins", "cp", models["onnx"])
            cache = tmp_path / "cache"
            cache.mkdir()
            ref = registry.ModelRef.parse("objectstore://pins/cp")
            path, entry = await registry.fetch(nc, ref, cache)
            agent = agent_mod.Agent(path, actor_count=1)
            loaded: list[int] = []
            real_reload = agent.reload_model

            def reload_model(p: Path, version: int | None = None) -> int:
                loaded.append(real_reload(p, version))
                return loaded[-1]

            agent.reload_model = reload_model  # type: ignore[method-assign]
            try:
                watcher = reload.RegistryWatcher(agent, nc, ref, cache, 60, entry.digest, path)
                await registry.push(nc, "pins", "cp", models["onnx_v2"])
                real_fetch = registry.fetch
                fetching = asyncio.Event()

                async def slow_fetch(*args: Any) -> Any:
                    fetching.set()
                    await asyncio.sleep(0.5)  # a large model
                    return await real_fetch(*args)

                monkeypatch.setattr(registry, "fetch", slow_fetch)
                poll = asyncio.create_task(watcher.check())
                await fetching.wait()
                await watcher.follow(1)
                await poll
                assert agent.get_model_version() == 1
                assert watcher.refused is None
                # Unpinned again: version 2 comes in.
                await watcher.follow(None)
                assert agent.get_model_version() == 2
                return loaded
            finally:
                agent.shutdown()
        finally:
            await nc.close()

    assert asyncio.run(main()) == [2]
    assert unpacked_on
    assert threading.main_thread().name not in unpacked_on


def test_a_version_that_fails_at_run_time_is_reported_and_not_fetched_again(
    nats_server: natsserver.NatsServer, models: dict[str, Path], tmp_path: Path
) -> None:
    """Version 2 loads and fails on the pod's batches of 4: the pod goes back to
    version 1, reports version 2 with why (the operator's ModelReady says it), and
    does not load it again at the next polls; version 3 is taken as usual."""
    url = nats_server.url

    def push(name: str) -> None:
        _cli("model", "push", "--nats", url, "--bucket", "m9", "--name", "cp", str(models[name]))

    push("onnx")
    cfg = _config(
        "runfail", "objectstore://m9/cp", url, tmp_path, actors=4, namespace="ns", reload=_POLL
    )
    tmp = tmp_path / "tmp"  # where the process unpacks the versions it fetches
    tmp.mkdir()
    proc, report = _pod(tmp_path, cfg, url, env={"TMPDIR": str(tmp)})

    def unpacked() -> list[str]:
        return sorted(p.name.split("-")[1] for p in tmp.glob("relayrl-models-*/*"))

    try:
        proc.wait_ready()
        push("onnx_v2_failing")
        refused = helpers.wait_for(
            "a report of version 2 replaced",
            lambda: (r := report()) is not None and r.refused is not None and r,
        )
        assert refused.model_version == 1
        assert refused.refused is not None
        assert (refused.refused.version, refused.refused.incompatible) == (2, False)
        assert refused.refused.reason.startswith(
            "model version 2 failed at run time, so the agent went back to version 1:"
        )
        time.sleep(1.0)  # several polls
        text = proc.metrics()
        assert 'model_reloads_total{result="ok"} 1.0' in text
        assert 'model_reloads_total{result="rolled_back"} 1.0' in text
        assert helpers.metric(text, "relayrl_runtime_model_version") == 1
        # Version 1 runs from memory; version 2's files go.
        helpers.wait_for("version 2 off the disk", lambda: unpacked() == [])
        # Pinned to the version it went back to: it runs it, nothing to say.
        proc.update_config({**cfg, "model": {**cfg["model"], "version": 1}})
        helpers.wait_for("the report cleared", lambda: (r := report()) and r.refused is None)
        proc.update_config(cfg)
        helpers.wait_for("version 2 refused again", lambda: (r := report()) and r.refused)
        export.export_mlp(tmp_path / "v3", spec.ModelFormat.ONNX, seed=2, version=3)
        _cli("model", "push", "--nats", url, "--bucket", "m9", "--name", "cp",
             str(tmp_path / "v3"))  # fmt: skip
        helpers.wait_for_model(proc, 3)
        helpers.wait_for("the report cleared", lambda: (r := report()) and r.refused is None)
        assert unpacked() == ["v3"]
        assert proc.terminate() == 0, proc.logs()
    finally:
        proc.kill()
    assert "other content" not in proc.logs()
    table = helpers.written(tmp_path / "out")
    assert set(table["policy_version"].to_pylist()) == {1, 3}


def test_a_pod_that_starts_on_a_failing_version_takes_the_one_pushed_before(
    nats_server: natsserver.NatsServer, models: dict[str, Path], tmp_path: Path
) -> None:
    """The newest version (2) loads and fails on the pod's batches of 4, and the pod
    started on it, so it has none before it in memory: it loads version 1 from the
    registry, reports version 2 with why, does not exit or load version 2 again, and
    takes version 3 when it is pushed. Every step is recorded."""
    url = nats_server.url

    def push(directory: Path) -> None:
        _cli("model", "push", "--nats", url, "--bucket", "m10", "--name", "cp", str(directory))

    push(models["onnx"])
    push(models["onnx_v2_failing"])
    cfg = _config(
        "startfail", "objectstore://m10/cp", url, tmp_path, actors=4, namespace="ns", reload=_POLL
    )
    proc, report = _pod(tmp_path, cfg, url)

    try:
        proc.wait_ready()
        helpers.wait_for_model(proc, 1)
        refused = helpers.wait_for(
            "a report of version 2",
            lambda: (r := report()) is not None and r.model_version == 1 and r.refused and r,
        )
        assert refused.refused is not None
        assert refused.refused.version == 2
        assert refused.refused.reason.startswith(
            "model version 2 failed at run time, so the agent went back to version 1:"
        )
        steps = helpers.metric(proc.metrics(), "relayrl_runtime_env_steps_total")
        helpers.wait_for(
            "steps on version 1",
            lambda: helpers.metric(proc.metrics(), "relayrl_runtime_env_steps_total") > steps + 200,
        )
        text = proc.metrics()
        assert 'model_reloads_total{result="ok"} 1.0' in text  # version 1, once
        assert 'request_errors_total{kind="model_run"} 1.0' in text
        export.export_mlp(tmp_path / "v3", spec.ModelFormat.ONNX, seed=2, version=3)
        push(tmp_path / "v3")
        helpers.wait_for_model(proc, 3)
        helpers.wait_for("the report cleared", lambda: (r := report()) and r.refused is None)
        assert proc.terminate() == 0, proc.logs()
    finally:
        proc.kill()
    logs = proc.logs()
    assert "loading version 1 from m10" in logs
    table = helpers.written(tmp_path / "out")
    assert set(table["policy_version"].to_pylist()) == {1, 3}
    assert table.num_rows == helpers.logged(logs, "env_steps"), logs


async def test_chunks_of_a_push_cut_off_are_removed_by_a_later_push(
    nats_server: natsserver.NatsServer,
    models: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A push killed after its chunks and before its meta message leaves them named by
    no object: the next push removes them once they are old enough, and leaves the
    chunks of the objects, and of a push that may still be writing, as they are."""
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await registry.push(nc, "m10", "cp", models["onnx"])
        stream = streams.object_store_stream("m10")
        old, young = "$O.m10.C.cutoffpushold", "$O.m10.C.cutoffpushyoung"
        for _ in range(3):
            await js.publish(old, b"x" * 1000)

        async def chunk_subjects() -> set[str]:
            info = await js.stream_info(stream, subjects_filter="$O.m10.C.>")
            return set(info.state.subjects or {})

        assert old in await chunk_subjects()
        await asyncio.sleep(1.5)
        await js.publish(young, b"y" * 1000)
        monkeypatch.setattr(registry, "ORPHAN_SECONDS", 1.0)

        class Ahead(datetime.datetime):
            """The pushing machine's clock, two hours fast: ages go by the server's."""

            @classmethod
            def now(cls, tz: datetime.tzinfo | None = None) -> Ahead:
                return cls.fromtimestamp(time.time() + 7200, tz)

        monkeypatch.setattr(registry, "datetime", Ahead)
        await registry.push(nc, "m10", "cp", models["onnx_v2"])
        left = await chunk_subjects()
        assert old not in left
        assert young in left
        assert len(left) == 4  # cp, cp@v1, cp@v2 and the young one
        for key in ("cp", "cp@v1", "cp@v2"):
            store = await js.object_store("m10")
            assert len((await store.get(key)).data or b"") > 0
    finally:
        await nc.close()


async def test_a_download_cut_off_leaves_no_consumer_behind(
    nats_server: natsserver.NatsServer,
    models: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A download that runs out of time (an object replaced while read never ends its
    read) or is cancelled: its subscription and its consumer on the bucket's stream go,
    else a pod following a trainer's pushes gathers one more of each every time."""
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await registry.push(nc, "m12", "cp", models["onnx"])
        ref = registry.ModelRef("m12", "cp")
        subs = len(nc._subs)
        monkeypatch.setattr(registry, "FETCH_SECONDS", 0.0)
        monkeypatch.setattr(registry, "FETCH_BYTES_PER_SECOND", float(1 << 40))
        with pytest.raises(TimeoutError, match="not read within 0s"):
            await registry.fetch(nc, ref, tmp_path / "cache")
        monkeypatch.setattr(registry, "FETCH_SECONDS", 60.0)
        task = asyncio.create_task(registry.fetch(nc, ref, tmp_path / "cache"))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(nc._subs) == subs
        stream = streams.object_store_stream("m12")
        for _ in range(60):  # the server drops an ordered consumer once it is left
            if not (await js.stream_info(stream)).state.consumer_count:
                break
            await asyncio.sleep(0.5)
        assert (await js.stream_info(stream)).state.consumer_count == 0
        # And a download that is let finish still works.
        path, entry = await registry.fetch(nc, ref, tmp_path / "cache")
        assert entry.version == 1
        assert model.read_metadata(path).version == 1
        assert len(nc._subs) == subs
    finally:
        await nc.close()


_PUSH = (str(helpers.RUNTIME), "model", "push")


def test_the_registry_and_reports_follow_rotated_credentials(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """The NATS password rotated (the Secret and the server changed together): the
    registry's and the status reports' connection is made anew with the credentials
    read again, so a version pushed after the rotation is loaded and reported."""
    auth = 'authorization {{ user: actor, password: "{}" }}'
    creds = tmp_path / "nats-credentials"
    creds.mkdir()
    (creds / streams.SECRET_KEY_USER).write_text("actor")
    (creds / streams.SECRET_KEY_PASSWORD).write_text("first")
    with natsserver.NatsServer(extra_config=auth.format("first")) as srv:

        def push(directory: Path, password: str) -> None:
            done = subprocess.run(
                [*_PUSH, str(directory), "--nats", srv.url, "--bucket", "m13", "--name", "cp"],
                env={**os.environ, "RELAYRL_NATS_USER": "actor", "RELAYRL_NATS_PASSWORD": password},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, done.stderr

        push(models["onnx"], "first")
        cfg = _config("rotate", "objectstore://m13/cp", srv.url, tmp_path, reload=_POLL)
        cfg["namespace"] = "ns"
        cfg["trajectories"] = {"nats": {"url": srv.url, "credentialsSecret": {"name": "nats"}}}
        proc, _ = _pod(tmp_path, cfg, srv.url, env={streams.ENV_NATS_CREDENTIALS_DIR: str(creds)})
        try:
            proc.wait_ready()
            (creds / streams.SECRET_KEY_PASSWORD).write_text("second")
            srv.config_file.write_text(
                srv.config_file.read_text().replace(auth.format("first"), auth.format("second"))
            )
            assert srv.proc is not None
            srv.proc.send_signal(signal.SIGHUP)  # nats-server reloads its config
            push(models["onnx_v2"], "second")
            helpers.wait_for_model(proc, 2)

            async def reported() -> int | None:
                nc = await nats.connect(srv.url, user="actor", password="second")
                try:
                    found = await reporting.read_reports(nc.jetstream(), "ns", "rotate")
                finally:
                    await nc.close()
                report = found.get("rotate-0")
                return None if report is None else report.model_version

            helpers.wait_for("version 2 reported", lambda: asyncio.run(reported()) == 2)
            assert proc.terminate() == 0, proc.logs()
        finally:
            proc.kill()
