"""Service names in a process-node pod's command, args and env resolve to a ready backend."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from relayrl_localstack import podspec

Json = dict[str, Any]


def backend(name: str, ip: str, port_name: str = "zmq", port: int = 5555) -> Json:
    return {
        "metadata": {"name": name},
        "spec": {
            "hostname": name,
            "containers": [{"ports": [{"name": port_name, "containerPort": port}]}],
        },
        "status": {"podIP": ip},
    }


def sources(services: Mapping[tuple[str, str], Json], pods: list[Json]) -> podspec.Sources:
    def service(namespace: str, name: str) -> Json:
        try:
            return dict(services[namespace, name])
        except KeyError:
            raise LookupError(name) from None

    def missing(namespace: str, name: str) -> Json:
        raise LookupError(name)

    return podspec.Sources(
        config_map=missing,
        secret=missing,
        service=service,
        ready_pods=lambda namespace, selector: list(pods),
        token=lambda *args: "",
        pvc_root=Path("/nonexistent"),
    )


CLIENT = {"metadata": {"name": "simulator-abc", "namespace": "ml"}}
REMOTE = {
    "spec": {
        "selector": {"app": "cartpole"},
        "clusterIP": "10.96.0.10",
        "ports": [{"port": 80, "targetPort": "zmq"}, {"port": 81, "targetPort": 9000}],
    }
}
HEADLESS = {"spec": {"selector": {"app": "cartpole"}, "clusterIP": "None", "ports": []}}


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("tcp://remote.ml.svc:80", "tcp://127.1.0.7:5555"),
        ("tcp://remote.ml.svc.cluster.local:81", "tcp://127.1.0.7:9000"),
        ("--address=remote.ml.svc", "--address=127.1.0.7"),
        ("http://remote.ml.svc:82/x", "http://127.1.0.7:82/x"),
        ("tcp://cartpole-0.pods.ml.svc:5555", "tcp://127.1.0.7:5555"),
        ("nats://nats.ml.svc:4222", "nats://nats.ml.svc:4222"),  # no such Service: left alone
        ("relayrl.io/process-node", "relayrl.io/process-node"),
        ("x.remote.ml.svcx", "x.remote.ml.svcx"),
    ],
)
def test_names_resolve_to_the_backend_and_its_target_port(text: str, want: str) -> None:
    src = sources(
        {("ml", "remote"): REMOTE, ("ml", "pods"): HEADLESS}, [backend("cartpole-0", "127.1.0.7")]
    )
    assert podspec.resolve_services(text, CLIENT, src) == want


def test_consumers_spread_over_backends_and_each_keeps_its_choice() -> None:
    pods = [backend(f"cartpole-{i}", f"127.1.0.{i + 1}") for i in range(3)]
    src = sources({("ml", "remote"): REMOTE}, pods)
    chosen = {
        name: podspec.resolve_services(
            "remote.ml.svc", {"metadata": {"name": name, "namespace": "ml"}}, src
        )
        for name in (f"simulator-{i}" for i in range(12))
    }
    assert len(set(chosen.values())) > 1
    again = podspec.resolve_services(
        "remote.ml.svc", {"metadata": {"name": "simulator-0", "namespace": "ml"}}, src
    )
    assert again == chosen["simulator-0"]


def test_a_service_without_ready_backends_makes_the_container_wait() -> None:
    src = sources({("ml", "remote"): REMOTE}, [])
    with pytest.raises(podspec.PodConfigError, match='service "ml/remote" has no Ready pod'):
        podspec.resolve_services("tcp://remote.ml.svc:80", CLIENT, src)


def test_a_named_target_port_the_backend_lacks_is_named_in_the_error() -> None:
    src = sources({("ml", "remote"): REMOTE}, [backend("cartpole-0", "127.1.0.7", "other")])
    with pytest.raises(podspec.PodConfigError, match="no container port named 'zmq'"):
        podspec.resolve_services("remote.ml.svc:80", CLIENT, src)


def test_env_and_args_are_resolved() -> None:
    src = sources({("ml", "remote"): REMOTE}, [backend("cartpole-0", "127.1.0.7")])
    pod = {**CLIENT, "spec": {}}
    container = {
        "name": "sim",
        "command": ["relayrl-runtime", "simulate"],
        "args": ["--address", "$(ADDRESS)"],
        "env": [
            {"name": "ADDRESS", "value": "tcp://remote.$(NS).svc:80"},
            {"name": "NS", "value": "ml"},
        ],
    }
    paths = podspec.MountedPaths(root=Path("/nonexistent"), mounts=())
    env = podspec.container_env(pod, container, src, {"NS": "ml"}, paths)
    assert env["ADDRESS"] == "tcp://127.1.0.7:5555"
    argv = podspec.argv_for(pod, container, env, paths, src)
    assert argv == ["relayrl-runtime", "simulate", "--address", "tcp://127.1.0.7:5555"]
