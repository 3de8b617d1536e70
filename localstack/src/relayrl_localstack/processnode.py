"""A process node: a Node whose pods run as real host processes. A dev/test tool, not a kubelet.

The local stack has no container engine, yet the pods the operator generates must
really run. The process node registers a Node (``relayrl-process-node`` by default),
watches the pods bound to it and runs each container as a host process from its pod
spec, reporting status back like a kubelet would, closely enough for an operator
and for tests. It is not a kubelet: no images, no isolation, no resource limits, no
``kubectl logs/exec/port-forward`` (container output goes to files, see
:meth:`ProcessNode.log_path`).

Scheduling. The node is labelled ``relayrl.io/process-node=true`` and tainted
``relayrl.io/process-node=true:NoSchedule``: only pods that tolerate the taint (and
usually select the label) land here, so a Deployment scaled to 1000 replicas in a
scale test ends up on kwok's fake nodes, not as 1000 host processes. kwok does not
manage this node (it only manages nodes annotated ``kwok.x-k8s.io/node=fake``).

What a container gets:

- argv = ``command`` + ``args`` (``$(VAR)`` expanded, Service names such as
  ``name.namespace.svc:port`` resolved to a ready backend pod on this node, see
  :mod:`relayrl_localstack.podspec`); the image is ignored, so a command is
  required. The process runs with the current Python environment: the bin
  directory of ``sys.executable`` leads PATH, so ``python`` and the project's console
  scripts are the project's.
- env: a small host base (PATH, HOME, LANG, TMPDIR), HOSTNAME = pod name,
  ``KUBERNETES_SERVICE_HOST/PORT`` = the real apiserver, ``KUBECONFIG`` = a
  kubeconfig whose ``tokenFile`` is the pod's own projected service-account token
  when the pod mounts one (so in-cluster clients such as kopf fall back to it and
  RBAC is exercised as the pod's service account; the token is renewed past 80% of
  its lifetime, as the kubelet does), then envFrom and env with valueFrom
  configMapKeyRef, secretKeyRef, fieldRef (metadata.*, spec.nodeName, status.podIP =
  the pod's own address, see Ports) and resourceFieldRef.
- volumes and mount paths: see :mod:`relayrl_localstack.podspec` (each pod has a root
  dir, exported as ``RELAYRL_MOUNT_ROOT``; mount paths named in command, args, env
  and workingDir are rewritten to their place under it).
- cwd: workingDir (rewritten; created under the pod root when it does not exist),
  else the pod root.

Ports. Every pod on this node gets its own loopback address, 127.1.x.y (all of
127.0.0.0/8 is loopback on Linux): it is the pod's ``status.podIP``, what the
downward API gives for ``status.podIP``, and where probes connect (at the probe's
port: a number or a container port name). A process that binds to its pod IP (the
downward API's ``status.podIP``) can use the same port as other pods; one that binds
0.0.0.0 takes the port on every address and collides with other pods on that port.
Addresses are unique on the host, across process nodes and stacks: each is held with a
lock on a file of its own under ``${RELAYRL_CACHE:-~/.cache/relayrl}/pod-addresses``
while a pod has it (the kernel releases the lock when the node's process ends).

Lifecycle. Init containers run to completion in order. Containers are restarted per
``restartPolicy`` with a doubling back-off (1 s to 30 s; reset after 60 s of running),
and report ``restartCount``, ``lastState`` and CrashLoopBackOff while waiting.
Readiness and liveness probes (httpGet, tcpSocket, exec) honour initialDelaySeconds,
periodSeconds, timeoutSeconds, successThreshold and failureThreshold; startup and
gRPC probes are not run (treated as passing). Pod conditions PodScheduled,
Initialized, ContainersReady and Ready and the phase follow. On deletion every
process group gets SIGTERM, then SIGKILL after the grace period
(``deletionGracePeriodSeconds``, else ``terminationGracePeriodSeconds``), and the
pod is removed with a grace-0 delete. The node keeps its Ready condition and its
Lease in ``kube-node-lease`` fresh.

Run in-process (``with ProcessNode(api_client, work_dir=...)``) or as
``python -m relayrl_localstack.processnode --kubeconfig PATH``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
import types
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final, Self
from urllib.parse import urlparse

import urllib3
import yaml
from kubernetes import client, watch

from relayrl_localstack import binaries, cluster, podrunner, podspec

logger = logging.getLogger(__name__)

NODE_NAME: Final = "relayrl-process-node"
NODE_LABEL: Final = "relayrl.io/process-node"
NODE_TAINT: Final = {"key": NODE_LABEL, "value": "true", "effect": "NoSchedule"}
LEASE_NAMESPACE: Final = "kube-node-lease"
LEASE_SECONDS: Final = 40
# A pod's service-account token is renewed past this share of its lifetime, or at
# this age, as the kubelet does.
TOKEN_RENEW_FRACTION: Final = 0.8
TOKEN_MAX_AGE_SECONDS: Final = 86400.0

Json = dict[str, Any]


def now_micro() -> str:
    """Kubernetes ``MicroTime`` (for Lease renewTime)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _json(response: Any) -> Json:
    data: Json = json.loads(response.data)
    return data


@contextlib.contextmanager
def _reading(what: str) -> Iterator[None]:
    """Turn an API error (a 5xx, a timeout) or a lost connection while reading what a
    pod references into :class:`podspec.PodConfigError`: the pod waits and retries, and
    a volume keeps its last content, as for a missing object."""
    try:
        yield
    except client.ApiException as err:
        raise podspec.PodConfigError(
            f"reading {what}: API error {err.status} {err.reason}; retrying"
        ) from err
    except (urllib3.exceptions.HTTPError, OSError) as err:
        raise podspec.PodConfigError(
            f"reading {what}: no answer from the API server ({err}); retrying"
        ) from err


@dataclasses.dataclass(frozen=True)
class _Token:
    """A service-account token issued for a pod, with its lifetime (epoch seconds).

    Renewed like the kubelet renews a projected token: past 80% of its lifetime, or
    after a day, whichever comes first; until then every volume refresh reuses it.
    """

    value: str
    issued: float
    expires: float

    def due(self, now: float) -> bool:
        """Whether a new token should be requested now."""
        lifetime = self.expires - self.issued
        age = now - self.issued
        return age >= min(lifetime * TOKEN_RENEW_FRACTION, TOKEN_MAX_AGE_SECONDS)


def _lock_address(path: Path, holder: str) -> int | None:
    """Take the lock on an address's file; its descriptor, or None when another pod on
    the host holds it. The file says who holds it, for a person looking."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, holder.encode())
    return fd


def _loopback(index: int) -> str:
    """The index-th pod address in 127.1.0.0/16 (all of 127.0.0.0/8 is loopback)."""
    return f"127.1.{index // 250}.{index % 250 + 1}"


class ProcessNode:
    """Registers a Node and runs the pods bound to it as host processes.

    ``api_client`` is a ``kubernetes.client.ApiClient``. Use as a context manager or
    call :meth:`start` / :meth:`stop`. ``taint=False`` registers the node without the
    ``relayrl.io/process-node`` taint (then any pod may land here).
    """

    def __init__(
        self,
        api_client: Any,
        *,
        name: str = NODE_NAME,
        work_dir: Path | None = None,
        taint: bool = True,
        capacity: Mapping[str, str] | None = None,
        heartbeat_seconds: float = 10.0,
        delete_node_on_stop: bool = True,
    ) -> None:
        self.api_client = api_client
        # Any: request bodies are plain dicts (see cluster.api_client_for).
        self.core: Any = client.CoreV1Api(api_client)
        self.coordination: Any = client.CoordinationV1Api(api_client)
        self.name = name
        self._own_work_dir = work_dir is None
        self.work_dir = work_dir or Path(tempfile.mkdtemp(prefix="relayrl-process-node-"))
        self.taint = taint
        self.capacity = dict(capacity or {"cpu": "16", "memory": "64Gi", "pods": "110"})
        self.heartbeat_seconds = heartbeat_seconds
        self.delete_node_on_stop = delete_node_on_stop
        self.stopping = threading.Event()
        self._runners: dict[str, podrunner.PodRunner] = {}
        self._pod_ips: dict[str, str] = {}
        self._pod_ip_locks: dict[str, int] = {}  # pod uid -> its address's lock file
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._transitions: dict[tuple[str, str], tuple[str, str]] = {}
        # (pod uid, namespace, account, audience, expirationSeconds) -> its token
        self._tokens: dict[tuple[str, str, str, str, int], _Token] = {}
        self.sources = podspec.Sources(
            config_map=self._get_config_map,
            secret=self._get_secret,
            service=self._get_service,
            ready_pods=self._ready_pods,
            token=self._issue_token,
            pvc_root=self.work_dir / "pvc",
        )
        host = api_client.configuration.host
        parsed = urlparse(str(host))
        self._server = str(host).rstrip("/")
        self._server_host = parsed.hostname or "127.0.0.1"
        self._server_port = str(parsed.port or 443)
        self._ca_file: str | None = api_client.configuration.ssl_ca_cert

    # -- lifecycle

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> Self:
        """Register the node, then start the heartbeat and pod watch threads."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._register()
        self._heartbeat_once()
        for target, name in ((self._heartbeat_loop, "heartbeat"), (self._watch_loop, "watch")):
            thread = threading.Thread(target=target, name=f"process-node-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        logger.info("process node %s up (work dir %s)", self.name, self.work_dir)
        return self

    def stop(self) -> None:
        """Stop every pod's processes and the threads; delete the Node if configured."""
        self.stopping.set()
        with self._lock:
            runners = list(self._runners.values())
        for runner in runners:
            runner.join(timeout=15)
        for thread in self._threads:
            thread.join(timeout=15)
        self._threads.clear()
        if self.delete_node_on_stop:
            with contextlib.suppress(Exception):
                self.core.delete_node(self.name)
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    # -- helpers used by runners

    def pod_dir(self, namespace: str, name: str, uid: str) -> Path:
        """The pod's directory (root, volumes, logs)."""
        return self.work_dir / "pods" / namespace / f"{name}-{uid[:8]}"

    def log_path(self, namespace: str, pod: str, container: str) -> Path | None:
        """The log file of a running pod's container, or None if unknown."""
        with self._lock:
            for runner in self._runners.values():
                if runner.namespace == namespace and runner.pod_name == pod:
                    return runner.dir / "logs" / f"{container}.log"
        return None

    def pids(self) -> dict[str, int]:
        """``namespace/pod/container`` -> pid of each running container process."""
        result: dict[str, int] = {}
        with self._lock:
            runners = list(self._runners.values())
        for runner in runners:
            for container in runner.init_containers + runner.containers:
                popen = container.popen
                if popen is not None:
                    result[f"{runner.namespace}/{runner.pod_name}/{container.name}"] = popen.pid
        return result

    def pod_ip(self, uid: str) -> str:
        """The pod's own loopback address: 127.1.x.y, unique among the host's running pods."""
        with self._lock:
            ip = self._pod_ips.get(uid)
            if ip is not None:
                return ip
            used = set(self._pod_ips.values())
            locks = binaries.cache_root() / "pod-addresses"
            locks.mkdir(parents=True, exist_ok=True)
            for index in range(1, 250 * 250):
                ip = _loopback(index)
                if ip in used:
                    continue
                fd = _lock_address(locks / ip, f"{os.getpid()} {self.name} {uid}\n")
                if fd is not None:
                    self._pod_ips[uid], self._pod_ip_locks[uid] = ip, fd
                    return ip
            raise RuntimeError(f"no free pod address in 127.1.0.0/16 (locks in {locks})")

    def forget(self, uid: str) -> None:
        """Drop a finished runner."""
        with self._lock:
            self._runners.pop(uid, None)
            self._pod_ips.pop(uid, None)
            fd = self._pod_ip_locks.pop(uid, None)
            if fd is not None:
                os.close(fd)  # releases the address
            for key in [k for k in self._transitions if k[0] == uid]:
                del self._transitions[key]
            for token_key in [k for k in self._tokens if k[0] == uid]:
                del self._tokens[token_key]

    def transition_time(self, uid: str, condition: Json) -> str:
        """Keep lastTransitionTime stable until the condition's status changes."""
        key = (uid, str(condition["type"]))
        with self._lock:
            previous = self._transitions.get(key)
            if previous is None or previous[0] != condition["status"]:
                previous = (str(condition["status"]), podrunner.now_rfc3339())
                self._transitions[key] = previous
            return previous[1]

    def patch_pod_status(self, namespace: str, name: str, status: Json) -> None:
        """JSON merge patch of the status: lists (conditions, statuses) replaced whole."""
        self.core.patch_namespaced_pod_status(
            name, namespace, {"status": status}, _content_type="application/merge-patch+json"
        )

    def delete_pod_now(self, namespace: str, name: str, uid: str) -> None:
        """Delete the pod with grace 0 (the kubelet's final step), if it is still that pod."""
        try:
            self.core.delete_namespaced_pod(
                name,
                namespace,
                body={"gracePeriodSeconds": 0, "preconditions": {"uid": uid}},
            )
        except client.ApiException as err:
            if err.status not in (404, 409):
                logger.warning("pod %s/%s: final delete failed: %s", namespace, name, err)

    def pod_extra_env(
        self, pod: Json, volume_dirs: Mapping[str, Path], pod_dir: Path
    ) -> dict[str, str]:
        """Env every container of ``pod`` gets from the node: API address and KUBECONFIG."""
        env = {
            "KUBERNETES_SERVICE_HOST": self._server_host,
            "KUBERNETES_SERVICE_PORT": self._server_port,
            "KUBERNETES_SERVICE_PORT_HTTPS": self._server_port,
        }
        token = self._mounted_token(pod, volume_dirs)
        if token is not None:
            kubeconfig = pod_dir / "kubeconfig"
            cluster: Json = {"server": self._server}
            if self._ca_file:
                cluster["certificate-authority"] = self._ca_file
            else:
                cluster["insecure-skip-tls-verify"] = True
            account = str(pod.get("spec", {}).get("serviceAccountName") or "default")
            document = {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "local", "cluster": cluster}],
                # The projected token file, renewed in place: clients that load the
                # kubeconfig again (kopf after a 401) get the current token.
                "users": [{"name": account, "user": {"tokenFile": str(token)}}],
                "contexts": [
                    {
                        "name": "pod",
                        "context": {
                            "cluster": "local",
                            "user": account,
                            "namespace": pod["metadata"]["namespace"],
                        },
                    }
                ],
                "current-context": "pod",
            }
            kubeconfig.write_text(yaml.safe_dump(document))
            kubeconfig.chmod(0o600)
            env["KUBECONFIG"] = str(kubeconfig)
        return env

    @staticmethod
    def _mounted_token(pod: Json, volume_dirs: Mapping[str, Path]) -> Path | None:
        for volume in pod.get("spec", {}).get("volumes") or []:
            for source in (volume.get("projected") or {}).get("sources") or []:
                token = source.get("serviceAccountToken")
                if token and not token.get("audience"):
                    path = volume_dirs[str(volume["name"])] / str(token["path"])
                    if path.is_file():
                        return path
        return None

    # -- object access for podspec.Sources

    def _get(self, reader: Any, kind: str, namespace: str, name: str) -> Json:
        with _reading(f'{kind} "{namespace}/{name}"'):
            try:
                return _json(reader(name, namespace, _preload_content=False))
            except client.ApiException as err:
                if err.status == 404:
                    raise LookupError(name) from err
                raise

    def _get_config_map(self, namespace: str, name: str) -> Json:
        return self._get(self.core.read_namespaced_config_map, "configmap", namespace, name)

    def _get_secret(self, namespace: str, name: str) -> Json:
        return self._get(self.core.read_namespaced_secret, "secret", namespace, name)

    def _get_service(self, namespace: str, name: str) -> Json:
        return self._get(self.core.read_namespaced_service, "service", namespace, name)

    def _ready_pods(self, namespace: str, selector: Mapping[str, str]) -> list[Json]:
        """Ready pods on this node matching ``selector``, by name: a Service's backends."""
        labels = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        with _reading(f"pods of {namespace} selected by {labels}"):
            found = _json(
                self.core.list_namespaced_pod(
                    namespace,
                    label_selector=labels,
                    field_selector=f"spec.nodeName={self.name}",
                    _preload_content=False,
                )
            )
        ready = [
            pod
            for pod in found.get("items") or []
            if (pod.get("status") or {}).get("podIP")
            and not (pod.get("metadata") or {}).get("deletionTimestamp")
            and any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in (pod.get("status") or {}).get("conditions") or []
            )
        ]
        return sorted(ready, key=lambda pod: str(pod["metadata"]["name"]))

    def _issue_token(
        self, namespace: str, account: str, audience: str | None, expiration: int, pod: Json
    ) -> str:
        """The pod's token for ``account``: the one issued before while it is fresh (see
        :class:`_Token`), else a new one from the TokenRequest API."""
        uid = str(pod["metadata"]["uid"])
        key = (uid, namespace, account, audience or "", expiration)
        with self._lock:
            known = self._tokens.get(key)
        if known is not None and not known.due(time.time()):
            return known.value
        issued = time.time()
        spec: Json = {
            # As asked: the apiserver gives the kubelet's default (3607 s) a year, so a
            # client that read the token once keeps working after the file is renewed.
            "expirationSeconds": expiration,
            "boundObjectRef": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": pod["metadata"]["name"],
                "uid": pod["metadata"]["uid"],
            },
        }
        if audience:
            spec["audiences"] = [audience]
        # Retried like a missing ConfigMap (a refresh keeps the last token), e.g. while
        # the namespace is terminating or the account is not created yet.
        with _reading(f'a token for serviceaccount "{namespace}/{account}"'):
            response = self.core.create_namespaced_service_account_token(
                account,
                namespace,
                {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
                _preload_content=False,
            )
        status = _json(response)["status"]
        expires = datetime.datetime.fromisoformat(str(status["expirationTimestamp"]))
        token = _Token(str(status["token"]), issued, expires.timestamp())
        with self._lock:
            if uid in self._runners:  # not for a pod forgotten meanwhile
                self._tokens[key] = token
        return token.value

    # -- node registration and heartbeat

    def _register(self) -> None:
        labels = {
            NODE_LABEL: "true",
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
        }
        body: Json = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.name, "labels": labels},
            "spec": {"taints": [dict(NODE_TAINT)] if self.taint else []},
        }
        try:
            self.core.create_node(body)
        except client.ApiException as err:
            if err.status != 409:
                raise
            self.core.patch_node(
                self.name,
                {"metadata": {"labels": labels}, "spec": body["spec"]},
                _content_type="application/merge-patch+json",
            )

    def _node_status(self) -> Json:
        now = podrunner.now_rfc3339()

        def cond(kind: str, status: str, reason: str, message: str) -> Json:
            return {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": now,
                "lastTransitionTime": self.transition_time(
                    "node", {"type": kind, "status": status}
                ),
            }

        return {
            "capacity": self.capacity,
            "allocatable": self.capacity,
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "ok"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "ok"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "ok"),
                cond("Ready", "True", "KubeletReady", "relayrl process node is ready"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": podspec.POD_IP},
                {"type": "Hostname", "address": self.name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": "v0.0.0-relayrl-process-node",
                "kubeProxyVersion": "",
                "containerRuntimeVersion": "process://",
                "osImage": "host processes",
                "kernelVersion": os.uname().release,
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        }

    def _heartbeat_once(self) -> None:
        self.core.patch_node_status(
            self.name,
            {"status": self._node_status()},
            _content_type="application/merge-patch+json",
        )
        node_uid = _json(self.core.read_node(self.name, _preload_content=False))["metadata"]["uid"]
        lease: Json = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.name,
                "namespace": LEASE_NAMESPACE,
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "Node", "name": self.name, "uid": node_uid}
                ],
            },
            "spec": {
                "holderIdentity": self.name,
                "leaseDurationSeconds": LEASE_SECONDS,
                "renewTime": now_micro(),
            },
        }
        try:
            self.coordination.patch_namespaced_lease(
                self.name,
                LEASE_NAMESPACE,
                {"spec": lease["spec"]},
                _content_type="application/merge-patch+json",
            )
        except client.ApiException as err:
            if err.status != 404:
                raise
            self.coordination.create_namespaced_lease(LEASE_NAMESPACE, lease)

    def _heartbeat_loop(self) -> None:
        while not self.stopping.wait(self.heartbeat_seconds):
            try:
                self._heartbeat_once()
            except Exception as err:
                logger.warning("process node heartbeat failed: %s", err)

    # -- pods

    def _watch_loop(self) -> None:
        selector = f"spec.nodeName={self.name}"
        delay = 0.5
        while not self.stopping.is_set():
            try:
                listed = _json(
                    self.core.list_pod_for_all_namespaces(
                        field_selector=selector, _preload_content=False
                    )
                )
                for pod in listed.get("items") or []:
                    self._handle("ADDED", pod)
                version = listed["metadata"]["resourceVersion"]
                while not self.stopping.is_set():
                    stream = watch.Watch().stream(  # type: ignore[no-untyped-call]
                        self.core.list_pod_for_all_namespaces,
                        field_selector=selector,
                        resource_version=version,
                        timeout_seconds=5,
                        allow_watch_bookmarks=True,
                        deserialize=False,
                    )
                    for event in stream:
                        obj = event["object"]
                        if event["type"] == "ERROR":
                            raise client.ApiException(status=int(obj.get("code") or 500))
                        version = obj["metadata"]["resourceVersion"]
                        if event["type"] != "BOOKMARK":
                            self._handle(str(event["type"]), obj)
                        if self.stopping.is_set():
                            break
                delay = 0.5
            except Exception as err:
                if self.stopping.is_set():
                    return
                logger.info("process node watch restarting after: %s", err)
                self.stopping.wait(delay)
                delay = min(delay * 2, 10.0)

    def _handle(self, kind: str, pod: Json) -> None:
        meta = pod["metadata"]
        uid = str(meta["uid"])
        with self._lock:
            runner = self._runners.get(uid)
        if kind == "DELETED":
            if runner is not None:
                runner.request_delete(0.0)
            return
        deleting = meta.get("deletionTimestamp") is not None
        if runner is None:
            if deleting:
                # Not ours to run (e.g. the node restarted): finish the deletion.
                self.delete_pod_now(str(meta["namespace"]), str(meta["name"]), uid)
                return
            if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                return
            runner = podrunner.PodRunner(self, pod)
            with self._lock:
                stopping = self.stopping.is_set()
                if not stopping:
                    self._runners[uid] = runner
            if stopping:
                self.forget(uid)  # frees the address taken for it
                return
            runner.start()
            return
        if deleting:
            grace = meta.get("deletionGracePeriodSeconds")
            runner.request_delete(float(grace) if grace is not None else None)
        else:
            runner.updated(pod)


def main(argv: list[str] | None = None) -> int:
    """Run a process node until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m relayrl_localstack.processnode")
    parser.add_argument("--kubeconfig", required=True, type=Path)
    parser.add_argument("--name", default=NODE_NAME)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--no-taint", action="store_true", help="register without the taint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    with (
        cluster.api_client_for(args.kubeconfig) as api,
        ProcessNode(api, name=args.name, work_dir=args.work_dir, taint=not args.no_taint),
    ):
        done.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
