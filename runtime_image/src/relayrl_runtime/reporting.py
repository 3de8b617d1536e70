"""Pod status reports in a NATS JetStream key-value bucket: what the operator reads.

Each actor runtime that talks to NATS puts one small JSON value per pod into the bucket
`relayrl-status` (history 1, entries expire after `MAX_AGE_SECONDS`, so a pod that is
gone drops out by itself) under the key `<namespace>.<agent>.<pod>`::

    {"pod": "cartpole-0", "modelVersion": 3, "actors": 16, "ready": true,
     "time": 1767225600.25,
     "refused": {"version": 4, "reason": "reload refused: ...", "incompatible": true},
     "configRevision": "9f86d081884c7d65"}

`actors` counts the agent's actors (env copies, as the `relayrl_runtime_actors` metric),
`ready` is the pod's readiness, `time` the Unix time of the report in seconds,
`refused` the last hot reload that failed (null once one succeeds; see `Refusal`),
`configRevision` the revision of the mounted config the pod last applied in full
(`config.revision`; null without a config file, absent from older runtimes).
`Reporter` (run by the runtime process, `app`) puts a report every `INTERVAL_SECONDS`
and at once when the model version, the refusal or the config revision changes. The
operator follows the bucket with a key watcher to set `status.modelVersion`, to roll
the pods for a refused version (see `Refusal`) and to finish a slice handover
(`relayrl_operator.handover`); `read_reports` is a one-off snapshot of one Agent.

Light on purpose (nats-py and the standard library only): the operator imports it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from typing import Any, Final

import nats.errors
import nats.js
import nats.js.api
import nats.js.errors

log = logging.getLogger(__name__)

BUCKET: Final = "relayrl-status"
HISTORY: Final = 1
MAX_AGE_SECONDS: Final = 120.0
INTERVAL_SECONDS: Final = 10.0
# How often the reporter looks at the model version between two regular reports.
CHECK_SECONDS: Final = 0.5

_KEY_FORBIDDEN: Final = frozenset(".*> \t\r\n")
# The stream behind the bucket, and the subject prefix of its keys.
STREAM: Final = f"KV_{BUCKET}"
_SUBJECT_PREFIX: Final = f"$KV.{BUCKET}."


def key(namespace: str, agent: str, pod: str) -> str:
    """`<namespace>.<agent>.<pod>`: the key of one pod's report."""
    for token, what in ((namespace, "namespace"), (agent, "agent"), (pod, "pod")):
        if not token or any(c in _KEY_FORBIDDEN for c in token):
            raise ValueError(f"{what}: not a valid key token (got {token!r})")
    return f"{namespace}.{agent}.{pod}"


def subject(name: str) -> str:
    """The subject in the bucket's stream that holds key `name`."""
    return _SUBJECT_PREFIX + name


def key_filter(namespace: str, agent: str) -> str:
    """The key pattern matching every pod of one Agent."""
    return key(namespace, agent, "x")[:-1] + "*"


def _optional_str(raw: Any) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise TypeError(f"expected a string or null, got {type(raw).__name__}")
    return raw


@dataclasses.dataclass(frozen=True)
class Refusal:
    """The last model version a pod would not or could not hot-reload, and why.

    `incompatible`: the model loads but records differently from the running one (a
    fresh process would run it, so the operator rolls the pods); otherwise it did not
    load at all (corrupt, wrong format) and the pod keeps its model.
    """

    version: int | None
    reason: str
    incompatible: bool

    def to_wire(self) -> dict[str, Any]:
        """The report's `refused` value."""
        return {
            "version": self.version,
            "reason": self.reason[:500],
            "incompatible": self.incompatible,
        }

    @classmethod
    def from_wire(cls, raw: Any) -> Refusal | None:
        """Parse a report's `refused` value (absent or null: none)."""
        if raw is None:
            return None
        version = raw["version"]
        return cls(
            None if version is None else int(version),
            str(raw["reason"]),
            bool(raw["incompatible"]),
        )


@dataclasses.dataclass(frozen=True)
class PodReport:
    """What one pod says about itself."""

    pod: str
    model_version: int | None
    actors: int
    ready: bool
    time: float
    refused: Refusal | None = None
    config_revision: str | None = None
    # The model.uri it runs: until a rolling update restarts it, a pod keeps the model
    # it started with, whatever spec.model.uri says now.
    model_uri: str | None = None

    def to_json(self) -> bytes:
        """The bucket value."""
        return json.dumps(
            {
                "pod": self.pod,
                "modelVersion": self.model_version,
                "actors": self.actors,
                "ready": self.ready,
                "time": self.time,
                "refused": None if self.refused is None else self.refused.to_wire(),
                "configRevision": self.config_revision,
                "modelUri": self.model_uri,
            }
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> PodReport:
        """Parse a bucket value; raises ValueError for anything else."""
        try:
            raw = json.loads(data)
            version = raw["modelVersion"]
            return cls(
                pod=str(raw["pod"]),
                model_version=None if version is None else int(version),
                actors=int(raw["actors"]),
                ready=bool(raw["ready"]),
                time=float(raw["time"]),
                refused=Refusal.from_wire(raw.get("refused")),
                config_revision=_optional_str(raw.get("configRevision")),
                model_uri=_optional_str(raw.get("modelUri")),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"not a pod report: {err}") from err


async def ensure_bucket(js: nats.js.JetStreamContext) -> Any:
    """The status bucket, created (history 1, max age 120 s) if it is missing."""
    try:
        return await js.key_value(BUCKET)
    except (nats.js.errors.BucketNotFoundError, nats.js.errors.NotFoundError):
        config = nats.js.api.KeyValueConfig(
            bucket=BUCKET,
            description="RelayRL pod status reports",
            history=HISTORY,
            ttl=MAX_AGE_SECONDS,
        )
        try:
            return await js.create_key_value(config)
        except nats.js.errors.BadRequestError:
            # Created concurrently by another pod.
            return await js.key_value(BUCKET)


async def put_report(kv: Any, namespace: str, agent: str, report: PodReport) -> int:
    """Put one report; returns its sequence in the bucket."""
    seq: int = await kv.put(key(namespace, agent, report.pod), report.to_json())
    return seq


async def read_reports(
    js: nats.js.JetStreamContext, namespace: str, agent: str
) -> dict[str, PodReport]:
    """The current report of every pod of one Agent, by pod name (empty: none yet).

    A snapshot: the bucket's stream names the keys that hold a value, and each key's
    latest value is read with a direct get. (A key watcher's "no more values" marker is
    not used: nats-py sends it too early when a value is on its way but not yet
    received, and the snapshot then comes back empty.)
    """
    try:
        kv = await js.key_value(BUCKET)
    except (nats.js.errors.BucketNotFoundError, nats.js.errors.NotFoundError):
        return {}
    info = await js.stream_info(STREAM, subjects_filter=subject(key_filter(namespace, agent)))
    reports: dict[str, PodReport] = {}
    for held in sorted(info.state.subjects or {}):
        name = held.removeprefix(_SUBJECT_PREFIX)
        try:
            entry = await kv.get(name)
        except nats.js.errors.KeyNotFoundError:  # deleted, or expired since
            continue
        try:
            report = PodReport.from_json(entry.value or b"")
        except ValueError as err:
            log.warning("status bucket: skipping %s: %s", name, err)
            continue
        reports[report.pod] = report
    return reports


class Reporter:
    """Puts this pod's report every `interval` seconds and when the model version changes.

    `snapshot` is called on the event loop and must be cheap (it reads the agent's
    state). A failed put (NATS away) is logged and retried at the next check, so the
    reporter never stops the runtime.
    """

    def __init__(
        self,
        js: nats.js.JetStreamContext,
        namespace: str,
        agent: str,
        snapshot: Callable[[], PodReport],
        *,
        interval: float = INTERVAL_SECONDS,
        check: float = CHECK_SECONDS,
    ) -> None:
        self.js = js
        self.namespace = namespace
        self.agent = agent
        self.snapshot = snapshot
        self.interval = interval
        self.check = min(check, interval)
        self.reports = 0

    async def run(self) -> None:
        """Report until cancelled."""
        kv: Any = None
        kv_of: Any = None  # the JetStream context kv was opened on
        # What the last report said that is sent again at once when it changes.
        sent: tuple[int | None, Refusal | None, str | None] | None = None
        sent_at: float | None = None
        failures = 0
        while True:
            report = self.snapshot()
            now = time.monotonic()
            due = (
                sent_at is None
                or now - sent_at >= self.interval
                or (report.model_version, report.refused, report.config_revision) != sent
            )
            if due:
                try:
                    if kv is None or kv_of is not self.js:  # a connection made anew
                        kv, kv_of = await ensure_bucket(self.js), self.js
                    await put_report(kv, self.namespace, self.agent, report)
                except (nats.errors.Error, TimeoutError, OSError) as err:
                    failures += 1
                    if failures == 1 or failures % 20 == 0:
                        log.warning("status report failed (%s), retrying", err)
                else:
                    failures = 0
                    sent = (report.model_version, report.refused, report.config_revision)
                    sent_at = now
                    self.reports += 1
            await asyncio.sleep(self.check)
