"""The Agent spec models: defaults, derived values and rejection of bad specs."""

from __future__ import annotations

import pytest

from relayrl_runtime import spec
from support import specs


def test_base_manifest_is_valid_and_defaulted() -> None:
    agent = spec.parse_agent(specs.base_manifest())
    assert agent.metadata.name == "cartpole"
    assert agent.spec.routers == 1
    assert agent.spec.device is spec.Device.CPU
    assert agent.spec.model.mode is spec.ModelMode.SHARED
    assert agent.spec.trajectories.max_length == 1000
    assert agent.spec.trajectories.nats.url == "nats://nats:4222"
    arrow = agent.spec.sinks[0].arrow
    assert arrow is not None
    assert arrow.format is spec.SinkFormat.PARQUET


def test_wire_names_are_camel_case_and_round_trip() -> None:
    agent = spec.parse_agent(specs.base_manifest())
    wire = agent.spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert wire["actorsPerPod"] == 4
    assert wire["gpusPerPod"] == 0
    assert spec.parse_spec(wire) == agent.spec


@pytest.mark.parametrize(
    ("actors", "per_pod", "paused", "pods"),
    [
        (8, 4, False, 2),
        (9, 4, False, 3),
        (2, 4, False, 1),
        (5, None, False, 1),
        (0, 4, False, 0),
        (8, 4, True, 0),
    ],
)
def test_pods_is_ceil_of_actors_over_actors_per_pod(
    actors: int, per_pod: int | None, paused: bool, pods: int
) -> None:
    manifest = specs.merge_patch(
        specs.base_manifest(),
        {"spec": {"actors": actors, "actorsPerPod": per_pod, "paused": paused}},
    )
    assert spec.parse_agent(manifest).spec.pods() == pods


def test_cuda_with_gpus_is_valid() -> None:
    manifest = specs.merge_patch(
        specs.base_manifest(), {"spec": {"device": "cuda", "gpusPerPod": 2}}
    )
    assert spec.parse_agent(manifest).spec.gpus_per_pod == 2


def test_there_are_enough_invalid_cases() -> None:
    assert len(specs.invalid_cases()) >= 15


@pytest.mark.parametrize("case", specs.invalid_cases(), ids=lambda c: c.id)
def test_invalid_spec_is_rejected_naming_field_and_rule(case: specs.InvalidCase) -> None:
    with pytest.raises(spec.InvalidSpecError) as caught:
        spec.parse_agent(case.manifest)
    problems = dict(caught.value.problems)
    assert case.field in problems, f"expected an error on {case.field}, got {problems}"
    assert case.message in problems[case.field]
    assert case.field in str(caught.value)


def test_error_message_shows_what_was_given() -> None:
    manifest = specs.merge_patch(specs.base_manifest(), {"spec": {"device": "tpu"}})
    with pytest.raises(
        spec.InvalidSpecError, match=r"spec\.device: .*'cpu' or 'cuda' \(got 'tpu'\)"
    ):
        spec.parse_agent(manifest)


def test_parse_spec_roots_errors_at_spec() -> None:
    with pytest.raises(spec.InvalidSpecError, match=r"^spec\.routers: "):
        spec.parse_spec({**specs.base_manifest()["spec"], "routers": 0})


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        # YAML reads a bare `on:` as True and `1:` as 1: keys that name no field.
        ({True: 1}, ("spec", "expected text keys, got the key True (quote it)")),
        ({1: "x"}, ("spec", "expected text keys, got the key 1 (quote it)")),
        (
            {"template": {"nodeSelector": {True: "x"}}},
            ("spec.template.nodeSelector", "expected text keys, got the key True (quote it)"),
        ),
        # An unknown key named like a union member ("int", "str") is still named.
        ({"int": 1}, ("spec.int", "unknown field")),
    ],
)
def test_odd_keys_are_named_not_a_crash(extra: dict[object, object], problem: tuple) -> None:
    with pytest.raises(spec.InvalidSpecError) as caught:
        spec.parse_spec({**specs.base_manifest()["spec"], **extra})
    assert caught.value.problems == (problem,)


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("nats://nats:4222", True),
        ("nats://nats.ns.svc.cluster.local.:4222", True),  # the final dot of an FQDN
        ("tls://nats-0.nats:4443/", True),
        ("tls://user:p@ss@nats-0.nats:4443/", False),  # credentials go in a Secret
        ("nats://a:4222,nats://token@b:4222", False),
        ("nats://a:4222,nats://[fd00::1]:4222,", True),  # a trailing comma is skipped
        ("nats://nats:42x2", False),
        ("nats://:4222", False),
        ("nats://nats:99999", False),
        ("nats://a:4222,,nats://b:4222", False),
        ("nats://a:4222, nats://b:4222", False),
        ("http://nats:4222", False),
    ],
)
def test_nats_urls(url: str, ok: bool) -> None:
    manifest = specs.merge_patch(
        specs.base_manifest(), {"spec": {"trajectories": {"nats": {"url": url}}}}
    )
    if ok:
        spec.parse_agent(manifest)
    else:
        with pytest.raises(spec.InvalidSpecError, match=r"spec\.trajectories\.nats\.url: expected"):
            spec.parse_agent(manifest)


def test_pattern_errors_say_what_is_expected_in_words() -> None:
    sinks = [{"postgres": {"dsnSecret": {"name": "pg"}, "table": "steps; drop table x"}}]
    with pytest.raises(spec.InvalidSpecError) as caught:
        spec.parse_spec({**specs.base_manifest()["spec"], "sinks": sinks})
    assert caught.value.problems == (
        (
            "spec.sinks[0].postgres.table",
            "expected a SQL name: lower-case letters, digits and '_', not starting with a"
            " digit, at most 63 characters (got 'steps; drop table x')",
        ),
    )


@pytest.mark.parametrize(("key", "valid"), specs.LABEL_KEYS)
def test_label_keys_are_qualified_names(key: str, valid: bool) -> None:
    manifest = specs.merge_patch(
        specs.base_manifest(), {"spec": {"template": {"labels": {key: "x"}}}}
    )
    if valid:
        spec.parse_agent(manifest)
    else:
        with pytest.raises(spec.InvalidSpecError, match=r"spec\.template\.labels: label keys"):
            spec.parse_agent(manifest)
