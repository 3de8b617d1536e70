"""The `relayrl-operator run` command's settings: flags over the environment."""

from __future__ import annotations

import argparse

from relayrl_operator import cli, settings


def _args(**overrides: object) -> argparse.Namespace:
    return argparse.Namespace(**{"runtime_image": None, **overrides})


def test_the_runtime_image_flag_keeps_the_other_settings() -> None:
    env = {
        settings.ENV_RUNTIME_IMAGE: "registry.example/runtime:env",
        settings.ENV_IMAGE_PULL_POLICY: "Always",
        settings.ENV_RESYNC_SECONDS: "12",
        settings.ENV_MONITOR_LABELS: '{"release": "prometheus"}',
    }
    from_env = cli._settings(_args(), env)
    assert from_env.runtime_image == "registry.example/runtime:env"
    flagged = cli._settings(_args(runtime_image="registry.example/runtime:flag"), env)
    assert flagged.runtime_image == "registry.example/runtime:flag"
    assert flagged.image_pull_policy == "Always"
    assert flagged.resync_seconds == 12.0
    assert dict(flagged.monitor_labels) == {"release": "prometheus"}


def test_the_health_url_brackets_an_ipv6_address() -> None:
    assert cli._http_url("10.0.0.7", 8081, "/healthz") == "http://10.0.0.7:8081/healthz"
    assert cli._http_url("fd00::7", 8081, "/healthz") == "http://[fd00::7]:8081/healthz"
    assert cli._http_url("::", 8081, "/healthz") == "http://[::]:8081/healthz"


def test_the_endpoints_listen_on_every_address_of_the_pods_family() -> None:
    assert cli._bind(_args(bind=None), {}) == "0.0.0.0"
    assert cli._bind(_args(bind=None), {cli.ENV_POD_IP: "10.244.1.7"}) == "0.0.0.0"
    assert cli._bind(_args(bind=None), {cli.ENV_POD_IP: "fd00:10:244::7"}) == "::"
    assert cli._bind(_args(bind="10.244.1.7"), {cli.ENV_POD_IP: "fd00::7"}) == "10.244.1.7"
