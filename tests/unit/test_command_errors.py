"""Ordinary mistakes on the command lines: a message naming what is wrong, exit 2, no traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from relayrl_operator import settings
from relayrl_runtime import streams

BIN = Path(sys.executable).parent
PUSH = ["relayrl-runtime", "model", "push", "/m", "--nats", "nats://n:4222"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["relayrl-sink", "arrow", "--agent", "a.b", "--path", "/tmp/x"],
            "agent: not a valid NATS subject token",
        ),
        (
            [
                "relayrl-sink",
                "arrow",
                "--agent",
                "a",
                "--path",
                "/tmp/x",
                "--nats-url",
                "nats://n:42x2",
            ],
            "nats URL: expected nats:// or tls:// URLs",
        ),
        (
            ["relayrl-sink", "postgres", "--agent", "a", "--dsn-file", "/nonexistent/dsn"],
            "--dsn-file /nonexistent/dsn: No such file or directory",
        ),
        (
            ["relayrl-sink", "arrow", "--agent", "a", "--path", "/x", "--log-level", "loud"],
            "invalid choice",
        ),
        (
            ["relayrl-sink", "arrow", "--agent", "a", "--path", "/x", "--compression-level", "3"],
            "--compression/--compression-level: codec snappy with level 3",
        ),
        (
            ["relayrl-sink", "arrow", "--agent", "a", "--path", "/x", "--http-port", "70000"],
            "argument --http-port: expected a port in 0..65535, got 70000",
        ),
        (
            ["relayrl-sink", "arrow", "--agent", "a", "--path", "/x", "--rotate-bytes", "0"],
            "argument --rotate-bytes: expected an integer >= 1, got 0",
        ),
        (
            ["relayrl-sink", "arrow", "--agent", "a", "--path", "/x", "--rotate-seconds", "nan"],
            "argument --rotate-seconds: expected seconds in (0, 86400], got nan",
        ),
        (
            ["relayrl-sink", "arrow", "--agent", "a", "--path", "/x", "--rotate-seconds", "inf"],
            "argument --rotate-seconds: expected seconds in (0, 86400], got inf",
        ),
        (
            ["relayrl-sink", "postgres", "--agent", "a", "--table", "Steps"],
            "argument --table: expected lower-case letters",
        ),
        (
            [*PUSH, "--bucket", "my.models", "--name", "cp"],
            "--bucket: expected letters, digits, '_' and '-'",
        ),
        ([*PUSH, "--bucket", "models", "--name", "team/cp"], "--name: expected letters"),
        (
            ["relayrl-runtime", "model", "list", "--nats", "nats://n:4222", "--bucket", "a.b"],
            "--bucket: expected",
        ),
        (["relayrl-runtime", "simulate", "--address", "tcp://localhost"], "expected tcp://"),
        (
            ["relayrl-runtime", "simulate", "--address", "tcp://h:5555", "--envs", "0"],
            "argument --envs: expected a whole number >= 1",
        ),
        (["relayrl-operator", "run", "--workers", "0"], "expected a whole number >= 1"),
        (["relayrl-runtime", "model", "export", "/tmp/x", "--version", "0"], "expected a whole"),
        (["relayrl-runtime", "model", "export", "/tmp/x", "--hidden", "64,a"], "layer widths"),
        (["relayrl-runtime", "simulate", "--address", "localhost:5555"], "expected tcp://"),
        (["relayrl-operator", "run", "--log-level", "verbose"], "invalid choice"),
        (
            [
                *["relayrl-runtime", "model", "list", "--nats", "nats://n:4222", "--bucket", "b"],
                "--connect-timeout",
                "0",
            ],
            "argument --connect-timeout: expected seconds > 0, got '0'",
        ),
    ],
)
def test_bad_arguments_exit_2_with_a_message(argv: list[str], message: str) -> None:
    done = subprocess.run(
        [str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("raw", ["0", "30s", "nan", "-5"])
def test_a_bad_resync_period_is_named(raw: str) -> None:
    with pytest.raises(
        ValueError, match=f"RELAYRL_RESYNC_SECONDS: expected seconds >= 1, got '{raw}'"
    ):
        settings.Settings.from_env({"RELAYRL_RESYNC_SECONDS": raw})
    assert settings.Settings.from_env({"RELAYRL_RESYNC_SECONDS": "5"}).resync_seconds == 5


@pytest.mark.parametrize("raw", ["pod-ip", "0.0.0.0", "podip"])
def test_a_bad_pod_listen_setting_is_named(raw: str) -> None:
    with pytest.raises(
        ValueError, match=f"RELAYRL_POD_LISTEN: expected 'all' or 'podIP', got '{raw}'"
    ):
        settings.Settings.from_env({"RELAYRL_POD_LISTEN": raw})


@pytest.mark.parametrize(
    ("env", "listen"),
    [
        ({}, "0.0.0.0"),
        ({"RELAYRL_POD_LISTEN": "all", "POD_IP": "10.244.1.7"}, "0.0.0.0"),
        ({"RELAYRL_POD_LISTEN": " ", "POD_IP": "fd00:10:244::7"}, "::"),
        ({"RELAYRL_POD_LISTEN": "podIP", "POD_IP": "fd00:10:244::7"}, "podIP"),
    ],
)
def test_pods_listen_on_every_address_of_the_clusters_family(
    env: dict[str, str], listen: str
) -> None:
    assert settings.Settings.from_env(env).pod_listen == listen


@pytest.mark.parametrize("url", ["nats://:4222", "nats://h:99999", "nats://a:1, http://b:2"])
def test_connect_options_refuse_a_url_nats_cannot_use(url: str) -> None:
    with pytest.raises(streams.ConnectError, match="nats URL: expected"):
        streams.ConnectOptions.from_env({}, servers=url)


def test_a_sink_port_in_use_is_named(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["arrow", "--agent", "a", "--path", str(tmp_path), "--http-host", "127.0.0.1"]
        done = subprocess.run(
            [str(BIN / "relayrl-sink"), *args, "--http-port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 2, done.stderr
    assert f"--http-port: cannot listen on 127.0.0.1:{port}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


def _runtime_listening(
    tmp_path: Path, host: str, port: int, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "runtime.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "agent": "a",
                "actors": 1,
                "model": {"uri": str(tmp_path / "model"), "format": "onnx"},
                "environment": {"gymnasium": {"id": "CartPole-v1"}},
                "localSink": {"path": str(tmp_path / "out")},
                "server": {"host": host, "port": port},
            }
        )
    )
    return subprocess.run(
        [str(BIN / "relayrl-runtime"), "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_a_runtime_port_in_use_is_named(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _runtime_listening(tmp_path, "127.0.0.1", port)
    assert done.returncode == 2, done.stderr
    assert f"server.port: cannot listen on 127.0.0.1:{port}" in done.stderr, done.stderr


def test_a_runtime_listen_address_not_of_this_host_is_named(tmp_path: Path) -> None:
    # 192.0.2.1 is a documentation address: no interface here has it.
    done = _runtime_listening(tmp_path, "192.0.2.1", 0)
    assert done.returncode == 2, done.stderr
    assert "server.host: cannot listen on 192.0.2.1:0" in done.stderr, done.stderr
    done = _runtime_listening(tmp_path, "127.0.0.1", 0, {"RELAYRL_BIND_ADDRESS": "192.0.2.1"})
    assert done.returncode == 2, done.stderr
    assert "RELAYRL_BIND_ADDRESS: cannot listen on 192.0.2.1:0" in done.stderr, done.stderr


def test_a_model_uri_naming_a_file_is_refused_by_name(tmp_path: Path) -> None:
    graph = tmp_path / "policy.onnx"
    graph.write_bytes(b"not read")
    cfg = tmp_path / "runtime.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "agent": "a",
                "actors": 1,
                "model": {"uri": str(graph), "format": "onnx"},
                "environment": {"gymnasium": {"id": "CartPole-v1"}},
                "localSink": {"path": str(tmp_path / "out")},
            }
        )
    )
    done = subprocess.run(
        [str(BIN / "relayrl-runtime"), "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "RELAYRL_BIND_ADDRESS": "127.0.0.1"},
    )
    assert done.returncode == 2, done.stderr
    assert "model.uri: expected a model directory" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_nats_secrets_named_in_a_config_must_be_mounted() -> None:
    """Run by hand, a config that names a TLS or credentials Secret without it mounted
    is refused, rather than connecting in plain text or without credentials."""
    from relayrl_runtime import spec

    tls = spec.NatsSpec.model_validate({"url": "tls://n:4222", "tls": {"secretName": "nats-tls"}})
    with pytest.raises(streams.ConnectError, match="tls: Secret 'nats-tls' is named but"):
        streams.nats_spec_options(tls, {})
    creds = spec.NatsSpec.model_validate({"credentialsSecret": {"name": "nats-creds"}})
    with pytest.raises(streams.ConnectError, match="credentialsSecret: Secret 'nats-creds'"):
        streams.nats_spec_options(creds, {})
    assert streams.nats_spec_options(creds, {"RELAYRL_NATS_TOKEN": "t"}).token == "t"
