"""Hot reload: watch a model path or the registry and swap new versions into the agent.

The process (`app`) runs one watcher as an asyncio task it owns. Loading happens in a
worker thread (`Agent.areload_model`) and the swap between two requests, so no request
fails during a reload. A version that fails to load or does not fit the running agent
is logged and counted, and the agent keeps its current model. One that loads and then
fails on a request is replaced by the version before it (`Agent.request_action`); the
watchers report it and do not load it again. A process that started on such a version
has none before it: its environment driver holds the version (`Agent.hold`) and its
step until the source holds another version, or, from the registry, the watcher loads
the newest version pushed before it.

For a path, publish a new version in one step: write it to a directory of its own and
point a symbolic link at it (`ln -s v4 tmp && mv -T tmp model`, with `model.uri` the
link). The watcher reloads when the metadata file changes and its version differs from
the running one. Rewriting the files in place works only when `relayrl-model.json` is
written last and the next version is not written while this one loads.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from relayrl_runtime import agent as agent_mod
from relayrl_runtime import errors, registry, reporting
from relayrl_runtime.inference import model

log = logging.getLogger(__name__)


def pin_not_held(pinned: int, path: Path, held: int) -> str:
    """Why a pinned version is not loaded from a model path."""
    return f"model.version {pinned} is pinned but {path} holds version {held}"


class _Watcher:
    """What both watchers share: one check at a time, and the last reload refused.

    `follow` (a config change) and the poll must not fetch and load side by side.
    `refused` is what the pod reports (`reporting.PodReport`): the operator answers a
    version the running agent cannot take in place with a rolling update, and shows
    any other failed reload in status.
    """

    agent: agent_mod.Agent

    def __init__(self) -> None:
        self._checking = asyncio.Lock()
        self.refused: reporting.Refusal | None = None

    async def _reload(
        self, agent: agent_mod.Agent, path: Path, version: int | None, pinned: int | None = None
    ) -> None:
        """Load `version` from `path` into the agent; a refusal is kept, then raised.

        `pinned`: the version the loader must find (the path may have changed since its
        metadata was read)."""
        try:
            await agent.areload_model(path, pinned)
        except errors.RelayRLError as err:
            incompatible = isinstance(err, errors.ModelIncompatibleError)
            self.refused = reporting.Refusal(version, str(err), incompatible)
            raise
        self.refused = None

    def _failed(self, err: errors.RelayRLError) -> None:
        """Count a reload that failed; one the agent refused as incompatible it counted
        itself (result "rejected"), so each attempt has one result."""
        if not isinstance(err, errors.ModelIncompatibleError):
            self.agent.metrics.model_reloads.labels("failed").inc()

    def _keep(self, version: int | None, reason: str) -> None:
        """The wanted version is not in the source, or failed at run time: the pod keeps
        its model and reports so (status shows it) until the source holds another
        version or this one is no longer wanted."""
        refusal = reporting.Refusal(version, reason, incompatible=False)
        if refusal != self.refused:
            log.warning("%s; keeping model version %d", reason, self.agent.get_model_version())
        self.refused = refusal

    def _ran_badly(self, version: int | None) -> bool:
        """Whether `version` failed at run time in this agent (then kept out, reported)."""
        why = None if version is None else self.agent.run_failure(version)
        if why is not None:
            self._keep(version, f"model version {version} {why}")
        return why is not None

    def _runs_wanted(self) -> None:
        """The agent runs the wanted version: nothing to report, unless it failed at run
        time with none to go back to."""
        if not self._ran_badly(self.agent.stalled):
            self.refused = None

    async def check(self) -> None:
        """Reload if the source holds a version other than the running one."""
        async with self._checking:
            await self._check()

    async def _check(self) -> None:
        raise NotImplementedError


class PathWatcher(_Watcher):
    """Polls a model directory's metadata file."""

    def __init__(
        self,
        agent: agent_mod.Agent,
        path: Path,
        poll_seconds: float,
        version: int | None = None,
    ) -> None:
        super().__init__()
        self.agent = agent
        self.path = path
        self.poll_seconds = poll_seconds
        # A pinned version (config model.version): only that version is loaded.
        self.version = version
        # Nothing seen yet: the first poll checks whatever the path holds, as a version
        # published while the agent loaded the one before it is new to the agent.
        self._seen: tuple[int, int, int] | None = None
        # The agent's model swaps, and its failing version, at the last check: a version
        # that failed at run time is looked at again (and reported) though the path is
        # unchanged.
        self._state: tuple[int, int | None] | None = None

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path / model.METADATA_FILE)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            await asyncio.sleep(self.poll_seconds)
            sig = self._signature()
            state = (self.agent.model_swaps, self.agent.stalled)
            if sig is None or (sig == self._seen and state == self._state):
                continue
            self._seen, self._state = sig, state
            await self.check()

    async def follow(self, version: int | None) -> None:
        """Switch to a pinned version (None: whatever the path holds) and check now."""
        self.version = version
        await self.check()

    async def _check(self) -> None:
        try:
            meta = model.read_metadata(self.path)
            running = self.agent.get_model_version()
            if self.version is not None and meta.version != self.version:
                if running == self.version:
                    # Runs the pinned version; the path moved on: nothing else is wrong.
                    self._runs_wanted()
                    log.info(
                        "%s holds version %d; model.version %d is pinned and runs",
                        self.path,
                        meta.version,
                        self.version,
                    )
                else:
                    self._keep(self.version, pin_not_held(self.version, self.path, meta.version))
                return
            if meta.version == running:
                self._runs_wanted()
                return
            if self._ran_badly(meta.version):
                return
            # Only a version read and then not loaded is a refusal: a directory read
            # while it is being written is not.
            await self._reload(self.agent, self.path, meta.version, self.version)
        except errors.RelayRLError as err:
            self._failed(err)
            log.error("hot reload from %s failed, keeping the current model: %s", self.path, err)
        except Exception:  # whatever else a half-written directory raises: poll on
            self.agent.metrics.model_reloads.labels("failed").inc()
            log.exception("hot reload from %s failed, keeping the current model", self.path)


class RegistryWatcher(_Watcher):
    """Polls the registry object of the model and reloads when its digest changes."""

    def __init__(
        self,
        agent: agent_mod.Agent,
        nc: Any,
        ref: registry.ModelRef,
        cache: Path,
        poll_seconds: float,
        digest: str,
        path: Path,
    ) -> None:
        super().__init__()
        self.agent = agent
        self.nc = nc
        self.ref = ref
        self.cache = cache
        self.poll_seconds = poll_seconds
        self._digest = digest  # the last object looked at (loaded or refused)
        self._running = digest  # the one the agent runs
        self._path = path  # where it was unpacked (under `cache`)
        # The object the agent ran before the last reload, and its version: the agent
        # goes back to it if the new version fails at run time (`Agent.run_failure`).
        self._before: tuple[str, int] | None = None
        # Objects of earlier versions that could not be loaded in place of a version
        # that failed with none before it (`_go_back`): not fetched again.
        self._tried: set[str] = set()

    async def run(self) -> None:
        """Poll until cancelled; transient registry errors are retried at the next poll."""
        while True:
            await asyncio.sleep(self.poll_seconds)
            await self.check()

    async def follow(self, version: int | None) -> None:
        """Switch to a pinned version (None: follow the newest) and load it now."""
        self.ref = registry.ModelRef(self.ref.bucket, self.ref.name, version)
        await self.check()

    async def _check(self) -> None:
        ref = self.ref
        if self._before is not None and self._before[1] == self.agent.get_model_version():
            # Back on the version before (the last one failed at run time): it runs
            # from memory, its files are gone, and the failed one's may go too.
            self._running, self._path, self._before = self._before[0], self.cache, None
            await asyncio.to_thread(registry.prune, self.cache, self._path)
        try:
            try:
                entry = await registry.info(self.nc, ref)
            except errors.ModelMissingError as err:
                self._keep(ref.version, str(err))
                return
            newest_failed = entry.version is not None and self.agent.run_failure(entry.version)
            if newest_failed or entry.digest == self._digest:
                # Nothing new to load (a version that failed here at run time is not
                # loaded again). A version held as failed with none before it (`Agent.
                # hold`) gives way to the newest one pushed before it, if any.
                before = self.refused  # e.g. the newest, which did not load
                held = self.agent.stalled
                if held is not None and ref.version is None:
                    self._ran_badly(held)  # reported while going back, too
                    await self._go_back(held, before)
                if self._ran_badly(self.agent.stalled):  # what holds the pod, first
                    return
                if newest_failed:
                    self._ran_badly(entry.version)
                elif entry.version == self.agent.get_model_version():
                    self.refused = None  # e.g. back to a version it runs
                return
            try:
                path, entry = await registry.fetch(self.nc, ref, self.cache)
            except errors.ModelLoadError as err:
                # Not a model archive any runtime can unpack: reported, and not fetched
                # again until the object changes.
                self._digest = entry.digest
                self.refused = reporting.Refusal(entry.version, str(err), incompatible=False)
                raise
            try:
                # Unless the pin moved while this version downloaded (`follow`): it is
                # not what is wanted now, and follow's own check comes next.
                if self.ref == ref:
                    await self._take(path, entry)
            except asyncio.CancelledError:
                raise  # the load may go on in its thread: its files stay
            except BaseException:
                await asyncio.to_thread(registry.prune, self.cache, self._path)
                raise
            await asyncio.to_thread(registry.prune, self.cache, self._path)
        except errors.RelayRLError as err:
            self._failed(err)
            log.error("hot reload from %s failed, keeping the current model: %s", self.ref, err)
        except (TimeoutError, OSError, ConnectionError) as err:
            log.warning(
                "model registry unreachable (%s), retrying in %.1fs", err, self.poll_seconds
            )
        except Exception as err:  # nats-py raises its own error types for transient faults
            log.warning("model registry poll failed (%r), retrying", err)

    async def _go_back(self, failed: int, before: reporting.Refusal | None) -> None:
        """Load the newest version pushed before `failed` (kept as `<name>@v<N>`) that has
        not failed here; none: the agent goes on waiting for a new one.

        A version that cannot be loaded here (not an archive, corrupt, another layout)
        is not tried again, and not reported: an incompatible one would have the
        operator roll the pods, which start on the failed version again. What is
        reported is the failed version. Transient errors are tried again at the next
        poll. `before`: what was reported before the failed version; a newer version
        that did not load is reported again once the pod went back."""
        bucket, name = self.ref.bucket, self.ref.name
        listed = await registry.list_models(self.nc, bucket)
        looked_at, reported = self._digest, self.refused  # the newest object's, and its
        while True:
            earlier = [
                e
                for e in listed
                if e.version is not None
                and e.version < failed
                and e.key == registry.versioned_key(name, e.version)
                and e.digest not in self._tried
                and self.agent.run_failure(e.version) is None
            ]
            if not earlier:
                return
            newest = max(earlier, key=lambda e: e.version or 0)  # all have one
            log.warning(
                "model version %d failed at run time with no version before it in this"
                " pod; loading version %d from %s",
                failed,
                newest.version,
                bucket,
            )
            try:
                path, entry = await registry.fetch(
                    self.nc, registry.ModelRef(bucket, name, newest.version), self.cache
                )
                try:
                    await self._take(path, entry)
                finally:
                    await asyncio.to_thread(registry.prune, self.cache, self._path)
                if before is not None and before.version != failed:
                    self.refused = before  # the newest, which did not load: still so
                return
            except errors.RelayRLError as err:
                self._tried.add(newest.digest)
                self._failed(err)
                self.refused = reported
                log.error(
                    "model version %s from %s cannot replace version %d: %s",
                    newest.version,
                    bucket,
                    failed,
                    err,
                )
            finally:
                self._digest = looked_at

    async def _take(self, path: Path, entry: registry.Entry) -> None:
        """Load a fetched version unless the agent runs it already."""
        # Whatever the load below makes of this version, it is not tried again (a
        # model that did not load once will not the next time): a newer one is.
        self._digest = entry.digest
        if entry.version == self.agent.get_model_version():
            if entry.digest != self._running:
                # Other bytes under the version it runs: a version names one model
                # (the steps record it), so they are not loaded; a new number is.
                log.warning(
                    "%s holds other content for version %d than this pod runs; keeping"
                    " what runs (push changed weights as a new version)",
                    self.ref.key,
                    entry.version,
                )
            self.refused = None
            return
        # The objects of the versions the agent may go back to after this reload: the
        # one it runs now, or (gone back meanwhile) the one it ran before.
        known = {self.agent.get_model_version(): self._running}
        if self._before is not None:
            known.setdefault(self._before[1], self._before[0])
        await self._reload(self.agent, path, entry.version)
        back_to = self.agent.previous_version
        if back_to is None and self.agent.get_model_version() != entry.version:
            back_to = self.agent.get_model_version()  # gone back before the load returned
        self._running, self._path = entry.digest, path
        self._before = (known[back_to], back_to) if back_to in known else None
