"""The operator's side of NATS: each Agent's JetStream stream and model bucket.

Names and stream settings come from `relayrl_runtime.streams`, the one place the
runtime, the sinks and the operator share. Connections are cached per server URL and
credential; credentials and TLS material are read from the Agent's Secrets through
the apiserver and written to a private temporary directory for nats-py.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.js.errors
from nats.aio.client import Client as NATS

from relayrl_operator import kube
from relayrl_operator.builders import common
from relayrl_runtime import spec, streams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _ConnKey:
    url: str
    namespace: str
    credentials: str | None
    tls: str | None


class NatsStreams:
    """Implements `reconcile.Streams` against real NATS servers."""

    def __init__(self, client: kube.Client, connect_deadline: float = 5.0) -> None:
        self._client = client
        self._deadline = connect_deadline
        self._conns: dict[_ConnKey, NATS] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="relayrl-operator-nats-")

    async def close(self) -> None:
        """Close every connection and remove the temporary credential files."""
        for nc in self._conns.values():
            with contextlib.suppress(Exception):
                await nc.close()
        self._conns.clear()
        self._tmp.cleanup()

    async def ensure(self, agent: common.AgentRef) -> str:
        """Create or update the stream and the model bucket."""
        js = (await self._connect(agent)).jetstream()
        nats_spec = agent.spec.trajectories.nats
        config = streams.stream_config(agent.namespace, agent.name, nats_spec.stream)
        await streams.ensure_stream(js, config)
        bucket = streams.model_bucket(agent.namespace, agent.name)
        await streams.ensure_object_store(js, bucket)
        return f"stream {config.name} and model bucket {bucket} ready"

    async def remove(self, agent: common.AgentRef) -> None:
        """Delete the stream and the model bucket (absent ones are fine)."""
        js = (await self._connect(agent)).jetstream()
        nats_spec = agent.spec.trajectories.nats
        name = streams.stream_name(agent.namespace, agent.name, nats_spec.stream)
        await streams.delete_stream(js, name)
        bucket = streams.model_bucket(agent.namespace, agent.name)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_object_store(bucket)
        log.info("removed stream %s and bucket %s", name, bucket)

    async def _connect(self, agent: common.AgentRef) -> NATS:
        nats_spec = agent.spec.trajectories.nats
        key = _ConnKey(
            url=nats_spec.url,
            namespace=agent.namespace,
            credentials=nats_spec.credentials_secret.name if nats_spec.credentials_secret else None,
            tls=nats_spec.tls.secret_name if nats_spec.tls else None,
        )
        nc = self._conns.get(key)
        if nc is not None and not nc.is_closed:
            return nc
        options = await self._options(key, nats_spec)
        nc = await streams.connect(options, deadline=self._deadline)
        self._conns[key] = nc
        return nc

    async def _options(self, key: _ConnKey, nats_spec: spec.NatsSpec) -> streams.ConnectOptions:
        values: dict[str, Any] = {}
        if key.credentials is not None:
            data = await self._secret(key.namespace, key.credentials)
            for name in ("user", "password", "token"):
                if name in data:
                    values[name] = data[name].decode()
            if "creds" in data:
                values["creds_file"] = str(self._write(key, "creds", data["creds"]))
        if key.tls is not None:
            data = await self._secret(key.namespace, key.tls)
            for secret_key, option in (
                (streams.TLS_KEY_CA, "tls_ca_file"),
                (streams.TLS_KEY_CERT, "tls_cert_file"),
                (streams.TLS_KEY_KEY, "tls_key_file"),
            ):
                if secret_key in data:
                    values[option] = str(self._write(key, secret_key, data[secret_key]))
        return streams.ConnectOptions(
            servers=streams.split_servers(nats_spec.url), name="relayrl-operator", **values
        )

    async def _secret(self, namespace: str, name: str) -> dict[str, bytes]:
        secret = await self._client.get(kube.SECRET, namespace, name)
        if secret is None:
            raise LookupError(f"Secret {namespace}/{name} not found")
        return {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}

    def _write(self, key: _ConnKey, name: str, content: bytes) -> Path:
        folder = Path(self._tmp.name) / f"{abs(hash(key)):x}"
        folder.mkdir(mode=0o700, exist_ok=True)
        path = folder / name
        path.write_bytes(content)
        path.chmod(0o600)
        return path
