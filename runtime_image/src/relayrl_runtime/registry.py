"""The model registry: model directories in a NATS JetStream object store bucket.

`relayrl-runtime model push` uploads a model directory; runtimes whose model URI is
`objectstore://<bucket>/<name>` download it at start and poll for new versions
(`reload.RegistryWatcher`). Layout in the bucket: the object `<name>` is the newest
version, and `<name>@v<version>` keeps every pushed version (for pinned `model.version`).
Each object is a gzip'd tar of the directory; its description is JSON
`{"version": N, "format": "onnx"}`, so listing needs no download.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from nats.js import api
from nats.js import errors as js_errors

from relayrl_runtime import errors, streams
from relayrl_runtime.inference import model

SCHEME = "objectstore"
# How long the registry commands wait for NATS before they give up.
CONNECT_SECONDS = 30.0


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


def pack(directory: Path) -> bytes:
    """A gzip'd tar of the model directory's regular files (validated metadata first)."""
    model.read_metadata(directory)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(directory.iterdir()):
            if path.is_file():
                tar.add(path, arcname=path.name)
    return buf.getvalue()


def unpack(data: bytes, destination: Path) -> Path:
    """Extract a packed model into `destination` (created); returns it."""
    destination.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            tar.extractall(destination, filter="data")
    except (tarfile.TarError, OSError) as err:
        raise errors.ModelLoadError(
            f"registry object: not a packed model directory: {err}"
        ) from err
    return destination


async def object_store(nc: Any, bucket: str, create: bool = False) -> Any:
    """The bucket's object store (created when asked and missing)."""
    js = nc.jetstream()
    try:
        return await js.object_store(bucket)
    except js_errors.BucketNotFoundError:
        if not create:
            raise errors.ModelMissingError(
                f"model registry: bucket {bucket!r} does not exist"
            ) from None
        return await js.create_object_store(bucket)


async def push(nc: Any, bucket: str, name: str, directory: Path) -> Entry:
    """Upload a model directory as the newest version of `name`."""
    meta = model.read_metadata(directory)
    data = pack(directory)
    store = await object_store(nc, bucket, create=True)
    description = json.dumps({"version": meta.version, "format": meta.format.value})
    for key in (versioned_key(name, meta.version), name):
        info = await store.put(key, data, meta=api.ObjectMeta(name=key, description=description))
    return Entry(name, meta.version, meta.format.value, int(info.size or 0), str(info.digest))


async def list_models(nc: Any, bucket: str) -> list[Entry]:
    """Every object in the bucket, sorted by key."""
    store = await object_store(nc, bucket)
    try:
        infos = await store.list()
    except js_errors.NotFoundError:
        return []
    return sorted((_entry(i) for i in infos if not i.deleted), key=lambda e: e.key)


async def info(nc: Any, ref: ModelRef) -> Entry:
    """Metadata of the wanted object (no download)."""
    store = await object_store(nc, ref.bucket)
    try:
        return _entry(await store.get_info(ref.key))
    except js_errors.NotFoundError:
        raise errors.ModelMissingError(
            f"model registry: no object {ref.key!r} in bucket {ref.bucket!r}"
        ) from None


async def fetch(nc: Any, ref: ModelRef, cache: Path) -> tuple[Path, Entry]:
    """Download and unpack the wanted version under `cache`; returns (directory, entry)."""
    store = await object_store(nc, ref.bucket)
    try:
        result = await store.get(ref.key)
    except js_errors.NotFoundError:
        raise errors.ModelMissingError(
            f"model registry: no object {ref.key!r} in bucket {ref.bucket!r}"
        ) from None
    entry = _entry(result.info)
    digest = entry.digest.split("=", 1)[-1].replace("/", "_")[:16]
    target = cache / f"{ref.name}-v{entry.version}-{digest}"
    if not (target / model.METADATA_FILE).exists():
        tmp = cache / f".{target.name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            unpack(bytes(result.data or b""), tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        tmp.rename(target)
    return target, entry


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
            version = int(desc.get("version")) if desc.get("version") is not None else None
            fmt = desc.get("format")
        except (ValueError, TypeError):
            pass
    return Entry(obj.name, version, fmt, int(obj.size or 0), str(obj.digest or ""))
