"""The model registry: model directories in a NATS JetStream object store bucket.

`relayrl-runtime model push` uploads a model directory; runtimes whose model URI is
`objectstore://<bucket>/<name>` download it at start and poll for new versions
(`reload.RegistryWatcher`). Layout in the bucket: the object `<name>` is the newest
version, and `<name>@v<version>` keeps every pushed version (for pinned `model.version`).
Each object is a gzip'd tar of the directory; its description is JSON
`{"version": N, "format": "onnx"}`, so listing needs no download.

A version names one model: the steps a runtime records carry it. So a push of version
N refuses other bytes where `<name>@vN` is stored already, and a version below the
newest, unless forced (a deliberate rollback). Packing is reproducible (no times or
owners in the archive), so pushing the same directory again changes nothing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import logging
import os
import re
import shutil
import stat
import tarfile
import time
import zlib
from collections.abc import Awaitable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import urlparse

from nats.js import api
from nats.js import errors as js_errors
from nats.js import object_store as object_store_api
from nats.js.kv import MSG_ROLLUP_SUBJECT
from nats.nuid import NUID

from relayrl_runtime import errors, streams
from relayrl_runtime.inference import model

log = logging.getLogger(__name__)

SCHEME = "objectstore"
# How long the registry commands wait for NATS before they give up.
CONNECT_SECONDS = 30.0
# A download gets this long plus a second for every FETCH_BYTES_PER_SECOND of the
# object: an object replaced while it is read never ends its read (its chunks go).
FETCH_SECONDS: Final = 60.0
# A model directory read while it changes is read again, this many times at most.
PACK_ATTEMPTS: Final = 5
PACK_RETRY_SECONDS: Final = 1.0
FETCH_BYTES_PER_SECOND: Final = 1 << 20
# Bucket names NATS takes; model names the model URI takes (no '@v<digits>' suffix,
# which would read as another name's version).
BUCKET_NAME: Final = re.compile(r"^[A-Za-z0-9_-]+$")
MODEL_NAME: Final = re.compile(r"^[A-Za-z0-9_.-]+$")
_VERSIONED: Final = re.compile(r"@v\d+$")
# nats-server's refusal of a publish whose expected last subject sequence is stale.
_WRONG_LAST_SEQUENCE: Final = 10071
# Chunks no object names are a push's that was cut off before its meta message (killed,
# its connection lost), once their last chunk is this old by the server's clock; younger
# ones may be a push still writing. A push removes them (`sweep`).
ORPHAN_SECONDS: Final = 3600.0
# A bucket with more objects than this is not swept: the server lists at most so many
# subjects at once, and an object left out of the list would look like no object.
_SWEEP_MAX_OBJECTS: Final = 10_000

_T = TypeVar("_T")


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """Where a model lives in the registry."""

    bucket: str
    name: str
    version: int | None = None

    @property
    def key(self) -> str:
        """Object holding the wanted version."""
        return self.name if self.version is None else versioned_key(self.name, self.version)

    @classmethod
    def parse(cls, uri: str, version: int | None = None) -> ModelRef:
        """`objectstore://bucket/name` (version from the spec, if pinned)."""
        parsed = urlparse(uri)
        name = parsed.path.lstrip("/")
        if parsed.scheme != SCHEME or not parsed.netloc or not name or "/" in name:
            raise errors.InvalidArgumentError.mismatch(
                "model.uri", "objectstore://<bucket>/<name>", repr(uri)
            )
        return cls(parsed.netloc, name, version)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One object in the bucket."""

    key: str
    version: int | None
    format: str | None
    size: int
    digest: str


def versioned_key(name: str, version: int) -> str:
    """Object name of one version."""
    return f"{name}@v{version}"


def check_bucket(bucket: str) -> None:
    """Raise InvalidArgumentError unless NATS takes the bucket name."""
    if not BUCKET_NAME.fullmatch(bucket):
        raise errors.InvalidArgumentError.mismatch(
            "--bucket", "letters, digits, '_' and '-'", repr(bucket)
        )


def check_names(bucket: str, name: str) -> None:
    """Raise InvalidArgumentError unless NATS takes the bucket and a model URI the name."""
    check_bucket(bucket)
    if not MODEL_NAME.fullmatch(name) or _VERSIONED.search(name):
        raise errors.InvalidArgumentError.mismatch(
            "--name",
            "letters, digits, '_', '-' and '.', not ending in @v<digits>",
            repr(name),
        )


def pack(directory: Path) -> tuple[bytes, model.ModelMetadata]:
    """A gzip'd tar of the model directory's files, and the metadata it holds.

    Symbolic links are followed (a checkpoint linked in is packed as its content), and
    the archive holds no times, owners or modes: the same files give the same bytes.
    The metadata is parsed from the bytes archived, so a push labels the object with
    the version it holds. A directory whose files change while they are read (a
    trainer writing the next version) is read again, up to `PACK_ATTEMPTS` times.
    """
    model.read_metadata(directory)  # a missing or invalid file, said before any reading
    for attempt in range(1, PACK_ATTEMPTS + 1):
        before = _listing(directory)
        try:
            contents = {arcname: path.read_bytes() for arcname, (path, _) in before.items()}
        except FileNotFoundError:  # renamed over or removed since the listing: changed
            contents = None
        if contents is not None and _listing(directory) == before:
            break
        if attempt == PACK_ATTEMPTS:
            raise errors.ModelMetadataError(
                f"{directory}: its files changed while they were read, {PACK_ATTEMPTS}"
                " times: push once it is written (write a new directory, then rename it"
                " into place)"
            )
        time.sleep(PACK_RETRY_SECONDS)
    assert contents is not None
    text = contents.get(model.METADATA_FILE)
    if text is None:
        raise errors.ModelMetadataError(
            f"{directory / model.METADATA_FILE}: expected a model metadata file"
            f" ({model.METADATA_FILE}), got none"
        )
    meta = model.parse_metadata(text, directory / model.METADATA_FILE)
    graph = meta.graph_file()
    if graph not in contents:
        raise errors.ModelMetadataError(
            f"{directory / model.METADATA_FILE}: file: expected {graph!r} in the"
            f" directory, got no such file"
        )
    buf = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as zipped,
        tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for arcname, data in contents.items():
            info = tarfile.TarInfo(arcname)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), meta


def _listing(directory: Path) -> dict[str, tuple[Path, tuple[int, int, int, int]]]:
    """Each file under `directory` (links followed), sorted, with what tells a change:
    device, inode, size and modification time."""
    files: dict[str, tuple[Path, tuple[int, int, int, int]]] = {}
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        for file_name in sorted(names):
            path = Path(root) / file_name
            try:
                st = path.stat()
            except OSError:
                continue  # a broken link, or gone since the listing
            if stat.S_ISREG(st.st_mode):  # skips sockets, fifos
                key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                files[path.relative_to(directory).as_posix()] = (path, key)
    return files


def digest_of(data: bytes) -> str:
    """The digest the object store records for `data`."""
    return "SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()


class TornReadError(TimeoutError):
    """An object whose chunks changed while they were read (a push replaced it): as a
    timeout, tried again."""


def unpack(data: bytes, destination: Path) -> Path:
    """Extract a packed model into `destination` (created); returns it."""
    destination.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            tar.extractall(destination, filter="data")
    except (tarfile.TarError, EOFError, zlib.error) as err:
        # Only what the bytes are: a full or read-only cache is this pod's fault, and
        # is tried again rather than reported as the object's.
        raise errors.ModelLoadError(
            f"registry object: not a packed model directory: {err}"
        ) from err
    return destination


async def _nats(bucket: str, request: Awaitable[_T]) -> _T:
    """A registry request; a refusal no retry changes (a bad name, a bad request) as
    RelayRLError. Not-found passes as it is; so do timeouts, "JetStream not available"
    (503) and a guarded write another writer got to first, which may pass."""
    try:
        return await request
    except js_errors.NotFoundError:
        raise
    except js_errors.APIError as err:
        if err.err_code == _WRONG_LAST_SEQUENCE:
            raise
        if isinstance(err, js_errors.BadRequestError):
            raise _refused(bucket, err) from err
        raise
    except js_errors.InvalidBucketNameError as err:
        raise _refused(bucket, err) from err


def _refused(bucket: str, err: Exception) -> errors.RelayRLError:
    return errors.RelayRLError(
        f"model registry: bucket {bucket!r}: NATS refused: {streams.describe(err)}"
    )


async def object_store(nc: Any, bucket: str, create: bool = False) -> Any:
    """The bucket's object store (created when asked and missing)."""
    js = nc.jetstream()
    try:
        return await _nats(bucket, js.object_store(bucket))
    except js_errors.BucketNotFoundError:
        if not create:
            raise errors.ModelMissingError(
                f"model registry: bucket {bucket!r} does not exist"
            ) from None
        return await _nats(bucket, js.create_object_store(bucket))


class VersionConflictError(errors.RelayRLError):
    """A push that would give a version number to other bytes, or go back in versions."""

    kind = "version_conflict"


# A push that finds its objects changed by another push between reading them and
# writing its own starts again (the rules decide afresh); this many times at most.
PUSH_ATTEMPTS: Final = 5


@dataclasses.dataclass(frozen=True)
class _Current:
    """An object as a push read it: its meta message's sequence, for a guarded write."""

    entry: Entry | None  # None: not there (never put, or deleted)
    sequence: int  # 0: no meta message
    nuid: str | None  # where its chunks are, to remove once replaced


class _Raced(Exception):
    """Another push changed the object after this one read it."""


async def push(nc: Any, bucket: str, name: str, directory: Path, force: bool = False) -> Entry:
    """Upload a model directory as the newest version of `name`.

    Refused (`VersionConflictError`) without `force`: other bytes for a version already
    stored, and a version below the newest one. The same directory again is a no-op.
    Pushes from several places at once are serialised: each object is written only if
    it is as the push read it (its meta message's sequence), else the push reads again
    and checks again, so a push never replaces a newer version pushed meanwhile.
    """
    check_names(bucket, name)
    data, meta = await asyncio.to_thread(pack, directory)
    digest = digest_of(data)
    await object_store(nc, bucket, create=True)
    js = nc.jetstream()
    versioned = versioned_key(name, meta.version)
    description = json.dumps({"version": meta.version, "format": meta.format.value})
    for _ in range(PUSH_ATTEMPTS):
        stored = await _read(js, bucket, versioned)
        newest = await _read(js, bucket, name)
        if not force:
            _check_push(bucket, name, meta.version, digest, stored.entry, newest.entry)
        try:
            for key, current in ((versioned, stored), (name, newest)):
                have = current.entry
                if have is not None and have.digest == digest and have.version == meta.version:
                    continue  # already there, as it is
                await _put_guarded(js, bucket, key, data, digest, description, current)
        except _Raced:
            continue
        try:  # housekeeping: the push itself is done
            await asyncio.wait_for(sweep(js, bucket), CONNECT_SECONDS)
        except Exception as err:
            log.warning("model registry: bucket %r not swept of cut-off pushes: %r", bucket, err)
        return Entry(name, meta.version, meta.format.value, len(data), digest)
    raise errors.RelayRLError(
        f"model registry: {name} in bucket {bucket!r} was changed by other pushes"
        f" {PUSH_ATTEMPTS} times while this one wrote: push again once they are done"
    )


def _check_push(
    bucket: str,
    name: str,
    version: int,
    digest: str,
    stored: Entry | None,
    newest: Entry | None,
) -> None:
    versioned = versioned_key(name, version)
    if stored is not None and stored.digest != digest:
        raise VersionConflictError(
            f"model registry: {versioned} in bucket {bucket!r} holds other content:"
            f" give changed weights a new version (model export --version, or"
            f" 'version' in {model.METADATA_FILE}), or push with --force"
        )
    if (
        newest is not None
        and newest.version == version
        and newest.digest != digest
        and stored is None
    ):
        raise VersionConflictError(
            f"model registry: {name} in bucket {bucket!r} holds other content as"
            f" version {version}: give changed weights a new version, or push"
            f" with --force"
        )
    if newest is not None and newest.version is not None and newest.version > version:
        raise VersionConflictError(
            f"model registry: {name} is at version {newest.version} in bucket"
            f" {bucket!r}, above {version}: pods pin an older version with"
            f" model.version; push with --force to make it the newest again"
        )


def _meta_subject(bucket: str, key: str) -> str:
    encoded = base64.urlsafe_b64encode(key.encode()).decode()
    return object_store_api.OBJ_META_PRE_TEMPLATE.format(bucket=bucket, obj=encoded)


async def _read(js: Any, bucket: str, key: str) -> _Current:
    """The object `key` as it is now, with its meta message's sequence."""
    stream = streams.object_store_stream(bucket)
    try:
        msg = await _nats(bucket, js.get_last_msg(stream, _meta_subject(bucket, key)))
    except js_errors.NotFoundError:
        return _Current(None, 0, None)
    try:
        info = api.ObjectInfo.from_response(json.loads(msg.data))
    except (ValueError, TypeError, KeyError) as err:
        raise errors.RelayRLError(
            f"model registry: {key} in bucket {bucket!r}: unreadable object metadata: {err}"
        ) from err
    return _Current(None if info.deleted else _entry(info), msg.seq, info.nuid or None)


async def _put_guarded(
    js: Any,
    bucket: str,
    key: str,
    data: bytes,
    digest: str,
    description: str,
    current: _Current,
) -> None:
    """Write `data` as object `key` (the object store's layout: chunks, then one meta
    message rolling up the old) only if its meta message is still `current`'s; raises
    `_Raced` otherwise, its chunks removed."""
    stream = streams.object_store_stream(bucket)
    chunk_size = object_store_api.OBJ_DEFAULT_CHUNK_SIZE
    # A generator per write: trainers forked from one launcher would repeat the ids of
    # one made at import, and write their chunks on the same subject.
    nuid = NUID().next().decode()
    chunks = object_store_api.OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=bucket, obj=nuid)
    info = api.ObjectInfo(
        name=key,
        bucket=bucket,
        nuid=nuid,
        size=len(data),
        mtime=datetime.now(UTC).isoformat(),
        chunks=-(-len(data) // chunk_size),
        digest=digest,
        description=description,
        options=api.ObjectMetaOptions(max_chunk_size=chunk_size),
    )

    async def drop_chunks() -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(js.purge_stream(stream, subject=chunks), CONNECT_SECONDS)

    try:
        for start in range(0, len(data), chunk_size):
            await _nats(bucket, js.publish(chunks, data[start : start + chunk_size]))
    except BaseException:
        await drop_chunks()
        raise
    try:
        await _nats(
            bucket,
            js.publish(
                _meta_subject(bucket, key),
                json.dumps(info.as_dict()).encode(),
                headers={
                    api.Header.ROLLUP: MSG_ROLLUP_SUBJECT,
                    api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE: str(current.sequence),
                },
            ),
        )
    except js_errors.APIError as err:  # refused: not stored
        await drop_chunks()
        if err.err_code == _WRONG_LAST_SEQUENCE:
            raise _Raced from err
        raise
    except BaseException as err:
        # No answer (a timeout, a cancel, a lost connection): the meta message may be
        # stored all the same, and then its chunks must stay. Removed only when the
        # object is known not to be this write.
        written = await _written(js, bucket, key, nuid)
        if written is False:
            await drop_chunks()
        if not written or not isinstance(err, Exception):
            raise
    if current.nuid is not None:  # the replaced object's chunks
        old = object_store_api.OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=bucket, obj=current.nuid)
        await _nats(bucket, js.purge_stream(stream, subject=old))


async def sweep(js: Any, bucket: str, older_than: float | None = None) -> int:
    """Remove the chunks of `bucket` that no object names and whose last chunk is older
    than `older_than` seconds (default `ORPHAN_SECONDS`): those of a push cut off before
    its meta message. Ages are by the server's clock: against the newest meta message
    (a push sweeps just after its own). Returns how many pushes' chunks were removed."""
    if older_than is None:
        older_than = ORPHAN_SECONDS
    stream = streams.object_store_stream(bucket)
    prefix = f"$O.{bucket}"
    chunked = await _nats(bucket, js.stream_info(stream, subjects_filter=f"{prefix}.C.>"))
    chunk_subjects = set(chunked.state.subjects or {})
    if not chunk_subjects:
        return 0
    metas = await _nats(bucket, js.stream_info(stream, subjects_filter=f"{prefix}.M.>"))
    meta_subjects = metas.state.subjects or {}
    if len(meta_subjects) >= _SWEEP_MAX_OBJECTS:
        log.warning("model registry: bucket %r has too many objects to sweep", bucket)
        return 0
    named = set()
    now: datetime | None = None
    for subject in meta_subjects:
        msg = await _nats(bucket, js.get_last_msg(stream, subject))
        if msg.time is not None and (now is None or msg.time > now):
            now = msg.time
        with contextlib.suppress(ValueError, TypeError, KeyError):
            info = api.ObjectInfo.from_response(json.loads(msg.data))
            if not info.deleted and info.nuid:
                named.add(f"{prefix}.C.{info.nuid}")
    removed = 0
    if now is None:
        return 0
    for subject in sorted(chunk_subjects - named):
        try:
            last = await _nats(bucket, js.get_last_msg(stream, subject))
        except js_errors.NotFoundError:
            continue  # removed meanwhile
        if last.time is None or (now - last.time).total_seconds() < older_than:
            continue
        await _nats(bucket, js.purge_stream(stream, subject=subject))
        removed += 1
    return removed


async def _written(js: Any, bucket: str, key: str, nuid: str) -> bool | None:
    """Whether object `key` is the write with chunks at `nuid`; None: cannot tell."""
    try:
        now = await asyncio.wait_for(_read(js, bucket, key), CONNECT_SECONDS)
    except Exception:
        return None
    return now.nuid == nuid


async def list_models(nc: Any, bucket: str) -> list[Entry]:
    """Every object in the bucket, sorted by key."""
    store = await object_store(nc, bucket)
    try:
        infos = await _nats(bucket, store.list())
    except js_errors.NotFoundError:
        return []
    return sorted((_entry(i) for i in infos if not i.deleted), key=_list_order)


def _list_order(e: Entry) -> tuple[str, int, int]:
    """By name, the newest-version object first, then its versions in number order."""
    base, _, number = e.key.rpartition("@v")
    if base and number.isdigit():
        return base, 1, int(number)
    return e.key, 0, 0


async def info(nc: Any, ref: ModelRef) -> Entry:
    """Metadata of the wanted object (no download)."""
    store = await object_store(nc, ref.bucket)
    try:
        return _entry(await _nats(ref.bucket, store.get_info(ref.key)))
    except js_errors.NotFoundError:
        raise errors.ModelMissingError(
            f"model registry: no object {ref.key!r} in bucket {ref.bucket!r}"
        ) from None


async def fetch(nc: Any, ref: ModelRef, cache: Path) -> tuple[Path, Entry]:
    """Download and unpack the wanted version under `cache`; returns (directory, entry)."""
    store = await object_store(nc, ref.bucket)
    try:
        obj = await _nats(ref.bucket, store.get_info(ref.key))
        budget = FETCH_SECONDS + int(obj.size or 0) / FETCH_BYTES_PER_SECOND
        received = io.BytesIO()  # written chunk by chunk
        await _nats(ref.bucket, _download(nc.jetstream(), ref, obj, received, budget))
    except js_errors.NotFoundError:
        raise errors.ModelMissingError(
            f"model registry: no object {ref.key!r} in bucket {ref.bucket!r}"
        ) from None
    entry = _entry(obj)
    digest = entry.digest.split("=", 1)[-1].replace("/", "_")[:16]
    target = cache / f"{ref.name}-v{entry.version}-{digest}"
    if not (target / model.METADATA_FILE).exists():
        # In a thread: a large model takes seconds to unpack, and the event loop
        # serves /healthz, /metrics and the pod's reports meanwhile.
        await asyncio.to_thread(
            _unpack_into, received.getvalue(), tmp=cache / f".{target.name}.partial", target=target
        )
    held = model.read_metadata(target).version
    if entry.version is not None and held != entry.version:
        # Pushed by a version of `model push` that read its directory while a trainer
        # wrote the next version: the label and the files disagree. Recorded steps
        # would name the wrong version.
        await asyncio.to_thread(shutil.rmtree, target, True)
        raise errors.ModelMetadataError(
            f"model registry: {ref.key} in {ref.bucket!r} is labelled version"
            f" {entry.version} but its {model.METADATA_FILE} says {held}: push the model"
            " again"
        )
    return target, entry


async def _download(js: Any, ref: ModelRef, obj: Any, into: io.BytesIO, budget: float) -> None:
    """Read the chunks of the object `obj` describes into `into`, checking its digest.

    On a subscription of its own, ended however the read ends: a read cut off (by the
    budget, or a cancel) would otherwise leave its ordered consumer on the server and
    its subscription on the connection, one more for every object replaced while read.
    """
    if obj.options is not None and obj.options.link is not None:
        raise errors.ModelLoadError(
            f"model registry: {ref.key} in {ref.bucket!r} is a link, not a pushed model"
        )
    if not obj.nuid:
        raise errors.ModelLoadError(f"model registry: {ref.key} in {ref.bucket!r}: no chunks")
    if not obj.size:
        return
    sub = await js.subscribe(
        object_store_api.OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=ref.bucket, obj=obj.nuid),
        ordered_consumer=True,
    )
    digest = hashlib.sha256()
    try:
        async with asyncio.timeout(budget):
            async for msg in sub.messages:
                into.write(msg.data)
                digest.update(msg.data)
                if msg.metadata.num_pending == 0:
                    break
    except TimeoutError:
        # Replaced while read (a push meanwhile): its old chunks are gone.
        raise TimeoutError(
            f"model registry: {ref.key} in {ref.bucket!r} not read within {budget:.0f}s"
            " (replaced meanwhile?); trying again"
        ) from None
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    want = str(obj.digest or "").split("=", 1)[-1]
    if base64.urlsafe_b64decode(want + "=" * (-len(want) % 4)) != digest.digest():
        raise TornReadError(
            f"model registry: {ref.key} in {ref.bucket!r}: what was read does not match its"
            " digest (replaced meanwhile?); trying again"
        )


def _unpack_into(data: bytes, tmp: Path, target: Path) -> None:
    """Unpack under a temporary name, then rename to `target` (never half there)."""
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        unpack(data, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(target)


def prune(cache: Path, keep: Path) -> None:
    """Remove every model directory under `cache` but `keep` (the one running): a loaded
    model no longer reads its files, and a pod that follows a trainer's pushes would
    otherwise fill its disk with past versions."""
    for entry in cache.iterdir():
        if entry != keep:
            shutil.rmtree(entry, ignore_errors=True)


async def connect(url: str, deadline: float = CONNECT_SECONDS) -> Any:
    """A NATS connection for the registry commands (push, list).

    Auth and TLS come from the RELAYRL_NATS_* variables, as for the runtime. A URL
    that is not one, or a server not reachable within `deadline` seconds, raises
    `errors.RelayRLError` saying so.
    """
    try:
        options = streams.ConnectOptions.from_env(servers=url)
        return await streams.connect(options, deadline=deadline)
    except streams.ConnectError as err:
        raise errors.RelayRLError(str(err)) from err


def _entry(obj: Any) -> Entry:
    version = fmt = None
    if obj.description:
        try:
            desc = json.loads(obj.description)
        except ValueError:
            desc = None
        if isinstance(desc, dict):  # else put by hand: no version, waited for
            with contextlib.suppress(ValueError, TypeError):
                version = int(desc["version"]) if desc.get("version") is not None else None
            fmt = desc.get("format") if isinstance(desc.get("format"), str) else None
    return Entry(obj.name, version, fmt, int(obj.size or 0), str(obj.digest or ""))
