"""The runtime process: `relayrl-runtime run --config FILE` (one per actor pod).

`App.run` owns everything it starts and tears it down in reverse on the way out:
the HTTP server (/metrics, /healthz, /readyz), the model (local path or registry), the
sink, the agent and its routers, the hot-reload watcher task, and the environment
source (a gymnasium/python driver thread or the ZMQ endpoint thread). SIGTERM or SIGINT
(or a configured run limit) starts the drain: stop stepping, cut and flush partial
trajectories, let routers write everything queued, close the sink, then exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from relayrl_runtime import agent as agent_mod
from relayrl_runtime import config, errors, httpserver, metrics, registry, reload, spec
from relayrl_runtime.envs import driver, gym, python
from relayrl_runtime.sinks import base as sink_base
from relayrl_runtime.sinks import local
from relayrl_runtime.transport import endpoint

log = logging.getLogger(__name__)


class App:
    """One runtime process for one config."""

    def __init__(self, cfg: config.RuntimeConfig, *, model_cache: Path | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics.RuntimeMetrics()
        self.model_cache = model_cache
        self.agent: agent_mod.Agent | None = None
        self.sink: sink_base.TrajectorySink | None = None
        self.stats: driver.DriverStats | None = None
        self.http_port: int | None = None
        self.remote_address: str | None = None
        self._failed: str | None = None
        self._stop = asyncio.Event()
        self._drv_stop = threading.Event()
        self._endpoint: endpoint.RemoteEndpoint | None = None
        self._source_task: asyncio.Task[driver.DriverStats] | None = None

    # ------------------------------------------------------------------ probes

    def healthy(self) -> tuple[bool, str]:
        """/healthz: the process is alive and has not failed."""
        if self._failed is not None:
            return False, f"failed: {self._failed}"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        """/readyz: model loaded and sink connected."""
        if self._failed is not None:
            return False, f"failed: {self._failed}"
        if self.agent is None or self.agent.closed:
            return False, "model not loaded"
        if self.sink is not None and not self.sink.connected:
            return False, "sink not connected"
        return True, f"ready: model version {self.agent.get_model_version()}"

    def stop(self) -> None:
        """Start the drain (what SIGTERM does)."""
        self._stop.set()

    # --------------------------------------------------------------------- run

    async def run(self) -> int:
        """Run until stopped; returns the exit code."""
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        server = httpserver.HttpServer(
            self.metrics.exposition, self.healthy, self.ready, cfg.server.host, cfg.server.port
        )
        self.http_port = await server.start()
        log.info("http server on %s:%d", cfg.server.host, self.http_port)
        nc: Any = None
        tasks: list[asyncio.Task[Any]] = []
        cache_dir = None
        code = 0
        try:
            cache = self.model_cache
            if cache is None:
                cache_dir = tempfile.TemporaryDirectory(prefix="relayrl-models-")
                cache = Path(cache_dir.name)
            model_path, watcher_factory, nc = await self._resolve_model(cache)
            self.sink = self._build_sink()
            self.agent = await asyncio.to_thread(self._build_agent, model_path)
            log.info(
                "agent %s ready: %d actors, %d routers, model version %d",
                cfg.agent,
                len(self.agent.get_actor_ids()),
                self.agent.router_scale,
                self.agent.get_model_version(),
            )
            if cfg.reload.enabled:
                tasks.append(asyncio.create_task(watcher_factory(self.agent).run()))
            source = await self._start_source()
            waiters: list[asyncio.Task[Any]] = [asyncio.create_task(self._stop.wait())]
            if source is not None:
                waiters.append(source)
            if cfg.limits.max_seconds is not None:
                waiters.append(asyncio.create_task(asyncio.sleep(cfg.limits.max_seconds)))
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
            log.info("draining")
        except errors.RelayRLError as err:
            self._failed = str(err)
            log.error("runtime failed: %s", err)
            code = 2
        finally:
            code = await self._drain(tasks, code)
            if nc is not None:
                with contextlib.suppress(Exception):
                    await nc.close()
            await server.close()
            if cache_dir is not None:
                cache_dir.cleanup()
        return code

    async def _drain(self, tasks: list[asyncio.Task[Any]], code: int) -> int:
        self._drv_stop.set()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._source_task is not None:
            try:
                self.stats = await self._source_task
            except errors.RelayRLError as err:
                log.error("environment driver failed: %s", err)
                code = code or 2
        if self._endpoint is not None:
            await asyncio.to_thread(self._endpoint.stop)
        if self.agent is not None:
            try:
                await asyncio.wait_for(
                    asyncio.to_thread(self.agent.shutdown, True), self.cfg.drain_seconds
                )
                log.info("drained: trajectories flushed, sink closed")
            except TimeoutError:
                log.error("drain did not finish in %.0fs", self.cfg.drain_seconds)
                code = code or 3
        return code

    async def _resolve_model(self, cache: Path) -> tuple[Path, Any, Any]:
        m = self.cfg.model
        poll = self.cfg.reload.poll_seconds
        if m.uri.startswith(registry.SCHEME + "://"):
            ref = registry.ModelRef.parse(m.uri, m.version)
            nc = await registry.connect(self.cfg.trajectories.nats.url)
            path, entry = await registry.fetch(nc, ref, cache)
            log.info("model %s version %s fetched from the registry", ref.key, entry.version)

            def registry_watcher(a: agent_mod.Agent) -> reload.RegistryWatcher:
                return reload.RegistryWatcher(a, nc, ref, cache, poll, entry.digest)

            return path, registry_watcher, nc
        path = Path(m.uri.removeprefix("file://"))

        def path_watcher(a: agent_mod.Agent) -> reload.PathWatcher:
            return reload.PathWatcher(a, path, poll)

        return path, path_watcher, None

    def _build_sink(self) -> sink_base.TrajectorySink:
        ls = self.cfg.local_sink
        if ls is None:
            raise errors.InvalidArgumentError(
                "localSink: expected a trajectory sink; this runtime build writes local "
                "files only (the NATS publisher comes with the trajectory pipeline)"
            )
        prefix = f"{self.cfg.agent}-{self.cfg.pod_index}"
        return local.LocalFileSink(
            Path(ls.path),
            ls.format,
            prefix=prefix,
            rotate_rows=ls.rotate_rows,
            rotate_seconds=ls.rotate_seconds,
        )

    def _env_copies(self) -> int:
        env = self.cfg.environment
        if env.gymnasium is not None:
            return env.gymnasium.envs_per_actor
        if env.python is not None:
            return env.python.envs_per_actor
        return 0

    def _build_agent(self, model_path: Path) -> agent_mod.Agent:
        cfg = self.cfg
        copies = self._env_copies()
        actors = cfg.actor_slice()
        # Each env copy is one agent actor: actor a's copies get ids a*k .. a*k+k-1.
        ids = [a * copies + j for a in actors for j in range(copies)]
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

    async def _start_source(self) -> asyncio.Task[Any] | None:
        cfg = self.cfg
        env = cfg.environment
        agent = self.agent
        assert agent is not None
        if env.remote is not None:
            self._endpoint = endpoint.RemoteEndpoint(
                agent,
                f"tcp://*:{env.remote.port}",
                max_frame_bytes=env.remote.max_frame_bytes,
                max_clients=env.remote.max_clients,
            )
            self.remote_address = await asyncio.to_thread(self._endpoint.start)
            return None
        ids = np.asarray(agent.get_actor_ids(), dtype=np.int64)
        if len(ids) == 0:
            return None
        if env.gymnasium is not None:
            g = env.gymnasium
            venv = gym.make(g.id, len(ids), vector_mode=g.vector_mode, kwargs=g.kwargs)
        else:
            assert env.python is not None
            venv = python.make(env.python.entry_point, len(ids), env.python.kwargs)
        drv = driver.EnvDriver(agent, venv, ids, seed=cfg.policy.seed)

        def run() -> driver.DriverStats:
            try:
                return drv.run(max_steps=cfg.limits.max_env_steps, stop=self._drv_stop)
            finally:
                drv.close()

        self._source_task = asyncio.create_task(asyncio.to_thread(run))
        return self._source_task


def main(config_path: Path) -> int:
    """Load the config and run the process; the CLI's `run` subcommand."""
    from relayrl_runtime import logs

    cfg = config.load(config_path)
    logs.setup(cfg.log_format.value)
    if cfg.device is spec.Device.CUDA:
        log.info("device cuda requested")
    return asyncio.run(App(cfg).run())
