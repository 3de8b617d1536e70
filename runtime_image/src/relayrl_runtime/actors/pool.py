"""The actor pool: actor ids, per-actor state and trajectory buffers.

Owned by `agent.Agent`, which calls it under its lock. Each actor is a row. Every step
is one record of a structured numpy dtype (obs, action, reward, stamps, mask, aux) in a
flat buffer where row r owns the slots `r*stride .. r*stride + horizon`: slot 0 of a
row is scratch and step t of its trajectory sits in slot t+1. `_pos[r]` is the slot of
the row's last step (the scratch slot when it has none), so recording a step for N
actors is a handful of vectorised writes with one flat index and no branches (the
reward of the previous action goes to slot `_pos`, harmlessly the scratch slot for an
actor that has no step yet), and a finished trajectory is one gather of whole records.
Horizon grows (doubling) up to the trajectory max length.

What leaves the pool is a `Chunk`: the gathered records plus per-trajectory ids and end
flags. Expanding it into the per-row `trajectory.Steps` is left to the router threads,
off the request path.

Reward semantics follow RelayRL: the reward passed with a request belongs to the
actor's previous action; `flag_last_action` gives the last action's reward and ends the
episode. A trajectory that reaches the max length is cut (marked `truncated` and `cut`)
when the next step arrives, and the episode continues in a new segment. An actor's next
episode id is drawn when its previous episode ends (or when it is added).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from relayrl_runtime import errors, trajectory

_INITIAL_ROWS = 8
_INITIAL_HORIZON = 64
# Actor ids within this of the smallest one resolve to rows through a dense array (8
# bytes per id); a remote endpoint's ids start high (pod_index << 32).
_DENSE_LIMIT = 1 << 20
# Id arrays remembered by `rows_for` (drivers send the same full id array every step,
# remote clients their own few ids), least recently used forgotten first.
_LOOKUP_CACHE = 64
# Id arrays this short are looked up with Python lists (fewer numpy calls).
_SMALL = 16

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


def record_dtype(layout: trajectory.Layout) -> np.dtype[np.void]:
    """The structured dtype of one recorded step."""
    fields: list[tuple[str, Any, tuple[int, ...]]] = [
        ("obs", np.dtype(layout.obs_dtype), layout.obs_shape),
        (
            "action",
            np.dtype(np.int64) if layout.discrete else np.dtype(np.float32),
            () if layout.discrete else (layout.action_size,),
        ),
        ("reward", np.dtype(np.float64), ()),
        # policy version, obs time, action time: one write per request for all three.
        ("stamps", np.dtype(np.int64), (3,)),
    ]
    if layout.discrete:
        fields.append(("mask", np.dtype(np.bool_), (layout.action_size,)))
    for aux in layout.aux:
        fields.append((f"aux_{aux.name}", np.dtype(aux.dtype), aux.shape))
    return np.dtype([(name, dt, shape) if shape else (name, dt) for name, dt, shape in fields])


@dataclasses.dataclass(slots=True)
class Chunk:
    """Whole trajectories as they leave the pool: records plus per-trajectory data.

    `records` holds the steps of every trajectory, trajectory after trajectory, each in
    step order; the other arrays have one entry per trajectory.
    """

    records: npt.NDArray[np.void]
    lengths: IntArray
    actor_id: IntArray
    episode_id: IntArray
    segment: npt.NDArray[np.int32]
    step0: IntArray
    terminated: BoolArray
    truncated: BoolArray
    cut: BoolArray

    @property
    def rows(self) -> int:
        """Number of steps."""
        return int(self.records.shape[0])

    @property
    def trajectories(self) -> int:
        """Number of trajectories."""
        return int(self.lengths.shape[0])

    @property
    def nbytes(self) -> int:
        """Memory the chunk holds: its steps (the per-trajectory arrays are small)."""
        return int(self.records.nbytes) + 64 * self.trajectories

    def to_steps(self, layout: trajectory.Layout) -> trajectory.Steps:
        """The per-row columns (what routers encode)."""
        lengths = self.lengths
        total = self.rows
        ends = np.cumsum(lengths)
        starts = ends - lengths
        rr = np.repeat(np.arange(len(lengths)), lengths)
        tt = np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)
        last = ends - 1
        flags = []
        for per_traj in (self.terminated, self.truncated, self.cut):
            flag = np.zeros(total, dtype=np.bool_)
            flag[last] = per_traj
            flags.append(flag)
        rec = self.records
        stamps = rec["stamps"]

        def col(name: str) -> npt.NDArray[Any]:
            return np.ascontiguousarray(rec[name])

        return trajectory.Steps(
            actor_id=self.actor_id[rr],
            episode_id=self.episode_id[rr],
            segment=self.segment[rr],
            step=self.step0[rr] + tt,
            obs=col("obs"),
            action=col("action"),
            mask=col("mask") if layout.discrete else None,
            reward=col("reward"),
            terminated=flags[0],
            truncated=flags[1],
            cut=flags[2],
            policy_version=np.ascontiguousarray(stamps[:, 0]),
            obs_time=np.ascontiguousarray(stamps[:, 1]),
            action_time=np.ascontiguousarray(stamps[:, 2]),
            aux={a.name: col(f"aux_{a.name}") for a in layout.aux},
            trajectories=len(lengths),
        )


def concat(chunks: list[Chunk]) -> Chunk:
    """Several chunks as one (one concatenation per field, whatever the count)."""
    if len(chunks) == 1:
        return chunks[0]

    def cat(name: str) -> npt.NDArray[Any]:
        return np.concatenate([getattr(c, name) for c in chunks])

    fields = {f.name: cat(f.name) for f in dataclasses.fields(Chunk) if f.name != "records"}
    dtype = chunks[0].records.dtype
    # As raw bytes: numpy concatenates structured arrays field by field.
    raw = np.concatenate([c.records.view(np.uint8) for c in chunks])
    return Chunk(records=raw.view(dtype), **fields)


def to_steps(layout: trajectory.Layout, chunks: list[Chunk]) -> trajectory.Steps:
    """Several chunks as one `Steps` (what a router encodes)."""
    return concat(chunks).to_steps(layout)


class ActorPool:
    """Actor rows plus their in-progress trajectories."""

    def __init__(
        self,
        layout: trajectory.Layout,
        max_length: int,
        run_prefix: int,
        on_resize: Callable[[int], None] | None = None,
    ) -> None:
        if max_length < 1:
            raise errors.InvalidArgumentError.mismatch("max_length", ">= 1", max_length)
        self.layout = layout
        self.max_length = max_length
        self._dtype = record_dtype(layout)
        self._aux_fields = tuple((a.name, f"aux_{a.name}") for a in layout.aux)
        self._episode_base = (run_prefix & 0x7FFFFFFF) << 32
        self._next_episode = 0
        self._id_to_row: dict[int, int] = {}
        self._next_id = 0
        self._free: list[int] = []
        self._rows = 0
        self._capacity = 0
        self._horizon = 0
        self._stride = 1
        self._dense: IntArray | None = np.zeros(0, dtype=np.int64)  # None: to rebuild
        self._dense_base = 0  # the actor id of the dense array's first entry
        self._lookups: dict[bytes, IntArray] = {}
        self._bases: dict[int, tuple[IntArray, IntArray]] = {}
        self._stamps = np.zeros(3, dtype=np.int64)
        # Masks are only written once some request carried one (records start all True).
        self._masked = False
        self._ids: IntArray = np.zeros(0, dtype=np.int64)
        # When each row's actor was added (a counter): `actor_ids` lists in that order.
        self._born: IntArray = np.zeros(0, dtype=np.int64)
        self._next_born = 0
        self._active: BoolArray = np.zeros(0, dtype=np.bool_)
        self._pos: IntArray = np.zeros(0, dtype=np.int64)
        self._episode: IntArray = np.zeros(0, dtype=np.int64)
        self._segment: npt.NDArray[np.int32] = np.zeros(0, dtype=np.int32)
        self._step0: IntArray = np.zeros(0, dtype=np.int64)
        self._buf: npt.NDArray[np.void] = np.zeros(0, dtype=self._dtype)
        # Told the buffer's size in bytes at each (re)allocation, the first one included.
        self.on_resize = on_resize
        self._alloc(_INITIAL_ROWS, min(max_length, _INITIAL_HORIZON))

    @property
    def buffer_bytes(self) -> int:
        """Bytes held for the trajectories in progress (docs/process.md, "Memory")."""
        return int(self._buf.nbytes)

    # ------------------------------------------------------------------ storage

    def _alloc(self, rows: int, horizon: int) -> None:
        """(Re)allocate for `rows` rows of `horizon` steps, keeping every recorded step."""
        old_rows, old_stride = self._capacity, self._stride
        stride = horizon + 1
        buf = np.zeros(rows * stride, dtype=self._dtype)
        if "mask" in self._dtype.names:  # type: ignore[operator]
            buf["mask"] = True
        if old_rows:
            # Copied as raw bytes (numpy copies structured arrays field by field).
            item = self._dtype.itemsize
            keep = min(old_stride, stride) * item
            new_raw = buf.view(np.uint8).reshape(rows, stride * item)
            old_raw = self._buf.view(np.uint8).reshape(old_rows, old_stride * item)
            new_raw[:old_rows, :keep] = old_raw[:, :keep]

        def grow(arr: npt.NDArray[Any], fill: Any) -> npt.NDArray[Any]:
            out = np.full(rows, fill, dtype=arr.dtype)
            out[:old_rows] = arr[:old_rows]
            return out

        # Everything is allocated before anything is replaced: a failed allocation
        # (MemoryError) leaves the pool as it was.
        pos = np.arange(rows, dtype=np.int64) * stride
        pos[:old_rows] += self._lengths_all()
        grown = (
            grow(self._ids, -1),
            grow(self._born, 0),
            grow(self._active, False),
            grow(self._episode, 0),
            grow(self._segment, 0),
            grow(self._step0, 0),
        )
        (self._ids, self._born, self._active, self._episode, self._segment, self._step0) = grown
        self._pos = pos
        self._buf = buf
        self._raw = buf.view(np.uint8).reshape(len(buf), self._dtype.itemsize)
        self._capacity = rows
        self._horizon = horizon
        self._stride = stride
        self._f_obs = buf["obs"]
        self._f_action = buf["action"]
        self._f_reward = buf["reward"]
        self._f_stamps = buf["stamps"]
        self._f_mask = buf["mask"] if self.layout.discrete else None
        self._f_aux = tuple((name, buf[field]) for name, field in self._aux_fields)
        self._lookups.clear()
        self._bases.clear()
        if self.on_resize is not None:
            self.on_resize(self.buffer_bytes)

    def _lengths_all(self) -> IntArray:
        rows = self._capacity
        return self._pos[:rows] - np.arange(rows, dtype=np.int64) * self._stride

    def _lengths(self, rows: IntArray) -> IntArray:
        lengths: IntArray = self._pos[rows] - rows * self._stride
        return lengths

    def _new_episodes(self, rows: IntArray) -> None:
        """Give these rows fresh episode ids (their next step starts the episode)."""
        count = len(rows)
        first = self._episode_base + self._next_episode
        self._episode[rows] = range(first, first + count)
        self._next_episode += count
        self._segment[rows] = 0
        self._step0[rows] = 0
        self._pos[rows] = rows * self._stride

    # ------------------------------------------------------------------- actors

    @property
    def actor_ids(self) -> list[int]:
        """Ids of all actors, in the order they were added (a renamed actor keeps its
        place): a row freed by a removal and taken by a new actor does not move the new
        one ahead of older ones."""
        rows = np.flatnonzero(self._active[: self._rows])
        rows = rows[np.argsort(self._born[rows], kind="stable")]
        return [int(i) for i in self._ids[rows]]

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
        # Room for all of them first (one allocation, which may fail with nothing added).
        needed = self._rows + max(0, len(ids) - len(self._free))
        if needed > self._capacity:
            capacity = self._capacity
            while capacity < needed:
                capacity *= 2
            self._alloc(capacity, self._horizon)
        rows = []
        for actor_id in ids:
            if self._free:
                row = self._free.pop()
            else:
                row = self._rows
                self._rows += 1
            self._ids[row] = actor_id
            self._born[row] = self._next_born
            self._next_born += 1
            self._active[row] = True
            self._id_to_row[actor_id] = row
            self._next_id = max(self._next_id, actor_id + 1)
            rows.append(row)
        self._new_episodes(np.asarray(rows, dtype=np.int64))
        self._invalidate()
        return rows

    def remove(self, actor_id: int) -> Chunk | None:
        """Remove an actor; its partial trajectory (if any) is returned, cut."""
        row = self.row_of(actor_id)
        rows = np.array([row], dtype=np.int64)
        out = None
        lengths = self._lengths(rows)
        if lengths[0] > 0:
            self._f_reward[self._pos[row]] = 0.0
            out = self._finish(rows, lengths, False, True, True)
        self._new_episodes(rows)
        self._active[row] = False
        self._ids[row] = -1
        del self._id_to_row[actor_id]
        self._free.append(row)
        self._invalidate()
        return out

    def rename(self, old: int, new: int) -> None:
        """Give an actor a new id; its trajectory continues under the new id. Ids are
        not recycled: the new id counts as used, as the old one stays used."""
        row = self.row_of(old)
        if new in self._id_to_row:
            raise errors.DuplicateActorError(f"new_id: expected an unused id, got {new}")
        del self._id_to_row[old]
        self._id_to_row[new] = row
        self._ids[row] = new
        self._next_id = max(self._next_id, new + 1)
        self._invalidate()

    def row_of(self, actor_id: int) -> int:
        """Row of one actor."""
        try:
            return self._id_to_row[actor_id]
        except KeyError:
            raise errors.UnknownActorError([actor_id]) from None

    def _invalidate(self) -> None:
        # The dense table is rebuilt at the next lookup, not here: removing actors one
        # by one (a client gone idle) would rebuild it from every id each time.
        self._dense = None
        self._lookups.clear()
        self._bases.clear()

    def _dense_rows(self) -> tuple[int, IntArray]:
        """The dense table and the actor id of its first entry."""
        dense = self._dense
        if dense is None:
            base = min(self._id_to_row, default=0)
            ids = [i for i in self._id_to_row if base <= i < base + _DENSE_LIMIT]
            size = max(ids, default=base - 1) - base + 1
            dense = np.full(size, -1, dtype=np.int64)
            if ids:
                dense[np.asarray(ids, dtype=np.int64) - base] = [self._id_to_row[i] for i in ids]
            self._dense, self._dense_base = dense, base
        return self._dense_base, dense

    def rows_for(self, ids: IntArray) -> IntArray:
        """Rows of these actor ids (validated: known and unique).

        Drivers send the same few id arrays again and again: those are remembered by
        their bytes. Otherwise ids within `_DENSE_LIMIT` of the smallest resolve through
        a dense id -> row array (one gather), others through the dict, and duplicates are
        found with a bincount over rows.
        """
        key = ids.tobytes()
        rows = self._lookups.pop(key, None)
        if rows is not None:
            self._lookups[key] = rows  # most recently used last
            return rows
        base, dense = self._dense_rows()
        n = len(ids)
        if n <= _SMALL:
            # A few ids (an episode end): plain Python beats several numpy calls.
            listed = ids.tolist()
            if listed and min(listed) >= base and max(listed) < base + len(dense):
                rows = dense[ids - base if base else ids]
                found = rows.tolist()
                if min(found) < 0:
                    raise errors.UnknownActorError(
                        [i for i, r in zip(listed, found, strict=True) if r < 0]
                    )
                if len(set(found)) != n:
                    raise errors.InvalidArgumentError.mismatch(
                        "actor_ids", "each actor at most once per request", listed
                    )
                return self._remember(key, rows)
        if n and int(ids.min()) >= base and int(ids.max()) < base + len(dense):
            rows = dense[ids - base if base else ids]
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
        return self._remember(key, rows)

    def _remember(self, key: bytes, rows: IntArray) -> IntArray:
        if len(self._lookups) >= _LOOKUP_CACHE:
            # Forget the least recently used (dicts keep insertion order).
            oldest = next(iter(self._lookups))
            self._bases.pop(id(self._lookups.pop(oldest)), None)
        self._lookups[key] = rows
        return rows

    # -------------------------------------------------------------------- steps

    def record(
        self,
        rows: IntArray,
        obs: npt.NDArray[Any],
        action: npt.NDArray[Any],
        mask: BoolArray | None,
        aux: Mapping[str, npt.NDArray[Any]],
        stamps: tuple[int, int, int],
        reward: npt.NDArray[np.float64] | float,
    ) -> Chunk | None:
        """Record one step for each row; returns trajectories cut at the max length."""
        # The hot path: each line is one vectorised numpy call over the request's rows.
        if len(rows) == 1:
            return self._record_one(int(rows[0]), obs, action, mask, aux, stamps, reward)
        pos = self._pos
        idx = pos[rows]
        # The reward of each row's previous action (the scratch slot if it has none).
        self._f_reward[idx] = reward
        if not len(rows):
            return None
        # The rows' first slots, remembered with the rows (until a reallocation).
        base = self._bases.get(id(rows))
        if base is None or base[0] is not rows:
            base = self._bases[id(rows)] = (rows, rows * self._stride)
        prev = idx - base[1]
        hi = int(prev.max())
        cut = None
        if hi >= self.max_length:
            full = prev >= self.max_length
            fr = rows[full]
            cut = self._finish(fr, prev[full], False, True, True)
            self._step0[fr] += prev[full]
            self._segment[fr] += 1
            pos[fr] = fr * self._stride
            idx = pos[rows]
            hi = int((idx - rows * self._stride).max())
        if hi >= self._horizon:
            horizon = self._horizon
            while horizon <= hi:
                horizon = min(self.max_length, horizon * 2)
            # Growing reallocates every array: re-read them, or the writes are lost.
            self._alloc(self._capacity, horizon)
            pos = self._pos
            idx = pos[rows]
        idx += 1
        self._f_obs[idx] = obs
        self._f_action[idx] = action
        if mask is not None:
            self._f_mask[idx] = mask  # type: ignore[index]
            self._masked = True
        elif self._masked:
            self._f_mask[idx] = True  # type: ignore[index]
        scratch = self._stamps
        scratch[0], scratch[1], scratch[2] = stamps
        self._f_stamps[idx] = scratch
        for name, field in self._f_aux:
            field[idx] = aux[name]
        pos[rows] = idx
        return cut

    def _record_one(
        self,
        row: int,
        obs: npt.NDArray[Any],
        action: npt.NDArray[Any],
        mask: BoolArray | None,
        aux: Mapping[str, npt.NDArray[Any]],
        stamps: tuple[int, int, int],
        reward: npt.NDArray[np.float64] | float,
    ) -> Chunk | None:
        """`record` for one row: scalar indexing instead of fancy indexing."""
        slot: int = self._pos.item(row)
        self._f_reward[slot] = reward[0] if isinstance(reward, np.ndarray) else reward
        length = slot - row * self._stride
        cut = None
        if length >= self.max_length:
            rows = np.array([row], dtype=np.int64)
            cut = self._finish(rows, np.array([length], dtype=np.int64), False, True, True)
            self._step0[row] += length
            self._segment[row] += 1
            slot = row * self._stride
            self._pos[row] = slot
            length = 0
        if length >= self._horizon:
            self._alloc(self._capacity, min(self.max_length, self._horizon * 2))
            slot = int(self._pos[row])
        slot += 1
        # Whole (1, ...) arrays into one slot (numpy drops the leading 1): no row views.
        self._f_obs[slot] = obs
        self._f_action[slot] = action.item(0) if self.layout.discrete else action
        if mask is not None:
            self._f_mask[slot] = mask[0]  # type: ignore[index]
            self._masked = True
        elif self._masked:
            self._f_mask[slot] = True  # type: ignore[index]
        stamp = self._f_stamps
        stamp[slot, 0], stamp[slot, 1], stamp[slot, 2] = stamps
        for name, field in self._f_aux:
            field[slot] = aux[name]
        self._pos[row] = slot
        return cut

    def flag_last(
        self,
        rows: IntArray,
        reward: npt.NDArray[np.float64] | float,
        terminated: BoolArray,
        truncated: BoolArray,
        cut: bool = False,
    ) -> Chunk | None:
        """End the episodes of these rows; rows without a recorded step are ignored.

        `cut` marks the trajectories as cut by the runtime (not by the environment).
        """
        if len(rows) <= _SMALL:
            rewards = reward.tolist() if isinstance(reward, np.ndarray) else [reward] * len(rows)
            return self._flag_small(
                rows.tolist(), rewards, terminated.tolist(), truncated.tolist(), cut
            )
        pos = self._pos[rows]
        prev = pos - rows * self._stride
        if not prev.all():
            has = prev > 0
            if not has.any():
                return None
            rows, prev, pos = rows[has], prev[has], pos[has]
            terminated, truncated = terminated[has], truncated[has]
            if isinstance(reward, np.ndarray):
                reward = reward[has]
        self._f_reward[pos] = reward
        out = self._finish(rows, prev, terminated, truncated, cut)
        self._new_episodes(rows)
        return out

    def _flag_small(
        self,
        rows: list[int],
        rewards: list[float],
        terminated: list[bool],
        truncated: list[bool],
        cut: bool,
    ) -> Chunk | None:
        """`flag_last` for a few rows (an episode end or two per step): Python scalars
        and one copy, instead of two dozen numpy calls on tiny arrays."""
        stride, pos, raw = self._stride, self._pos, self._raw
        ids, episode, segment, step0 = self._ids, self._episode, self._segment, self._step0
        reward_field = self._f_reward
        parts: list[npt.NDArray[np.uint8]] = []
        meta: list[tuple[int, int, int, int, int]] = []
        flags: list[tuple[bool, bool]] = []
        next_episode = self._episode_base + self._next_episode
        for row, reward, term, trunc in zip(rows, rewards, terminated, truncated, strict=True):
            base = row * stride
            last = pos.item(row)
            if last == base:
                continue  # no recorded step
            reward_field[last] = reward
            parts.append(raw[base + 1 : last + 1])
            meta.append(
                (last - base, ids.item(row), episode.item(row), segment.item(row),
                 step0.item(row))
            )  # fmt: skip
            flags.append((term, trunc))
            episode[row] = next_episode
            next_episode += 1
            segment[row] = 0
            step0[row] = 0
            pos[row] = base
        if not meta:
            return None
        self._next_episode = next_episode - self._episode_base
        records = np.concatenate(parts) if len(parts) > 1 else parts[0].copy()
        # Two conversions for all the per-trajectory values; the chunk holds columns.
        m = np.array(meta, dtype=np.int64)
        f = np.array(flags, dtype=np.bool_)
        return Chunk(
            records=records.view(self._dtype).reshape(-1),
            lengths=m[:, 0],
            actor_id=m[:, 1],
            episode_id=m[:, 2],
            segment=m[:, 3],  # type: ignore[arg-type]
            step0=m[:, 4],
            terminated=f[:, 0],
            truncated=f[:, 1],
            cut=np.ones(len(meta), np.bool_) if cut else np.zeros(len(meta), np.bool_),
        )

    def drop_last(self, rows: IntArray) -> None:
        """Forget the last recorded step of these rows (none for a row without one)."""
        base = rows * self._stride
        self._pos[rows] = np.maximum(self._pos[rows] - 1, base)

    def flush(self) -> Chunk | None:
        """Cut every in-progress trajectory (at shutdown); episodes end here."""
        lengths = self._lengths_all()[: self._rows]
        rows = np.flatnonzero(self._active[: self._rows] & (lengths > 0)).astype(np.int64)
        if len(rows) == 0:
            return None
        self._f_reward[self._pos[rows]] = 0.0
        out = self._finish(rows, lengths[rows], False, True, True)
        self._new_episodes(rows)
        return out

    def _finish(
        self,
        rows: IntArray,
        lengths: IntArray,
        terminated: BoolArray | bool,
        truncated: BoolArray | bool,
        cut: bool,
    ) -> Chunk:
        """Gather the trajectories of these rows (copies of their records)."""
        k = len(rows)
        # Slots rows*stride + 1 .. rows*stride + length, trajectory after trajectory.
        # Records are copied as raw bytes: numpy copies structured arrays field by field.
        raw = self._raw
        if k <= _SMALL:
            stride = self._stride
            listed = lengths.tolist()
            out = np.empty((sum(listed), raw.shape[1]), dtype=np.uint8)
            at = 0
            for r, n in zip(rows.tolist(), listed, strict=True):
                out[at : at + n] = raw[r * stride + 1 : r * stride + 1 + n]
                at += n
        else:
            starts = np.cumsum(lengths) - lengths
            first = rows * self._stride + 1 - starts
            slots = np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(first, lengths)
            out = raw.take(slots, axis=0)
        records = out.view(self._dtype).reshape(-1)
        return Chunk(
            records=records,
            lengths=lengths,
            actor_id=self._ids[rows],
            episode_id=self._episode[rows],
            segment=self._segment[rows],
            step0=self._step0[rows],
            terminated=_flags(terminated, k),
            truncated=_flags(truncated, k),
            cut=_flags(cut, k),
        )

    def in_progress_steps(self) -> int:
        """Steps recorded but not yet part of a finished trajectory."""
        lengths = self._lengths_all()[: self._rows]
        return int(lengths[self._active[: self._rows]].sum())


def _flags(value: BoolArray | bool, k: int) -> BoolArray:
    # A copy: the caller's array may change after the chunk is made.
    if isinstance(value, np.ndarray):
        return np.array(value, dtype=np.bool_)
    return np.full(k, value, dtype=np.bool_)
