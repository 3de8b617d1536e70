"""Waits that lose the first cancel they get, as Python 3.11's `asyncio.wait_for` can
when the cancel and the awaited result land together (tests/unit/runtime/test_aio.py
sets that race up for real)."""

from __future__ import annotations

import asyncio


class LosesOneCancel:
    """`wait` sleeps, swallowing the first cancel of all its calls (`lost` says it did);
    `run` waits until cancelled, as a task's body."""

    def __init__(self) -> None:
        self.lost = False

    async def wait(self, seconds: float) -> None:
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            if self.lost:
                raise
            self.lost = True

    async def run(self, *args: object) -> None:
        while True:
            await self.wait(0.05)
