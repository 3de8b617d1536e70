"""The peering rule the reconciler pauses by: Kopf's, read from a peering object's status."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest

from relayrl_operator import cli, handover, metrics, peering, reconcile, settings

NOW = dt.datetime(2026, 11, 21, 12, 0, 0, tzinfo=dt.UTC)
ME = "relayrl-operator-7c9f-abcde"


def entry(priority: int, seconds_ago: float = 5, lifetime: int = 60) -> dict[str, Any]:
    seen = NOW - dt.timedelta(seconds=seconds_ago)
    return {"priority": priority, "lifetime": lifetime, "lastseen": seen.isoformat()}


def test_alone_or_outranking_everyone_acts() -> None:
    assert peering.blockers({}, ME, 0, NOW) == []
    assert peering.blockers({ME: entry(0)}, ME, 0, NOW) == []
    assert peering.blockers({ME: entry(10), "old": entry(5)}, ME, 10, NOW) == []


def test_a_live_peer_of_higher_priority_pauses() -> None:
    assert peering.blockers({ME: entry(0), "new": entry(100)}, ME, 0, NOW) == ["new"]


def test_a_live_peer_of_equal_priority_pauses_both() -> None:
    status = {"a": entry(0), "b": entry(0)}
    assert peering.blockers(status, "a", 0, NOW) == ["b"]
    assert peering.blockers(status, "b", 0, NOW) == ["a"]


def test_a_dead_peer_does_not_count() -> None:
    # Last seen 61 s ago with a 60 s lifetime: gone (a crashed pod that never said so).
    assert peering.blockers({"crashed": entry(100, seconds_ago=61)}, ME, 0, NOW) == []
    # A peer leaving cleanly writes lifetime 0.
    assert peering.blockers({"left": entry(100, seconds_ago=0, lifetime=0)}, ME, 0, NOW) == []


@pytest.mark.parametrize(
    "info",
    [
        {"priority": 3},  # no lastseen: Kopf takes it as seen now
        {"priority": 3, "lastseen": "not a time"},  # unreadable: the safe side is a pause
        {"priority": 3, "lastseen": "2026-11-21T11:59:59"},  # no zone: UTC
    ],
)
def test_entries_without_a_usable_time_are_alive(info: dict[str, Any]) -> None:
    assert peering.blockers({"peer": info}, ME, 0, NOW) == ["peer"]


def test_paths_cluster_wide_or_per_namespace() -> None:
    wide = peering.Peering(None, "relayrl-operator", ME, 0)  # type: ignore[arg-type]
    assert wide.paths() == ["/apis/kopf.dev/v1/clusterkopfpeerings/relayrl-operator"]
    namespaced = peering.Peering(None, "relayrl-operator", ME, 0, ("ml", "rl"))  # type: ignore[arg-type]
    assert namespaced.paths() == [
        "/apis/kopf.dev/v1/namespaces/ml/kopfpeerings/relayrl-operator",
        "/apis/kopf.dev/v1/namespaces/rl/kopfpeerings/relayrl-operator",
    ]


def test_identity_is_the_pod_name_when_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_ID", "relayrl-operator-5d8c-xyz12")
    assert peering.own_identity() == "relayrl-operator-5d8c-xyz12"
    monkeypatch.delenv("POD_ID")
    assert peering.own_identity() != peering.own_identity()  # a process-unique suffix


class FakePeers:
    """Stands in for the peering objects: whoever is listed in `blocking`."""

    priority = 0

    def __init__(self) -> None:
        self.blocking = ["relayrl-operator-new"]

    async def blockers(self) -> list[str]:
        return list(self.blocking)


class NoApis:
    async def has_api(self, api_version: str) -> bool:
        return False


async def test_a_paused_reconciler_keeps_its_queue_and_acts_on_resume() -> None:
    peers = FakePeers()
    rec = reconcile.Reconciler(
        client=NoApis(),  # type: ignore[arg-type]
        cfg=settings.Settings(),
        streams=None,
        workers=2,
        peers=peers,  # type: ignore[arg-type]
    )
    passes: list[tuple[str, str]] = []

    async def run_one(key: tuple[str, str]) -> None:
        passes.append(key)

    rec._run_one = run_one  # type: ignore[method-assign]
    await rec.start()
    try:
        assert not rec.active
        assert metrics.ACTIVE._value.get() == 0
        rec.agent_event("ADDED", {"metadata": {"namespace": "ml", "name": "a", "generation": 1}})
        await asyncio.sleep(0.2)
        assert passes == []  # standby: nothing done, the key waits
        rec._states[("ml", "a")].needs_apply = False
        rec._states[("ml", "a")].config_layout = handover.Layout(8, 4)
        peers.blocking = []
        await rec._check_peers()
        await asyncio.sleep(0.2)
        assert rec.active
        assert metrics.ACTIVE._value.get() == 1
        assert passes == [("ml", "a")]
        # Resuming compares every Agent's children again: a peer may have changed them.
        assert rec._states[("ml", "a")].needs_apply
        # And reads its ConfigMap's layout again: a peer may be mid-handover.
        assert rec._states[("ml", "a")].config_layout is None
    finally:
        await rec.stop()


@pytest.mark.parametrize("value", ["ml-*", "ML", "x-", "a" * 64, "team/rl"])
def test_the_cli_takes_namespace_names_not_patterns(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "--namespace", value])
    assert exit_.value.code == 2
    assert "is not a namespace name" in capsys.readouterr().err
