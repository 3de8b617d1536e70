"""The operator's API credentials: the in-cluster service account's token, read again
as the kubelet rewrites it, for the reconciler's client and for Kopf's login."""

from __future__ import annotations

import datetime
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kopf
import pytest
from aiohttp import web
from kubernetes.config import incluster_config

from relayrl_operator import kube
from relayrl_operator.handlers import lifecycle
from support import webstub

# Not a certificate any connection checks: the loader only wants a non-empty file.
_CA = "-----BEGIN CERTIFICATE-----\nnot checked here\n-----END CERTIFICATE-----\n"


@pytest.fixture
def in_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A pod's service-account files and environment; returns the token file."""
    token, ca = tmp_path / "token", tmp_path / "ca.crt"
    token.write_text("token-1")
    ca.write_text(_CA)
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(ca))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    return token


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[str, list[str]]]:
    """An HTTP server that answers `{}` and keeps each request's Authorization header."""
    seen: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/api/v1/namespaces/ml/configmaps/c", answer)
    async with webstub.serving(app) as url:
        yield url, seen


def _rotated_a_minute_later(
    monkeypatch: pytest.MonkeyPatch, token: Path, new_token: str | None
) -> None:
    """The token file rewritten (None: removed), a minute on: the in-cluster loader keeps
    a token a minute before it reads the file again."""
    if new_token is None:
        token.unlink()
    else:
        token.write_text(new_token)

    class Later(datetime.datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return datetime.datetime.now(tz) + datetime.timedelta(minutes=2)

    shim = types.SimpleNamespace(datetime=Later, timedelta=datetime.timedelta)
    monkeypatch.setattr(incluster_config, "datetime", shim)


async def test_the_service_account_token_is_sent_once_and_followed_as_it_rotates(
    in_cluster: Path, recorder: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, seen = recorder
    cfg = kube.load_configuration(None)
    assert cfg.host == "https://10.96.0.1:443"
    cfg.host, cfg.ssl_ca_cert = url, None  # the recorder speaks plain HTTP
    monkeypatch.setattr(kube, "TOKEN_RECHECK_SECONDS", 0.0)
    client = kube.Client.from_configuration(cfg)
    try:
        await client.request("GET", "/api/v1/namespaces/ml/configmaps/c")
        _rotated_a_minute_later(monkeypatch, in_cluster, "token-2")  # the kubelet's rotation
        await client.request("GET", "/api/v1/namespaces/ml/configmaps/c")
    finally:
        await client.close()
    # Not "Bearer bearer token-1": the in-cluster loader keeps its own "bearer " prefix.
    assert seen == ["Bearer token-1", "Bearer token-2"]


async def test_a_token_that_cannot_be_read_again_keeps_the_one_in_use(
    in_cluster: Path, recorder: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, seen = recorder
    cfg = kube.load_configuration(None)
    cfg.host, cfg.ssl_ca_cert = url, None
    monkeypatch.setattr(kube, "TOKEN_RECHECK_SECONDS", 0.0)
    client = kube.Client.from_configuration(cfg)
    try:
        _rotated_a_minute_later(monkeypatch, in_cluster, None)
        await client.request("GET", "/api/v1/namespaces/ml/configmaps/c")
    finally:
        await client.close()
    assert seen == ["Bearer token-1"]


def test_kopf_logs_in_with_the_bare_service_account_token(in_cluster: Path) -> None:
    info = lifecycle.login(memo=kopf.Memo(kubeconfig=None))
    assert info.scheme == "Bearer"
    assert info.token == "token-1"
    assert info.server == "https://10.96.0.1:443"


def test_a_kubeconfig_token_keeps_its_value() -> None:
    cfg = types.SimpleNamespace(api_key={"BearerToken": "Bearer abc.def"})
    assert kube.bearer_token(cfg) == "abc.def"
    assert kube.bearer_token(types.SimpleNamespace(api_key={})) is None
