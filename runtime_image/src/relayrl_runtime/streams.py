"""NATS names, JetStream streams and connection options: the one place for all of them.

Imported by the runtime's publisher, by the sink processes and by the operator (which
creates the stream and the model bucket when an Agent appears), so that a subject, a
stream name or a header means the same thing everywhere. Light on purpose: nats-py,
the standard library and `relayrl_runtime.spec` only (the operator imports it).

Layout of one Agent's data in NATS (issue 4, DESIGN.md "Delivery semantics"):

- subject `relayrl.<namespace>.<agent>.trajectories`: Arrow IPC messages;
- subject `relayrl.<namespace>.<agent>.deadletter`: messages a sink could not read,
  with the reason in a header; both subjects live in one file-backed stream
  (`RELAYRL_<namespace>_<agent>` unless the spec names one), whose duplicate window
  drops re-published messages that carry a `Nats-Msg-Id` already stored;
- object store bucket `relayrl-<namespace>-<agent>-models`: the model registry;
- durable consumers `relayrl-sink-arrow` and `relayrl-sink-postgres`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final, cast

import nats
import nats.errors
import nats.js
import nats.js.api
import nats.js.errors
import nats.js.object_store
from nats.aio.client import Client as NATS

from relayrl_runtime import spec

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------ names

SUBJECT_PREFIX: Final = "relayrl"
TRAJECTORIES_TOKEN: Final = "trajectories"
DEADLETTER_TOKEN: Final = "deadletter"

# Headers of a trajectory message (besides Nats-Msg-Id).
HEADER_MSG_ID: Final = "Nats-Msg-Id"
HEADER_SCHEMA_VERSION: Final = "Relayrl-Schema-Version"
HEADER_TRAJECTORIES: Final = "Relayrl-Trajectories"
HEADER_STEPS: Final = "Relayrl-Steps"
HEADER_POLICY_MIN: Final = "Relayrl-Policy-Version-Min"
HEADER_POLICY_MAX: Final = "Relayrl-Policy-Version-Max"
HEADER_PRODUCER: Final = "Relayrl-Producer"
# Headers a sink adds when it dead-letters a message.
HEADER_DEAD_REASON: Final = "Relayrl-Dead-Letter-Reason"
HEADER_DEAD_SINK: Final = "Relayrl-Dead-Letter-Sink"
HEADER_ORIGINAL_SUBJECT: Final = "Relayrl-Original-Subject"
HEADER_ORIGINAL_SEQUENCE: Final = "Relayrl-Original-Sequence"
# Set when the dead-letter copy holds only the start of the message (the whole would
# not fit under the server's max_payload with the headers): the original's size. The
# original stays in the stream at its sequence.
HEADER_DEAD_TRUNCATED: Final = "Relayrl-Dead-Letter-Truncated"

# Environment variables naming mounted secrets and NATS settings (set by the operator).
ENV_NATS_URL: Final = "RELAYRL_NATS_URL"
ENV_NATS_STREAM: Final = "RELAYRL_NATS_STREAM"
ENV_NATS_CREDENTIALS_DIR: Final = "RELAYRL_NATS_CREDENTIALS_DIR"
ENV_NATS_TLS_DIR: Final = "RELAYRL_NATS_TLS_DIR"
ENV_NATS_USER: Final = "RELAYRL_NATS_USER"
ENV_NATS_PASSWORD: Final = "RELAYRL_NATS_PASSWORD"
ENV_NATS_TOKEN: Final = "RELAYRL_NATS_TOKEN"
ENV_NATS_CREDS_FILE: Final = "RELAYRL_NATS_CREDS_FILE"

# Keys of the credentials Secret (spec.NatsSpec.credentials_secret) and the TLS Secret.
SECRET_KEY_USER: Final = "user"
SECRET_KEY_PASSWORD: Final = "password"
SECRET_KEY_TOKEN: Final = "token"
SECRET_KEY_CREDS: Final = "creds"
TLS_KEY_CA: Final = "ca.crt"
TLS_KEY_CERT: Final = "tls.crt"
TLS_KEY_KEY: Final = "tls.key"

# Room left in a NATS message for headers (ids, counts) next to the Arrow payload.
HEADER_ROOM_BYTES: Final = 4096


class SinkKind:
    """Names of the sink kinds; each has its own durable consumer."""

    ARROW: Final = "arrow"
    POSTGRES: Final = "postgres"


def subject_root(namespace: str, agent: str) -> str:
    """`relayrl.<namespace>.<agent>`: every subject of one Agent is under it."""
    for token, what in ((namespace, "namespace"), (agent, "agent")):
        if not token or any(c in token for c in ".*> \t\r\n"):
            raise ValueError(f"{what}: not a valid NATS subject token (got {token!r})")
    return f"{SUBJECT_PREFIX}.{namespace}.{agent}"


def trajectories_subject(namespace: str, agent: str) -> str:
    """Where the runtime publishes trajectories."""
    return f"{subject_root(namespace, agent)}.{TRAJECTORIES_TOKEN}"


def deadletter_subject(namespace: str, agent: str) -> str:
    """Where sinks put messages they cannot read."""
    return f"{subject_root(namespace, agent)}.{DEADLETTER_TOKEN}"


def stream_name(namespace: str, agent: str, override: str | None = None) -> str:
    """The JetStream stream of one Agent (spec.trajectories.nats.stream wins)."""
    if override:
        return override
    return f"RELAYRL_{namespace}_{agent}"


def model_bucket(namespace: str, agent: str) -> str:
    """The object store bucket holding the Agent's models."""
    return f"relayrl-{namespace}-{agent}-models"


def durable_name(kind: str) -> str:
    """The durable consumer name of one sink kind."""
    return f"relayrl-sink-{kind}"


# ---------------------------------------------------------------------- streams


@dataclasses.dataclass(frozen=True)
class StreamSettings:
    """Limits of an Agent's stream."""

    max_age_seconds: float = 7 * 24 * 3600.0
    max_bytes: int = -1
    # How long JetStream remembers a Nats-Msg-Id. Longer than the publisher's longest
    # retry of one message, so a retry after an outage is still dropped as a duplicate.
    duplicate_window_seconds: float = 15 * 60.0
    replicas: int = 1
    max_msg_bytes: int = (8 << 20) + HEADER_ROOM_BYTES


def stream_config(
    namespace: str,
    agent: str,
    override: str | None = None,
    settings: StreamSettings | None = None,
) -> nats.js.api.StreamConfig:
    """The desired config of an Agent's stream (file storage, limits retention)."""
    settings = settings or StreamSettings()
    return nats.js.api.StreamConfig(
        name=stream_name(namespace, agent, override),
        description=f"RelayRL trajectories of Agent {namespace}/{agent}",
        subjects=[f"{subject_root(namespace, agent)}.>"],
        retention=nats.js.api.RetentionPolicy.LIMITS,
        storage=nats.js.api.StorageType.FILE,
        discard=nats.js.api.DiscardPolicy.OLD,
        max_age=settings.max_age_seconds,
        max_bytes=settings.max_bytes,
        max_msg_size=settings.max_msg_bytes,
        duplicate_window=settings.duplicate_window_seconds,
        num_replicas=settings.replicas,
    )


class StreamConflictError(Exception):
    """A stream of the wanted name holds subjects that are not the Agent's."""


def foreign_subjects(want: nats.js.api.StreamConfig, have: nats.js.api.StreamConfig) -> list[str]:
    """The subjects of `have` outside `want`'s: another Agent's (or someone else's)."""
    roots = [s.removesuffix(".>") for s in want.subjects or []]
    return [
        s for s in have.subjects or [] if not any(s == r or s.startswith(f"{r}.") for r in roots)
    ]


def check_owner(want: nats.js.api.StreamConfig, have: nats.js.api.StreamConfig) -> None:
    """Raise `StreamConflictError` when the stream named as `want` is not the Agent's.

    Two Agents given the same `trajectories.nats.stream` would otherwise share it: the
    second would take the first one's subjects over, and deleting either would delete
    both Agents' trajectories.
    """
    foreign = foreign_subjects(want, have)
    if foreign:
        raise StreamConflictError(
            f"stream {have.name} holds {', '.join(foreign)}, not this Agent's subjects"
            f" ({', '.join(want.subjects or [])}): it is another Agent's (or made by hand);"
            " give this Agent a trajectories.nats.stream of its own"
        )


async def ensure_stream(
    js: nats.js.JetStreamContext, config: nats.js.api.StreamConfig
) -> nats.js.api.StreamInfo:
    """Create the stream, or update it to `config` if it differs (idempotent).

    An existing stream that already has the config is left alone: the operator checks
    every Agent's stream each resync, and an update rewrites the stream's metadata. One
    that holds other subjects is not the Agent's and is not touched
    (`StreamConflictError`).
    """
    assert config.name is not None
    try:
        info = await js.stream_info(config.name)
    except nats.js.errors.NotFoundError:
        try:
            info = await js.add_stream(config)
            log.info("created stream %s", config.name)
            return info
        except nats.js.errors.BadRequestError as err_add:
            # Created concurrently by another process (then updated below), or refused
            # (e.g. another stream holds the subjects): that refusal is the error.
            try:
                info = await js.stream_info(config.name)
            except nats.js.errors.NotFoundError:
                raise err_add from None
    check_owner(config, info.config)
    if not config_differs(config, info.config):
        return info
    return await js.update_stream(config)


def config_differs(want: nats.js.api.StreamConfig, have: nats.js.api.StreamConfig) -> bool:
    """Whether a stream's config differs from `want` in any field `want` has.

    Fields `want` leaves unset (None) do not count, so the server's own additions are
    ignored; its dataclass defaults (`sealed=False`, ...) do count.
    """
    current = have.as_dict()
    return any(current.get(k) != v for k, v in want.as_dict().items())


async def iter_stream_configs(
    js: nats.js.JetStreamContext,
) -> AsyncIterator[nats.js.api.StreamConfig]:
    """Every stream's config: one paged listing, however many streams there are.

    The server sends up to 256 streams a page, and only one page is held at a time. A
    stream created or deleted while the pages go by may be missed or listed twice; a
    caller that acts on what is missing must make that action idempotent
    (`ensure_stream` is).
    """
    offset = 0
    while True:
        # A StreamsListIterator, whatever nats-py's annotation says: it has the total.
        page = cast(nats.js.api.StreamsListIterator, await js.streams_info_iterator(offset))
        count = 0
        for info in page:
            count += 1
            yield info.config
        offset += count
        if not count or offset >= page.total:
            return


def object_store_stream(bucket: str) -> str:
    """The stream that holds an object store bucket, named as nats-py names it."""
    return nats.js.object_store.OBJ_STREAM_TEMPLATE.format(bucket=bucket)


async def delete_stream(js: nats.js.JetStreamContext, name: str) -> bool:
    """Delete a stream; False if it was not there."""
    try:
        return await js.delete_stream(name)
    except nats.js.errors.NotFoundError:
        return False


MODELS_DESCRIPTION: Final = "RelayRL models"
_MODELS_OF: Final = f"{MODELS_DESCRIPTION} of Agent "


def models_description(namespace: str, agent: str) -> str:
    """The description of an Agent's model bucket: whose it is."""
    return f"{_MODELS_OF}{namespace}/{agent}"


def models_agent(description: str) -> str | None:
    """The `<namespace>/<agent>` a model bucket's description names, if any."""
    return description.removeprefix(_MODELS_OF) if description.startswith(_MODELS_OF) else None


def models_of_another(description: str, namespace: str, agent: str) -> bool:
    """Whether a bucket so described is another Agent's (one naming no Agent is not)."""
    owner = models_agent(description)
    return owner is not None and owner != f"{namespace}/{agent}"


async def ensure_object_store(
    js: nats.js.JetStreamContext,
    bucket: str,
    replicas: int = 1,
    description: str = MODELS_DESCRIPTION,
) -> nats.js.object_store.ObjectStore:
    """Open the bucket, creating it (file storage) if it is missing."""
    try:
        return await js.object_store(bucket)
    except (nats.js.errors.BucketNotFoundError, nats.js.errors.NotFoundError):
        config = nats.js.api.ObjectStoreConfig(
            bucket=bucket,
            storage=nats.js.api.StorageType.FILE,
            replicas=replicas,
            description=description,
        )
        return await js.create_object_store(bucket, config=config)


# ---------------------------------------------------------------------- backoff


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Bounded, growing, jittered delays ("full jitter"): for every retry of a transient fault.

    `delays()` yields `random.uniform(base/2, cap_n)` with cap_n doubling from `initial`
    up to `maximum`, so many clients that lost the same server do not return in step.
    """

    initial: float = 0.05
    maximum: float = 5.0
    factor: float = 2.0

    def delay(self, attempt: int) -> float:
        """The delay before retry number `attempt` (0-based)."""
        cap = min(self.maximum, self.initial * self.factor ** min(attempt, 60))
        return random.uniform(cap / 2, cap)

    def delays(self) -> Iterator[float]:
        """An endless sequence of delays; the caller bounds the attempts or the time."""
        attempt = 0
        while True:
            yield self.delay(attempt)
            attempt += 1


# --------------------------------------------------------------- connect options


class ConnectError(Exception):
    """NATS could not be reached within the deadline, or the options are unusable."""


@dataclasses.dataclass(frozen=True)
class ConnectOptions:
    """How to reach NATS: servers, auth (user/password, token or creds file) and TLS."""

    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    name: str | None = None
    user: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    token: str | None = dataclasses.field(default=None, repr=False)
    creds_file: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_hostname: str | None = None
    connect_timeout: float = 5.0
    # Reconnects go on forever with jittered backoff: the data waits, it is never dropped.
    reconnect: Backoff = dataclasses.field(
        default_factory=lambda: Backoff(initial=0.1, maximum=5.0)
    )
    ping_interval: float = 10.0
    # Bytes nats-py buffers while reconnecting; the publisher's own backlog is the real
    # bound, this only smooths short blips.
    pending_bytes: int = 8 << 20

    def __post_init__(self) -> None:
        if self.token is not None and (self.user is not None or self.creds_file is not None):
            raise ConnectError("nats auth: set one of user/password, token or creds, not several")
        if (self.user is None) != (self.password is None):
            raise ConnectError("nats auth: user and password go together")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConnectError("nats tls: tls.crt and tls.key go together")

    @property
    def tls(self) -> bool:
        """Whether the connection uses TLS."""
        return (
            self.tls_ca_file is not None
            or self.tls_cert_file is not None
            or any(s.startswith("tls://") for s in self.servers)
        )

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        servers: str | None = None,
        name: str | None = None,
    ) -> ConnectOptions:
        """Options from RELAYRL_NATS_* variables and mounted secret directories.

        `RELAYRL_NATS_CREDENTIALS_DIR` is a mounted Secret with keys user and
        password, or token, or creds; `RELAYRL_NATS_TLS_DIR` one with ca.crt and
        optionally tls.crt + tls.key. Single values can also come from
        RELAYRL_NATS_USER/PASSWORD/TOKEN/CREDS_FILE.
        """
        env = os.environ if environ is None else environ
        url = servers or env.get(ENV_NATS_URL) or "nats://127.0.0.1:4222"
        values: dict[str, Any] = {
            "user": env.get(ENV_NATS_USER),
            "password": env.get(ENV_NATS_PASSWORD),
            "token": env.get(ENV_NATS_TOKEN),
            "creds_file": env.get(ENV_NATS_CREDS_FILE),
        }
        cred_dir = env.get(ENV_NATS_CREDENTIALS_DIR)
        if cred_dir:
            values.update(_read_credentials_dir(Path(cred_dir)))
        tls_dir = env.get(ENV_NATS_TLS_DIR)
        if tls_dir:
            values.update(_tls_dir(Path(tls_dir)))
        return cls(
            servers=split_servers(url),
            name=name,
            **{k: v for k, v in values.items() if v is not None},
        )

    def connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `nats.connect` (callbacks excluded)."""
        kwargs: dict[str, Any] = {
            "servers": list(self.servers),
            "name": self.name,
            "connect_timeout": self.connect_timeout,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_to_server_handler": self._pick_server,
            "ping_interval": self.ping_interval,
            "max_outstanding_pings": 3,
            "pending_size": self.pending_bytes,
        }
        if self.user is not None:
            kwargs["user"] = self.user
            kwargs["password"] = self.password
        if self.token is not None:
            kwargs["token"] = self.token
        if self.creds_file is not None:
            kwargs["user_credentials"] = self.creds_file
        if self.tls:
            kwargs["tls"] = self.ssl_context()
            if self.tls_hostname:
                kwargs["tls_hostname"] = self.tls_hostname
        return kwargs

    def ssl_context(self) -> ssl.SSLContext:
        """A client TLS context: the CA bundle if given, the client cert for mutual TLS."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.tls_ca_file)
        if self.tls_cert_file is not None and self.tls_key_file is not None:
            ctx.load_cert_chain(self.tls_cert_file, self.tls_key_file)
        return ctx

    def _pick_server(self, servers: list[Any], _info: dict[str, Any]) -> tuple[Any | None, float]:
        # nats-py's own reconnect waits a fixed time; this gives every server a jittered,
        # growing delay from its failed attempts instead (nats-core's reconnect jitter).
        best = min(servers, key=lambda s: s.reconnects)
        return best, self.reconnect.delay(best.reconnects)


def split_servers(url: str) -> tuple[str, ...]:
    """`nats://a:4222,nats://b:4222` -> both URLs."""
    servers = tuple(s.strip() for s in url.split(",") if s.strip())
    if not servers:
        raise ConnectError("nats URL: no server given")
    for server in servers:
        if re.fullmatch(spec.NATS_URLS, server) is None:
            raise ConnectError(f"nats URL: expected {spec.NATS_URLS_EXPECTED}, got {server!r}")
    return servers


def _read_credentials_dir(path: Path) -> dict[str, str]:
    def read(key: str) -> str | None:
        f = path / key
        return f.read_text().strip() if f.is_file() else None

    out: dict[str, str] = {}
    user, password, token = read(SECRET_KEY_USER), read(SECRET_KEY_PASSWORD), read(SECRET_KEY_TOKEN)
    if user is not None:
        out["user"] = user
    if password is not None:
        out["password"] = password
    if token is not None:
        out["token"] = token
    if (path / SECRET_KEY_CREDS).is_file():
        out["creds_file"] = str(path / SECRET_KEY_CREDS)
    if not out:
        raise ConnectError(
            f"nats credentials: {path} has none of the keys "
            f"{SECRET_KEY_USER}/{SECRET_KEY_PASSWORD}, {SECRET_KEY_TOKEN} or {SECRET_KEY_CREDS}"
        )
    return out


def _tls_dir(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, field in (
        (TLS_KEY_CA, "tls_ca_file"),
        (TLS_KEY_CERT, "tls_cert_file"),
        (TLS_KEY_KEY, "tls_key_file"),
    ):
        if (path / key).is_file():
            out[field] = str(path / key)
    if "tls_ca_file" not in out and "tls_cert_file" not in out:
        raise ConnectError(f"nats tls: {path} has neither {TLS_KEY_CA} nor {TLS_KEY_CERT}")
    return out


Callback = Callable[[], Awaitable[None]]


def describe(err: BaseException) -> str:
    """An error of nats-py in words (some have no message of their own)."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


async def connect(
    options: ConnectOptions,
    *,
    deadline: float | None = None,
    disconnected_cb: Callback | None = None,
    reconnected_cb: Callback | None = None,
    closed_cb: Callback | None = None,
    error_cb: Callable[[Exception], Awaitable[None]] | None = None,
) -> NATS:
    """Connect; the first connection is retried until `deadline` seconds (None: forever).

    Later disconnects are handled by nats-py's reconnect loop, forever, with the jitter
    of `ConnectOptions.reconnect`. Errors are logged by the error callback.
    """

    async def log_error(err: Exception) -> None:
        log.warning("nats: %s", str(err) or type(err).__name__)
        if error_cb is not None:
            await error_cb(err)

    nc = NATS()
    # With unlimited reconnects nats-py retries the first connection on its own too
    # (every `reconnect_time_wait`), so the deadline is the only bound.
    attempt = nc.connect(
        **options.connect_kwargs(),
        reconnect_time_wait=1,
        error_cb=log_error,
        disconnected_cb=disconnected_cb,
        reconnected_cb=reconnected_cb,
        closed_cb=closed_cb,
    )
    try:
        await asyncio.wait_for(attempt, timeout=deadline)
    except TimeoutError as err:
        # A client cut off before its first connect began has nothing to close (nats-py
        # asserts): what to say is the timeout.
        with contextlib.suppress(Exception):
            await nc.close()
        raise ConnectError(
            f"nats {', '.join(options.servers)}: not reachable within {deadline}s"
            f" (last error: {nc.last_error or 'none'})"
        ) from err
    return nc


# NATS refusing a connection's credentials this many times in a row has it made anew,
# its options read again (a rotated Secret).
AUTH_REFUSALS: Final = 3
_CLOSE_SECONDS: Final = 5.0


def refuses_credentials(err: Exception) -> bool:
    """Whether nats-py reports the server refusing the connection's credentials."""
    text = str(err).lower()
    return isinstance(err, nats.errors.AuthorizationError) or any(
        t in text
        for t in ("authorization violation", "authentication expired", "authentication revoked")
    )


class RenewingConnection:
    """A NATS connection that is made anew, with its options read again, once NATS has
    refused its credentials `AUTH_REFUSALS` times in a row: nats-py's own reconnects
    keep the credentials it started with, so a rotated Secret would end it for good.

    `current` is the connection to use now; `on_renew` callbacks get the new one.
    """

    def __init__(self, options: Callable[[], ConnectOptions], *, deadline: float | None) -> None:
        self._options = options
        self._deadline = deadline
        self._nc: NATS | None = None
        self._refusals = 0
        self._renewing: asyncio.Task[None] | None = None
        self._closed = False
        self.on_renew: list[Callable[[NATS], None]] = []

    @property
    def current(self) -> NATS:
        assert self._nc is not None, "open() first"
        return self._nc

    async def open(self) -> NATS:
        """Connect (ConnectError past the deadline)."""
        self._nc = await self._connect()
        return self._nc

    async def _connect(self) -> NATS:
        self._refusals = 0
        made: list[NATS] = []

        async def gone() -> None:
            # nats-py gave the connection up (a server reload that changed the
            # credentials ends it at once): make it anew, unless that is under way.
            if made and made[0] is self._nc and not self._closed and self._renewing is None:
                log.warning("nats: the connection was closed; connecting again")
                self._renewing = asyncio.get_running_loop().create_task(self._renew())

        nc = await connect(
            self._options(), deadline=self._deadline, error_cb=self._error, closed_cb=gone
        )
        made.append(nc)
        return nc

    async def _error(self, err: Exception) -> None:
        if not refuses_credentials(err) or self._closed:
            return
        self._refusals += 1
        if self._refusals == AUTH_REFUSALS and self._renewing is None:
            log.warning("nats: the server refuses the credentials; reading them again")
            # Not awaited: nats-py's reconnect loop awaits this callback, and closing
            # the connection cancels that loop.
            self._renewing = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        old = self._nc
        try:
            if old is not None:
                # nats-py flushes what is pending first, into a dead socket: whatever
                # that raises, the connection is done with.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(old.close(), _CLOSE_SECONDS)
            delay = 0.5
            while not self._closed:
                try:
                    nc = await self._connect()
                except Exception as err:  # ConnectError, or options that do not read
                    log.warning("nats: connecting again failed (%s); again in %.1fs", err, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)
                    continue
                self._nc = nc
                log.info("nats: connected again, with the credentials read again")
                for callback in self.on_renew:
                    callback(nc)
                return
        finally:
            self._renewing = None

    async def close(self) -> None:
        """Close the connection (and stop renewing it)."""
        self._closed = True
        if self._renewing is not None:
            self._renewing.cancel()
            with contextlib.suppress(BaseException):
                await self._renewing
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()


def nats_spec_options(
    nats_spec: spec.NatsSpec,
    environ: Mapping[str, str] | None = None,
    name: str | None = None,
) -> ConnectOptions:
    """Connect options for an Agent's `trajectories.nats`, secrets from the mounted dirs.

    The spec names Secrets; the process reads them where they are mounted (the
    operator mounts them and sets the variables). A config that names one with nothing
    mounted is refused, rather than connecting without TLS or credentials."""
    env = os.environ if environ is None else environ
    if nats_spec.tls is not None and not env.get(ENV_NATS_TLS_DIR):
        raise ConnectError(
            f"tls: Secret {nats_spec.tls.secret_name!r} is named but {ENV_NATS_TLS_DIR}"
            " names no directory it is mounted in"
        )
    creds = (
        ENV_NATS_CREDENTIALS_DIR,
        ENV_NATS_USER,
        ENV_NATS_TOKEN,
        ENV_NATS_CREDS_FILE,
    )
    if nats_spec.credentials_secret is not None and not any(env.get(k) for k in creds):
        raise ConnectError(
            f"credentialsSecret: Secret {nats_spec.credentials_secret.name!r} is named but"
            f" {ENV_NATS_CREDENTIALS_DIR} names no directory it is mounted in"
        )
    return ConnectOptions.from_env(env, servers=nats_spec.url, name=name)
