"""One pod on the process node: its containers as host processes, and its status.

A :class:`PodRunner` thread per pod prepares volumes and env (:mod:`podspec`), runs
init containers in order, then the containers, restarting them per restartPolicy
with a doubling back-off, probing them (:mod:`probes`) and patching the pod's status
whenever it changes. On deletion it stops every process group (SIGTERM, then SIGKILL
after the grace period) and removes the pod with a grace-0 delete. Owned by
:class:`relayrl_localstack.processnode.ProcessNode` through the :class:`RunnerHost`
protocol. A dev/test tool, not a kubelet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Protocol

from relayrl_localstack import podspec, probes, procs

logger = logging.getLogger(__name__)

BACKOFF_START: Final = 1.0
BACKOFF_MAX: Final = 30.0
BACKOFF_RESET_AFTER: Final = 60.0
TICK: Final = 0.2
# How often ConfigMap and Secret volumes are compared with their objects.
VOLUME_REFRESH_SECONDS = 2.0

Json = dict[str, Any]


def now_rfc3339() -> str:
    """Kubernetes ``Time`` (seconds precision, UTC)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class RunnerHost(Protocol):
    """What a pod runner needs from its node."""

    stopping: threading.Event
    sources: podspec.Sources

    def pod_dir(self, namespace: str, name: str, uid: str) -> Path:
        """The pod's directory."""

    def forget(self, uid: str) -> None:
        """Drop a finished runner."""

    def transition_time(self, uid: str, condition: Json) -> str:
        """Stable lastTransitionTime of a condition."""

    def patch_pod_status(self, namespace: str, name: str, status: Json) -> None:
        """Write the pod's status."""

    def delete_pod_now(self, namespace: str, name: str, uid: str) -> None:
        """Grace-0 delete of the pod."""

    def pod_extra_env(
        self, pod: Json, volume_dirs: Mapping[str, Path], pod_dir: Path
    ) -> dict[str, str]:
        """Env the node gives every container of the pod."""

    def pod_ip(self, uid: str) -> str:
        """The pod's own loopback address (allocated on first call, freed by forget)."""


@dataclasses.dataclass
class Container:
    """One container of a pod: its process, state and probes."""

    spec: Json
    init: bool
    log: Path
    argv: list[str] = dataclasses.field(default_factory=list)
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    cwd: Path | None = None
    popen: subprocess.Popen[bytes] | None = None
    started_at: str | None = None
    started_mono: float = 0.0
    restart_count: int = 0
    state: Json = dataclasses.field(
        default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}}
    )
    last_state: Json = dataclasses.field(default_factory=dict)
    restart_at: float | None = None
    backoff: float = BACKOFF_START
    finished: bool = False  # terminated and will not be restarted
    exit_code: int | None = None
    readiness: probes.ProbeState | None = None
    liveness: probes.ProbeState | None = None

    @property
    def name(self) -> str:
        """The container name."""
        return str(self.spec["name"])

    @property
    def ready(self) -> bool:
        """Running and (if it has one) passing its readiness probe."""
        if self.popen is None or "running" not in self.state:
            return False
        return self.readiness.ok if self.readiness is not None else True

    def status(self) -> Json:
        """The container's entry of the pod's containerStatuses."""
        state = {"waiting": None, "running": None, "terminated": None, **self.state}
        status: Json = {
            "name": self.name,
            "image": str(self.spec.get("image") or ""),
            "imageID": "",
            "containerID": f"process://{self.popen.pid}" if self.popen else None,
            "ready": self.ready,
            "started": "running" in self.state,
            "restartCount": self.restart_count,
            "state": {k: v for k, v in state.items() if v is not None},
        }
        if self.last_state:
            status["lastState"] = self.last_state
        if status["containerID"] is None:
            del status["containerID"]
        return status


class PodRunner(threading.Thread):
    """Runs one pod's containers until the pod is deleted or the node stops."""

    def __init__(self, node: RunnerHost, pod: Json) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.node = node
        self.uid = str(meta["uid"])
        self.pod_ip = node.pod_ip(self.uid)
        # The runner's own copy, with the pod IP the downward API reports.
        self.pod = {**pod, "status": {**(pod.get("status") or {}), "podIP": self.pod_ip}}
        self._volume_dirs: dict[str, Path] = {}
        self._volumes_checked = 0.0
        # Volume name -> the error its last refresh ended with (it keeps its content).
        self._refresh_errors: dict[str, str] = {}
        self._annotations = dict(meta.get("annotations") or {})
        self._sync = threading.Event()  # a pod update asks for a volume refresh
        self.namespace = str(meta["namespace"])
        self.pod_name = str(meta["name"])
        self.dir = node.pod_dir(self.namespace, self.pod_name, self.uid)
        self._deleted = threading.Event()
        self._grace: float | None = None
        self._last_status: str | None = None
        self._start_time = now_rfc3339()
        self.containers: list[Container] = []
        self.init_containers: list[Container] = []
        self.phase = "Pending"
        self.initialized = False
        # The pod's status reason and message (a Failed pod says why).
        self.reason: str | None = None
        self.message: str | None = None

    def updated(self, pod: Json) -> None:
        """The pod object changed (any thread): new annotations make its ConfigMap and
        Secret volumes refresh at the next tick, as a kubelet's pod sync does."""
        annotations = (pod.get("metadata") or {}).get("annotations") or {}
        if annotations != self._annotations:
            self._annotations = dict(annotations)
            self._sync.set()

    def request_delete(self, grace: float | None) -> None:
        """Stop the pod (grace seconds, or the pod's own) and delete it; any thread."""
        if grace is not None:
            self._grace = grace if self._grace is None else min(self._grace, grace)
        self._deleted.set()

    def _grace_seconds(self) -> float:
        if self._grace is not None:
            return self._grace
        spec_grace = self.pod.get("spec", {}).get("terminationGracePeriodSeconds")
        return float(spec_grace if spec_grace is not None else 30)

    def _stopping(self) -> bool:
        return self._deleted.is_set() or self.node.stopping.is_set()

    def _idle_until_stopping(self) -> None:
        """A pod that ended (Failed) keeps its status until deleted or the node stops;
        a status write that failed is tried again."""
        while not self._stopping():
            self._report()
            self._deleted.wait(TICK * 5)

    def run(self) -> None:
        """Thread body: run the pod until deleted or the node stops, then clean up."""
        try:
            self._run()
        except Exception as err:
            logger.exception("pod %s/%s: runner failed", self.namespace, self.pod_name)
            self._fail(err)
        finally:
            self._terminate_all(
                self._grace_seconds() if self._deleted.is_set() else min(self._grace_seconds(), 5.0)
            )
            if self._deleted.is_set():
                self._remove_pod()
            shutil.rmtree(self.dir, ignore_errors=True)
            self.node.forget(self.uid)

    def _run(self) -> None:
        spec = self.pod.get("spec") or {}
        logs = self.dir / "logs"
        self.init_containers = [
            Container(c, True, logs / f"{c['name']}.log") for c in spec.get("initContainers") or []
        ]
        self.containers = [
            Container(c, False, logs / f"{c['name']}.log") for c in spec.get("containers") or []
        ]
        self._report()
        if not self._prepare():
            return
        policy = str(spec.get("restartPolicy") or "Always")
        for container in self.init_containers:
            if not self._run_init(container, policy):
                return
        self.initialized = True
        for container in self.containers:
            self._start(container)
        self._report()
        while not self._stopping():
            now = time.monotonic()
            if now - self._volumes_checked >= VOLUME_REFRESH_SECONDS or self._sync.is_set():
                self._sync.clear()
                self._refresh_volumes()
                self._volumes_checked = now
            for container in self.containers:
                self._tick(container, policy, now)
            self._update_phase()
            self._report()
            self._deleted.wait(TICK)

    def _fail(self, err: Exception) -> None:
        """The runner itself failed: stop the containers and report the pod Failed with
        the error, until it is deleted (its owner, e.g. a ReplicaSet, replaces it)."""
        try:
            self._terminate_all(min(self._grace_seconds(), 5.0))
            self.phase = "Failed"
            self.reason = "ProcessNodeError"
            self.message = f"the process node failed running the pod: {type(err).__name__}: {err}"
            self._idle_until_stopping()
        except Exception:
            logger.exception(
                "pod %s/%s: reporting the failure failed", self.namespace, self.pod_name
            )

    def _prepare(self) -> bool:
        """Materialise volumes and env; retry while referenced objects are missing."""
        while not self._stopping():
            try:
                self._prepare_once()
                return True
            except podspec.PodConfigError as err:
                self._set_waiting_all("CreateContainerConfigError", str(err))
            except podspec.PodSpecError as err:
                self._set_waiting_all("CreateContainerError", str(err))
                self.phase = "Failed"
                self.reason, self.message = "ProcessNodeUnsupported", str(err)
                self._idle_until_stopping()
                return False
            self._report()
            self._deleted.wait(2.0)
        return False

    def _prepare_once(self) -> None:
        spec = self.pod.get("spec") or {}
        root = self.dir / "root"
        volumes_dir = self.dir / "volumes"
        if volumes_dir.exists():
            shutil.rmtree(volumes_dir)
        root.mkdir(parents=True, exist_ok=True)
        volume_dirs: dict[str, Path] = {}
        for volume in spec.get("volumes") or []:
            volume_dirs[str(volume["name"])] = podspec.materialise_volume(
                self.pod, volume, volumes_dir / str(volume["name"]), self.node.sources
            )
        self._volume_dirs = volume_dirs
        extra = self.node.pod_extra_env(self.pod, volume_dirs, self.dir)
        for container in self.init_containers + self.containers:
            paths = podspec.prepare_mounts(self.pod, container.spec, volume_dirs, root)
            base = podspec.base_env(self.pod, root, extra)
            container.env = podspec.container_env(
                self.pod, container.spec, self.node.sources, base, paths
            )
            container.argv = podspec.argv_for(
                self.pod, container.spec, container.env, paths, self.node.sources
            )
            container.cwd = podspec.working_dir(container.spec, paths)
            container.state = {"waiting": {"reason": "PodInitializing"}}

    def _refresh_volumes(self) -> None:
        """Update ConfigMap and Secret volumes whose objects changed (like a kubelet).

        A volume whose refresh fails (its object deleted, an API error) keeps its last
        content and is tried again at the next refresh; the error is logged when it
        first appears and when it is over.
        """
        for volume in (self.pod.get("spec") or {}).get("volumes") or []:
            name = str(volume["name"])
            target = self._volume_dirs.get(name)
            if target is None:
                continue
            try:
                changed = podspec.refresh_volume(self.pod, volume, target, self.node.sources)
            except Exception as err:
                error = f"{type(err).__name__}: {err}"
                if self._refresh_errors.get(name) != error:
                    logger.warning(
                        "pod %s/%s: volume %s keeps its last content: %s",
                        self.namespace,
                        self.pod_name,
                        name,
                        error,
                    )
                self._refresh_errors[name] = error
                continue
            if self._refresh_errors.pop(name, None) is not None:
                logger.info(
                    "pod %s/%s: volume %s refreshed again", self.namespace, self.pod_name, name
                )
            if changed:
                logger.info("pod %s/%s: volume %s updated", self.namespace, self.pod_name, name)

    def _set_waiting_all(self, reason: str, message: str) -> None:
        for container in self.init_containers + self.containers:
            container.state = {"waiting": {"reason": reason, "message": message}}

    def _start(self, container: Container) -> None:
        assert container.cwd is not None
        container.log.parent.mkdir(parents=True, exist_ok=True)
        try:
            container.popen = procs.spawn(
                container.argv,
                log_path=container.log,
                env=container.env,
                cwd=container.cwd,
            )
        except OSError as err:
            container.popen = None
            container.state = {
                "terminated": {
                    "exitCode": 128,
                    "reason": "StartError",
                    "message": str(err),
                    "startedAt": now_rfc3339(),
                    "finishedAt": now_rfc3339(),
                }
            }
            container.exit_code = 128
            container.started_mono = time.monotonic()
            return
        container.started_at = now_rfc3339()
        container.started_mono = time.monotonic()
        container.state = {"running": {"startedAt": container.started_at}}
        probe_start = container.started_mono
        if container.spec.get("readinessProbe"):
            container.readiness = probes.ProbeState(container.spec["readinessProbe"], probe_start)
        if container.spec.get("livenessProbe"):
            container.liveness = probes.ProbeState(
                container.spec["livenessProbe"], probe_start, ok=True
            )
        logger.info(
            "pod %s/%s: started %s (pid %d): %s",
            self.namespace,
            self.pod_name,
            container.name,
            container.popen.pid,
            container.argv,
        )

    def _exited(self, container: Container) -> int | None:
        """Return the exit code if the container's process has exited (reaping it)."""
        if container.popen is None:
            return container.exit_code
        code = container.popen.poll()
        if code is None:
            return None
        # Kill what the process left behind in its group.
        procs.stop_group(container.popen.pid, grace_seconds=0)
        # Killed by a signal: 128 + signal number, as container runtimes report it.
        container.exit_code = 128 - code if code < 0 else code
        container.state = {
            "terminated": {
                "exitCode": container.exit_code,
                "reason": "Completed" if container.exit_code == 0 else "Error",
                "startedAt": container.started_at or now_rfc3339(),
                "finishedAt": now_rfc3339(),
                "containerID": f"process://{container.popen.pid}",
            }
        }
        container.popen = None
        container.readiness = None
        container.liveness = None
        return container.exit_code

    def _run_init(self, container: Container, policy: str) -> bool:
        while not self._stopping():
            self._start(container)
            self._report()
            while not self._stopping():
                code = self._exited(container)
                if code is not None:
                    break
                self._deleted.wait(TICK)
            else:
                return False
            if code == 0:
                container.finished = True
                self._report()
                return True
            if policy == "Never":
                container.finished = True
                self.phase = "Failed"
                self._report()
                self._idle_until_stopping()
                return False
            container.last_state = container.state
            container.state = {
                "waiting": {"reason": "CrashLoopBackOff", "message": "init container failed"}
            }
            self._report()
            self._deleted.wait(container.backoff)
            container.backoff = min(container.backoff * 2, BACKOFF_MAX)
            container.restart_count += 1
        return False

    def _tick(self, container: Container, policy: str, now: float) -> None:
        if container.finished:
            return
        if container.restart_at is not None:
            if now >= container.restart_at:
                container.restart_at = None
                container.restart_count += 1
                self._start(container)
            return
        code = self._exited(container)
        if code is None:
            self._probe(container, now)
            return
        restart = policy == "Always" or (policy == "OnFailure" and code != 0)
        if not restart:
            container.finished = True
            return
        ran_for = now - container.started_mono
        if ran_for >= BACKOFF_RESET_AFTER:
            container.backoff = BACKOFF_START
        container.last_state = container.state
        container.state = {
            "waiting": {
                "reason": "CrashLoopBackOff",
                "message": f"back-off {container.backoff:.0f}s restarting failed container "
                f"{container.name}",
            }
        }
        container.restart_at = now + container.backoff
        container.backoff = min(container.backoff * 2, BACKOFF_MAX)

    def _probe(self, container: Container, now: float) -> None:
        assert container.cwd is not None
        if container.readiness is not None and container.readiness.due(now):
            ok = probes.run_probe(
                container.readiness.spec,
                container.spec,
                container.env,
                container.cwd,
                self.pod_ip,
            )
            container.readiness.record(ok, now)
        if container.liveness is not None and container.liveness.due(now):
            ok = probes.run_probe(
                container.liveness.spec,
                container.spec,
                container.env,
                container.cwd,
                self.pod_ip,
            )
            container.liveness.record(ok, now)
            if not container.liveness.ok and container.popen is not None:
                logger.info(
                    "pod %s/%s: liveness probe of %s failed; killing it",
                    self.namespace,
                    self.pod_name,
                    container.name,
                )
                grace = float(
                    container.liveness.spec.get("terminationGracePeriodSeconds")
                    or self._grace_seconds()
                )
                procs.stop_group(container.popen.pid, grace_seconds=grace, popen=container.popen)

    def _update_phase(self) -> None:
        if self.phase in ("Succeeded", "Failed"):
            return
        if self.containers and all(c.finished for c in self.containers):
            failed = any(c.exit_code != 0 for c in self.containers)
            self.phase = "Failed" if failed else "Succeeded"
        elif self.initialized:
            self.phase = "Running"

    def _report(self) -> None:
        ready = bool(self.containers) and all(c.ready for c in self.containers)
        if self.phase in ("Succeeded", "Failed"):
            ready = False

        def condition(kind: str, value: bool) -> Json:
            return {"type": kind, "status": "True" if value else "False"}

        status: Json = {
            "phase": self.phase,
            "hostIP": podspec.POD_IP,
            "hostIPs": [{"ip": podspec.POD_IP}],
            "podIP": self.pod_ip,
            "podIPs": [{"ip": self.pod_ip}],
            "startTime": self._start_time,
            "conditions": [
                condition("PodScheduled", True),
                condition("Initialized", self.initialized),
                condition("ContainersReady", ready),
                condition("Ready", ready),
            ],
            "containerStatuses": [c.status() for c in self.containers],
            "initContainerStatuses": [c.status() for c in self.init_containers],
        }
        if self.reason:
            status["reason"] = self.reason
        if self.message:
            status["message"] = self.message
        signature = json.dumps(status, sort_keys=True)
        if signature == self._last_status:
            return
        # Transition times: stamp only conditions that changed.
        for cond in status["conditions"]:
            cond["lastTransitionTime"] = self.node.transition_time(self.uid, cond)
        try:
            self.node.patch_pod_status(self.namespace, self.pod_name, status)
            self._last_status = signature
        except Exception as err:
            logger.debug("pod %s/%s: status patch failed: %s", self.namespace, self.pod_name, err)

    def _terminate_all(self, grace: float) -> None:
        running = [c for c in self.init_containers + self.containers if c.popen is not None]
        for container in running:
            assert container.popen is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(container.popen.pid, signal.SIGTERM)
        for container in running:
            assert container.popen is not None
            procs.stop_group(container.popen.pid, grace_seconds=grace, popen=container.popen)
            self._exited(container)  # its terminated state, for a pod that stays Failed
            container.popen = None
            container.finished = True

    def _remove_pod(self) -> None:
        self.node.delete_pod_now(self.namespace, self.pod_name, self.uid)
