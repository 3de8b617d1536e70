"""Actor slice handover: the layout rules (the passes: test_reconcile_passes)."""

from __future__ import annotations

from relayrl_operator import handover


def test_a_layout_round_trips_through_its_annotation() -> None:
    for layout in (handover.Layout(16, 4), handover.Layout(0, 1, handover=True)):
        assert handover.Layout.decode(layout.encode()) == layout
    assert handover.Layout(8, 2, handover=True).encode() == "actors=8,actorsPerPod=2,handover"
    for text in (None, "", "actors=8", "actors=x,actorsPerPod=2", "actors=8,actorsPerPod=0"):
        assert handover.Layout.decode(text) is None


def _owners(layout: handover.Layout) -> dict[int, int]:
    return {a: a // layout.per_pod for a in range(layout.actors)}


def test_moves_is_true_exactly_when_an_actor_changes_pods() -> None:
    layouts = [handover.Layout(a, p) for a in range(13) for p in range(1, 7)]
    for old in layouts:
        for new in layouts:
            before, after = _owners(old), _owners(new)
            moved = any(before[a] != after[a] for a in before.keys() & after.keys())
            assert handover.moves(old, new) == moved, (old, new)
