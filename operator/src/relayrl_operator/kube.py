"""A small asyncio Kubernetes client: server-side apply, get, watch, delete, status patch.

The reconciler applies every desired child with server-side apply (field manager
`relayrl-operator`, force): the apiserver computes the diff, a child that is already
right costs no write, a deleted one is re-created and a hand-edited field of ours is
taken back. Credentials come from the kubeconfig or the in-cluster service account,
loaded with the `kubernetes` package, whose refresh hook is asked again every
`TOKEN_RECHECK_SECONDS` (the kubelet rewrites a pod's token file before it expires; an
exec plugin's credential expires); requests go through aiohttp.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import ssl
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import kubernetes

from relayrl_operator import constants, metrics
from relayrl_runtime import spec

log = logging.getLogger(__name__)

# Retry delays for transient errors: 0.5 s doubling up to 60 s, with jitter.
BACKOFF_BASE: Final = 0.5
BACKOFF_MAX: Final = 60.0

# How often a bearer token is read again through the configuration's refresh hook (the
# hook itself re-reads a service-account token file once a minute at most).
TOKEN_RECHECK_SECONDS: Final = 30.0

# A watch that has sent nothing (not even a bookmark) for this long is given up.
WATCH_IDLE_SECONDS: Final = 150

APPLY_CONTENT_TYPE: Final = "application/apply-patch+yaml"
MERGE_CONTENT_TYPE: Final = "application/merge-patch+json"


@dataclass(frozen=True)
class Kind:
    """Where the apiserver serves one kind."""

    api_version: str
    kind: str
    plural: str

    def path(self, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
        """The REST path of a collection (in every namespace with None) or an object
        (optionally a subresource)."""
        root = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        if namespace is None:
            if name is not None:
                raise ValueError(f"{self.kind} {name}: a namespaced object needs its namespace")
            return f"{root}/{self.plural}"
        out = f"{root}/namespaces/{namespace}/{self.plural}"
        if name is not None:
            out += f"/{name}"
        if sub is not None:
            out += f"/{sub}"
        return out


CONFIGMAP: Final = Kind("v1", "ConfigMap", "configmaps")
SERVICE: Final = Kind("v1", "Service", "services")
SECRET: Final = Kind("v1", "Secret", "secrets")
PVC: Final = Kind("v1", "PersistentVolumeClaim", "persistentvolumeclaims")
POD: Final = Kind("v1", "Pod", "pods")
STATEFULSET: Final = Kind("apps/v1", "StatefulSet", "statefulsets")
DEPLOYMENT: Final = Kind("apps/v1", "Deployment", "deployments")
PDB: Final = Kind("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets")
PODMONITOR: Final = Kind("monitoring.coreos.com/v1", "PodMonitor", "podmonitors")
EVENT: Final = Kind("v1", "Event", "events")
AGENT: Final = Kind(spec.API_VERSION, spec.KIND, spec.PLURAL)

KINDS: Final = {
    (k.api_version, k.kind): k
    for k in (CONFIGMAP, SERVICE, SECRET, PVC, POD, STATEFULSET, DEPLOYMENT, PDB, PODMONITOR, AGENT)
}


def kind_of(obj: Mapping[str, Any]) -> Kind:
    """The Kind of a manifest."""
    return KINDS[(obj["apiVersion"], obj["kind"])]


def load_configuration(kubeconfig: str | None = None) -> Any:
    """A `kubernetes.client.Configuration`: the given kubeconfig, else in-cluster, else default.

    An explicit kubeconfig wins; without one the pod's service account is used when
    running in a cluster, and `$KUBECONFIG` / `~/.kube/config` otherwise.
    """
    cfg = kubernetes.client.Configuration()
    if kubeconfig is None:
        try:
            kubernetes.config.load_incluster_config(client_configuration=cfg)
        except kubernetes.config.ConfigException:
            pass
        else:
            return cfg
    kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    return cfg


_SCHEME: Final = re.compile(r"^\s*bearer\s+", re.IGNORECASE)


def bearer_token(cfg: Any) -> str | None:
    """The bearer token of a loaded configuration, without its scheme: a kubeconfig's
    comes as "Bearer x", the in-cluster service account's as "bearer x"."""
    token = cfg.api_key.get("authorization") or cfg.api_key.get("BearerToken")
    if not token:
        return None
    return _SCHEME.sub("", str(token)).strip() or None


def _authorization(cfg: Any) -> dict[str, str]:
    token = bearer_token(cfg)
    return {"Authorization": f"Bearer {token}"} if token else {}


@dataclass(frozen=True)
class Applied:
    """The object after a server-side apply, and whether the apply created it."""

    obj: dict[str, Any]
    created: bool

    @property
    def resource_version(self) -> str:
        """The object's resourceVersion: unchanged when the apply changed nothing."""
        return str(self.obj.get("metadata", {}).get("resourceVersion", ""))


class ApiError(Exception):
    """The apiserver refused a request (or, `ForeignObjectError`, the operator did)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def transient(self) -> bool:
        """Worth retrying: conflicts, throttling and server-side failures, but not a
        manifest server-side apply cannot merge (a key listed twice: a 500 that the
        same manifest gets again every time)."""
        if self.status >= 500 and _UNMERGEABLE in self.message:
            return False
        return self.status in (409, 429) or self.status >= 500

    @property
    def namespace_terminating(self) -> bool:
        """The namespace is being deleted: nothing new may be made in it."""
        return self.status == 403 and _TERMINATING in self.message


class ForeignObjectError(ApiError):
    """A child's name is taken by an object that is not the Agent's: it is left alone
    (an apply would take it over, and the garbage collector delete it with the Agent)."""

    def __init__(self, obj: Mapping[str, Any]) -> None:
        meta = obj["metadata"]
        self.child = (str(obj["kind"]), str(meta["name"]))
        super().__init__(
            409,
            "AlreadyExists",
            f"{obj['kind']} {meta['namespace']}/{meta['name']} exists and is not this"
            " Agent's (no owner reference to it, nor this operator's labels for an Agent"
            " of its name): delete or rename it, or give the Agent another name",
        )

    @property
    def transient(self) -> bool:
        """Not until the object is gone: checked again at the next apply."""
        return False


# Accept header for an object's metadata alone (smaller answers to encode and decode).
METADATA_ONLY: Final = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"

# What the apiserver says (with a 500) of an apply whose manifest repeats a list key.
_UNMERGEABLE: Final = "failed to create typed patch object"
# What the apiserver says (with a 403) of a create in a namespace being deleted.
_TERMINATING: Final = "because it is being terminated"


def retry_delay(failures: int) -> float:
    """Seconds before the next try after `failures` in a row: growing, bounded, jittered."""
    delay = min(BACKOFF_MAX, BACKOFF_BASE * 2.0 ** min(failures - 1, 16))
    return delay * random.uniform(0.8, 1.2)  # jitter, not crypto


def resource_of(path: str) -> str:
    """The resource an API path addresses, with its subresource: "statefulsets", "agents/status".

    /api/v1/namespaces/ns/events -> "events"; /apis/g/v/namespaces/ns/agents/a/status ->
    "agents/status"; /api/v1/namespaces/ns -> "namespaces".
    """
    parts = path.split("?", 1)[0].strip("/").split("/")
    rest = parts[2:] if parts[:1] == ["api"] else parts[3:]
    if rest[:1] == ["namespaces"]:
        rest = rest[2:] or ["namespaces"]
    if not rest:
        return "other"
    return rest[0] + (f"/{rest[2]}" if len(rest) >= 3 else "")


class Client:
    """An aiohttp session bound to one apiserver and credential."""

    def __init__(
        self,
        host: str,
        headers: Mapping[str, str],
        ssl_context: ssl.SSLContext | bool,
        config: Any = None,
    ):
        self._host = host.rstrip("/")
        # Sent with every request (the sessions keep none): a refreshed token replaces
        # the whole mapping, from a worker thread.
        self._headers = dict(headers)
        self._ssl = ssl_context
        # The `kubernetes` configuration the token came from, when it can refresh it.
        self._config = config if getattr(config, "refresh_api_key_hook", None) else None
        self._token_due = time.monotonic() + TOKEN_RECHECK_SECONDS
        self._session: aiohttp.ClientSession | None = None
        # Watches hold their connection for minutes: a pool of their own, so they
        # never take the slots requests wait for, however many namespaces are watched.
        self._watch_session: aiohttp.ClientSession | None = None

    @classmethod
    def from_config(cls, kubeconfig: str | None = None) -> Client:
        """Credentials from a kubeconfig file, or from the pod's service account."""
        return cls.from_configuration(load_configuration(kubeconfig))

    @classmethod
    def from_configuration(cls, cfg: Any) -> Client:
        """A client for a loaded `kubernetes.client.Configuration`."""
        context: ssl.SSLContext | bool = False
        if cfg.host.startswith("https"):
            context = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
            if not cfg.verify_ssl:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            if cfg.cert_file:
                context.load_cert_chain(cfg.cert_file, cfg.key_file)
        return cls(cfg.host, _authorization(cfg), context, cfg)

    async def _check_token(self) -> None:
        """Every `TOKEN_RECHECK_SECONDS`, the token as the configuration's hook has it now
        (it may read a file or run an exec plugin: in a worker thread)."""
        if self._config is None or time.monotonic() < self._token_due:
            return
        self._token_due = time.monotonic() + TOKEN_RECHECK_SECONDS
        cfg = self._config

        def reload() -> dict[str, str]:
            cfg.refresh_api_key_hook(cfg)
            return _authorization(cfg)

        try:
            headers = await asyncio.to_thread(reload)
        except Exception as err:  # keep the token in use; the next check tries again
            log.warning("could not refresh the API credentials: %s", err)
            return
        if headers and headers != self._headers:
            log.info("API credentials refreshed")
            self._headers = headers

    async def close(self) -> None:
        """Close the HTTP sessions."""
        session, watching = self._session, self._watch_session
        self._session = self._watch_session = None
        try:
            if session is not None:
                await session.close()
        finally:
            if watching is not None:
                await watching.close()
        if watching is not None:
            # A watch ended mid-answer leaves its TLS connection aborting: the socket
            # is closed by a callback, which gets its turn here, before a caller may
            # close the event loop.
            await asyncio.sleep(0.1)

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=64),
                timeout=aiohttp.ClientTimeout(total=30),
            )
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        accept: str | None = None,
    ) -> dict[str, Any]:
        """One API call; raises ApiError on a non-2xx answer."""
        return (await self._send(method, path, body, params, content_type, accept))[1]

    async def _send(
        self,
        method: str,
        path: str,
        body: Any,
        params: Mapping[str, str] | None,
        content_type: str,
        accept: str | None = None,
    ) -> tuple[int, dict[str, Any]]:
        await self._check_token()
        data = None if body is None else json.dumps(body)
        headers = dict(self._headers)
        if data is not None:
            headers["Content-Type"] = content_type
        if accept is not None:
            headers["Accept"] = accept
        code = "error"
        try:
            async with self._http().request(
                method, self._host + path, data=data, params=params, headers=headers
            ) as resp:
                code = str(resp.status)
                text = await resp.text()
                if resp.status >= 400:
                    raise _error(resp.status, text)
                return resp.status, (json.loads(text) if text else {})
        except (TimeoutError, aiohttp.ClientError) as err:
            code = "error"  # the answer may have started before the connection failed
            raise ApiError(503, "Unavailable", f"{method} {path}: {err!r}") from err
        finally:
            metrics.API_REQUESTS.labels(method.lower(), resource_of(path), code).inc()

    async def apply(self, obj: Mapping[str, Any]) -> Applied:
        """Server-side apply of a manifest, taking ownership of its fields."""
        meta = obj["metadata"]
        status, result = await self._send(
            "PATCH",
            kind_of(obj).path(meta["namespace"], meta["name"]),
            obj,
            {"fieldManager": constants.FIELD_MANAGER, "force": "true"},
            APPLY_CONTENT_TYPE,
        )
        # Server-side apply answers 201 when it created the object.
        return Applied(result, created=status == 201)

    async def watch(
        self, kind: Kind, namespace: str | None, params: Mapping[str, str], accept: str
    ) -> AsyncGenerator[dict[str, Any], None]:
        """The events of one watch request, decoded, until the server ends it.

        The answer is one JSON event per line; lines are split here rather than with
        the response's readline, which has a length limit a large object can exceed.
        """
        path = kind.path(namespace)
        if self._watch_session is None:
            self._watch_session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=0),
                # With bookmarks the server writes at least every minute or so: a
                # silence this long is a dead connection.
                timeout=aiohttp.ClientTimeout(total=None, connect=30, sock_read=WATCH_IDLE_SECONDS),
            )
        await self._check_token()
        code = "error"
        try:
            async with self._watch_session.get(
                self._host + path,
                params={**params, "watch": "true"},
                headers={**self._headers, "Accept": accept},
            ) as resp:
                code = str(resp.status)
                if resp.status >= 400:
                    raise _error(resp.status, await resp.text())
                pending: list[bytes] = []  # the start of a line not yet complete
                async for chunk in resp.content.iter_any():
                    if b"\n" not in chunk:
                        pending.append(chunk)
                        continue
                    lines = b"".join([*pending, chunk]).split(b"\n")
                    pending = [lines.pop()]
                    for line in lines:
                        if line.strip():
                            yield json.loads(line)
        except (TimeoutError, aiohttp.ClientError) as err:
            code = "error"
            raise ApiError(503, "Unavailable", f"watch {path}: {err!r}") from err
        finally:
            metrics.API_REQUESTS.labels("watch", resource_of(path), code).inc()

    async def can(self, verb: str, resource: str, group: str = "") -> bool:
        """Whether this client may `verb` `resource` in every namespace (a
        SelfSubjectAccessReview, which every authenticated user may ask for)."""
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": {"verb": verb, "resource": resource, "group": group}},
        }
        try:
            out = await self.request(
                "POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", body=review
            )
        except ApiError as err:
            log.warning("cannot ask whether this client may %s %s: %s", verb, resource, err)
            return False
        return bool((out.get("status") or {}).get("allowed"))

    async def list(self, kind: Kind, namespace: str, field_selector: str) -> list[dict[str, Any]]:
        """The objects of a kind in a namespace that match a field selector, as the
        apiserver's watch cache has them."""
        found = await self.request(
            "GET",
            kind.path(namespace),
            params={"fieldSelector": field_selector, "resourceVersion": "0"},
        )
        return list(found.get("items") or [])

    async def get_metadata(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None:
        """An object's metadata as the apiserver's watch cache has it (no etcd read; it
        may be a moment old), or None when it does not exist."""
        try:
            return await self.request(
                "GET",
                kind.path(namespace, name),
                params={"resourceVersion": "0"},
                accept=METADATA_ONLY,
            )
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    async def get(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None:
        """An object, or None when it does not exist."""
        try:
            return await self.request("GET", kind.path(namespace, name))
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    async def delete(self, kind: Kind, namespace: str, name: str) -> bool:
        """Delete an object (dependents in the background); False if it was not there."""
        try:
            await self.request(
                "DELETE", kind.path(namespace, name), body={"propagationPolicy": "Background"}
            )
        except ApiError as err:
            if err.status == 404:
                return False
            raise
        return True

    async def merge_patch(
        self,
        kind: Kind,
        namespace: str,
        name: str,
        patch: Mapping[str, Any],
        sub: str | None = None,
    ) -> dict[str, Any]:
        """A JSON merge patch of an object or its subresource (e.g. status)."""
        return await self.request(
            "PATCH", kind.path(namespace, name, sub), body=patch, content_type=MERGE_CONTENT_TYPE
        )

    async def has_api(self, api_version: str) -> bool:
        """Whether the apiserver serves a group/version (e.g. monitoring.coreos.com/v1)."""
        try:
            await self.request("GET", f"/apis/{api_version}")
        except ApiError as err:
            if err.status == 404:
                return False
            raise
        return True


def _error(status: int, text: str) -> ApiError:
    try:
        body = json.loads(text)
        return ApiError(status, str(body.get("reason", "")), str(body.get("message", text)))
    except ValueError:
        return ApiError(status, "", text)
