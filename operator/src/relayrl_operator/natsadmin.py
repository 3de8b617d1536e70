"""The operator's side of NATS: each Agent's JetStream stream and model bucket.

Names and stream settings come from `relayrl_runtime.streams`, the one place the
runtime, the sinks and the operator share. Connections are cached per server URL and
credential; credentials and TLS material are read from the Agent's Secrets through
the apiserver and written to a private temporary directory for nats-py. A server
named by a bare Service name (`nats://nats:4222`) is the one in the Agent's
namespace, as for its pods. While a server is away the passes of its Agents fail at
once rather than wait out a request: a connection that is reconnecting, a connect that
failed within `RETRY_SECONDS`, and one under way to a server that failed before all
answer so, so many Agents on that server do not hold the workers. A connection that
has been reconnecting for `STALE_SECONDS` is opened anew, with its Secrets read again
(rotated credentials or certificates are taken).

Each connection also watches the `relayrl-status` key-value bucket, where actor pods
report the model version they run (`relayrl_runtime.reporting`); the latest report of
every pod is kept in memory and a listener (the reconciler) is told which Agent's
pods reported, so status follows a model push without polling.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.api
import nats.js.errors
import nats.js.kv
from nats.aio.client import Client as NATS

from relayrl_operator import kube
from relayrl_operator.builders import common
from relayrl_runtime import aio, reporting, spec, streams

log = logging.getLogger(__name__)

RETRY_SECONDS = 5.0
STALE_SECONDS = 30.0
# A connection no Agent has used for this long is closed (at a resync).
IDLE_SECONDS = 300.0
# How often (seconds) a quiet report watch checks that the status bucket is the one it
# follows. A server started again without its store (a new volume, a wiped disk) has
# none; the pods make it again, and its sequences start over below the one the old
# watch waits for: that watch would never deliver again.
REPORTS_CHECK_SECONDS = 30.0
# How long a new connection waits for its report watch to bring in what the status
# bucket holds, at most, before a pass may use it.
REPORTS_LOAD_SECONDS = 2.0


@dataclass(frozen=True)
class _ConnKey:
    url: str
    namespace: str
    credentials: str | None
    tls: str | None


class NatsStreams:
    """Implements `reconcile.Streams` against real NATS servers."""

    def __init__(self, client: kube.Client, connect_deadline: float = 5.0) -> None:
        self._client = client
        self._deadline = connect_deadline
        self._conns: dict[_ConnKey, NATS] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="relayrl-operator-nats-")
        self._watchers: dict[_ConnKey, asyncio.Task[None]] = {}
        self._reports: dict[tuple[str, str], dict[str, reporting.PodReport]] = {}
        self._listener: Callable[[tuple[str, str]], None] | None = None
        # One connection per key however many workers ask at once; a slow server
        # holds up only the Agents that use it.
        self._connecting: dict[_ConnKey, asyncio.Lock] = {}
        # A failed connect, until it may be tried again: (monotonic time, its error).
        self._failed: dict[_ConnKey, tuple[float, Exception]] = {}
        # Since when each connection has been reconnecting (monotonic time).
        self._down_since: dict[_ConnKey, float] = {}
        self._closing: set[asyncio.Task[None]] = set()  # connections given up on
        # When each connection was last asked for, or named by a live Agent (monotonic).
        self._used: dict[_ConnKey, float] = {}

    def set_listener(self, listener: Callable[[tuple[str, str]], None]) -> None:
        """Call `listener((namespace, agent))` when a pod of that Agent reports."""
        self._listener = listener

    def reports(self, namespace: str, agent: str) -> Mapping[str, reporting.PodReport]:
        """The latest report of each pod of an Agent, by pod name."""
        return self._reports.get((namespace, agent), {})

    async def close(self) -> None:
        """Stop the watchers, close every connection, remove the credential files."""
        watchers = list(self._watchers.values())
        await aio.cancel_and_wait(*watchers)
        for task in watchers:
            failed = aio.failure(task)
            if failed is not None:
                log.warning("status bucket watch ended: %r", failed)
        self._watchers.clear()
        if self._closing:
            await asyncio.wait(set(self._closing))
        for nc in self._conns.values():
            with contextlib.suppress(Exception):
                await nc.close()
        self._conns.clear()
        self._tmp.cleanup()

    async def ensure(self, agent: common.AgentRef) -> str:
        """Create or update the stream and the model bucket."""
        js = (await self._connect(agent)).jetstream()
        config = _stream_config(agent)
        await streams.ensure_stream(js, config)
        bucket = streams.model_bucket(agent.namespace, agent.name)
        owner = streams.models_description(agent.namespace, agent.name)
        # The bucket's name joins namespace and Agent with '-', which both may hold:
        # team-a/x and team/a-x name one bucket. It is the one's that made it; the
        # other is told so rather than share it (and lose its models when the first
        # Agent's delete removes the bucket).
        info = await _info(js, streams.object_store_stream(bucket))
        if info is None:
            await streams.ensure_object_store(js, bucket, description=owner)
        else:
            described = info.config.description or ""
            if streams.models_of_another(described, agent.namespace, agent.name):
                maker = streams.models_agent(described)
                raise streams.StreamConflictError(
                    f"model bucket {bucket} is Agent {maker}'s: its name is this Agent's"
                    f" too (namespace and name joined by '-'); give this Agent another"
                    f" name, or delete {maker}"
                )
        return f"stream {config.name} and model bucket {bucket} ready"

    async def verify(self, agents: Iterable[common.AgentRef]) -> set[tuple[str, str]]:
        """The Agents whose stream or model bucket is missing, or whose stream differs.

        One paged listing of the streams per NATS connection stands in for a stream and
        a bucket request per Agent: a resync of a thousand Agents costs NATS a few
        requests, not two thousand. Agents whose server cannot be listed are returned
        too; their own pass then tries, and its status says what fails.
        """
        groups: dict[_ConnKey, list[common.AgentRef]] = {}
        for agent in agents:
            groups.setdefault(_conn_key(agent), []).append(agent)
        found = await asyncio.gather(*(self._verify(group) for group in groups.values()))
        return set().union(*found)

    async def _verify(self, agents: list[common.AgentRef]) -> set[tuple[str, str]]:
        # What should exist: each Agent's stream (with its config) and bucket stream. What
        # the listing shows as it should be is struck off; what is left was lost.
        wanted: dict[str, tuple[tuple[str, str], nats.js.api.StreamConfig | None]] = {}
        for agent in agents:
            key = (agent.namespace, agent.name)
            config = _stream_config(agent)
            assert config.name is not None
            wanted[config.name] = (key, config)
            bucket = streams.model_bucket(agent.namespace, agent.name)
            wanted[streams.object_store_stream(bucket)] = (key, None)
        try:
            js = (await self._connect(agents[0])).jetstream()
            async for have in streams.iter_stream_configs(js):
                name = have.name or ""
                entry = wanted.get(name)
                if entry is not None and (
                    entry[1] is None or not streams.config_differs(entry[1], have)
                ):
                    del wanted[name]
        except Exception as err:  # any NATS failure: each Agent's own pass finds out
            log.info("cannot list streams at %s: %s", agents[0].spec.trajectories.nats.url, err)
            return {(a.namespace, a.name) for a in agents}
        return {key for key, _ in wanted.values()}

    async def remove(self, agent: common.AgentRef) -> None:
        """Delete the stream and the model bucket (absent ones are fine).

        What is another Agent's stays: a stream that holds other subjects (the same
        `trajectories.nats.stream` given to two Agents), a bucket whose description
        names another Agent (`relayrl-team-a-x-models` is both team-a/x's and
        team/a-x's name).
        """
        try:
            config = _stream_config(agent)
        except ValueError as err:
            # A name no stream could be made for: an Agent from before the CRD refused
            # such names (`cart.pole`). There is nothing of its to delete.
            log.info(
                "agent %s/%s: no stream or bucket to remove: %s", agent.namespace, agent.name, err
            )
            return
        assert config.name is not None
        bucket = streams.model_bucket(agent.namespace, agent.name)
        js = (await self._connect(agent)).jetstream()
        stream_info = await _info(js, config.name)
        if stream_info is not None:
            foreign = streams.foreign_subjects(config, stream_info.config)
            if foreign:
                log.warning(
                    "agent %s/%s: leaving stream %s: it holds %s, another Agent's subjects",
                    agent.namespace,
                    agent.name,
                    config.name,
                    ", ".join(foreign),
                )
            else:
                await streams.delete_stream(js, config.name)
        bucket_info = await _info(js, streams.object_store_stream(bucket))
        if bucket_info is not None:
            owner = bucket_info.config.description or ""
            if streams.models_of_another(owner, agent.namespace, agent.name):
                log.warning(
                    "agent %s/%s: leaving model bucket %s: %s",
                    agent.namespace,
                    agent.name,
                    bucket,
                    owner,
                )
            else:
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await js.delete_object_store(bucket)
        log.info("removed what was left of stream %s and bucket %s", config.name, bucket)

    async def retain(self, agents: Iterable[common.AgentRef]) -> None:
        """Let go of what no Agent here uses: connections (with their report watchers)
        none of `agents` maps to and none asked for in `IDLE_SECONDS` (deleted Agents,
        a changed URL or Secret), and the reports of other Agents or of pods that
        stopped reporting (an expired report leaves no trace in the watch)."""
        now = time.monotonic()
        names = set()
        for agent in agents:
            names.add((agent.namespace, agent.name))
            self._used[_conn_key(agent)] = now
        known = set(self._conns) | set(self._failed) | set(self._connecting) | set(self._used)
        for key in known:
            lock = self._connecting.get(key)
            if now - self._used.get(key, 0.0) > IDLE_SECONDS and not (lock and lock.locked()):
                await self._release(key)
        cutoff = time.time() - 2 * reporting.MAX_AGE_SECONDS
        for agent_key in list(self._reports):
            pods = self._reports[agent_key]
            for pod in [p for p, r in pods.items() if r.time < cutoff]:
                del pods[pod]
            if agent_key not in names or not pods:
                del self._reports[agent_key]

    async def _release(self, key: _ConnKey) -> None:
        watcher = self._watchers.pop(key, None)
        if watcher is not None:
            await aio.cancel_and_wait(watcher)
        nc = self._conns.pop(key, None)
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
            log.info(
                "closed the NATS connection to %s for %s: no Agent uses it", key.url, key.namespace
            )
        for table in (self._connecting, self._failed, self._down_since, self._used):
            table.pop(key, None)

    async def _connect(self, agent: common.AgentRef) -> NATS:
        nats_spec = agent.spec.trajectories.nats
        key = _conn_key(agent)
        self._used[key] = time.monotonic()
        nc = self._usable(key)
        if nc is not None:
            return nc
        lock = self._connecting.setdefault(key, asyncio.Lock())
        self._raise_if_failed(key, lock)
        async with lock:
            nc = self._usable(key)
            if nc is not None:
                return nc
            self._raise_if_failed(key)  # the attempt this one waited for
            try:
                return await self._open(key, nats_spec)
            except Exception as err:
                self._failed[key] = (time.monotonic() + RETRY_SECONDS, err)
                raise

    def _usable(self, key: _ConnKey) -> NATS | None:
        """The cached connection while it is connected; None when there is none to use.

        One that is reconnecting fails the request at once (NATS is away: a request
        would only wait out its timeout, holding a worker); after `STALE_SECONDS` it
        is opened anew.
        """
        nc = self._conns.get(key)
        if nc is None or nc.is_closed:
            return None
        if nc.is_connected:
            return nc
        since = self._down_since.setdefault(key, time.monotonic())
        if time.monotonic() - since <= STALE_SECONDS:
            raise streams.ConnectError(f"nats {key.url}: disconnected, reconnecting")
        log.info("nats %s: reconnecting for %.0fs; opening it anew", key.url, STALE_SECONDS)
        del self._conns[key]
        self._close_later(nc)
        return None

    def _raise_if_failed(self, key: _ConnKey, lock: asyncio.Lock | None = None) -> None:
        """Fail at once, as the last attempt did, while that failure is recent or while
        another attempt at a server that failed is under way (`lock` held)."""
        failed = self._failed.get(key)
        if failed is None:
            return
        until, err = failed
        if time.monotonic() < until or (lock is not None and lock.locked()):
            # The same text as the attempt's: status does not change with each pass.
            raise streams.ConnectError(str(err) or type(err).__name__) from err

    async def _open(self, key: _ConnKey, nats_spec: spec.NatsSpec) -> NATS:
        options = await self._options(key, nats_spec)
        opened: list[NATS] = []  # the callbacks speak for this connection only

        async def disconnected() -> None:
            if opened and self._conns.get(key) is opened[0]:
                self._down_since.setdefault(key, time.monotonic())

        async def reconnected() -> None:
            if opened and self._conns.get(key) is opened[0]:
                self._down_since.pop(key, None)

        nc = await streams.connect(
            options,
            deadline=self._deadline,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
        )
        opened.append(nc)
        self._down_since.pop(key, None)
        self._failed.pop(key, None)
        old = self._watchers.pop(key, None)
        if old is not None:
            old.cancel()
        loaded = asyncio.Event()
        watcher = asyncio.get_running_loop().create_task(
            self._watch_reports(key, nc, loaded), name=f"status-reports {nats_spec.url}"
        )
        self._watchers[key] = watcher
        # The reports the bucket holds, before any pass uses the connection: a status
        # computed without them (a restarted operator's first) would drop the model
        # version the pods run, until they came in a moment later.
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(loaded.wait(), REPORTS_LOAD_SECONDS)
        except BaseException:  # cancelled meanwhile: nothing of this connection stays
            if self._watchers.get(key) is watcher:
                del self._watchers[key]
            watcher.cancel()
            self._close_later(nc)
            raise
        self._conns[key] = nc
        return nc

    def _close_later(self, nc: NATS) -> None:
        """Close a connection in a task of its own (`close` waits for it)."""
        task = asyncio.get_running_loop().create_task(_close_quietly(nc))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _watch_reports(self, key: _ConnKey, nc: NATS, loaded: asyncio.Event) -> None:
        """Follow the status bucket for as long as the connection lives: the reports of
        the pods of the connection's namespace only. A connection is opened for the
        Agents of one namespace (with their credentials): reports it carries for other
        namespaces' pods would let whoever runs that server (an Agent may name any)
        write another tenant's status, and roll its pods."""
        delay = 0.5
        while not nc.is_closed:
            try:
                js = nc.jetstream()
                kv = await reporting.ensure_bucket(js)
                pattern = f"{key.namespace}.>"
                info = await js.stream_info(
                    reporting.STREAM, subjects_filter=reporting.subject(pattern)
                )
                created = info.created
                # The keys holding a value now: the reports are in once each came
                # (the watch's own end-of-values marker can come before the last).
                waiting = set(info.state.subjects or {})
                if not waiting:
                    loaded.set()
                watcher: Any = await kv.watch(pattern)
                delay = 0.5
                seen = 0  # the last stream sequence delivered
                while True:
                    try:
                        entry = await watcher.updates(timeout=REPORTS_CHECK_SECONDS)
                    except nats.errors.TimeoutError:
                        if await _same_bucket(js, created, seen):
                            continue
                        log.info("status bucket at %s gone or made again: watching anew", key.url)
                        with contextlib.suppress(Exception):
                            await watcher.stop()
                        break
                    if isinstance(entry, nats.js.kv.KeyValue.Entry):
                        seen = max(seen, entry.revision or 0)
                        self._report_entry(key, entry)
                        if waiting:
                            waiting.discard(reporting.subject(str(entry.key)))
                            if not waiting:
                                loaded.set()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # a NATS outage: watch again once it is back
                log.info("status bucket watch: %s; again in %.1fs", err, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    def _report_entry(self, key: _ConnKey, entry: Any) -> None:
        parts = str(entry.key).split(".", 2)
        if len(parts) != 3 or parts[0] != key.namespace:
            return
        namespace, agent, pod = parts
        pods = self._reports.setdefault((namespace, agent), {})
        if entry.operation is not None or entry.value is None:  # deleted or purged
            pods.pop(pod, None)
        else:
            try:
                pods[pod] = reporting.PodReport.from_json(entry.value)
            except ValueError as err:
                log.warning("status bucket: skipping %s: %s", entry.key, err)
                return
        if self._listener is not None:
            self._listener((namespace, agent))

    async def _options(self, key: _ConnKey, nats_spec: spec.NatsSpec) -> streams.ConnectOptions:
        values: dict[str, Any] = {}
        if key.credentials is not None:
            data = await self._secret(key.namespace, key.credentials)
            for name in ("user", "password", "token"):
                if name in data:
                    values[name] = data[name].decode()
            if "creds" in data:
                values["creds_file"] = str(self._write(key, "creds", data["creds"]))
        if key.tls is not None:
            data = await self._secret(key.namespace, key.tls)
            for secret_key, option in (
                (streams.TLS_KEY_CA, "tls_ca_file"),
                (streams.TLS_KEY_CERT, "tls_cert_file"),
                (streams.TLS_KEY_KEY, "tls_key_file"),
            ):
                if secret_key in data:
                    values[option] = str(self._write(key, secret_key, data[secret_key]))
        given = streams.split_servers(nats_spec.url)
        servers = tuple(in_namespace(s, key.namespace) for s in given)
        names = {_host(s) for s in given}
        if len(names) == 1 and servers != given:
            # The pods connect to the bare name: its certificate is checked against it.
            # (nats-py takes one name for all servers: several bare names are checked
            # as written here, <name>.<namespace>.svc.)
            values["tls_hostname"] = names.pop()
        return streams.ConnectOptions(servers=servers, name="relayrl-operator", **values)

    async def _secret(self, namespace: str, name: str) -> dict[str, bytes]:
        secret = await self._client.get(kube.SECRET, namespace, name)
        if secret is None:
            raise LookupError(f"Secret {namespace}/{name} not found")
        return {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}

    def _write(self, key: _ConnKey, name: str, content: bytes) -> Path:
        folder = Path(self._tmp.name) / f"{abs(hash(key)):x}"
        folder.mkdir(mode=0o700, exist_ok=True)
        path = folder / name
        path.write_bytes(content)
        path.chmod(0o600)
        return path


async def _info(js: Any, stream: str) -> nats.js.api.StreamInfo | None:
    """A stream's info; None when there is no such stream."""
    try:
        info: nats.js.api.StreamInfo = await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        return None
    return info


async def _close_quietly(nc: NATS) -> None:
    with contextlib.suppress(Exception):
        await nc.close()


def in_namespace(server: str, namespace: str) -> str:
    """A server URL as the Agent's pods resolve it: a bare name (no dot) is a Service in
    their namespace, not in the operator's. IP addresses, `localhost` and names with a
    dot are left as they are."""
    host = _host(server)
    if not host or host.startswith("[") or "." in host or host == "localhost":
        return server
    scheme, _, rest = server.partition("://")
    userinfo, at, hostport = rest.rpartition("@")
    return f"{scheme}://{userinfo}{at}{host}.{namespace}.svc{hostport.removeprefix(host)}"


def _host(server: str) -> str:
    """The host of a server URL as written (an IPv6 address with its brackets)."""
    hostport = server.partition("://")[2].rpartition("@")[2]
    if hostport.startswith("["):
        return hostport[: hostport.find("]") + 1]
    return hostport.split(":", 1)[0].split("/", 1)[0]


def _conn_key(agent: common.AgentRef) -> _ConnKey:
    """Which connection serves an Agent: its server, namespace and Secrets."""
    nats_spec = agent.spec.trajectories.nats
    return _ConnKey(
        url=nats_spec.url,
        namespace=agent.namespace,
        credentials=nats_spec.credentials_secret.name if nats_spec.credentials_secret else None,
        tls=nats_spec.tls.secret_name if nats_spec.tls else None,
    )


def _stream_config(agent: common.AgentRef) -> nats.js.api.StreamConfig:
    """The config an Agent's stream should have."""
    override = agent.spec.trajectories.nats.stream
    return streams.stream_config(agent.namespace, agent.name, override)


async def _same_bucket(js: Any, created: Any, seen: int) -> bool:
    """Whether the status bucket is still the one made at `created` whose watch has
    delivered up to stream sequence `seen`: not deleted, not made again, its sequences
    not started over. A server that cannot be asked now counts as the same one (the
    watch's own reconnects cover an outage)."""
    try:
        info = await js.stream_info(reporting.STREAM)
    except (nats.js.errors.NotFoundError, nats.errors.ConnectionClosedError):
        return False  # a closed connection: its watch ends
    except Exception:  # asked again at the next check
        return True
    if created is not None and info.created is not None and info.created != created:
        return False
    return int(info.state.last_seq) >= seen
