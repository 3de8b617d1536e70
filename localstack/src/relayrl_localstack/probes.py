"""Readiness and liveness probes of the process node (httpGet, tcpSocket, exec).

Probes connect to the pod's own loopback address (or the probe's ``host``) at the
probe's port: a number or the name of a container port, never through a proxy. gRPC
probes are not run (they pass). Used by :mod:`relayrl_localstack.podrunner`.
"""

from __future__ import annotations

import dataclasses
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from relayrl_localstack import localhttp, podspec

Json = dict[str, Any]


@dataclasses.dataclass
class ProbeState:
    """Counters of one probe of one running container."""

    spec: Json
    started: float
    last_run: float = 0.0
    successes: int = 0
    failures: int = 0
    ok: bool = False

    def due(self, now: float) -> bool:
        """Whether the probe should run now (initial delay and period)."""
        initial = float(self.spec.get("initialDelaySeconds") or 0)
        period = float(self.spec.get("periodSeconds") or 10)
        if now - self.started < initial:
            return False
        return self.last_run == 0.0 or now - self.last_run >= period

    def record(self, success: bool, now: float) -> None:
        """Count one attempt; flip ``ok`` at the success/failure thresholds."""
        self.last_run = now
        if success:
            self.successes += 1
            self.failures = 0
            if self.successes >= int(self.spec.get("successThreshold") or 1):
                self.ok = True
        else:
            self.failures += 1
            self.successes = 0
            if self.failures >= int(self.spec.get("failureThreshold") or 3):
                self.ok = False


def probe_port(container: Json, port: Any) -> int:
    """Resolve a probe port: a number, or the name of one of the container's ports."""
    if isinstance(port, int) or (isinstance(port, str) and port.isdigit()):
        return int(port)
    for item in container.get("ports") or []:
        if item.get("name") == port:
            return int(item["containerPort"])
    raise podspec.PodSpecError(f"probe port {port!r} names no container port")


def run_probe(
    spec: Json,
    container: Json,
    env: Mapping[str, str],
    cwd: Path,
    pod_ip: str = podspec.POD_IP,
) -> bool:
    """Run one probe attempt against the pod's IP; True on success."""
    timeout = float(spec.get("timeoutSeconds") or 1)
    try:
        if spec.get("httpGet"):
            get = spec["httpGet"]
            scheme = str(get.get("scheme") or "HTTP").lower()
            host = str(get.get("host") or pod_ip)
            port = probe_port(container, get.get("port"))
            path = str(get.get("path") or "/")
            request = urllib.request.Request(f"{scheme}://{host}:{port}{path}")
            for header in get.get("httpHeaders") or []:
                request.add_header(str(header["name"]), str(header["value"]))
            context = None
            if scheme == "https":
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            try:
                with localhttp.urlopen(request, timeout=timeout, context=context) as resp:
                    return 200 <= int(resp.status) < 400
            except urllib.error.HTTPError as err:
                return 200 <= err.code < 400
        if spec.get("tcpSocket"):
            sock_spec = spec["tcpSocket"]
            port = probe_port(container, sock_spec.get("port"))
            with socket.create_connection(
                (str(sock_spec.get("host") or pod_ip), port), timeout=timeout
            ):
                return True
        if spec.get("exec"):
            command = [str(x) for x in spec["exec"].get("command") or []]
            result = subprocess.run(
                command,
                env=dict(env),
                cwd=cwd,
                capture_output=True,
                timeout=timeout,
                check=False,
                start_new_session=True,
            )
            return result.returncode == 0
    except (OSError, subprocess.TimeoutExpired, podspec.PodSpecError, ValueError):
        return False
    # gRPC and unknown handlers are not run.
    return True
