"""Pod status reports in the `relayrl-status` KV bucket, on a real nats-server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import nats
import pytest
from integration.runtime import helpers

from relayrl_runtime import aio, app, config, reporting, streams
from support import natsserver


async def _reports(url: str, namespace: str, agent: str) -> dict[str, reporting.PodReport]:
    nc = await nats.connect(url)
    try:
        return await reporting.read_reports(nc.jetstream(), namespace, agent)
    finally:
        await nc.close()


def _reports_now(url: str, namespace: str, agent: str) -> dict[str, reporting.PodReport]:
    return asyncio.run(_reports(url, namespace, agent))


async def _wait_report(js: Any, what: str, check: Any) -> dict[str, reporting.PodReport]:
    deadline = time.monotonic() + 30.0
    last: dict[str, reporting.PodReport] = {}
    while time.monotonic() < deadline:
        last = await reporting.read_reports(js, "ns", "cartpole")
        if check(last):
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


async def test_reporter_puts_reports_and_reports_version_changes_at_once(
    nats_server: natsserver.NatsServer,
) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        assert await reporting.read_reports(js, "ns", "cartpole") == {}
        state: dict[str, Any] = {"version": 1, "revision": "aaaa"}

        def snapshot() -> reporting.PodReport:
            return reporting.PodReport(
                "cartpole-0",
                state["version"],
                4,
                True,
                time.time(),
                config_revision=state["revision"],
            )

        # A long interval: only a change can explain a second or third report.
        reporter = reporting.Reporter(js, "ns", "cartpole", snapshot, interval=3600, check=0.05)
        task = asyncio.create_task(reporter.run())
        try:
            first = await _wait_report(js, "a report", lambda r: "cartpole-0" in r)
            assert first["cartpole-0"].model_version == 1
            assert first["cartpole-0"].actors == 4
            assert first["cartpole-0"].ready
            state["version"] = 2
            second = await _wait_report(
                js, "version 2", lambda r: r["cartpole-0"].model_version == 2
            )
            assert second["cartpole-0"].time >= first["cartpole-0"].time
            # The value can be read before the put's acknowledgement reaches the
            # reporter (which counts a report then).
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if reporter.reports >= 2:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)  # and no third report follows
            assert reporter.reports == 2
            # A config applied (a slice handover waits for it): reported at once too.
            state["revision"] = "bbbb"
            third = await _wait_report(
                js, "revision bbbb", lambda r: r["cartpole-0"].config_revision == "bbbb"
            )
            assert third["cartpole-0"].model_version == 2
        finally:
            await aio.cancel_and_wait(task)  # one cancel may be lost in a NATS call
            assert task.cancelled()
        # Another Agent's reports are not mixed in; the bucket keeps one value per key.
        kv = await reporting.ensure_bucket(js)
        other = reporting.PodReport(
            "other-0", 5, 1, False, time.time(), model_uri="objectstore://models/other"
        )
        await reporting.put_report(kv, "ns", "other", other)
        assert set(await reporting.read_reports(js, "ns", "cartpole")) == {"cartpole-0"}
        assert (await reporting.read_reports(js, "ns", "other"))["other-0"] == other
        status = await kv.status()
        assert status.history == 1
        assert status.ttl == pytest.approx(reporting.MAX_AGE_SECONDS)
        entry = await kv.get(reporting.key("ns", "cartpole", "cartpole-0"))
        assert set(json.loads(entry.value)) == {
            "pod",
            "modelVersion",
            "actors",
            "ready",
            "time",
            "refused",
            "configRevision",
            "modelUri",
        }
    finally:
        await asyncio.wait_for(nc.close(), 10)  # never hang a failed test


async def test_read_reports_sees_every_pod_while_they_report(
    nats_server: natsserver.NatsServer,
) -> None:
    # Reads racing with puts: each read must still see all three pods (with history 1 a
    # put replaces the key's message, which once made a snapshot come back empty).
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        kv = await reporting.ensure_bucket(js)
        for pod in range(3):
            report = reporting.PodReport(f"cartpole-{pod}", 1, 4, True, time.time())
            await reporting.put_report(kv, "ns", "cartpole", report)

        async def keep_reporting() -> None:
            version = 1
            while True:
                version += 1
                report = reporting.PodReport("cartpole-0", version, 4, True, time.time())
                await reporting.put_report(kv, "ns", "cartpole", report)
                await asyncio.sleep(0.002)

        putter = asyncio.create_task(keep_reporting())
        try:
            seen = [await reporting.read_reports(js, "ns", "cartpole") for _ in range(300)]
        finally:
            await aio.cancel_and_wait(putter)  # one cancel may be lost in a NATS call
            assert putter.cancelled()
        assert [sorted(r) for r in seen if len(r) != 3] == []
        versions = [r["cartpole-0"].model_version for r in seen]
        assert versions == sorted(versions)
        assert versions[-1] > 1
    finally:
        await asyncio.wait_for(nc.close(), 10)  # never hang a failed test


def _push(url: str, model: Path) -> None:
    args = ["model", "push", "--nats", url, "--bucket", "models", "--name", "cp", str(model)]
    done = subprocess.run(
        [str(helpers.RUNTIME), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_runtime_reports_its_model_version(
    nats_server: natsserver.NatsServer, models: dict[str, Path], tmp_path: Path
) -> None:
    url = nats_server.url
    _push(url, models["onnx"])
    _push(url, models["onnx_v2"])
    cfg: dict[str, Any] = {
        "agent": "cartpole",
        "namespace": "ns",
        "actors": 2,
        "model": {"uri": "objectstore://models/cp", "format": "onnx", "version": 1},
        "environment": {"gymnasium": {"id": "CartPole-v1", "envsPerActor": 2}},
        "trajectories": {"nats": {"url": url}},
        "localSink": {"path": str(tmp_path / "out")},
        "reload": {"pollSeconds": 0.2},
    }
    env = {config.ENV_POD_NAME: "cartpole-7"}
    proc = helpers.RuntimeProcess(tmp_path, cfg, env=env, mounted=True)
    try:
        proc.wait_ready()
        reports = helpers.wait_for(
            "a ready report",
            lambda: (
                (r := _reports_now(url, "ns", "cartpole")).get("cartpole-7")
                and r["cartpole-7"].ready
                and r
            ),
        )
        report = reports["cartpole-7"]
        assert (report.model_version, report.actors) == (1, 4)
        # Unpinned: follow the newest version in the registry (2), and say so.
        proc.update_config({**cfg, "model": {**cfg["model"], "version": None}})
        helpers.wait_for(
            "a version 2 report",
            lambda: _reports_now(url, "ns", "cartpole")["cartpole-7"].model_version == 2,
        )
        text = proc.metrics()
        assert helpers.metric(text, "relayrl_runtime_model_version") == 2
        # The config change and the registry poll both saw version 2: loaded once.
        ok = 'relayrl_runtime_model_reloads_total{result="ok"}'
        assert helpers.metric(text, ok) == 1, proc.logs()
        assert _reports_now(url, "ns", "cartpole")["cartpole-7"].refused is None
        # A version of another layout is refused, and the report says so (the operator
        # rolls the pods for it); the pod keeps running version 2.
        _push(url, models["onnx_v3_wide"])
        report = helpers.wait_for(
            "a report of the refusal",
            lambda: (
                _reports_now(url, "ns", "cartpole")["cartpole-7"].refused is not None
                and _reports_now(url, "ns", "cartpole")["cartpole-7"]
            ),
        )
        assert report.model_version == 2
        assert report.refused is not None
        assert (report.refused.version, report.refused.incompatible) == (3, True)
        assert "inputs: expected [4] float32, got [6] float32" in report.refused.reason
        assert proc.terminate() == 0, proc.logs()
    finally:
        proc.kill()


async def test_runtime_publishes_to_nats_without_a_local_sink(
    nats_server: natsserver.NatsServer, models: dict[str, Path], tmp_path: Path
) -> None:
    """Every step the process took is in the stream once it exits; it reported its
    model version while it ran (a run of seconds, not of a few steps: the first report
    follows the reporter's own connection)."""
    url = nats_server.url
    cfg: dict[str, Any] = {
        "agent": "cartpole",
        "namespace": "ns",
        "actors": 2,
        "model": {"uri": str(models["onnx"]), "format": "onnx"},
        "environment": {"gymnasium": {"id": "CartPole-v1"}},
        "trajectories": {"maxLength": 20, "nats": {"url": url}},
        "limits": {"maxSeconds": 2.0},
    }
    proc = helpers.RuntimeProcess(tmp_path, cfg)
    try:
        code = await asyncio.to_thread(proc.proc.wait, 120)
        assert code == 0, proc.logs()
    finally:
        proc.kill()
    taken = helpers.logged(proc.logs(), "env_steps")
    assert taken > 0
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(streams.stream_name("ns", "cartpole"))
        assert info.state.messages > 0
        sub = await js.pull_subscribe(streams.trajectories_subject("ns", "cartpole"), "check")
        steps = 0
        while steps < taken:
            for msg in await sub.fetch(100, timeout=10):
                steps += int(msg.headers[streams.HEADER_STEPS])
                await msg.ack()
        assert steps == taken
        reports = await reporting.read_reports(js, "ns", "cartpole")
        assert reports["cartpole-0"].model_version == 1
    finally:
        await nc.close()


def test_no_nats_no_reports(models: dict[str, Path], tmp_path: Path) -> None:
    base = {
        "agent": "a",
        "actors": 1,
        "model": {"uri": str(models["onnx"]), "format": "onnx"},
        "environment": {"gymnasium": {"id": "CartPole-v1"}},
    }
    local = config.from_mapping({**base, "localSink": {"path": str(tmp_path)}}, environ={})
    assert not app.App(local).uses_nats
    published = config.from_mapping(base, environ={})
    assert app.App(published).uses_nats
    registry = config.from_mapping(
        {
            **base,
            "localSink": {"path": str(tmp_path)},
            "model": {"uri": "objectstore://models/cp", "format": "onnx"},
        },
        environ={},
    )
    assert app.App(registry).uses_nats
