"""The reconciler's queue of Agents waiting for a pass: urgent ones first.

Most passes answer something that happened: an Agent was applied or edited, a child
changed, a pod reported, a retry fell due. The periodic resync adds a pass for every
Agent at once, which finds nothing to do nearly always. In one first-in-first-out
queue, a thousand of those would sit ahead of the passes that move Agents towards
Ready. So the resync's keys wait in a background lane, taken when no urgent key waits,
and still one in every `BACKGROUND_SHARE` takes, so a fleet that never goes quiet keeps
being compared with its desired state too. A key is queued once: enqueued urgently
while it waits in the background lane, it moves up.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Final, Generic, TypeVar

K = TypeVar("K")

# While both lanes hold keys, one take in this many comes from the background lane.
BACKGROUND_SHARE: Final = 8


class WorkQueue(Generic[K]):
    """Keys in two lanes, urgent and background; each key at most once."""

    def __init__(self) -> None:
        self._urgent: collections.deque[K] = collections.deque()
        self._background: collections.deque[K] = collections.deque()
        # Each waiting key, and whether it waits in the urgent lane. A key moved up
        # leaves its old place in the background lane, skipped when reached.
        self._waiting: dict[K, bool] = {}
        self._urgent_waiting = 0
        self._takes = 0
        self._nonempty = asyncio.Event()

    def __len__(self) -> int:
        return len(self._waiting)

    @property
    def urgent(self) -> int:
        """How many keys wait in the urgent lane."""
        return self._urgent_waiting

    def put(self, key: K, *, background: bool = False) -> None:
        """Queue `key` unless it waits already; an urgent put moves a background key up."""
        urgent = self._waiting.get(key)
        if urgent is None:
            self._waiting[key] = not background
            (self._background if background else self._urgent).append(key)
            self._urgent_waiting += not background
        elif not urgent and not background:
            self._waiting[key] = True
            self._urgent.append(key)
            self._urgent_waiting += 1
        self._nonempty.set()

    def get_nowait(self) -> K:
        """The next key; IndexError when none waits."""
        lanes = (self._urgent, self._background)
        if (self._takes + 1) % BACKGROUND_SHARE == 0:
            lanes = (self._background, self._urgent)
        for lane in lanes:
            while lane:
                key = lane.popleft()
                if self._waiting.get(key) is (lane is self._urgent):
                    del self._waiting[key]
                    self._urgent_waiting -= lane is self._urgent
                    self._takes += 1
                    return key
        self._nonempty.clear()
        raise IndexError("no key waits")

    async def get(self) -> K:
        """The next key, waiting for one."""
        while True:
            try:
                return self.get_nowait()
            except IndexError:
                await self._nonempty.wait()
