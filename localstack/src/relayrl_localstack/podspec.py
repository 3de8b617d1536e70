"""Turn a pod spec into what a host process needs: volumes on disk, env, argv, cwd.

Part of the process node (:mod:`relayrl_localstack.processnode`), which is a dev/test
tool, not a kubelet. Pods are plain dicts (the API's camelCase JSON).

Mount paths. A container cannot see ``/etc/relayrl/config.yaml`` on the host, so
each pod gets a root directory (``RELAYRL_MOUNT_ROOT``, exported to the process) and
every volume mount appears at ``<root><mountPath>`` (a symlink to the volume's
directory, or to its ``subPath``). The mount path is then rewritten wherever the pod
spec names it: in ``command``, ``args``, env values (literal and resolved) and
``workingDir``, as a whole path or a path prefix (``/etc/cfg``, ``/etc/cfg/a.yaml``,
``--config=/etc/cfg/a.yaml``; not ``/etc/cfgx`` nor ``/x/etc/cfg``). Code that builds
a path at run time from a constant can prefix it with ``$RELAYRL_MOUNT_ROOT``.

Service names. There is no cluster DNS and no kube-proxy, so a Service name in
``command``, ``args`` or an env value is replaced by a ready backend pod's own address
when the containers are prepared: ``name.namespace.svc`` (or ``.svc.cluster.local``),
and ``hostname.name.namespace.svc`` for a pod behind a headless Service. A ``:port``
after the name is mapped to the backend's targetPort (a number, or a container port
name), as kube-proxy would; a headless Service keeps the port. Only pods on the process
node are backends (kwok pods have no process to reach); the container waits, like for
a missing ConfigMap, until one is Ready. A name whose Service does not exist is left
alone and fails to resolve, as it would in a cluster.

Volumes: configMap, secret, emptyDir, projected (configMap, secret, downwardAPI,
serviceAccountToken via the TokenRequest API), downwardAPI, hostPath (the host path
itself) and persistentVolumeClaim (a directory per claim under the node's work dir
that outlives the pod). Other volume types are errors.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import re
import shutil
import sys
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

MOUNT_ROOT_ENV: Final = "RELAYRL_MOUNT_ROOT"
# Every pod on the process node shares the host loopback.
POD_IP: Final = "127.0.0.1"

Json = dict[str, Any]
# (namespace, name) -> object JSON, raising LookupError when absent and PodConfigError
# when it cannot be read now (an API or connection error).
Getter = Callable[[str, str], Json]
# (namespace, service account, audience, expirationSeconds, pod) -> token
TokenIssuer = Callable[[str, str, str | None, int, Json], str]
# (namespace, label selector) -> the Ready pods on this node it selects, by name
ReadyPods = Callable[[str, Mapping[str, str]], list[Json]]


class PodConfigError(Exception):
    """A referenced ConfigMap, Secret or key is missing, unusable or cannot be read now;
    retried like a kubelet does."""


class PodSpecError(Exception):
    """The pod spec uses something the process node cannot do; permanent."""


@dataclasses.dataclass(frozen=True)
class Sources:
    """How the process node reads objects the pod spec references."""

    config_map: Getter
    secret: Getter
    service: Getter
    ready_pods: ReadyPods
    token: TokenIssuer
    pvc_root: Path


@dataclasses.dataclass(frozen=True)
class MountedPaths:
    """mountPath -> host path, longest first, plus the pod root."""

    root: Path
    mounts: tuple[tuple[str, Path], ...]

    def rewrite(self, text: str) -> str:
        """Replace every mount path (whole, or as a path prefix) in ``text``.

        One pass, longest mount path first, so a rewritten path is never rewritten
        again (an emptyDir at ``/tmp`` must not match the pod root under /tmp).
        """
        if not self.mounts:
            return text
        targets = {mount.rstrip("/") or "/": str(host) for mount, host in self.mounts}
        alternatives = "|".join(re.escape(m) for m in sorted(targets, key=len, reverse=True))
        pattern = r"(?<![\w./-])(" + alternatives + r")(?=/|$|[^\w.-])"
        return re.sub(pattern, lambda match: targets[match.group(1)], text)


def _field(obj: Mapping[str, Any] | None, *keys: str) -> Any:
    cur: Any = obj
    for key in keys:
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(key)
    return cur


def field_ref(pod: Json, path: str) -> str:
    """Resolve a downward-API ``fieldPath`` on the process node (podIP: the pod's own)."""
    meta = pod.get("metadata") or {}
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": _field(pod, "spec", "nodeName"),
        "spec.serviceAccountName": _field(pod, "spec", "serviceAccountName"),
        "status.podIP": _field(pod, "status", "podIP") or POD_IP,
        "status.podIPs": _field(pod, "status", "podIP") or POD_IP,
        "status.hostIP": POD_IP,
        "status.hostIPs": POD_IP,
    }
    if path in simple:
        return str(simple[path] or "")
    match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    raise PodSpecError(f"unsupported fieldRef fieldPath {path!r}")


def _resource_field(container: Json, ref: Json) -> str:
    resource = str(ref.get("resource", ""))
    section, _, name = resource.partition(".")
    value = _field(container, "resources", section, name)
    if value is None:
        # Like a kubelet without limits: report the node's (here: the host's) capacity.
        value = str(os.cpu_count() or 1) if name == "cpu" else "0"
    return str(value)


def _secret_text(secret: str, key: str, value: str) -> str:
    """A Secret value for the environment: text, else a config error naming it."""
    try:
        return base64.b64decode(value).decode()
    except UnicodeDecodeError as err:
        raise PodConfigError(
            f'key "{key}" of secret "{secret}" is not UTF-8 text, so it cannot be an '
            "environment variable here; mount the secret as a volume instead"
        ) from err


def _decode_secret(secret: str, data: Mapping[str, str]) -> dict[str, str]:
    return {k: _secret_text(secret, k, v) for k, v in data.items()}


def _lookup(getter: Getter, namespace: str, name: str, *, optional: bool, kind: str) -> Json | None:
    try:
        return getter(namespace, name)
    except LookupError as err:
        if optional:
            return None
        raise PodConfigError(f'{kind} "{name}" not found') from err


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Expand ``$(VAR)`` like the kubelet: unknown references stay, ``$$`` is ``$``."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _VAR_REF.sub(replace, text)


_LABEL = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
_SERVICE_NAME = re.compile(
    rf"(?<![\w.-])(?:({_LABEL})\.)?({_LABEL})\.({_LABEL})\.svc(?:\.cluster\.local)?"
    r"(?::(\d{1,5}))?(?![\w.-])"
)


def _container_port(pod: Json, name: str) -> int | None:
    for container in _field(pod, "spec", "containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == name:
                return int(port["containerPort"])
    return None


def resolve_services(text: str, pod: Json, sources: Sources) -> str:
    """Replace Service names in ``text`` with a ready backend's address (see the module doc).

    The backend is chosen by a hash of the consuming pod's name, so the pods of a
    Deployment spread over the Service's backends, as kube-proxy's connections would.
    """

    def replace(match: re.Match[str]) -> str:
        hostname, name, namespace, port = match.groups()
        try:
            service = sources.service(namespace, name)
        except LookupError:
            return match.group(0)
        selector = _field(service, "spec", "selector") or {}
        where = f'service "{namespace}/{name}"'
        if not selector:
            raise PodConfigError(f"{where} has no selector; the process node resolves only those")
        backends = sources.ready_pods(namespace, selector)
        headless = _field(service, "spec", "clusterIP") == "None"
        if hostname is not None:
            if not headless:
                return match.group(0)  # pod names exist only under headless Services
            backends = [
                b
                for b in backends
                if hostname in (_field(b, "spec", "hostname"), _field(b, "metadata", "name"))
            ]
        if not backends:
            raise PodConfigError(f"{where} has no Ready pod on the process node yet")
        me = str(_field(pod, "metadata", "name") or "")
        backend = backends[zlib.crc32(me.encode()) % len(backends)]
        ip = str(_field(backend, "status", "podIP"))
        if port is None or headless:
            return ip if port is None else f"{ip}:{port}"
        entry = next(
            (p for p in _field(service, "spec", "ports") or [] if int(p["port"]) == int(port)),
            None,
        )
        if entry is None:
            return f"{ip}:{port}"  # nothing listens there, as in a cluster
        target = entry.get("targetPort", entry["port"])
        if isinstance(target, str) and not target.isdigit():
            number = _container_port(backend, target)
            if number is None:
                raise PodConfigError(f"{where}: backend has no container port named {target!r}")
            target = number
        return f"{ip}:{target}"

    return _SERVICE_NAME.sub(replace, text)


def container_env(
    pod: Json,
    container: Json,
    sources: Sources,
    base: Mapping[str, str],
    paths: MountedPaths,
) -> dict[str, str]:
    """Return the process env: ``base``, then envFrom, then env (in order, with $(VAR))."""
    namespace = str(pod["metadata"]["namespace"])
    env = dict(base)
    declared: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = str(source.get("prefix") or "")
        if source.get("configMapRef"):
            ref = source["configMapRef"]
            obj = _lookup(
                sources.config_map,
                namespace,
                ref["name"],
                optional=bool(ref.get("optional")),
                kind="configmap",
            )
            data = dict((obj or {}).get("data") or {})
        elif source.get("secretRef"):
            ref = source["secretRef"]
            obj = _lookup(
                sources.secret,
                namespace,
                ref["name"],
                optional=bool(ref.get("optional")),
                kind="secret",
            )
            data = _decode_secret(str(ref["name"]), (obj or {}).get("data") or {})
        else:
            continue
        for key, value in data.items():
            declared[prefix + key] = value
    for item in container.get("env") or []:
        name = str(item["name"])
        if item.get("valueFrom"):
            declared[name] = _value_from(pod, container, item["valueFrom"], sources)
        else:
            declared[name] = expand(str(item.get("value") or ""), {**env, **declared})
    for name, value in declared.items():
        env[name] = paths.rewrite(resolve_services(value, pod, sources))
    return env


def _value_from(pod: Json, container: Json, value_from: Json, sources: Sources) -> str:
    namespace = str(pod["metadata"]["namespace"])
    if value_from.get("configMapKeyRef"):
        ref = value_from["configMapKeyRef"]
        optional = bool(ref.get("optional"))
        obj = _lookup(
            sources.config_map, namespace, ref["name"], optional=optional, kind="configmap"
        )
        data = (obj or {}).get("data") or {}
        if ref["key"] not in data:
            if optional:
                return ""
            raise PodConfigError(f'key "{ref["key"]}" not found in configmap "{ref["name"]}"')
        return str(data[ref["key"]])
    if value_from.get("secretKeyRef"):
        ref = value_from["secretKeyRef"]
        optional = bool(ref.get("optional"))
        obj = _lookup(sources.secret, namespace, ref["name"], optional=optional, kind="secret")
        data = (obj or {}).get("data") or {}
        if ref["key"] not in data:
            if optional:
                return ""
            raise PodConfigError(f'key "{ref["key"]}" not found in secret "{ref["name"]}"')
        return _secret_text(str(ref["name"]), str(ref["key"]), data[ref["key"]])
    if value_from.get("fieldRef"):
        return field_ref(pod, str(value_from["fieldRef"]["fieldPath"]))
    if value_from.get("resourceFieldRef"):
        return _resource_field(container, value_from["resourceFieldRef"])
    raise PodSpecError(f"unsupported env valueFrom {sorted(value_from)}")


def _write_items(
    target: Path,
    data: Mapping[str, str | bytes],
    items: Sequence[Json] | None,
    default_mode: int | None,
) -> None:
    chosen: list[tuple[str, str | bytes, int | None]] = []
    if items:
        for item in items:
            key = str(item["key"])
            if key not in data:
                raise PodConfigError(f'key "{key}" not found for a volume item')
            chosen.append((str(item["path"]), data[key], item.get("mode")))
    else:
        chosen = [(key, value, None) for key, value in data.items()]
    for rel, value, mode in chosen:
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(value, bytes):
            path.write_bytes(value)
        else:
            path.write_text(value)
        final_mode = mode if mode is not None else default_mode
        if final_mode is not None:
            path.chmod(final_mode)


def _config_map_data(obj: Json) -> dict[str, str | bytes]:
    data: dict[str, str | bytes] = dict(obj.get("data") or {})
    for key, value in (obj.get("binaryData") or {}).items():
        data[key] = base64.b64decode(value)
    return data


def _secret_data(obj: Json) -> dict[str, str | bytes]:
    return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}


def _write_object(
    source: Json,
    target: Path,
    namespace: str,
    sources: Sources,
    *,
    name_key: str,
    modes: bool = True,
) -> None:
    """Write a ConfigMap's or Secret's keys (all, or the listed `items`) under `target`.

    `source` is a volume or a projection source with a `configMap` or `secret` entry;
    `name_key` names the Secret's name field (`secretName` in a volume).
    """
    if source.get("configMap"):
        ref, lookup, name, decode, kind = (
            source["configMap"],
            sources.config_map,
            "name",
            _config_map_data,
            "configmap",
        )
    else:
        ref, lookup, name, decode, kind = (
            source["secret"],
            sources.secret,
            name_key,
            _secret_data,
            "secret",
        )
    obj = _lookup(lookup, namespace, ref[name], optional=bool(ref.get("optional")), kind=kind)
    if obj is not None:
        mode = ref.get("defaultMode") if modes else None
        _write_items(target, decode(obj), ref.get("items"), mode)


def materialise_volume(pod: Json, volume: Json, target: Path, sources: Sources) -> Path:
    """Write one volume's content under ``target``; return the directory to mount."""
    namespace = str(pod["metadata"]["namespace"])
    if volume.get("hostPath"):
        return Path(str(volume["hostPath"]["path"]))
    if volume.get("persistentVolumeClaim"):
        claim = str(volume["persistentVolumeClaim"]["claimName"])
        path = sources.pvc_root / namespace / claim
        path.mkdir(parents=True, exist_ok=True)
        return path
    target.mkdir(parents=True, exist_ok=True)
    if "emptyDir" in volume:
        return target
    if volume.get("configMap") or volume.get("secret"):
        _write_object(volume, target, namespace, sources, name_key="secretName")
        return target
    if volume.get("downwardAPI"):
        _write_downward(pod, volume["downwardAPI"].get("items") or [], target)
        return target
    if volume.get("projected"):
        for source in volume["projected"].get("sources") or []:
            _materialise_projection(pod, source, target, sources)
        return target
    kinds = sorted(k for k in volume if k != "name")
    raise PodSpecError(f"volume {volume.get('name')!r}: unsupported type {kinds}")


def _write_downward(pod: Json, items: Sequence[Json], target: Path) -> None:
    data: dict[str, str | bytes] = {}
    for item in items:
        if item.get("fieldRef"):
            data[str(item["path"])] = field_ref(pod, str(item["fieldRef"]["fieldPath"]))
        else:
            raise PodSpecError("downwardAPI volume: only fieldRef items are supported")
    _write_items(target, data, None, None)


def _materialise_projection(pod: Json, source: Json, target: Path, sources: Sources) -> None:
    namespace = str(pod["metadata"]["namespace"])
    if source.get("configMap") or source.get("secret"):
        # In a projected volume the mode is the volume's, and a Secret is named by `name`.
        _write_object(source, target, namespace, sources, name_key="name", modes=False)
    elif source.get("downwardAPI"):
        _write_downward(pod, source["downwardAPI"].get("items") or [], target)
    elif source.get("serviceAccountToken"):
        ref = source["serviceAccountToken"]
        account = str(_field(pod, "spec", "serviceAccountName") or "default")
        token = sources.token(
            namespace, account, ref.get("audience"), int(ref.get("expirationSeconds") or 3600), pod
        )
        _write_items(target, {str(ref["path"]): token}, None, 0o600)
    else:
        raise PodSpecError(f"projected volume: unsupported source {sorted(source)}")


def prepare_mounts(
    pod: Json, container: Json, volume_dirs: Mapping[str, Path], root: Path
) -> MountedPaths:
    """Make ``<root><mountPath>`` point at each mounted volume (or its subPath)."""
    mounts: list[tuple[str, Path]] = []
    for mount in container.get("volumeMounts") or []:
        name = str(mount["name"])
        if name not in volume_dirs:
            raise PodSpecError(f"volumeMount {name!r} names no volume of the pod")
        source = volume_dirs[name]
        sub_path = mount.get("subPath")
        if sub_path:
            source = source / str(sub_path)
            if not source.exists():
                source.mkdir(parents=True)
        mount_path = "/" + str(mount["mountPath"]).strip("/")
        link = root / mount_path.lstrip("/")
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.is_dir():
            shutil.rmtree(link)
        link.symlink_to(source, target_is_directory=source.is_dir())
        mounts.append((mount_path, link))
    mounts.sort(key=lambda item: len(item[0]), reverse=True)
    return MountedPaths(root=root, mounts=tuple(mounts))


def base_env(pod: Json, root: Path, extra: Mapping[str, str]) -> dict[str, str]:
    """Environment every process starts from (before the container's own env).

    The host's PATH with the current Python environment's bin directory first, so
    ``python`` and the project's console scripts resolve to the project's venv;
    HOME, LANG and TMPDIR from the host; HOSTNAME = pod name; the mount root; and
    ``extra`` (the process node's KUBERNETES_SERVICE_HOST/PORT, KUBECONFIG, ...).
    """
    venv_bin = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    env = {"PATH": f"{venv_bin}{os.pathsep}{path}", MOUNT_ROOT_ENV: str(root)}
    for key in ("HOME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV", "TZ"):
        if key in os.environ:
            env[key] = os.environ[key]
    env["HOSTNAME"] = str(pod["metadata"]["name"])
    env.update(extra)
    return env


def argv_for(
    pod: Json, container: Json, env: Mapping[str, str], paths: MountedPaths, sources: Sources
) -> list[str]:
    """Return command + args with ``$(VAR)`` expanded, Service names resolved and mount
    paths rewritten."""
    command = [str(x) for x in container.get("command") or []]
    args = [str(x) for x in container.get("args") or []]
    if not command:
        raise PodSpecError(
            f"container {container.get('name')!r} has no command: the process node ignores "
            "images, so it cannot know their entrypoint"
        )
    return [
        paths.rewrite(resolve_services(expand(part, env), pod, sources)) for part in command + args
    ]


def working_dir(container: Json, paths: MountedPaths) -> Path:
    """Return the process cwd: the rewritten workingDir (created), else the pod root."""
    wanted = container.get("workingDir")
    if not wanted:
        return paths.root
    rewritten = Path(paths.rewrite(str(wanted)))
    if rewritten != Path(str(wanted)):
        return rewritten
    # An image directory that does not exist here: create it inside the pod root.
    inside = paths.root / str(wanted).lstrip("/")
    inside.mkdir(parents=True, exist_ok=True)
    return inside


def refresh_volume(pod: Json, volume: Json, target: Path, sources: Sources) -> bool:
    """Bring a materialised ConfigMap/Secret/projected volume up to date, as a kubelet does.

    The new content is written beside ``target`` and each changed file is moved into
    place with an atomic rename, so a reader never sees a half-written file. Returns
    whether anything changed. Other volume kinds are left alone. When the content
    cannot be made (a deleted ConfigMap, an API error), ``target`` is left as it was
    and the error is raised: the caller keeps the last content, like a kubelet.
    """
    if not any(volume.get(k) for k in ("configMap", "secret", "projected")):
        return False
    fresh = target.parent / f".{target.name}.refresh"
    if fresh.exists():
        shutil.rmtree(fresh)
    try:
        materialise_volume(pod, volume, fresh, sources)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    changed = False
    new_files = {p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file()}
    for rel in sorted(new_files):
        src, dst = fresh / rel, target / rel
        if dst.is_file() and dst.read_bytes() == src.read_bytes():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        changed = True
    for old in [p for p in target.rglob("*") if p.is_file()]:
        if old.relative_to(target) not in new_files:
            old.unlink()
            changed = True
    shutil.rmtree(fresh, ignore_errors=True)
    return changed
