"""The actor pool: actor ids, per-actor state and columnar trajectory buffers.

Owned by `agent.Agent`, which calls it under its lock. Each actor is a row; each buffer
column is an array of shape (rows, horizon, ...) where horizon grows (doubling) up to the
trajectory max length, so a step for N actors is one fancy-indexed write per column and
a finished trajectory is one gather per column — no Python object per step.

Reward semantics follow RelayRL: the reward passed with a request belongs to the
actor's previous action; `flag_last_action` gives the last action's reward and ends the
episode. A trajectory that reaches the max length is cut (marked `truncated` and `cut`)
when the next step arrives, and the episode continues in a new segment.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np
import numpy.typing as npt

from relayrl_runtime import errors, trajectory

_INITIAL_ROWS = 8
_INITIAL_HORIZON = 64
# Actor ids below this resolve to rows through a dense array (8 bytes per id).
_DENSE_LIMIT = 1 << 20

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


@dataclasses.dataclass(frozen=True, slots=True)
class StepRecord:
    """One request's worth of step data for the rows it touched."""

    obs: npt.NDArray[np.generic]
    action: npt.NDArray[np.generic]
    mask: BoolArray | None
    aux: Mapping[str, npt.NDArray[np.generic]]
    version: int
    obs_time_us: int
    action_time_us: int


class ActorPool:
    """Actor rows plus their in-progress trajectories."""

    def __init__(self, layout: trajectory.Layout, max_length: int, run_prefix: int) -> None:
        if max_length < 1:
            raise errors.InvalidArgumentError.mismatch("max_length", ">= 1", max_length)
        self.layout = layout
        self.max_length = max_length
        self._episode_base = (run_prefix & 0x7FFFFFFF) << 32
        self._next_episode = 0
        self._id_to_row: dict[int, int] = {}
        self._next_id = 0
        self._free: list[int] = []
        self._rows = 0
        self._horizon = min(max_length, _INITIAL_HORIZON)
        self._dense: IntArray = np.zeros(0, dtype=np.int64)
        # Drivers pass the same ids every step: remember the last lookup by its bytes.
        self._last_key = b"\xff"
        self._last_rows: IntArray = np.zeros(0, dtype=np.int64)
        # Masks are only written once some request carried one (the buffer starts all True).
        self._masked = False
        self._alloc(_INITIAL_ROWS, self._horizon)

    # ------------------------------------------------------------------ storage

    def _alloc(self, rows: int, horizon: int) -> None:
        lay = self.layout
        old = getattr(self, "_cols", None)
        old_rows = self._rows
        old_h = getattr(self, "_alloc_h", 0)
        act_shape: tuple[int, ...] = () if lay.discrete else (lay.action_size,)
        cols: dict[str, npt.NDArray[np.generic]] = {
            "obs": np.zeros((rows, horizon, *lay.obs_shape), dtype=lay.obs_dtype),
            "action": np.zeros(
                (rows, horizon, *act_shape), dtype=np.int64 if lay.discrete else np.float32
            ),
            "reward": np.zeros((rows, horizon), dtype=np.float64),
            # policy version, obs time, action time: one write per request for all three.
            "stamps": np.zeros((rows, horizon, 3), dtype=np.int64),
        }
        if lay.discrete:
            cols["mask"] = np.ones((rows, horizon, lay.action_size), dtype=np.bool_)
        for aux in lay.aux:
            cols[f"aux_{aux.name}"] = np.zeros((rows, horizon, *aux.shape), dtype=aux.dtype)
        state: dict[str, npt.NDArray[np.generic]] = {
            "ids": np.full(rows, -1, dtype=np.int64),
            "active": np.zeros(rows, dtype=np.bool_),
            "length": np.zeros(rows, dtype=np.int64),
            "open": np.zeros(rows, dtype=np.bool_),
            "episode": np.zeros(rows, dtype=np.int64),
            "segment": np.zeros(rows, dtype=np.int32),
            "step0": np.zeros(rows, dtype=np.int64),
        }
        if old is not None:
            for name, arr in cols.items():
                arr[:old_rows, :old_h] = old[name][:old_rows, :old_h]
            for name, arr in state.items():
                arr[:old_rows] = getattr(self, "_" + name)[:old_rows]
        self._cols = cols
        self._alloc_h = horizon
        self._capacity = rows
        self._ids: IntArray = state["ids"]  # type: ignore[assignment]
        self._active: BoolArray = state["active"]  # type: ignore[assignment]
        self._length: IntArray = state["length"]  # type: ignore[assignment]
        self._open: BoolArray = state["open"]  # type: ignore[assignment]
        self._episode: IntArray = state["episode"]  # type: ignore[assignment]
        self._segment: npt.NDArray[np.int32] = state["segment"]  # type: ignore[assignment]
        self._step0: IntArray = state["step0"]  # type: ignore[assignment]

    def _grow_horizon(self, needed: int) -> None:
        horizon = self._alloc_h
        while horizon < needed:
            horizon = min(self.max_length, horizon * 2)
        self._alloc(self._capacity, horizon)

    # ------------------------------------------------------------------- actors

    @property
    def actor_ids(self) -> list[int]:
        """Ids of all actors, in creation order of their rows."""
        return [int(i) for i in self._ids[: self._rows][self._active[: self._rows]]]

    def __len__(self) -> int:
        return len(self._id_to_row)

    def __contains__(self, actor_id: int) -> bool:
        return actor_id in self._id_to_row

    def next_free_id(self) -> int:
        """The smallest id above every id in use or ever used (ids are not recycled)."""
        return max(max(self._id_to_row, default=-1) + 1, self._next_id)

    def check_new_ids(self, actor_ids: Iterable[int]) -> list[int]:
        """Validate ids for new actors (unique, unused); returns them as ints."""
        ids = [int(i) for i in actor_ids]
        if len(set(ids)) != len(ids):
            raise errors.DuplicateActorError(f"actor_ids: expected unique ids, got {ids}")
        taken = [i for i in ids if i in self._id_to_row]
        if taken:
            raise errors.DuplicateActorError(
                f"actor_ids: expected ids not in use, got {taken} already taken"
            )
        return ids

    def add(self, actor_ids: Iterable[int]) -> list[int]:
        """Add actors (ids checked by `check_new_ids`); returns their rows."""
        ids = self.check_new_ids(actor_ids)
        rows = []
        for actor_id in ids:
            if self._free:
                row = self._free.pop()
            else:
                if self._rows == self._capacity:
                    self._alloc(self._capacity * 2, self._alloc_h)
                row = self._rows
                self._rows += 1
            self._ids[row] = actor_id
            self._active[row] = True
            self._length[row] = 0
            self._open[row] = False
            self._id_to_row[actor_id] = row
            self._next_id = max(self._next_id, actor_id + 1)
            rows.append(row)
        self._invalidate()
        return rows

    def remove(self, actor_id: int) -> trajectory.Steps | None:
        """Remove an actor; its partial trajectory (if any) is returned, cut."""
        row = self.row_of(actor_id)
        rows = np.array([row], dtype=np.int64)
        out = None
        if self._length[row] > 0:
            self._cols["reward"][row, self._length[row] - 1] = 0.0
            out = self._finish(rows, False, True, True)
        self._active[row] = False
        self._open[row] = False
        self._length[row] = 0
        self._ids[row] = -1
        del self._id_to_row[actor_id]
        self._free.append(row)
        self._invalidate()
        return out

    def rename(self, old: int, new: int) -> None:
        """Give an actor a new id; its trajectory continues under the new id."""
        row = self.row_of(old)
        if new in self._id_to_row:
            raise errors.DuplicateActorError(f"new_id: expected an unused id, got {new}")
        del self._id_to_row[old]
        self._id_to_row[new] = row
        self._ids[row] = new
        self._invalidate()

    def row_of(self, actor_id: int) -> int:
        """Row of one actor."""
        try:
            return self._id_to_row[actor_id]
        except KeyError:
            raise errors.UnknownActorError([actor_id]) from None

    def _invalidate(self) -> None:
        ids = [i for i in self._id_to_row if 0 <= i < _DENSE_LIMIT]
        size = max(ids, default=-1) + 1
        dense = np.full(size, -1, dtype=np.int64)
        if ids:
            dense[np.asarray(ids, dtype=np.int64)] = [self._id_to_row[i] for i in ids]
        self._dense = dense
        self._last_key = b"\xff"  # no id array serialises to one byte
        self._last_rows = np.zeros(0, dtype=np.int64)

    def rows_for(self, ids: IntArray) -> IntArray:
        """Rows of these actor ids (validated: known and unique).

        Ids below `_DENSE_LIMIT` resolve through a dense id -> row array (one gather);
        others through the dict. Duplicates are found with a bincount over rows.
        """
        key = ids.tobytes()
        if key == self._last_key:
            return self._last_rows
        dense = self._dense
        if len(ids) and int(ids.min()) >= 0 and int(ids.max()) < len(dense):
            rows = dense[ids]
            if (rows < 0).any():
                unknown = ids[rows < 0].tolist()
                raise errors.UnknownActorError(unknown)
        else:
            lookup = self._id_to_row
            try:
                rows = np.fromiter(
                    (lookup[i] for i in ids.tolist()), dtype=np.int64, count=len(ids)
                )
            except KeyError:
                unknown = [i for i in ids.tolist() if i not in lookup]
                raise errors.UnknownActorError(unknown) from None
        if len(rows) > 1 and np.bincount(rows).max() > 1:
            raise errors.InvalidArgumentError.mismatch(
                "actor_ids", "each actor at most once per request", ids.tolist()
            )
        self._last_key = key
        self._last_rows = rows
        return rows

    # -------------------------------------------------------------------- steps

    def record(
        self, rows: IntArray, step: StepRecord, reward: npt.NDArray[np.float64] | float
    ) -> trajectory.Steps | None:
        """Record one step for each row; returns trajectories cut at the max length."""
        # The hot path: each line is one vectorised numpy call over the request's rows.
        length = self._length
        cols = self._cols
        prev = length[rows]
        lo = int(prev.min()) if len(prev) else 0
        hi = int(prev.max()) if len(prev) else 0
        if lo > 0:
            cols["reward"][rows, prev - 1] = reward
        elif hi > 0:
            pending = prev > 0
            r = reward[pending] if isinstance(reward, np.ndarray) else reward
            cols["reward"][rows[pending], prev[pending] - 1] = r
        cut = None
        if hi >= self.max_length:
            full = prev >= self.max_length
            fr = rows[full]
            cut = self._finish(fr, False, True, True)
            self._step0[fr] += prev[full]
            self._segment[fr] += 1
            length[fr] = 0
            prev = length[rows]
            hi = int(prev.max())
        if lo == 0:
            fresh = ~self._open[rows]
            if fresh.any():
                nr = rows[fresh]
                count = len(nr)
                self._episode[nr] = self._episode_base + self._next_episode + np.arange(count)
                self._next_episode += count
                self._open[nr] = True
                self._segment[nr] = 0
                self._step0[nr] = 0
        if hi >= self._alloc_h:
            self._grow_horizon(hi + 1)
            # Growing reallocates every array: re-read them, or the writes below are lost.
            cols = self._cols
            length = self._length
        cols["obs"][rows, prev] = step.obs
        cols["action"][rows, prev] = step.action
        if step.mask is not None:
            cols["mask"][rows, prev] = step.mask
            self._masked = True
        elif self._masked:
            cols["mask"][rows, prev] = True
        cols["stamps"][rows, prev] = (step.version, step.obs_time_us, step.action_time_us)
        for aux in self.layout.aux:
            cols[f"aux_{aux.name}"][rows, prev] = step.aux[aux.name]
        length[rows] = prev + 1
        return cut

    def flag_last(
        self,
        rows: IntArray,
        reward: npt.NDArray[np.float64] | float,
        terminated: BoolArray,
        truncated: BoolArray,
    ) -> trajectory.Steps | None:
        """End the episodes of these rows; rows without a recorded step are ignored."""
        prev = self._length[rows]
        has = prev > 0
        if not has.any():
            return None
        if not has.all():
            rows, prev = rows[has], prev[has]
            terminated, truncated = terminated[has], truncated[has]
            if isinstance(reward, np.ndarray):
                reward = reward[has]
        self._cols["reward"][rows, prev - 1] = reward
        out = self._finish(rows, terminated, truncated, False)
        self._length[rows] = 0
        self._open[rows] = False
        return out

    def flush(self) -> trajectory.Steps | None:
        """Cut every in-progress trajectory (at shutdown); episodes end here."""
        rows = np.flatnonzero(self._active[: self._rows] & (self._length[: self._rows] > 0))
        if len(rows) == 0:
            return None
        rows = rows.astype(np.int64)
        self._cols["reward"][rows, self._length[rows] - 1] = 0.0
        out = self._finish(rows, False, True, True)
        self._length[rows] = 0
        self._open[rows] = False
        return out

    def _finish(
        self,
        rows: IntArray,
        terminated: BoolArray | bool,
        truncated: BoolArray | bool,
        cut: bool,
    ) -> trajectory.Steps:
        """Gather the trajectories of these rows into `Steps` (copies)."""
        lengths = self._length[rows]
        total = int(lengths.sum())
        ends = np.cumsum(lengths)
        starts = ends - lengths
        rr = np.repeat(rows, lengths)
        tt = np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)
        last = ends - 1
        term = np.zeros(total, dtype=np.bool_)
        trunc = np.zeros(total, dtype=np.bool_)
        cuts = np.zeros(total, dtype=np.bool_)
        term[last] = terminated
        trunc[last] = truncated
        cuts[last] = cut
        cols = self._cols
        stamps = cols["stamps"][rr, tt]
        return trajectory.Steps(
            actor_id=self._ids[rr],
            episode_id=self._episode[rr],
            segment=self._segment[rr],
            step=self._step0[rr] + tt,
            obs=cols["obs"][rr, tt],
            action=cols["action"][rr, tt],
            mask=cols["mask"][rr, tt] if self.layout.discrete else None,
            reward=cols["reward"][rr, tt],
            terminated=term,
            truncated=trunc,
            cut=cuts,
            policy_version=stamps[:, 0],
            obs_time=stamps[:, 1],
            action_time=stamps[:, 2],
            aux={a.name: cols[f"aux_{a.name}"][rr, tt] for a in self.layout.aux},
            trajectories=len(rows),
        )

    def in_progress_steps(self) -> int:
        """Steps recorded but not yet part of a finished trajectory."""
        return int(self._length[: self._rows].sum())
