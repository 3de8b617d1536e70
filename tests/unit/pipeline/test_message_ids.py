"""The sinks' memory of message ids written: runs per producer, storage forms, forgetting."""

from __future__ import annotations

import random

import pytest

from relayrl_runtime.sinks import message_ids
from relayrl_runtime.sinks.message_ids import MessageIds


def test_publisher_ids_split_into_producer_and_number() -> None:
    assert message_ids.split("actor-0-7-a1b2c3-42") == ("actor-0-7-a1b2c3", 42)
    for other in (None, "", "42", "-42", "deadletter-arrow-S-x", "p-4 2", "p-\u00b2", "p-"):
        assert message_ids.split(other) is None, other


def test_only_the_runtime_publishers_ids_are_tracked() -> None:
    mine = {"Nats-Msg-Id": "pod-1-x-3", "Relayrl-Producer": "pod-1-x"}
    assert message_ids.tracked(mine) == "pod-1-x-3"
    for other in (
        {"Nats-Msg-Id": "pod-1-x-3"},
        {"Nats-Msg-Id": "pod-1-x-3", "Relayrl-Producer": "pod-1"},
        {"Nats-Msg-Id": "batch-7", "Relayrl-Producer": "pod-1-x"},
        {"Relayrl-Producer": "pod-1-x"},
        {},
        None,
    ):
        assert message_ids.tracked(other) is None, other


def test_in_order_messages_keep_one_run_and_any_order_is_remembered_exactly() -> None:
    ids = MessageIds()
    for n in range(1, 1001):
        ids.add(f"pod-1-x-{n}", 10.0)
    assert ids.producers["pod-1-x"].flat() == [1, 1000]

    # Retries answered out of order (429s), each once: every number seen, none more.
    order = list(range(1, 501))
    random.Random(4).shuffle(order)
    seen: set[int] = set()
    for n in order:
        assert f"q-{n}" not in ids
        ids.add(f"q-{n}", 1.0)
        seen.add(n)
        assert all(f"q-{m}" in ids for m in list(seen)[:20])
    assert ids.producers["q"].flat() == [1, 500]
    assert "q-501" not in ids
    assert "q-0" not in ids
    assert "pod-1-x-1001" not in ids
    assert "other-1" not in ids
    assert "not-a-number-x" not in ids


def test_gaps_stay_gaps() -> None:
    ids = MessageIds()
    for n in (5, 7, 9, 6):
        ids.add(f"p-{n}", 0.0)
    assert ids.producers["p"].flat() == [5, 7, 9, 9]
    assert [n for n in range(1, 12) if f"p-{n}" in ids] == [5, 6, 7, 9]


def test_beyond_the_run_limit_the_oldest_run_is_forgotten() -> None:
    ids = MessageIds(max_runs=3)
    for n in (1, 3, 5, 7):
        ids.add(f"p-{n}", 0.0)
    # Forgetting can only let a copy through, never drop a message not written.
    assert ids.producers["p"].flat() == [3, 3, 5, 5, 7, 7]


def test_merged_leaves_the_original_as_it_was() -> None:
    ids = MessageIds()
    ids.add("a-1", 100.0)
    ids.add("b-1", 100.0)
    new, touched, forgotten = ids.merged([("a-2", 101.0), ("c-1", 101.0), ("junk", 101.0)])
    assert touched == {"a", "c"}
    assert forgotten == []
    assert [i in new for i in ("a-1", "a-2", "b-1", "c-1")] == [True] * 4
    # A commit that fails leaves the memory as it was.
    assert [i in ids for i in ("a-1", "a-2", "b-1", "c-1")] == [True, False, True, False]
    assert ids.producers["a"].flat() == [1, 1]


def test_a_copy_shares_nothing() -> None:
    """The service adds what is not committed yet to its copy of the writer's ids: had
    they shared a producer's runs, the writer's next snapshot would record those ids
    as written, and after a crash their messages would be skipped, lost."""
    committed = MessageIds()
    committed.add("p-1", 0.0)
    taken = committed.copy()
    taken.add("p-2", 1.0)
    taken.add("q-1", 1.0)
    assert ["p-2" in committed, "q-1" in committed] == [False, False]
    assert committed.to_json() == MessageIds.from_rows([("p", [1, 1], 0.0)]).to_json()
    assert committed.merged([("r-1", 0.0)])[0].producers["p"].flat() == [1, 1]


def test_idle_producers_are_forgotten_by_stream_time() -> None:
    ids = MessageIds(forget_seconds=1000)
    ids.add("old-1", 0.0)
    ids.add("new-1", 500.0)
    _, _, forgotten = ids.merged([("new-2", 900.0)])
    assert forgotten == []
    new, touched, forgotten = ids.merged([("new-2", 1001.0)])
    assert (forgotten, touched) == (["old"], {"new"})
    assert ["old-1" in new, "new-1" in new] == [False, True]
    # A producer both written and forgotten in one commit is not rewritten.
    _, touched, forgotten = ids.merged([("old-2", 0.5), ("new-3", 2000.0)])
    assert (forgotten, touched) == (["old"], {"new"})


def test_storage_forms_round_trip() -> None:
    ids = MessageIds()
    for n in (1, 2, 3, 10, 12):
        ids.add(f"pod-a-{n}", 1700000000.5)
    ids.add("pod-b-1", 1700000001.0)
    for again in (
        MessageIds.from_json(ids.to_json()),
        MessageIds.from_rows(ids.rows(ids.producers)),
    ):
        assert again.producers == ids.producers
        assert again.newest == ids.newest


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("{", "not JSON"),
        ('{"version": 2, "producers": {}}', "version 1"),
        ('{"version": 1, "producers": []}', "producers: expected an object"),
        ('{"version": 1, "producers": {"p": {"runs": [1]}}}', "expected {runs, stored}"),
        ('{"version": 1, "producers": {"p": {"runs": [1], "stored": 0}}}', "start/end pairs"),
        ('{"version": 1, "producers": {"p": {"runs": [3, 4, 1, 2], "stored": 0}}}', "sorted"),
    ],
)
def test_a_garbled_snapshot_is_refused_with_what_was_expected(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        MessageIds.from_json(text)
