"""Which messages a sink has written, by `Nats-Msg-Id`: a copy stored twice is dropped.

JetStream drops a message whose id it saw within the stream's duplicate window (15
minutes). A publish whose ack was lost, then an outage longer than that, stores the
retry as a second message: the sinks are the last place to tell. The runtime's
publisher names itself in `Relayrl-Producer` and numbers its messages `<producer>-<n>`,
`n` counting from 1 in each process, so a sink keeps, per producer, the runs of `n` it
has written: one run while messages come in order, a few more while retries arrive out
of order. Other messages (another publisher's ids) are not tracked: nothing is ever
skipped on an id whose meaning the sink does not know.

A producer is forgotten once nothing of it was stored for `forget_seconds` (stream
time; 7 days, the stream's default age limit). Each sink records the memory in the
same durable step as the data it describes (pipeline.md "Delivery").
"""

from __future__ import annotations

import bisect
import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from relayrl_runtime import streams

FORGET_SECONDS: Final = 7 * 24 * 3600.0
# Runs kept per producer. Messages in order make one; more than this many gaps that
# never fill (they do not arise from the publisher) forget the oldest run.
MAX_RUNS: Final = 1024
FORMAT_VERSION: Final = 1


def tracked(headers: Mapping[str, str] | None) -> str | None:
    """A message's id when the runtime's publisher made it (`<Relayrl-Producer>-<n>`)."""
    if not headers:
        return None
    msg_id = headers.get(streams.HEADER_MSG_ID)
    key = split(msg_id)
    return msg_id if key is not None and key[0] == headers.get(streams.HEADER_PRODUCER) else None


def split(msg_id: str | None) -> tuple[str, int] | None:
    """(producer, n) of a publisher's message id; None for an id of another form."""
    if not msg_id:
        return None
    producer, sep, n = msg_id.rpartition("-")
    if not sep or not producer or not (n.isascii() and n.isdigit()):
        return None
    return producer, int(n)


@dataclasses.dataclass
class Runs:
    """Sorted, disjoint runs [starts[i], ends[i]] of one producer's message numbers."""

    starts: list[int]
    ends: list[int]
    stored: float  # stream time (epoch seconds) of its newest message written

    def __contains__(self, n: int) -> bool:
        i = bisect.bisect_right(self.starts, n) - 1
        return i >= 0 and n <= self.ends[i]

    def add(self, n: int, max_runs: int = MAX_RUNS) -> None:
        starts, ends = self.starts, self.ends
        if ends and ends[-1] == n - 1:  # the usual case: the next one in order
            ends[-1] = n
            return
        i = bisect.bisect_right(starts, n) - 1
        if i >= 0 and n <= ends[i]:
            return
        left = i >= 0 and ends[i] == n - 1
        right = i + 1 < len(starts) and starts[i + 1] == n + 1
        if left and right:
            ends[i] = ends[i + 1]
            del starts[i + 1], ends[i + 1]
        elif left:
            ends[i] = n
        elif right:
            starts[i + 1] = n
        else:
            starts.insert(i + 1, n)
            ends.insert(i + 1, n)
            if len(starts) > max_runs:
                del starts[0], ends[0]

    def flat(self) -> list[int]:
        """[start0, end0, start1, end1, ...]."""
        return [x for pair in zip(self.starts, self.ends, strict=True) for x in pair]

    @classmethod
    def from_flat(cls, flat: Sequence[int], stored: float) -> Runs:
        if len(flat) % 2:
            raise ValueError(f"runs: expected start/end pairs, got {len(flat)} numbers")
        starts, ends = [int(x) for x in flat[0::2]], [int(x) for x in flat[1::2]]
        if any(a > b for a, b in zip(starts, ends, strict=True)) or any(
            b + 1 >= c for b, c in zip(ends, starts[1:], strict=False)
        ):
            raise ValueError(f"runs: expected sorted, disjoint start/end pairs, got {flat[:8]}")
        return cls(starts, ends, float(stored))

    def copy(self) -> Runs:
        return Runs(list(self.starts), list(self.ends), self.stored)


class MessageIds:
    """The message ids written, per producer; see the module docstring."""

    def __init__(
        self,
        producers: dict[str, Runs] | None = None,
        *,
        forget_seconds: float = FORGET_SECONDS,
        max_runs: int = MAX_RUNS,
    ) -> None:
        self.producers: dict[str, Runs] = producers if producers is not None else {}
        self.forget_seconds = forget_seconds
        self.max_runs = max_runs
        self.newest = max((r.stored for r in self.producers.values()), default=0.0)
        self._swept = self.newest  # `newest` at the last look for idle producers

    def __contains__(self, msg_id: str | None) -> bool:
        key = split(msg_id)
        if key is None:
            return False
        runs = self.producers.get(key[0])
        return runs is not None and key[1] in runs

    def __len__(self) -> int:
        return len(self.producers)

    def add(self, msg_id: str | None, stored: float) -> str | None:
        """Note a message as written; its producer (None: an id not tracked)."""
        key = split(msg_id)
        if key is None:
            return None
        self._note(*key, stored)
        return key[0]

    def _note(self, producer: str, n: int, stored: float) -> None:
        runs = self.producers.get(producer)
        if runs is None:
            runs = self.producers[producer] = Runs([], [], stored)
        runs.add(n, self.max_runs)
        runs.stored = max(runs.stored, stored)
        self.newest = max(self.newest, stored)

    def forget_idle(self) -> list[str]:
        """Drop producers with nothing stored for `forget_seconds`; their names.

        Looks only once stream time moved on by a hundredth of that since it last
        looked (called at every commit): a producer is forgotten at most that late.
        """
        if self.newest - self._swept < self.forget_seconds / 100:
            return []
        self._swept = self.newest
        horizon = self.newest - self.forget_seconds
        gone = [p for p, r in self.producers.items() if r.stored < horizon]
        for p in gone:
            del self.producers[p]
        return gone

    def merged(self, ids: Iterable[tuple[str, float]]) -> tuple[MessageIds, set[str], list[str]]:
        """A copy with `ids` (message id, stream time) added and idle producers
        forgotten, this one unchanged (a commit that fails leaves it as it was); with
        the producers changed and those forgotten. The producers not changed are shared
        with this one: neither may be added to afterwards (`copy` for that)."""
        out = self._like(dict(self.producers))
        touched: set[str] = set()
        for msg_id, stored in ids:
            key = split(msg_id)
            if key is None:
                continue
            producer, n = key
            if producer not in touched:
                runs = out.producers.get(producer)
                if runs is not None:
                    out.producers[producer] = runs.copy()  # copied before it changes
                touched.add(producer)
            out._note(producer, n, stored)
        forgotten = out.forget_idle()
        return out, touched - set(forgotten), forgotten

    def copy(self) -> MessageIds:
        """A copy sharing nothing: the service adds to its copy what the writer has not
        committed yet, so the writer's must never see those."""
        return self._like({p: r.copy() for p, r in self.producers.items()})

    def _like(self, producers: dict[str, Runs]) -> MessageIds:
        """`producers` with this one's settings and stream clock."""
        out = MessageIds(producers, forget_seconds=self.forget_seconds, max_runs=self.max_runs)
        out.newest, out._swept = self.newest, self._swept
        return out

    # ----------------------------------------------------------- storage forms

    def rows(self, producers: Iterable[str]) -> list[tuple[str, list[int], float]]:
        """(producer, flat runs, newest stream time) of each of `producers`."""
        return [(p, self.producers[p].flat(), self.producers[p].stored) for p in producers]

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[str, Sequence[int], float]]) -> MessageIds:
        return cls({p: Runs.from_flat(flat, stored) for p, flat, stored in rows})

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": FORMAT_VERSION,
                "producers": {
                    p: {"runs": r.flat(), "stored": r.stored} for p, r in self.producers.items()
                },
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> MessageIds:
        """Parse `to_json` output; ValueError naming what is wrong."""
        try:
            doc: Any = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"not JSON: {err}") from err
        if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION:
            raise ValueError(f"expected an object with version {FORMAT_VERSION}")
        producers = doc.get("producers")
        if not isinstance(producers, dict):
            raise ValueError("producers: expected an object")
        try:
            return cls.from_rows(
                (str(p), list(v["runs"]), float(v["stored"])) for p, v in producers.items()
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"producers: expected {{runs, stored}} for each: {err}") from err
