"""The runtime process: `relayrl-runtime run --config FILE` (one per actor pod).

`App.run` owns everything it starts and tears it down in reverse on the way out:
the HTTP server (/metrics, /healthz, /readyz), the model (local path or registry), the
sink (local files, or the NATS publisher when the config has no `localSink`), the agent
and its routers, the hot-reload watcher task, the config-file watcher (`live`), the
status reporter (`reporting`, when the process talks to NATS), and the environment
source (a gymnasium/python driver thread or the ZMQ endpoint thread). SIGTERM or SIGINT
(or a configured run limit) starts the drain: stop stepping, cut and flush partial
trajectories, let routers write everything queued, close the sink, then exit 0. The
drain takes about `drainSeconds`: what overran is named in the log and the process
exits 3, and `watchdog` ends a process still alive 10 s later.

Servers bind `server.host`, or `RELAYRL_BIND_ADDRESS` when it is set (`config.bind_host`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import nats.errors
import numpy as np

from relayrl_runtime import agent as agent_mod
from relayrl_runtime import (
    aio,
    config,
    errors,
    httpserver,
    live,
    metrics,
    registry,
    reload,
    reporting,
    spec,
    streams,
    watchdog,
)
from relayrl_runtime.envs import driver, gym, python
from relayrl_runtime.inference import model as model_mod
from relayrl_runtime.sinks import base as sink_base
from relayrl_runtime.sinks import local
from relayrl_runtime.transport import endpoint, publisher

# How long the first NATS connection may take when the model comes from the registry
# (nothing can run before it); later disconnects are retried forever.
_NATS_CONNECT_SECONDS = 60.0
# A registry model not there yet is looked for again after 1 s, doubling up to 30 s.
_MODEL_WAIT_SECONDS = 1.0
_MODEL_WAIT_MAX_SECONDS = 30.0
# How long closing a NATS connection may take on the way out.
_NATS_CLOSE_SECONDS = 5.0
# How long past the drain deadline the publisher's close may take to return (it gives up
# on unacked messages at the deadline itself, then stops its thread).
_PUBLISHER_CLOSE_GRACE = 2.0
# How long the background tasks (watchers, reporter) may take to end once cancelled.
_CANCEL_SECONDS = 10.0
# How much longer than `drainSeconds` the process may take to exit before the watchdog
# ends it (closing connections, the HTTP server, the interpreter's own finalization).
_EXIT_GRACE_SECONDS = 10.0
# How often the sink is asked whether it has failed for good.
_SINK_CHECK_SECONDS = 0.5

log = logging.getLogger(__name__)

T = TypeVar("T")


class App:
    """One runtime process for one config."""

    def __init__(
        self,
        cfg: config.RuntimeConfig,
        *,
        model_cache: Path | None = None,
        config_path: Path | None = None,
        config_bytes: bytes | None = None,
        config_poll_seconds: float = 1.0,
        exit_watchdog: bool = False,
    ) -> None:
        self.cfg = cfg
        # Whether the drain arms `watchdog` (only for a process of its own: it exits).
        self.exit_watchdog = exit_watchdog
        self.metrics = metrics.RuntimeMetrics()
        self.model_cache = model_cache
        self.config_path = config_path
        self.config_bytes = config_bytes
        self.config_poll_seconds = config_poll_seconds
        self.bind_host = config.bind_host(cfg)
        self.pod = config.pod_name(cfg)
        self.agent: agent_mod.Agent | None = None
        self.sink: sink_base.TrajectorySink | None = None
        self.stats: driver.DriverStats | None = None
        self.http_port: int | None = None
        self.remote_address: str | None = None
        self.reporter: reporting.Reporter | None = None
        self._failed: str | None = None
        self._waiting: str | None = None  # why the model is not loaded yet, while it waits
        self._stop = asyncio.Event()
        self._drv_stop = threading.Event()
        self._endpoint: endpoint.RemoteEndpoint | None = None
        self._driver: driver.EnvDriver | None = None
        self._watcher: reload.PathWatcher | reload.RegistryWatcher | None = None
        self._config_watcher: live.ConfigWatcher | None = None
        # The global actor indices this process runs: its slice, or under a slice
        # handover the part of it that it ran before (config.slice_handover).
        self._actors: list[int] = []
        # The registry's and the status reports' connection (made anew with the
        # credentials read again when NATS refuses them: a rotated Secret).
        self._conn: streams.RenewingConnection | None = None
        self._source_task: asyncio.Future[driver.DriverStats] | None = None

    @property
    def uses_nats(self) -> bool:
        """Whether this process talks to NATS (publisher or model registry)."""
        return self.cfg.local_sink is None or self.cfg.model.uri.startswith(registry.SCHEME + "://")

    # ------------------------------------------------------------------ probes

    def healthy(self) -> tuple[bool, str]:
        """/healthz: the process is alive and has not failed."""
        if self._failed is not None:
            return False, f"failed: {self._failed}"
        remote = self._endpoint
        # Started, and not stopped by a drain: it ends by itself only on a fault.
        if (
            remote is not None
            and self.remote_address is not None
            and not remote.alive
            and not remote.stopping
        ):
            return False, "the remote endpoint stopped serving"
        env_call = None if self._driver is None else self._driver.env_call_since
        limit = self.cfg.limits.env_call_seconds
        if env_call is not None and time.monotonic() - env_call > limit:
            return False, (
                f"the environment's step or reset has not returned for"
                f" {time.monotonic() - env_call:.0f} s (limits.envCallSeconds: {limit:.0f})"
            )
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        """/readyz: model loaded and sink connected."""
        if self._failed is not None:
            return False, f"failed: {self._failed}"
        if self.agent is None or self.agent.closed:
            return False, self._waiting or "model not loaded"
        waiting = self.sink.waiting if self.sink is not None else None
        if waiting is not None:
            return False, f"trajectory sink: {waiting}"
        return True, f"ready: model version {self.agent.get_model_version()}"

    def stop(self) -> None:
        """Start the drain (what SIGTERM does)."""
        self._stop.set()

    def _arm_watchdog(self) -> None:
        if self.exit_watchdog:
            watchdog.arm(self.cfg.drain_seconds + _EXIT_GRACE_SECONDS, asyncio.get_running_loop())

    # --------------------------------------------------------------------- run

    async def run(self) -> int:
        """Run until stopped; returns the exit code."""
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        server = httpserver.HttpServer(
            self.metrics.exposition, self.healthy, self.ready, self.bind_host, cfg.server.port
        )
        try:
            self.http_port = await server.start()
        except OSError as err:
            # A port taken is the port's fault; a name or address not of this host, the host's.
            port_fault = err.errno in (errno.EADDRINUSE, errno.EACCES)
            field = "server.port" if port_fault else config.bind_field()
            raise errors.InvalidArgumentError(
                f"{field}: cannot listen on {self.bind_host}:{cfg.server.port}:"
                f" {err.strerror or err}"
            ) from err
        log.info("http server on %s:%d", self.bind_host, self.http_port)
        tasks: list[asyncio.Task[Any]] = []
        cache_dir = None
        code = 0
        try:
            cache = self.model_cache
            if cache is None:
                # One directory a pod, emptied first: a process before this one in the
                # pod (killed, out of memory) could not remove its copies, and /tmp is
                # the pod's emptyDir, which outlives its containers.
                cache_dir = cache = Path(tempfile.gettempdir()) / (
                    f"relayrl-models-{cfg.namespace}-{config.pod_name(cfg)}"
                )
                await asyncio.to_thread(shutil.rmtree, cache, True)
                cache.mkdir(parents=True)
            # SIGTERM is heeded while starting too (the first NATS connection alone may
            # take a minute): what has started is drained as usual.
            stopped = asyncio.create_task(self._stop.wait())
            starting = asyncio.create_task(self._start(cache, tasks))
            await asyncio.wait([starting, stopped], return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                await aio.cancel_and_wait(starting)
                if not starting.cancelled():
                    starting.result()  # ended anyway: its error counts; its source drains
                log.info("stopped while starting")
            else:
                code = await self._serve(starting.result(), stopped)
        except errors.RelayRLError as err:
            self._failed = str(err)
            log.error("runtime failed: %s", err)
            code = 2
        finally:
            code = await self._drain(tasks, code)
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._conn.close(), _NATS_CLOSE_SECONDS)
            await server.close()
            if cache_dir is not None:
                shutil.rmtree(cache_dir, ignore_errors=True)
        return code

    async def _start(
        self, cache: Path, tasks: list[asyncio.Task[Any]]
    ) -> asyncio.Future[Any] | None:
        """Load the model, build the sink and agent, start the watchers and the source.

        Background tasks go into `tasks` as they start (the drain cancels them); returns
        the source's future (None for the remote endpoint).
        """
        self._reread_config()
        model_path, watcher_factory = await self._resolve_model(cache)
        # Waiting for the model re-reads the config: what follows starts from the newest.
        cfg = self.cfg
        self.sink = self._build_sink()
        self.agent = await asyncio.to_thread(self._build_agent, model_path)
        log.info(
            "agent %s ready: %d actors, %d routers, model version %d",
            cfg.agent,
            len(self.agent.get_actor_ids()),
            self.agent.router_scale,
            self.agent.get_model_version(),
        )
        self._watcher = watcher_factory(self.agent)
        if cfg.reload.enabled:
            tasks.append(asyncio.create_task(self._watcher.run()))
        source = await self._start_source()
        if self.config_path is not None:
            watcher = live.ConfigWatcher(
                self.config_path,
                cfg,
                self.apply_config,
                poll_seconds=self.config_poll_seconds,
                loaded=self.config_bytes,
            )
            self._config_watcher = watcher
            tasks.append(asyncio.create_task(watcher.run()))
        if self.uses_nats:
            tasks.append(asyncio.create_task(self._report()))
        return source

    async def _serve(self, source: asyncio.Future[Any] | None, stopped: asyncio.Task[Any]) -> int:
        """Run until SIGTERM, a run limit, the source ending (raises its error) or the
        sink failing for good (returns 3); returns the exit code so far."""
        waiters: list[asyncio.Future[Any]] = [stopped]
        if source is not None:
            waiters.append(source)
        if self.cfg.limits.max_seconds is not None:
            waiters.append(asyncio.create_task(asyncio.sleep(self.cfg.limits.max_seconds)))
        sink_failed = asyncio.create_task(self._sink_failure())
        waiters.append(sink_failed)
        done, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            if task is not source:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if source is not None and source in done:
            exc = source.exception()
            if exc is not None:
                raise exc
        code = 0
        if sink_failed in done:
            self._failed = f"sink failed: {sink_failed.result()}"
            log.error("runtime stopping: %s (trajectories cannot be written)", self._failed)
            code = watchdog.EXIT_CODE
        log.info("draining")
        return code

    async def _sink_failure(self) -> str:
        """Returns once the sink has failed for good, with the reason."""
        while True:
            failure = None if self.sink is None else self.sink.failure
            if failure is not None:
                return failure
            await asyncio.sleep(_SINK_CHECK_SECONDS)

    async def _drain(self, tasks: list[asyncio.Task[Any]], code: int) -> int:
        """Stop the source, flush and close, in about `drainSeconds`.

        The source (env driver or remote endpoint) has the first half to stop; the
        flush has until the end, and one still running then is waited for (the watchdog
        bounds that) rather than dropped. Whatever overran is named in one error line
        and the process exits 3. The blocking steps run on daemon threads (`_off_loop`):
        one that never returns cannot hold the process open.
        """
        try:
            self._arm_watchdog()
        except (OverflowError, ValueError):  # never let it keep the drain from running
            log.exception("drain: the exit watchdog could not be armed")
        if isinstance(self.sink, publisher.NatsPublisher):
            # Routers waiting on a full backlog (NATS away) go on, so they can stop;
            # acks not in by the end of the drain are named, and the exit is 3, before
            # the watchdog ends the process without a word.
            self.sink.drain_by(time.monotonic() + self.cfg.drain_seconds)
        # Timeouts below may come out negative: wait_for then only takes what is done.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.drain_seconds
        source_deadline = loop.time() + self.cfg.drain_seconds / 2
        self._drv_stop.set()
        await _cancel(tasks)
        late: list[str] = []
        if self._source_task is not None:
            source = self._source_task
            try:
                self.stats = await asyncio.wait_for(
                    asyncio.shield(source), source_deadline - loop.time()
                )
            except TimeoutError:
                late.append(
                    "the environment driver did not stop in time"
                    " (a long env step, or actors held by a full router queue)"
                )
                source.add_done_callback(_ended_late)
            except errors.RelayRLError as err:
                log.error("environment driver failed: %s", err)
                code = code or 2
            except Exception:
                log.exception("environment driver failed")
                code = code or 2
            else:
                # Every recorded step is flushed below, so a reader can check that the
                # trajectories written hold exactly `env_steps` rows.
                log.info(
                    "environment driver stopped after %d env steps",
                    self.stats.steps,
                    extra={"env_steps": self.stats.steps, "episodes": self.stats.episodes},
                )
        if self._endpoint is not None:
            try:
                await asyncio.wait_for(
                    _off_loop(self._endpoint.stop, "relayrl-endpoint-stop"),
                    source_deadline - loop.time(),
                )
            except TimeoutError:
                late.append("the remote endpoint did not stop in time")
        if self.agent is not None:
            flush = _off_loop(functools.partial(self.agent.shutdown, True), "relayrl-shutdown")
            # The publisher ends its own close at the deadline (what is not acked then is
            # lost, and it says so): a moment more for it to return.
            grace = _PUBLISHER_CLOSE_GRACE if isinstance(self.sink, publisher.NatsPublisher) else 0
            try:
                try:
                    await asyncio.wait_for(asyncio.shield(flush), deadline + grace - loop.time())
                except TimeoutError:
                    log.error(
                        "drain: still flushing trajectories after %.0fs, waiting for them",
                        self.cfg.drain_seconds,
                    )
                    await flush
                    late.append("trajectories were flushed late")
            except publisher.UnackedError:
                code = code or watchdog.EXIT_CODE  # the publisher said what was lost
            except Exception:
                log.exception("drain: flushing trajectories or closing the sink failed")
                code = code or watchdog.EXIT_CODE
            else:
                log.info("drained: trajectories flushed, sink closed")
        elif self.sink is not None:
            # The agent never started, so nothing was recorded: just close the sink.
            try:
                await asyncio.wait_for(
                    _off_loop(self.sink.close, "relayrl-sink-close"),
                    deadline - loop.time(),
                )
            except Exception as err:
                log.warning("closing the sink: %r", err)
        if late:
            log.error("drain did not finish in %.0fs: %s", self.cfg.drain_seconds, "; ".join(late))
            code = code or watchdog.EXIT_CODE
        return code

    def _nats_options(self) -> streams.ConnectOptions:
        try:
            return streams.nats_spec_options(self.cfg.trajectories.nats, name=self.pod)
        except streams.ConnectError as err:
            raise errors.InvalidArgumentError(f"trajectories.nats: {err}") from err

    async def _resolve_model(self, cache: Path) -> tuple[Path, Any]:
        m = self.cfg.model
        poll = self.cfg.reload.poll_seconds
        if m.uri.startswith(registry.SCHEME + "://"):
            ref = registry.ModelRef.parse(m.uri, m.version)
            conn = streams.RenewingConnection(self._nats_options, deadline=_NATS_CONNECT_SECONDS)
            try:
                await conn.open()
            except streams.ConnectError as err:
                raise errors.ModelLoadError(f"model registry: {err}") from err
            self._conn = conn
            delay = _MODEL_WAIT_SECONDS
            while True:
                try:
                    path, entry = await registry.fetch(conn.current, ref, cache)
                    break
                except (
                    errors.ModelMissingError,
                    errors.ModelLoadError,
                    TimeoutError,
                    OSError,
                    nats.errors.Error,
                ) as err:
                    # Not pushed yet, a pinned version that is not there, an archive no
                    # runtime can unpack, or NATS not answering: wait (not ready) rather
                    # than exit into a crash loop. SIGTERM ends the wait.
                    delay = await self._wait_for_model(
                        str(err) or streams.describe(err),
                        "push it, or change model.version"
                        if isinstance(err, errors.RelayRLError)
                        else "the model registry did not answer",
                        delay,
                    )
                    ref = registry.ModelRef.parse(m.uri, self.cfg.model.version)
            self._waiting = None
            log.info("model %s version %s fetched from the registry", ref.key, entry.version)

            def registry_watcher(a: agent_mod.Agent) -> reload.RegistryWatcher:
                watcher = reload.RegistryWatcher(
                    a, conn.current, ref, cache, poll, entry.digest, path
                )
                conn.on_renew.append(lambda nc: setattr(watcher, "nc", nc))
                return watcher

            return path, registry_watcher
        path = Path(m.uri.removeprefix("file://"))
        if path.is_file():  # the metadata a single graph file needs has no place here
            raise errors.InvalidArgumentError.mismatch(
                "model.uri",
                f"a model directory (with {model_mod.METADATA_FILE}) holding the graph",
                f"the file {path}",
            )

        delay = _MODEL_WAIT_SECONDS
        while (pinned := self.cfg.model.version) is not None:
            try:
                held = model_mod.read_metadata(path).version
            except errors.RelayRLError:
                break  # the load below says what is wrong with the directory
            if held == pinned:
                break
            # The path moved on (a trainer publishing there) before this pod (re)started:
            # wait for the pinned version (not ready) rather than exit into a crash loop.
            delay = await self._wait_for_model(
                reload.pin_not_held(pinned, path, held),
                "publish it there, or change model.version",
                delay,
            )
        self._waiting = None

        def path_watcher(a: agent_mod.Agent) -> reload.PathWatcher:
            return reload.PathWatcher(a, path, poll, self.cfg.model.version)

        return path, path_watcher

    async def _wait_for_model(self, what: str, hint: str, delay: float) -> float:
        """One wait for a model not there yet: /readyz says `what`, the log says it and
        `hint`; then the config is read again (model.version may have changed). Returns
        the next delay (doubling up to a maximum). SIGTERM ends the wait."""
        self._waiting = f"waiting for the model: {what}"
        log.warning("%s; %s; looking again in %.0fs", what, hint, delay)
        await asyncio.sleep(delay)
        self._reread_config()
        return min(2 * delay, _MODEL_WAIT_MAX_SECONDS)

    def _build_sink(self) -> sink_base.TrajectorySink:
        cfg = self.cfg
        ls = cfg.local_sink
        if ls is None:
            nats_spec = cfg.trajectories.nats
            self._nats_options()  # refused now, by name, if the Secrets are not there
            pub = publisher.NatsPublisher(
                self._nats_options,  # read again for each new connection
                publisher.PublisherConfig(
                    namespace=cfg.namespace,
                    agent=cfg.agent,
                    stream=nats_spec.stream,
                    max_message_bytes=nats_spec.max_batch_bytes,
                    create_stream=cfg.create_stream,
                ),
                publisher.PublisherMetrics(self.metrics.registry),
            )
            # Connects in the background; /readyz waits for it (sink.connected).
            pub.start()
            log.info("publishing trajectories on %s", pub.subject)
            return pub
        prefix = f"{cfg.agent}-{cfg.pod_index}"
        return local.LocalFileSink(
            Path(ls.path),
            ls.format,
            prefix=prefix,
            rotate_rows=ls.rotate_rows,
            rotate_seconds=ls.rotate_seconds,
        )

    # ---------------------------------------------------------------- reporting

    def _snapshot(self) -> reporting.PodReport:
        agent = self.agent
        return reporting.PodReport(
            pod=self.pod,
            model_version=None if agent is None else agent.get_model_version(),
            actors=0 if agent is None else agent.actor_count,
            ready=self.ready()[0],
            time=time.time(),
            refused=None if self._watcher is None else self._watcher.refused,
            config_revision=self._config_revision(),
            model_uri=self.cfg.model.uri,
        )

    def _config_revision(self) -> str | None:
        if self._config_watcher is not None:
            return self._config_watcher.revision
        return None if self.config_bytes is None else config.revision(self.config_bytes)

    async def _report(self) -> None:
        """Report this pod's status to NATS (its own connection unless one is open)."""
        conn = self._conn
        own = conn is None
        if conn is None:
            conn = streams.RenewingConnection(self._nats_options, deadline=None)
            await conn.open()
        try:
            reporter = self.reporter = reporting.Reporter(
                conn.current.jetstream(), self.cfg.namespace, self.cfg.agent, self._snapshot
            )
            conn.on_renew.append(lambda nc: setattr(reporter, "js", nc.jetstream()))
            await reporter.run()
        finally:
            if own:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), _NATS_CLOSE_SECONDS)

    # -------------------------------------------------------------- live config

    def _reread_config(self) -> None:
        """Take the hot fields of the mounted config as it is now, before the actors
        are made: it may have changed since the process read it (a slice handover
        began while it started)."""
        if self.config_path is None or self.config_bytes is None:
            return
        try:
            data = self.config_path.read_bytes()
            if data == self.config_bytes:
                return
            new = config.parse_as_run(data, str(self.config_path))
        except (OSError, spec.InvalidSpecError) as err:
            log.warning("config %s: keeping the one read at start: %s", self.config_path, err)
            return
        self.cfg = live.with_hot_fields(self.cfg, new)
        self.config_bytes = data

    def _ids(self, actors: list[int]) -> list[int]:
        # Each env copy is one agent actor: actor a's copies get ids a*k .. a*k+k-1, so
        # an actor keeps its ids (its global index) whatever slice it falls in.
        copies = self._env_copies()
        return [a * copies + j for a in actors for j in range(copies)]

    def _slice(self, cfg: config.RuntimeConfig) -> list[int]:
        """The global actors to run under `cfg`, given those run now."""
        if cfg.slice_handover:
            # Actors move between pods: give up what is no longer ours, take nothing
            # new until the operator clears the handover (every pod has given up).
            running = set(self._actors)
            return [a for a in cfg.actor_slice() if a in running]
        return list(cfg.actor_slice())

    async def apply_config(self, old: config.RuntimeConfig, new: config.RuntimeConfig) -> None:
        """Apply the hot fields of a changed config (`live.ConfigWatcher` calls this)."""
        agent = self.agent
        if agent is None or agent.closed:
            return
        self.cfg = new
        if new.routers != agent.router_scale:
            try:
                routers = await asyncio.to_thread(
                    agent.scale_throughput, new.routers - agent.router_scale
                )
                log.info("routers scaled to %d", routers)
            except errors.RelayRLError as err:
                log.error("routers: could not scale to %d: %s", new.routers, err)
        actors = self._slice(new)
        failed: errors.RelayRLError | None = None
        if actors != self._actors:
            if self._driver is None:
                self._actors = actors
                log.info("actors: %s; this process's actors come from remote clients", actors)
            else:
                try:
                    await asyncio.to_thread(self._driver.resize, self._ids(actors))
                except errors.RelayRLError as err:
                    failed = err
                else:
                    self._actors = actors
                    log.info(
                        "actors: now running global actors %s (%d env copies)%s",
                        actors,
                        len(self._driver.actor_ids),
                        " (slice handover: taking no new ones yet)" if new.slice_handover else "",
                    )
        if new.model.version != old.model.version and self._watcher is not None:
            log.info(
                "model.version: %s",
                "newest" if new.model.version is None else new.model.version,
            )
            await self._watcher.follow(new.model.version)
        if failed is not None:
            # Raised after the rest is applied: the config watcher logs it and does not
            # count this config as applied (a slice handover waits for it).
            raise errors.RelayRLError(f"actors: could not apply the slice {actors}: {failed}")

    def _env_copies(self) -> int:
        return self.cfg.environment.copies_per_actor()

    def _build_agent(self, model_path: Path) -> agent_mod.Agent:
        cfg = self.cfg
        # Started during a slice handover: its actors may still run in another pod.
        self._actors = [] if cfg.slice_handover else list(cfg.actor_slice())
        ids = self._ids(self._actors)
        return agent_mod.Agent(
            model_path,
            actor_count=len(ids),
            actor_ids=ids,
            router_scale=cfg.routers,
            device=cfg.device,
            model_mode=cfg.model.mode,
            model_format=cfg.model.format,
            model_version=cfg.model.version
            if not cfg.model.uri.startswith("objectstore")
            else None,
            sink=self.sink,
            name=cfg.agent,
            max_length=cfg.trajectories.max_length,
            sample=cfg.policy.sample,
            seed=cfg.policy.seed,
            metrics_=self.metrics,
        )

    async def _start_source(self) -> asyncio.Future[Any] | None:
        cfg = self.cfg
        env = cfg.environment
        agent = self.agent
        assert agent is not None
        if env.remote is not None:
            self._endpoint = endpoint.RemoteEndpoint(
                agent,
                endpoint.tcp_address(self.bind_host, env.remote.port),
                max_frame_bytes=env.remote.max_frame_bytes,
                max_clients=env.remote.max_clients,
                max_actors=env.remote.max_actors,
                client_idle_seconds=cfg.limits.remote_client_idle_seconds,
                first_actor_id=endpoint.first_remote_id(cfg.pod_index),
            )
            self.remote_address = await asyncio.to_thread(self._endpoint.start)
            return None
        ids = np.asarray(agent.get_actor_ids(), dtype=np.int64)

        if env.gymnasium is not None:
            field, source = "environment.gymnasium", f"environment.gymnasium {env.gymnasium.id!r}"
        else:
            assert env.python is not None
            field = "environment.python"
            source = f"environment.python {env.python.entry_point!r}"

        def make_env(count: int) -> driver.VecEnv:
            try:
                if env.gymnasium is not None:
                    g = env.gymnasium
                    venv = gym.make(g.id, count, vector_mode=g.vector_mode, kwargs=g.kwargs)
                else:
                    assert env.python is not None
                    venv = python.make(env.python.entry_point, count, env.python.kwargs)
            except errors.RelayRLError:
                raise
            except Exception as err:  # the env's own constructor: e.g. a kwarg it lacks
                raise errors.InvalidArgumentError(
                    f"{field}: the environment could not be made: {type(err).__name__}: {err}"
                ) from err
            try:
                driver.check_spaces(venv, agent.layout, source)
            except errors.RelayRLError:
                venv.close()
                raise
            return venv

        # An empty slice still gets a driver: a live config change may give it actors.
        venv = await asyncio.to_thread(make_env, len(ids)) if len(ids) else None
        if venv is None and cfg.slice_handover and self._env_copies():
            # Started during a slice handover: no actors yet, but the environment must
            # be one that can be made (else the pod would be ready, running none).
            await asyncio.to_thread(lambda: make_env(1).close())
        drv = driver.EnvDriver(
            agent, venv, ids, seed=cfg.policy.seed, make_env=make_env, source=source
        )
        self._driver = drv

        def run() -> driver.DriverStats:
            try:
                return drv.run(max_steps=cfg.limits.max_env_steps, stop=self._drv_stop)
            finally:
                # With the rewards the last actions got (a failed agent has none to cut).
                with contextlib.suppress(errors.RelayRLError):
                    drv.end_episodes()
                drv.close()

        self._source_task = _off_loop(run, "relayrl-env-driver")
        return self._source_task


def main(config_path: Path) -> int:
    """Load the config and run the process; the CLI's `run` subcommand."""
    from relayrl_runtime import logs

    data = config_path.read_bytes()
    cfg = config.parse_as_run(data, str(config_path))
    logs.setup(cfg.log_format.value)
    if config.pod_fields() is not None:
        _note_template(cfg, data, config_path)
    if cfg.device is spec.Device.CUDA:
        log.info("device cuda requested")
    watchdog.install_stack_dump()
    runtime = App(cfg, config_path=config_path, config_bytes=data, exit_watchdog=True)
    return asyncio.run(runtime.run())


def _note_template(cfg: config.RuntimeConfig, data: bytes, path: Path) -> None:
    """Log where the mounted file's restart-only fields differ from the pod's own: a
    pod of an older template, started again during a rolling update."""
    try:
        full = config.parse(data, str(path))
    except spec.InvalidSpecError as err:
        log.warning(
            "config %s: this runtime cannot read all of it (%s); running this pod's"
            " template's settings with the file's actors, routers and model version",
            path,
            err,
        )
        return
    differ = [".".join(p) for p in live.changed_fields(full, cfg) if p not in config.HOT_FIELDS]
    if differ:
        log.warning(
            "config %s differs from this pod's template in %s: running the template's"
            " (a rolling update replaces the pod)",
            path,
            ", ".join(differ),
        )


async def _cancel(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel the background tasks and wait (a little) for them to end."""
    pending = await aio.cancel_and_wait(*tasks, give_up_after=_CANCEL_SECONDS)
    for task in tasks:
        if task in pending:
            log.error("background task %s did not end when cancelled", task.get_name())
            continue
        err = aio.failure(task)
        if err is not None:  # a background task that failed must not stop the drain
            log.error("background task %s failed", task.get_name(), exc_info=err)


def _ended_late(source: asyncio.Future[Any]) -> None:
    """Retrieve the outcome of a source that stopped after the drain gave up on it."""
    err = aio.failure(source)
    if err is not None:
        log.warning("environment driver ended after the drain: %r", err)


def _off_loop(fn: Callable[[], T], name: str) -> asyncio.Future[T]:
    """Run `fn` on a daemon thread of its own; the future gets its result.

    Unlike `asyncio.to_thread`, a call that never returns does not hold the process open
    (the event loop's executor is joined on the way out; a daemon thread is not).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, err: BaseException | None) -> None:
        if future.done():  # cancelled: nobody waits for it any more
            return
        if err is not None:
            future.set_exception(err)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result, err = fn(), None
        except BaseException as exc:  # handed to the awaiting coroutine
            result, err = None, exc
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            loop.call_soon_threadsafe(settle, result, err)

    threading.Thread(target=target, name=name, daemon=True).start()
    return future
