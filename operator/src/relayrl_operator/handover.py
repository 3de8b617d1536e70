"""Actor slice handover: no actor runs in two pods while actorsPerPod changes.

Pod i runs the actors [i * perPod, (i + 1) * perPod) of the Agent. Running pods apply
a new `actors` or `actorsPerPod` from their mounted config, each when its kubelet
refreshes the file, so without care a pod could take actors another pod still runs.
A change of `actors` alone never moves an actor to another pod; a change of
`actorsPerPod` does (`moves`), and goes in two steps:

1. the ConfigMap gets the new layout with `sliceHandover: true`: every pod keeps
   only those actors of its new slice it already runs, and a pod that starts now runs
   none (`relayrl_runtime.app`);
2. once every running actor pod has reported that config's revision (its status
   report, `relayrl_runtime.reporting`), and the pods past the new count are gone,
   the plain layout: each pod takes its whole new slice.

The ConfigMap's `relayrl.io/actor-layout` annotation records the layout it holds, so
the next pass (or a restarted operator) knows where a handover stands. A handover that
does not finish within `TIMEOUT_SECONDS` (a pod that cannot report) ends anyway, with
a Warning Event naming the pods.
"""

from __future__ import annotations

import dataclasses
from typing import Final

# How long step 1 may wait for every pod's report before the plain layout is written.
TIMEOUT_SECONDS: Final = 60.0
# How often the reconciler looks at a handover under way besides its events.
CHECK_SECONDS: Final = 1.0

_HANDOVER: Final = "handover"


@dataclasses.dataclass(frozen=True)
class Layout:
    """How an Agent's actors are spread over its pods, as a ConfigMap holds it."""

    actors: int
    per_pod: int
    handover: bool = False

    def encode(self) -> str:
        """The `relayrl.io/actor-layout` annotation's value."""
        text = f"actors={self.actors},actorsPerPod={self.per_pod}"
        return f"{text},{_HANDOVER}" if self.handover else text

    @classmethod
    def decode(cls, text: str | None) -> Layout | None:
        """Parse the annotation; None when absent or not ours."""
        if not text:
            return None
        parts = text.split(",")
        handover = parts[-1] == _HANDOVER
        if handover:
            parts = parts[:-1]
        try:
            fields = dict(p.split("=", 1) for p in parts)
            layout = cls(int(fields["actors"]), int(fields["actorsPerPod"]), handover)
        except (KeyError, ValueError):
            return None
        return layout if layout.actors >= 0 and layout.per_pod >= 1 else None


def moves(old: Layout, new: Layout) -> bool:
    """Whether some actor of both layouts is in one pod under `old`, another under `new`.

    Actors below the smaller actorsPerPod are in pod 0 under both; the actor just past
    it (if both layouts have it) is in pod 1 under one and pod 0 under the other.
    """
    if old.per_pod == new.per_pod:
        return False
    return min(old.actors, new.actors) > min(old.per_pod, new.per_pod)
