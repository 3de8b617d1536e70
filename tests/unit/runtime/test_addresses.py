"""Which socket family a listener or a remote client takes, IPv6 clusters included."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from relayrl_runtime.sinks import service
from relayrl_runtime.transport import client


def _resolving(monkeypatch: pytest.MonkeyPatch, names: dict[str, list[int]]) -> None:
    """Names resolve to addresses of these families only (as a cluster's DNS would)."""
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host in names:
            return [(f, socket.SOCK_STREAM, 6, "", ("x", 0)) for f in names[host]]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_a_client_uses_ipv6_only_where_ipv4_cannot_reach(monkeypatch: pytest.MonkeyPatch) -> None:
    _resolving(
        monkeypatch,
        {
            # ::1 first, as /etc/hosts has it in many images: a runtime listening on
            # IPv4 only must still be reached.
            "localhost": [socket.AF_INET6, socket.AF_INET],
            "actor-0.cartpole.ml": [socket.AF_INET6],  # an IPv6 cluster's Service
            "actor-0.cartpole.v4": [socket.AF_INET],
        },
    )
    assert client.wants_ipv6("tcp://[::1]:5555")
    assert client.wants_ipv6("tcp://[fd00:10::7]:5555")
    assert client.wants_ipv6("tcp://actor-0.cartpole.ml:5555")
    assert not client.wants_ipv6("tcp://localhost:5555")
    assert not client.wants_ipv6("tcp://127.0.0.1:5555")
    assert not client.wants_ipv6("tcp://actor-0.cartpole.v4:5555")
    assert not client.wants_ipv6("tcp://no-such-host.invalid:5555")
    assert not client.wants_ipv6("ipc:///tmp/runtime.sock")


def test_a_sink_listens_with_the_family_of_its_host(monkeypatch: pytest.MonkeyPatch) -> None:
    _resolving(monkeypatch, {"sink.v6": [socket.AF_INET6], "sink.v4": [socket.AF_INET]})
    v4, v6 = socket.AF_INET, socket.AF_INET6
    assert service._listen_family("0.0.0.0") == (v4, "0.0.0.0")
    assert service._listen_family("10.244.1.7") == (v4, "10.244.1.7")
    assert service._listen_family("") == (v4, "")
    assert service._listen_family("::") == (v6, "::")
    assert service._listen_family("fd00:10::7") == (v6, "fd00:10::7")
    assert service._listen_family("[fd00:10::7]") == (v6, "fd00:10::7")
    assert service._listen_family("sink.v6") == (v6, "sink.v6")
    assert service._listen_family("sink.v4") == (v4, "sink.v4")
