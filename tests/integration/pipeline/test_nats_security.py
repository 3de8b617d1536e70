"""NATS TLS with client certificates and JWT (.creds) auth against a real nats-server (issue 4).

Connect options are built the way a pod builds them, `streams.ConnectOptions.from_env`
over mounted-Secret-style directories (RELAYRL_NATS_TLS_DIR with ca.crt, tls.crt,
tls.key; RELAYRL_NATS_CREDENTIALS_DIR with a creds key). With them the runtime's
publisher gets its trajectories acked and stored in the stream, a `relayrl-sink`
process with the same environment drains them into Parquet, and clients missing the
certificate, the CA or the credentials are refused with `streams.ConnectError`.
Token and user/password auth are covered in test_publisher.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import pyarrow as pa
import pytest

from relayrl_localstack import certs
from relayrl_runtime import streams
from relayrl_runtime.transport import publisher
from support import natsauth, natsserver, pipeline, trajectories

SUBJECT = streams.trajectories_subject(pipeline.NAMESPACE, trajectories.AGENT)
STREAM = streams.stream_name(pipeline.NAMESPACE, trajectories.AGENT)
PRODUCER = 21
BATCHES = 6
# A refused client is retried until this deadline, then `connect` raises ConnectError.
REFUSED_DEADLINE = 3.0


def _secret_dir(path: Path, files: Mapping[str, bytes]) -> Path:
    """A directory laid out like a mounted Secret: one file per key."""
    path.mkdir(parents=True)
    for key, data in files.items():
        (path / key).write_bytes(data)
    return path


async def _refused(options: streams.ConnectOptions) -> str:
    """The ConnectError message of a client the server does not let in."""
    try:
        nc = await streams.connect(options, deadline=REFUSED_DEADLINE)
    except streams.ConnectError as err:
        return str(err)
    await nc.close()
    raise AssertionError(f"the server let a client in with {options!r}")


async def _publish_and_read_back(options: streams.ConnectOptions) -> pa.Table:
    """Publish BATCHES batches with the runtime's publisher; check acks and the stream."""
    pub = publisher.NatsPublisher(
        options,
        publisher.PublisherConfig(namespace=pipeline.NAMESPACE, agent=trajectories.AGENT),
    )
    pub.start()
    for i in range(BATCHES):
        pub.write(trajectories.batch(PRODUCER, i))
    pub.close(timeout=60)
    want = trajectories.expected({PRODUCER: BATCHES})
    assert pub.acked_steps == want.num_rows

    nc = await streams.connect(options, deadline=20)
    try:
        js = nc.jetstream()
        info = await js.stream_info(STREAM)
        sub = await js.pull_subscribe(SUBJECT, durable=None, stream=STREAM)
        msgs = []
        while len(msgs) < info.state.messages:
            msgs += await sub.fetch(info.state.messages - len(msgs), timeout=10)
    finally:
        await nc.close()
    stored = pa.concat_tables(pa.ipc.open_stream(m.data).read_all() for m in msgs)
    pipeline.assert_same(trajectories.sort(stored), want, "stream")
    return want


def _drain_with_arrow_sink(
    server: natsserver.NatsServer, work: Path, env: Mapping[str, str], want: pa.Table
) -> None:
    """A `relayrl-sink arrow` process with `env` (the mounted dirs) stores everything."""
    work.mkdir()
    p = pipeline.Pipeline(server, work, None)
    p.env.update(env)
    try:
        sink = p.arrow_sink("--rotate-seconds", "1")
        sink.start()
        sink.wait_ready()
        pipeline.wait_until(
            "arrow sink drained the stream",
            lambda: pipeline.arrow_rows(p.arrow_dir) >= want.num_rows,
        )
        assert sink.terminate() == 0, sink.logs()
        pipeline.assert_same(pipeline.read_arrow(p.arrow_dir), want, "arrow sink")
    finally:
        p.close()


# ------------------------------------------------------------------------ TLS


@pytest.fixture
def pki(tmp_path: Path) -> certs.MutualTLSFiles:
    return certs.generate_mutual_tls(tmp_path / "pki")


@pytest.fixture
def tls_server(pki: certs.MutualTLSFiles) -> Iterator[natsserver.NatsServer]:
    # verify: true -- a client must present a certificate signed by ca_file.
    conf = f"""
tls {{
  cert_file: "{pki.server_cert}"
  key_file: "{pki.server_key}"
  ca_file: "{pki.ca_cert}"
  verify: true
}}
"""
    with natsserver.NatsServer(extra_config=conf) as srv:
        yield srv


def _tls_secret(path: Path, ca: Path, cert: Path | None, key: Path | None) -> Path:
    files = {streams.TLS_KEY_CA: ca.read_bytes()}
    if cert is not None and key is not None:
        files[streams.TLS_KEY_CERT] = cert.read_bytes()
        files[streams.TLS_KEY_KEY] = key.read_bytes()
    return _secret_dir(path, files)


async def test_mutual_tls_publishes_and_a_sink_drains(
    tls_server: natsserver.NatsServer, pki: certs.MutualTLSFiles, tmp_path: Path
) -> None:
    tls_dir = _tls_secret(tmp_path / "nats-tls", pki.ca_cert, pki.client_cert, pki.client_key)
    env = {streams.ENV_NATS_URL: tls_server.url, streams.ENV_NATS_TLS_DIR: str(tls_dir)}
    options = streams.ConnectOptions.from_env(env)
    assert options.tls
    assert options.tls_cert_file == str(tls_dir / streams.TLS_KEY_CERT)

    want = await _publish_and_read_back(options)
    _drain_with_arrow_sink(tls_server, tmp_path / "sink", env, want)


async def test_mutual_tls_refuses_a_client_without_its_certificate(
    tls_server: natsserver.NatsServer, pki: certs.MutualTLSFiles, tmp_path: Path
) -> None:
    # Trusts the server, presents no certificate: the server ends the handshake.
    tls_dir = _tls_secret(tmp_path / "ca-only", pki.ca_cert, None, None)
    options = streams.ConnectOptions.from_env(
        {streams.ENV_NATS_URL: tls_server.url, streams.ENV_NATS_TLS_DIR: str(tls_dir)}
    )
    assert options.tls
    assert options.tls_cert_file is None
    await _refused(options)
    # With TLS 1.3 the client may see the server's alert or only the connection drop;
    # the server's log says why either way.
    pipeline.wait_until(
        "nats-server logged the missing client certificate",
        lambda: "client didn't provide a certificate" in tls_server.logs(),
        20,
    )
    # No TLS options: the server's INFO demands TLS, so nats-py upgrades with the system
    # CAs, which do not know this CA.
    assert "CERTIFICATE_VERIFY_FAILED" in await _refused(
        streams.ConnectOptions(servers=(tls_server.url,))
    )


async def test_mutual_tls_client_rejects_a_server_from_another_ca(
    tls_server: natsserver.NatsServer, pki: certs.MutualTLSFiles, tmp_path: Path
) -> None:
    # The right client certificate, but ca.crt is some other CA: the server's cert
    # does not verify on the client side.
    other = certs.generate_mutual_tls(tmp_path / "other-pki")
    tls_dir = _tls_secret(tmp_path / "wrong-ca", other.ca_cert, pki.client_cert, pki.client_key)
    options = streams.ConnectOptions.from_env(
        {streams.ENV_NATS_URL: tls_server.url, streams.ENV_NATS_TLS_DIR: str(tls_dir)}
    )
    assert "CERTIFICATE_VERIFY_FAILED" in await _refused(options)


async def test_mutual_tls_refuses_a_client_certificate_from_another_ca(
    tls_server: natsserver.NatsServer, pki: certs.MutualTLSFiles, tmp_path: Path
) -> None:
    # Trusts the server, but presents a certificate the server's CA did not sign.
    other = certs.generate_mutual_tls(tmp_path / "other-pki")
    tls_dir = _tls_secret(
        tmp_path / "foreign-cert", pki.ca_cert, other.client_cert, other.client_key
    )
    options = streams.ConnectOptions.from_env(
        {streams.ENV_NATS_URL: tls_server.url, streams.ENV_NATS_TLS_DIR: str(tls_dir)}
    )
    await _refused(options)
    # The client only sees the connection drop; the server's log says why.
    pipeline.wait_until(
        "nats-server logged the rejected client certificate",
        lambda: "certificate signed by unknown authority" in tls_server.logs(),
        20,
    )


# ------------------------------------------------------------- JWT / .creds


@pytest.fixture
def trust() -> natsauth.Trust:
    return natsauth.Trust.create()


@pytest.fixture
def jwt_server(trust: natsauth.Trust) -> Iterator[natsserver.NatsServer]:
    with natsserver.NatsServer(extra_config=trust.server_config()) as srv:
        yield srv


async def test_creds_file_publishes_and_a_sink_drains(
    jwt_server: natsserver.NatsServer, trust: natsauth.Trust, tmp_path: Path
) -> None:
    cred_dir = tmp_path / "nats-credentials"
    trust.write_creds(cred_dir / streams.SECRET_KEY_CREDS)
    env = {streams.ENV_NATS_URL: jwt_server.url, streams.ENV_NATS_CREDENTIALS_DIR: str(cred_dir)}
    options = streams.ConnectOptions.from_env(env)
    assert options.creds_file == str(cred_dir / streams.SECRET_KEY_CREDS)

    want = await _publish_and_read_back(options)
    _drain_with_arrow_sink(jwt_server, tmp_path / "sink", env, want)


async def test_creds_auth_refuses_no_creds_and_an_unknown_account(
    jwt_server: natsserver.NatsServer, tmp_path: Path
) -> None:
    assert "Authorization Violation" in await _refused(
        streams.ConnectOptions(servers=(jwt_server.url,))
    )

    cred_dir = _secret_dir(
        tmp_path / "stranger",
        {streams.SECRET_KEY_CREDS: natsauth.stranger_creds().encode()},
    )
    options = streams.ConnectOptions.from_env(
        {streams.ENV_NATS_URL: jwt_server.url, streams.ENV_NATS_CREDENTIALS_DIR: str(cred_dir)}
    )
    assert "Authorization Violation" in await _refused(options)
