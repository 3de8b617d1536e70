"""Live config: watch the mounted config file and apply the fields that allow it.

The operator renders the runtime config into a ConfigMap mounted as a file; the kubelet
updates that file in place when the ConfigMap changes (an atomic swap of the `..data`
symlink the file points through). `ConfigWatcher` (a task `app` owns) reads the file by
its path about once a second, so it sees the new target of the symlink as well as an
edit in place, and compares the bytes with the last ones it saw.

A valid new config is split: the `config.HOT_FIELDS` (the operator's list in
`relayrl_operator.builders.configmap` must match it) are applied without a restart;
a change to any other field is logged as a warning that a restart is needed (the
operator rolls the pods for those). A process with its pod's own cold fields
(`config.parse_as_run`, the operator's actor pods) reads only the hot fields of the
file: the rest is its template's until the pod is replaced. An invalid file is logged
and ignored. The revision of the file last applied in full (`revision`) goes into the
pod's status report: during a slice handover the operator waits for every pod to
report it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Final

from relayrl_runtime import config, spec

log = logging.getLogger(__name__)

HOT_FIELDS: Final = config.HOT_FIELDS

Apply = Callable[[config.RuntimeConfig, config.RuntimeConfig], Awaitable[None]]

# A config whose hot fields could not all be applied is tried again after this long.
RETRY_SECONDS: Final = 10.0


def _flatten(data: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for k, v in data.items():
        path = (*prefix, k)
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, path))
        else:
            out[path] = v
    return out


def changed_fields(old: config.RuntimeConfig, new: config.RuntimeConfig) -> list[tuple[str, ...]]:
    """Paths (wire names) whose values differ, sorted."""
    a = _flatten(old.model_dump(mode="json", by_alias=True, exclude_none=True))
    b = _flatten(new.model_dump(mode="json", by_alias=True, exclude_none=True))
    return sorted(p for p in a.keys() | b.keys() if a.get(p) != b.get(p))


def _is_hot(path: tuple[str, ...]) -> bool:
    return path in HOT_FIELDS


def with_hot_fields(
    running: config.RuntimeConfig, new: config.RuntimeConfig
) -> config.RuntimeConfig:
    """`running` with the hot fields taken from `new` (`model.version` only where the
    rest of the model is unchanged, see `_moves_model`)."""
    moved = _moves_model(changed_fields(running, new))
    version = running.model.version if moved else new.model.version
    return running.model_copy(
        update={
            "actors": new.actors,
            "actors_per_pod": new.actors_per_pod,
            "routers": new.routers,
            "slice_handover": new.slice_handover,
            "model": running.model.model_copy(update={"version": version}),
        }
    )


def _moves_model(changed: list[tuple[str, ...]]) -> bool:
    """Whether a cold `model` field changed (its uri, format...): then the new
    `model.version` names a version of the new model, which this process, still on
    the old one until it restarts, must not look for in the old one."""
    return any(p[:1] == ("model",) and not _is_hot(p) for p in changed)


class ConfigWatcher:
    """Polls the config file; calls `apply(old, new)` with the hot fields changed."""

    def __init__(
        self,
        path: Path,
        running: config.RuntimeConfig,
        apply: Apply,
        *,
        poll_seconds: float = 1.0,
        environ: Mapping[str, str] | None = None,
        loaded: bytes | None = None,
    ) -> None:
        self.path = path
        self.running = running
        self.apply = apply
        self.poll_seconds = poll_seconds
        self.environ = environ
        # The bytes `running` was read from: a change made before the watcher started
        # is still a change.
        self._seen = self._read() if loaded is None else loaded
        # The revision (`config.revision`) of the file as last applied in full: the
        # pod reports it, and the operator waits for it during a slice handover.
        self.revision = None if self._seen is None else config.revision(self._seen)
        self.applied = 0
        self._retry_at: float | None = None  # set while the last apply failed

    def _read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except OSError:
            # Mid-swap or briefly missing: try again at the next poll.
            return None

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            await asyncio.sleep(self.poll_seconds)
            await self.check()

    async def check(self) -> None:
        """Read the file once; apply it if its content changed."""
        data = self._read()
        retry = self._retry_at is not None and time.monotonic() >= self._retry_at
        if data is None or (data == self._seen and not retry):
            return
        self._seen = data
        try:
            new = config.parse_as_run(data, str(self.path), self.environ)
        except spec.InvalidSpecError as err:
            log.error(
                "config %s changed but is invalid, keeping the running one: %s", self.path, err
            )
            return
        except Exception:  # a parse failure nobody foresaw must not end the watch
            log.exception(
                "config %s changed but could not be read, keeping the running one", self.path
            )
            return
        changed = changed_fields(self.running, new)
        moved = _moves_model(changed)

        def hot_now(p: tuple[str, ...]) -> bool:
            return _is_hot(p) and not (moved and p[:1] == ("model",))

        cold = [".".join(p) for p in changed if not hot_now(p) and p not in config.UNUSED_FIELDS]
        if cold:
            log.warning(
                "config %s changed fields that need a restart to take effect: %s",
                self.path,
                ", ".join(cold),
                extra={"restart_fields": ",".join(cold)},
            )
        hot = [".".join(p) for p in changed if hot_now(p)]
        if not hot:
            self._retry_at = None
            self.revision = config.revision(data)
            return
        old, target = self.running, with_hot_fields(self.running, new)
        log.info("config %s changed; applying %s", self.path, ", ".join(hot))
        try:
            await self.apply(old, target)
        except Exception:  # keep watching; tried again, or with the next change
            log.exception(
                "config %s: applying %s failed; trying again in %.0fs",
                self.path,
                ", ".join(hot),
                RETRY_SECONDS,
            )
            # Not counted as applied: the revision stays, and the fields stay changed
            # against the running config (a later file with only a cold change still
            # applies them).
            self._retry_at = time.monotonic() + RETRY_SECONDS
            return
        self._retry_at = None
        self.revision = config.revision(data)
        self.running = target
        self.applied += 1
