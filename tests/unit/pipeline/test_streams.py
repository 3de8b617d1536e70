"""streams: names, stream config, connect options from mounted secrets, backoff."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import pytest

from relayrl_runtime import spec, streams


def test_names_of_one_agent() -> None:
    assert streams.trajectories_subject("ml", "cartpole") == "relayrl.ml.cartpole.trajectories"
    assert streams.deadletter_subject("ml", "cartpole") == "relayrl.ml.cartpole.deadletter"
    assert streams.stream_name("ml", "cartpole") == "RELAYRL_ml_cartpole"
    assert streams.stream_name("ml", "cartpole", "custom") == "custom"
    assert streams.model_bucket("ml", "cartpole") == "relayrl-ml-cartpole-models"
    assert streams.durable_name(streams.SinkKind.ARROW) == "relayrl-sink-arrow"
    with pytest.raises(ValueError, match="agent"):
        streams.trajectories_subject("ml", "a.b")


def test_stream_config_keeps_both_subjects_on_file_storage() -> None:
    cfg = streams.stream_config("ml", "cartpole")
    assert cfg.subjects == ["relayrl.ml.cartpole.>"]
    assert cfg.storage is not None
    assert cfg.storage.value == "file"
    assert cfg.duplicate_window == 900
    assert cfg.max_msg_size is not None
    assert cfg.max_msg_size > spec.NatsSpec().max_batch_bytes


def test_credentials_from_a_mounted_secret(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "user").write_text("actor\n")
    (creds / "password").write_text("pw\n")
    opts = streams.ConnectOptions.from_env(
        {
            streams.ENV_NATS_CREDENTIALS_DIR: str(creds),
            streams.ENV_NATS_URL: "nats://a:1,nats://b:2",
        }
    )
    assert opts.servers == ("nats://a:1", "nats://b:2")
    kw = opts.connect_kwargs()
    assert (kw["user"], kw["password"]) == ("actor", "pw")
    assert "password" not in repr(opts).replace("password=", "")

    token_dir = tmp_path / "token"
    token_dir.mkdir()
    (token_dir / "token").write_text("t0k")
    assert (
        streams.ConnectOptions.from_env(
            {streams.ENV_NATS_CREDENTIALS_DIR: str(token_dir)}
        ).connect_kwargs()["token"]
        == "t0k"
    )

    creds_dir = tmp_path / "jwt"
    creds_dir.mkdir()
    (creds_dir / "creds").write_text("-----BEGIN NATS USER JWT-----\n")
    jwt = streams.ConnectOptions.from_env({streams.ENV_NATS_CREDENTIALS_DIR: str(creds_dir)})
    assert jwt.connect_kwargs()["user_credentials"] == str(creds_dir / "creds")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(streams.ConnectError, match="none of the keys"):
        streams.ConnectOptions.from_env({streams.ENV_NATS_CREDENTIALS_DIR: str(empty)})


def test_conflicting_auth_is_rejected() -> None:
    with pytest.raises(streams.ConnectError, match="not several"):
        streams.ConnectOptions(token="t", user="u", password="p")
    with pytest.raises(streams.ConnectError, match="go together"):
        streams.ConnectOptions(user="u")


def test_tls_from_a_mounted_secret(tmp_path: Path) -> None:
    key, crt = tmp_path / "tls.key", tmp_path / "tls.crt"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=nats",
            "-keyout",
            str(key),
            "-out",
            str(crt),
        ],
        check=True,
        capture_output=True,
    )
    (tmp_path / "ca.crt").write_bytes(crt.read_bytes())
    opts = streams.ConnectOptions.from_env({streams.ENV_NATS_TLS_DIR: str(tmp_path)})
    assert opts.tls
    kw = opts.connect_kwargs()
    assert isinstance(kw["tls"], ssl.SSLContext)
    assert kw["tls"].verify_mode == ssl.CERT_REQUIRED


def test_backoff_grows_is_bounded_and_jittered() -> None:
    b = streams.Backoff(initial=0.1, maximum=2.0)
    delays = [b.delay(i) for i in range(20)]
    assert all(0.05 <= d <= 2.0 for d in delays)
    assert max(delays[:2]) <= 0.2
    assert min(delays[10:]) >= 1.0
    assert len({round(b.delay(8), 6) for _ in range(20)}) > 1
