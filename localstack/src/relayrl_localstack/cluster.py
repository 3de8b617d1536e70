"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, controller-manager, scheduler.

:class:`LocalCluster` starts the pinned binaries (see :mod:`relayrl_localstack.binaries`)
on free ports of 127.0.0.1 in a temporary work dir, writes a kubeconfig with a static
admin token, waits for the apiserver's ``/readyz`` and the other components'
``/healthz`` with a deadline, and on exit stops every process group (SIGTERM, then
SIGKILL) so nothing is left running. Each component logs to ``<work_dir>/logs/``;
a failed start names the log and shows its tail.

Choices (why they differ from a production cluster):

- Authentication: ``--token-auth-file`` with one token per client. The admin is in
  ``system:masters``; the scheduler and controller-manager use their canonical user
  names so the bootstrap RBAC roles apply to them as in a kubeadm cluster.
- Authorization: ``Node,RBAC``, so the RBAC manifests of the chart are really
  enforced for service accounts.
- Admission: the default plugins plus ``OwnerReferencesPermissionEnforcement``, which
  stricter distributions turn on: a client that sets ``blockOwnerDeletion`` on an owner
  reference needs ``update`` on the owner's ``finalizers`` subresource, so the chart's
  RBAC is checked for that too.
- ``--endpoint-reconciler-type=none``: the apiserver's address is loopback, which the
  ``kubernetes`` Service's endpoints may not hold.
- etcd runs with ``--unsafe-no-fsync``: the data is thrown away after the run.

Used by the pytest fixtures in ``tests/cluster/conftest.py`` and by the CLI.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import shutil
import ssl
import subprocess
import tempfile
import time
import types
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Final, Self

import yaml
from kubernetes import client, config

from relayrl_localstack import binaries as binaries_mod
from relayrl_localstack import certs, localhttp, procs

logger = logging.getLogger(__name__)

SERVICE_CLUSTER_IP_RANGE: Final = "10.96.0.0/16"
# kube-controller-manager and kube-scheduler client QPS/burst (defaults 20/30 and 50/100).
CLIENT_RATE_FLAGS: Final = ("--kube-api-qps=1000", "--kube-api-burst=2000")
SERVICE_ACCOUNT_ISSUER: Final = "https://kubernetes.default.svc.cluster.local"


class ClusterError(RuntimeError):
    """The local cluster failed to start; the message names the component log."""


@dataclasses.dataclass
class _Component:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    health_url: str | None = None


@dataclasses.dataclass(frozen=True)
class ClusterInfo:
    """What a client needs to reach a running cluster."""

    server: str
    kubeconfig: Path
    token: str
    ca_cert: Path
    work_dir: Path


class LocalCluster:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler on loopback.

    Use as a context manager, or call :meth:`start` and :meth:`stop`::

        with LocalCluster() as cluster:
            api = cluster.api_client()
    """

    def __init__(
        self,
        work_dir: Path | None = None,
        *,
        bins: binaries_mod.Binaries | None = None,
        startup_timeout: float = 120.0,
        keep_work_dir: bool = False,
    ) -> None:
        self._bins = bins
        self._given_work_dir = work_dir
        self._startup_timeout = startup_timeout
        self._keep_work_dir = keep_work_dir
        self._components: list[_Component] = []
        self._info: ClusterInfo | None = None
        self._work_dir: Path | None = None

    # -- public API -------------------------------------------------------------

    @property
    def info(self) -> ClusterInfo:
        """Server URL, kubeconfig path, token and CA of the running cluster."""
        if self._info is None:
            raise ClusterError("cluster not started")
        return self._info

    @property
    def kubeconfig(self) -> Path:
        """Path of the admin kubeconfig."""
        return self.info.kubeconfig

    @property
    def binaries(self) -> binaries_mod.Binaries:
        """The binaries this cluster runs."""
        if self._bins is None:
            self._bins = binaries_mod.ensure_binaries()
        return self._bins

    @property
    def work_dir(self) -> Path:
        """The cluster's work dir (logs, certs, etcd data, kubeconfigs)."""
        return self.info.work_dir

    def pids(self) -> dict[str, int]:
        """Process ids (= process group ids) of the running components."""
        return {c.name: c.popen.pid for c in self._components}

    def api_client(self) -> Any:
        """Return a ``kubernetes.client.ApiClient`` for the admin user."""
        return api_client_for(self.kubeconfig)

    def kubectl(
        self, *args: str, check: bool = True, input_text: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run the pinned kubectl against this cluster."""
        return subprocess.run(
            [str(self.binaries.kubectl), "--kubeconfig", str(self.kubeconfig), *args],
            check=check,
            capture_output=True,
            text=True,
            input=input_text,
            timeout=timeout,
        )

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> Self:
        """Start all components and wait until they are healthy."""
        if self._components:
            raise ClusterError("cluster already started")
        bins = self.binaries
        work_dir = self._given_work_dir or Path(tempfile.mkdtemp(prefix="relayrl-localstack-"))
        work_dir.mkdir(parents=True, exist_ok=True)
        self._work_dir = work_dir
        try:
            self._start(bins, work_dir)
        except BaseException:
            self._keep_work_dir = True  # keep the logs the error points to
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every component (reverse start order); remove the work dir unless kept."""
        while self._components:
            component = self._components.pop()
            procs.stop_group(component.popen.pid, grace_seconds=10, popen=component.popen)
        work_dir = self._work_dir
        if work_dir is not None and not self._keep_work_dir and self._given_work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
        self._work_dir = None
        self._info = None

    # -- internals --------------------------------------------------------------

    def _start(self, bins: binaries_mod.Binaries, work_dir: Path) -> None:
        logs = work_dir / "logs"
        pki = work_dir / "pki"
        creds = certs.generate(pki)
        tokens = {
            "admin": certs.new_token(),
            "scheduler": certs.new_token(),
            "controller-manager": certs.new_token(),
        }
        token_file = pki / "tokens.csv"
        token_file.write_text(
            f'{tokens["admin"]},admin,uid-admin,"system:masters"\n'
            f"{tokens['scheduler']},system:kube-scheduler,uid-kube-scheduler\n"
            f"{tokens['controller-manager']},system:kube-controller-manager,"
            "uid-kube-controller-manager\n"
        )
        token_file.chmod(0o600)

        etcd_client, etcd_peer = procs.free_port(), procs.free_port()
        apiserver_port = procs.free_port()
        server = f"https://127.0.0.1:{apiserver_port}"
        kubeconfig = work_dir / "kubeconfig"
        write_kubeconfig(kubeconfig, server=server, ca_cert=creds.ca_cert, token=tokens["admin"])
        scheduler_kubeconfig = work_dir / "scheduler.kubeconfig"
        write_kubeconfig(
            scheduler_kubeconfig, server=server, ca_cert=creds.ca_cert, token=tokens["scheduler"]
        )
        cm_kubeconfig = work_dir / "controller-manager.kubeconfig"
        write_kubeconfig(
            cm_kubeconfig, server=server, ca_cert=creds.ca_cert, token=tokens["controller-manager"]
        )

        self._spawn(
            "etcd",
            [
                str(bins.etcd),
                "--name=default",
                f"--data-dir={work_dir / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{etcd_client}",
                f"--advertise-client-urls=http://127.0.0.1:{etcd_client}",
                f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-cluster=default=http://127.0.0.1:{etcd_peer}",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
            logs,
            health_url=f"http://127.0.0.1:{etcd_client}/health",
        )
        self._spawn(
            "kube-apiserver",
            [
                str(bins.kube_apiserver),
                f"--etcd-servers=http://127.0.0.1:{etcd_client}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={apiserver_port}",
                f"--cert-dir={pki}",
                f"--tls-cert-file={creds.serving_cert}",
                f"--tls-private-key-file={creds.serving_key}",
                f"--token-auth-file={token_file}",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={creds.sa_public_key}",
                f"--service-account-signing-key-file={creds.sa_private_key}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--endpoint-reconciler-type=none",
                "--allow-privileged=true",
                "--profiling=false",
                "--v=1",
            ],
            logs,
            health_url=f"{server}/readyz",
        )
        # The controller-manager and scheduler read the apiserver's bootstrap RBAC
        # (e.g. the extension-apiserver-authentication reader binding) at start-up and
        # exit when it is not there yet: start them once the apiserver is ready.
        deadline = time.monotonic() + self._startup_timeout
        ca_context = ssl.create_default_context(cafile=str(creds.ca_cert))
        for component in self._components:
            self._wait_healthy(component, deadline, ca_context, tokens["admin"])
        scheduler_port, cm_port = procs.free_port(), procs.free_port()
        self._spawn(
            "kube-controller-manager",
            [
                str(bins.kube_controller_manager),
                f"--kubeconfig={cm_kubeconfig}",
                f"--authentication-kubeconfig={cm_kubeconfig}",
                f"--authorization-kubeconfig={cm_kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={cm_port}",
                f"--cert-dir={work_dir / 'controller-manager'}",
                f"--service-account-private-key-file={creds.sa_private_key}",
                f"--root-ca-file={creds.ca_cert}",
                "--use-service-account-credentials=true",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                # Client-side rate limits sized for kwok scale runs: at the defaults
                # (20 requests/s per controller) the StatefulSet controller alone needs
                # minutes to create 1,000 pods. The apiserver's own flow control stays.
                *CLIENT_RATE_FLAGS,
                "--concurrent-statefulset-syncs=20",
                "--leader-elect=false",
                "--profiling=false",
                "--v=1",
            ],
            logs,
            health_url=f"https://127.0.0.1:{cm_port}/healthz",
        )
        self._spawn(
            "kube-scheduler",
            [
                str(bins.kube_scheduler),
                f"--kubeconfig={scheduler_kubeconfig}",
                f"--authentication-kubeconfig={scheduler_kubeconfig}",
                f"--authorization-kubeconfig={scheduler_kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={scheduler_port}",
                f"--cert-dir={work_dir / 'scheduler'}",
                *CLIENT_RATE_FLAGS,
                "--leader-elect=false",
                "--profiling=false",
                "--v=1",
            ],
            logs,
            health_url=f"https://127.0.0.1:{scheduler_port}/healthz",
        )
        self._info = ClusterInfo(
            server=server,
            kubeconfig=kubeconfig,
            token=tokens["admin"],
            ca_cert=creds.ca_cert,
            work_dir=work_dir,
        )
        for component in self._components[2:]:
            self._wait_healthy(component, deadline, ca_context, tokens["admin"])
        self._wait_default_service_account(deadline)
        logger.info("local cluster ready at %s (work dir %s)", server, work_dir)

    def _spawn(
        self, name: str, argv: list[str], logs: Path, *, health_url: str | None = None
    ) -> None:
        log = logs / f"{name}.log"
        popen = procs.spawn(argv, log_path=log)
        self._components.append(_Component(name, popen, log, health_url))

    def _wait_healthy(
        self, component: _Component, deadline: float, ca_context: ssl.SSLContext, token: str
    ) -> None:
        url = component.health_url
        if url is None:
            return
        if url.startswith("https://") and "/readyz" in url:
            context: ssl.SSLContext | None = ca_context
            headers = {"Authorization": f"Bearer {token}"}
        elif url.startswith("https://"):
            # Scheduler and controller-manager serve a self-signed cert of their own;
            # /healthz is on their always-allowed paths.
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            headers = {}
        else:
            context, headers = None, {}
        last_error = "no answer yet"
        while True:
            code = component.popen.poll()
            if code is not None:
                raise ClusterError(
                    f"{component.name} exited with code {code} during start-up; "
                    f"log: {component.log}\n{procs.tail(component.log)}"
                )
            try:
                request = urllib.request.Request(url, headers=headers)
                with localhttp.urlopen(request, timeout=5, context=context) as response:
                    if response.status == 200:
                        return
                    last_error = f"HTTP {response.status}"
            except urllib.error.HTTPError as err:
                last_error = f"HTTP {err.code}: {err.read()[:500]!r}"
            except (urllib.error.URLError, OSError) as err:
                last_error = str(err)
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"{component.name} not healthy at {url} before the deadline "
                    f"({self._startup_timeout:.0f}s): {last_error}; log: {component.log}\n"
                    f"{procs.tail(component.log)}"
                )
            time.sleep(0.2)

    def _wait_default_service_account(self, deadline: float) -> None:
        """Pods can be created only once the controller-manager made the default SA."""
        with self.api_client() as api:
            core: Any = client.CoreV1Api(api)
            while True:
                with contextlib.suppress(client.ApiException):
                    core.read_namespaced_service_account("default", "default")
                    return
                if time.monotonic() > deadline:
                    log = self._work_dir / "logs" / "kube-controller-manager.log"  # type: ignore[operator]
                    raise ClusterError(
                        f"no default ServiceAccount before the deadline; log: {log}\n"
                        f"{procs.tail(log)}"
                    )
                time.sleep(0.2)


def write_kubeconfig(
    path: Path,
    *,
    server: str,
    ca_cert: Path,
    token: str,
    name: str = "relayrl-local",
) -> None:
    """Write a kubeconfig for ``server`` with a bearer token (mode 0600)."""
    ca_data = base64.b64encode(ca_cert.read_bytes()).decode()
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": name, "cluster": {"server": server, "certificate-authority-data": ca_data}}
        ],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
        "current-context": name,
    }
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    path.chmod(0o600)


def api_client_for(kubeconfig: Path) -> Any:
    """Return a ``kubernetes.client.ApiClient`` for a kubeconfig file.

    Typed ``Any``: callers pass plain dicts (the API's JSON) as request bodies, which
    every version of the client accepts, and read JSON with ``_preload_content=False``.
    A server on loopback (the local stack's) is reached directly, never through the
    proxy of ``https_proxy``, which the client otherwise honours.
    """
    configuration = client.Configuration()
    config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=str(kubeconfig), client_configuration=configuration
    )
    if _is_loopback(urllib.parse.urlparse(str(configuration.host)).hostname):
        configuration.proxy = None
    return client.ApiClient(configuration)


def _is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def server_version(kubeconfig: Path) -> dict[str, str]:
    """Return the apiserver's ``/version`` document (via the kubernetes client)."""
    with api_client_for(kubeconfig) as api:
        version_api: Any = client.VersionApi(api)
        response = version_api.get_code(_preload_content=False)
        data: dict[str, str] = json.loads(response.data)
        return data


def env_with_kubeconfig(kubeconfig: Path) -> dict[str, str]:
    """Return ``os.environ`` with KUBECONFIG set, for child processes."""
    env = dict(os.environ)
    env["KUBECONFIG"] = str(kubeconfig)
    return env
