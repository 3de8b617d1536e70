"""The operator's NATS side (`natsadmin.NatsStreams`) against a real nats-server.

The apiserver is a stand-in here (it only serves the Agent's credentials Secret); the
cluster tests run the same code against a real control plane.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import pytest
import yaml

from relayrl_operator import natsadmin
from relayrl_operator.builders import common
from relayrl_runtime import reporting, spec, streams
from support import natsserver

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "cartpole-cpu" / "agent.yaml"


class Secrets:
    """Serves Secrets by name, as the apiserver would; counts the reads."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, str]] = {}
        self.reads = 0

    async def get(self, kind: Any, namespace: str, name: str) -> dict[str, Any] | None:
        self.reads += 1
        values = self.data.get(name)
        if values is None:
            return None
        return {"data": {k: base64.b64encode(v.encode()).decode() for k, v in values.items()}}


def agent(
    url: str,
    credentials: str | None = None,
    *,
    namespace: str = "ml",
    name: str = "cartpole",
    stream: str | None = None,
) -> common.AgentRef:
    body = yaml.safe_load(EXAMPLE.read_text())
    nats: dict[str, Any] = {"url": url}
    if credentials is not None:
        nats["credentialsSecret"] = {"name": credentials}
    if stream is not None:
        nats["stream"] = stream
    body["spec"]["trajectories"] = {**body["spec"]["trajectories"], "nats": nats}
    return common.AgentRef(name, namespace, "u1", 1, spec.parse_spec(body["spec"]))


async def _until(check: Callable[[], bool], seconds: float) -> None:
    for _ in range(int(seconds / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {seconds}s")


async def _streams(url: str) -> set[str]:
    nc = await nats.connect(url)
    try:
        return {str(i.config.name) for i in await nc.jetstream().streams_info()}
    finally:
        await nc.close()


def test_a_bare_service_name_is_the_one_in_the_agents_namespace() -> None:
    cases = {
        "nats://nats:4222": "nats://nats.ml.svc:4222",
        "tls://u:p@nats": "tls://u:p@nats.ml.svc",
        "nats://nats.other:4222": "nats://nats.other:4222",
        "nats://nats.:4222": "nats://nats.:4222",
        "nats://127.0.0.1:4222": "nats://127.0.0.1:4222",
        "nats://[::1]:4222": "nats://[::1]:4222",
        "nats://localhost:4222": "nats://localhost:4222",
    }
    assert {url: natsadmin.in_namespace(url, "ml") for url in cases} == cases


async def test_an_unreachable_server_is_asked_once_and_its_agents_fail_at_once() -> None:
    url = f"nats://127.0.0.1:{natsserver.free_port()}"
    admin = natsadmin.NatsStreams(Secrets(), connect_deadline=1.0)  # type: ignore[arg-type]
    try:
        started = time.monotonic()
        with pytest.raises(streams.ConnectError, match=r"not reachable within 1\.0s") as first:
            await admin.ensure(agent(url))
        assert time.monotonic() - started >= 1.0
        # Twenty more Agents on it, all at once: none waits for another attempt.
        started = time.monotonic()
        results = await asyncio.gather(
            *(admin.ensure(agent(url)) for _ in range(20)), return_exceptions=True
        )
        assert time.monotonic() - started < 0.5
        assert all(isinstance(r, streams.ConnectError) for r in results)
        # The attempt's own words, so an Agent's status does not change with each pass.
        assert {str(r) for r in results} == {str(first.value)}
    finally:
        await admin.close()


async def test_an_agent_whose_name_no_subject_takes_has_nothing_to_remove() -> None:
    """An Agent from before the CRD refused dotted names: its finalizer lets it go
    (no stream could be made for it) instead of waiting on NATS for good."""
    url = f"nats://127.0.0.1:{natsserver.free_port()}"  # nothing listens: never asked
    admin = natsadmin.NatsStreams(Secrets(), connect_deadline=1.0)  # type: ignore[arg-type]
    try:
        await admin.remove(agent(url, name="cart.pole"))
    finally:
        await admin.close()


async def test_a_server_gone_under_a_connection_fails_passes_at_once(
    nats_server: natsserver.NatsServer,
) -> None:
    admin = natsadmin.NatsStreams(Secrets())  # type: ignore[arg-type]
    try:
        a = agent(nats_server.url)
        await admin.ensure(a)
        (nc,) = admin._conns.values()
        nats_server.stop()
        await _until(lambda: not nc.is_connected, 10)
        started = time.monotonic()
        with pytest.raises(streams.ConnectError, match="disconnected, reconnecting"):
            await admin.ensure(a)
        assert time.monotonic() - started < 0.5  # not a request's timeout
        nats_server.start()
        await _until(lambda: nc.is_connected, 20)
        assert "ready" in await admin.ensure(a)
    finally:
        await admin.close()


# nats-py leaves the socket of each refused reconnect attempt open for the garbage
# collector, which warns about it (nats/aio/client.py, `_attempt_reconnect`).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_rotated_credentials_are_taken_once_the_old_ones_stop_working(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(natsadmin, "STALE_SECONDS", 1.0)
    monkeypatch.setattr(natsadmin, "RETRY_SECONDS", 0.2)
    conf = 'authorization {{ user: "operator", password: "{}" }}'
    with natsserver.NatsServer(extra_config=conf.format("first")) as srv:
        secrets = Secrets()
        secrets.data["nats-auth"] = {"user": "operator", "password": "first"}
        admin = natsadmin.NatsStreams(secrets, connect_deadline=2.0)  # type: ignore[arg-type]
        try:
            a = agent(srv.url, credentials="nats-auth")
            assert "ready" in await admin.ensure(a)
            # The password is rotated: the Secret and the server both change.
            srv.stop()
            text = srv.config_file.read_text().replace('"first"', '"second"')
            srv.config_file.write_text(text)
            secrets.data["nats-auth"]["password"] = "second"
            srv.start()
            deadline = time.monotonic() + 30
            while True:
                try:
                    assert "ready" in await asyncio.wait_for(admin.ensure(a), 5)
                    break
                except (Exception, TimeoutError):
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.3)
            assert secrets.reads >= 2  # read again for the new connection
        finally:
            await admin.close()


async def test_a_stream_nats_refuses_is_reported_as_refused(
    nats_server: natsserver.NatsServer,
) -> None:
    """Another stream holds the Agent's subjects: the error is that refusal, not the
    "stream not found" of the update tried after it."""
    nc = await nats.connect(nats_server.url)
    admin = natsadmin.NatsStreams(Secrets())  # type: ignore[arg-type]
    try:
        await nc.jetstream().add_stream(name="OTHER", subjects=["relayrl.ml.cartpole.>"])
        with pytest.raises(nats.js.errors.BadRequestError, match="overlap"):
            await admin.ensure(agent(nats_server.url))
    finally:
        await admin.close()
        await nc.close()


async def test_agents_sharing_a_stream_name_or_a_bucket_name_keep_each_others(
    nats_server: natsserver.NatsServer,
) -> None:
    url = nats_server.url
    admin = natsadmin.NatsStreams(Secrets())  # type: ignore[arg-type]
    try:
        # The same trajectories.nats.stream for two Agents: the second is refused, and
        # deleting it leaves the first one's stream.
        first = agent(url, name="first", stream="shared")
        second = agent(url, name="second", stream="shared")
        await admin.ensure(first)
        with pytest.raises(streams.StreamConflictError, match=r"holds relayrl\.ml\.first\.>"):
            await admin.ensure(second)
        await admin.remove(second)
        assert "shared" in await _streams(url)
        # team-a/x and team/a-x both name their model bucket relayrl-team-a-x-models:
        # the one that did not make it is told so (its stream is ready, its status
        # says why it is not), rather than share it and lose its models when the
        # maker's delete removes the bucket; deleting it leaves the bucket.
        maker, namesake = (
            agent(url, namespace="team-a", name="x"),
            agent(url, namespace="team", name="a-x"),
        )
        await admin.ensure(maker)
        assert "ready" in await admin.ensure(maker)  # its own, again
        with pytest.raises(
            streams.StreamConflictError,
            match=r"model bucket relayrl-team-a-x-models is Agent team-a/x's",
        ):
            await admin.ensure(namesake)
        await admin.remove(namesake)
        assert "OBJ_relayrl-team-a-x-models" in await _streams(url)
        await admin.remove(maker)
        assert "OBJ_relayrl-team-a-x-models" not in await _streams(url)
        # The maker gone, the namesake makes a bucket of its own.
        assert "ready" in await admin.ensure(namesake)
        nc = await nats.connect(url)
        try:
            info = await nc.jetstream().stream_info("OBJ_relayrl-team-a-x-models")
        finally:
            await nc.close()
        assert info.config.description == streams.models_description("team", "a-x")
        await admin.remove(namesake)
        await admin.remove(first)
        assert "shared" not in await _streams(url)
    finally:
        await admin.close()


async def test_a_server_carries_status_reports_of_its_own_namespaces_agents_only(
    nats_server: natsserver.NatsServer,
) -> None:
    """Anyone who may create an Agent may point it at a server of their own, and write
    there a report keyed as another namespace's pod (a refusal that rolls its pods, a
    model version): the operator takes from each connection its namespace's reports."""
    admin = natsadmin.NatsStreams(Secrets())  # type: ignore[arg-type]
    with natsserver.NatsServer() as theirs:
        try:
            await admin.ensure(agent(nats_server.url, namespace="team-a", name="victim"))
            await admin.ensure(agent(theirs.url, namespace="team-b", name="evil"))
            report = reporting.PodReport(
                pod="victim-actors-0", model_version=7, actors=2, ready=True, time=time.time()
            )
            for url, namespace, agent_name, pod in (
                (theirs.url, "team-a", "victim", "victim-actors-0"),  # spoofed
                (theirs.url, "team-b", "evil", "evil-actors-0"),
                (nats_server.url, "team-a", "victim", "victim-actors-1"),
            ):
                nc = await nats.connect(url)
                try:
                    kv = await reporting.ensure_bucket(nc.jetstream())
                    await kv.put(reporting.key(namespace, agent_name, pod), report.to_json())
                finally:
                    await nc.close()
            await _until(lambda: bool(admin.reports("team-b", "evil")), 10)
            await _until(lambda: bool(admin.reports("team-a", "victim")), 10)
            await asyncio.sleep(0.5)  # the spoofed one had as long
            assert set(admin.reports("team-a", "victim")) == {"victim-actors-1"}
            assert set(admin.reports("team-b", "evil")) == {"evil-actors-0"}
        finally:
            await admin.close()


async def test_what_no_agent_uses_is_let_go_at_a_resync(
    nats_server: natsserver.NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connections (each with a report watcher and a consumer on the server) and pod
    reports of Agents that are gone, or of pods that stopped reporting, are dropped."""
    admin = natsadmin.NatsStreams(Secrets())  # type: ignore[arg-type]
    kept, gone = agent(nats_server.url, namespace="a"), agent(nats_server.url, namespace="b")
    try:
        for each in (kept, gone):
            await admin.ensure(each)
        nc = await nats.connect(nats_server.url)
        try:
            kv = await reporting.ensure_bucket(nc.jetstream())
            now = time.time()
            for namespace, pod, at in (("a", "cartpole-actors-0", now), ("b", "x-0", now)):
                report = reporting.PodReport(
                    pod=pod, model_version=1, actors=1, ready=True, time=at
                )
                await kv.put(reporting.key(namespace, "cartpole", pod), report.to_json())
            stale = reporting.PodReport(
                pod="cartpole-actors-9", model_version=1, actors=1, ready=True, time=now - 600
            )
            await kv.put(reporting.key("a", "cartpole", "cartpole-actors-9"), stale.to_json())
        finally:
            await nc.close()
        await _until(lambda: len(admin.reports("a", "cartpole")) == 2, 10)
        await _until(lambda: bool(admin.reports("b", "cartpole")), 10)
        assert len(admin._conns) == 2
        await admin.retain([kept])  # within IDLE_SECONDS: nothing closed yet
        assert len(admin._conns) == 2
        assert set(admin.reports("a", "cartpole")) == {"cartpole-actors-0"}  # stale one went
        assert not admin.reports("b", "cartpole")
        monkeypatch.setattr(natsadmin, "IDLE_SECONDS", 0.0)
        await admin.retain([kept])
        assert set(admin._conns) == {natsadmin._conn_key(kept)}
        assert set(admin._watchers) == {natsadmin._conn_key(kept)}
        # A deleted Agent's connection is opened again when asked for (its cleanup).
        await admin.remove(gone)
        assert len(admin._conns) == 2
    finally:
        await admin.close()


async def test_reports_keep_coming_after_the_server_loses_its_jetstream_state(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server started again without its store (a new volume, a wiped disk) has
    neither the status bucket nor the watcher's consumer. The pods make the bucket
    again; the operator's watch must follow it, not wait at the old one's sequence."""
    monkeypatch.setattr(natsadmin, "REPORTS_CHECK_SECONDS", 0.5)
    admin = natsadmin.NatsStreams(Secrets())  # type: ignore[arg-type]
    with natsserver.NatsServer() as server:

        async def report(pod: str, version: int) -> None:
            nc = await nats.connect(server.url)
            try:
                kv = await reporting.ensure_bucket(nc.jetstream())
                for _ in range(5):  # a few puts: the old watch's sequences run past 1
                    await kv.put(
                        reporting.key("ml", "cartpole", pod),
                        reporting.PodReport(
                            pod=pod, model_version=version, actors=4, ready=True, time=time.time()
                        ).to_json(),
                    )
            finally:
                await nc.close()

        def version(pod: str) -> int | None:
            got = admin.reports("ml", "cartpole").get(pod)
            return None if got is None else got.model_version

        try:
            await admin.ensure(agent(server.url))
            await report("cartpole-actors-0", 1)
            await _until(lambda: version("cartpole-actors-0") == 1, 10)
            server.stop()
            shutil.rmtree(server.store_dir)
            server.start()
            await report("cartpole-actors-0", 2)
            await _until(lambda: version("cartpole-actors-0") == 2, 20)
        finally:
            await admin.close()


async def test_a_new_connection_brings_in_the_reports_before_its_first_use(
    nats_server: natsserver.NatsServer,
) -> None:
    """A restarted operator's first pass of a running Agent computes status with the
    reports its pods made before: else it writes the model version away, and back."""
    nc = await nats.connect(nats_server.url)
    try:
        kv = await reporting.ensure_bucket(nc.jetstream())
        for i in range(50):
            pod = f"cartpole-actors-{i}"
            report = reporting.PodReport(
                pod=pod, model_version=3, actors=4, ready=True, time=time.time()
            )
            await kv.put(reporting.key("ml", "cartpole", pod), report.to_json())
    finally:
        await nc.close()
    admin = natsadmin.NatsStreams(Secrets())  # type: ignore[arg-type]
    try:
        await admin._connect(agent(nats_server.url))
        assert len(admin.reports("ml", "cartpole")) == 50
    finally:
        await admin.close()
