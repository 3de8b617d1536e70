"""The policy head: one forward pass per batch, then actions, log-probs and aux outputs.

Wraps a `backend.Backend` with its `model.ModelMetadata`. Discrete actions take the
argmax of (masked) logits or sample from them with the Gumbel-max trick; continuous
actions are the mean or a Gaussian sample around it. Everything is vectorised over the
batch: this is the agent's hot path. A small discrete batch (a remote client's actor or
two, at most `_SMALL_LOGP` logits) is instead chosen in one pass over the logits as
Python floats, which also gives the log-probabilities: a dozen numpy calls on tiny
arrays cost more than the arithmetic. Both use the same Gumbel noise, so a seeded
sampler acts the same either way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from relayrl_runtime import errors
from relayrl_runtime.inference import backend as backend_mod
from relayrl_runtime.inference import model

_LOG_2PI = math.log(2.0 * math.pi)


class PolicyOutput:
    """What one forward pass gives for a batch of n rows.

    A plain slotted class (made once per request, so its constructor is kept cheap).
    `logp` is the log-probability of each action when choosing it gave it for free (a
    small discrete batch), else None (see `log_prob`).
    """

    __slots__ = ("actions", "logp", "mask", "outputs", "version")

    def __init__(
        self,
        actions: npt.NDArray[np.generic],
        outputs: Mapping[str, npt.NDArray[np.generic]],
        mask: npt.NDArray[np.bool_] | None,
        version: int,
        logp: npt.NDArray[np.float32] | None = None,
    ) -> None:
        self.actions = actions  # int64 (n,) discrete, float32 (n, size) continuous
        self.outputs = outputs  # every model output by name
        self.mask = mask
        self.version = version
        self.logp = logp


class Policy:
    """A loaded, validated model ready to act."""

    def __init__(
        self,
        backend: backend_mod.Backend,
        metadata: model.ModelMetadata,
        source: str,
        graph: bytes | None = None,
    ) -> None:
        self.backend = backend
        self.metadata = metadata
        self.source = source
        # The graph file's bytes as loaded, when kept: copies (independent mode) are made
        # from them, not from the file, which may have been rewritten since.
        self.graph = graph
        self.version = metadata.version
        self._obs_shape = metadata.input.item_shape
        self._obs_dtype = np.dtype(metadata.input.dtype)
        names = [o.name for o in metadata.outputs]
        self._head = names.index(metadata.action.output)
        self._log_std = (
            names.index(metadata.action.log_std_output)
            if metadata.action.log_std_output is not None
            else None
        )
        self._names = tuple(names)
        self._discrete = metadata.action.kind is model.ActionKind.DISCRETE
        self._size = metadata.action.size

    @property
    def obs_shape(self) -> tuple[int, ...]:
        """Shape of one observation."""
        return self._obs_shape

    @property
    def obs_dtype(self) -> np.dtype[np.generic]:
        """Dtype observations must have."""
        return self._obs_dtype

    def check_obs(self, obs: npt.NDArray[np.generic], rows: int) -> npt.NDArray[np.generic]:
        """`obs` as `rows` observations of the model's kind; `InvalidArgumentError` unless
        it is one (a nested list of numbers is taken, as an array of the model's dtype)."""
        expected = (rows, *self._obs_shape)
        if type(obs) is not np.ndarray:
            try:
                obs = np.asarray(obs, dtype=self._obs_dtype)
            except (TypeError, ValueError) as err:
                raise errors.InvalidArgumentError.mismatch(
                    "obs", f"an array of shape {list(expected)}", f"{type(obs).__name__} ({err})"
                ) from None
        if obs.shape != expected:
            raise errors.InvalidArgumentError.mismatch("obs.shape", list(expected), list(obs.shape))
        if obs.dtype != self._obs_dtype:
            raise errors.InvalidArgumentError.mismatch("obs.dtype", self._obs_dtype, obs.dtype)
        return obs

    def check_mask(self, mask: npt.NDArray[np.generic], rows: int) -> npt.NDArray[np.bool_]:
        """Validate an action mask; returns it as bool."""
        if not self._discrete:
            raise errors.InvalidArgumentError.mismatch(
                "mask", "None for continuous actions", f"an array of shape {list(mask.shape)}"
            )
        expected = (rows, self._size)
        if mask.shape != expected:
            raise errors.InvalidArgumentError.mismatch(
                "mask.shape", list(expected), list(mask.shape)
            )
        as_bool = mask.astype(np.bool_, copy=False)
        if rows and not as_bool.any(axis=1).all():
            empty = np.flatnonzero(~as_bool.any(axis=1)).tolist()
            raise errors.InvalidArgumentError.mismatch(
                "mask", "at least one allowed action per row", f"none allowed in rows {empty}"
            )
        return as_bool

    def act(
        self,
        obs: npt.NDArray[np.generic],
        mask: npt.NDArray[np.bool_] | None,
        rng: np.random.Generator,
        sample: bool,
    ) -> PolicyOutput:
        """One forward pass for the batch; obs and mask are already validated."""
        n = obs.shape[0]
        try:
            outputs = self.backend.run(obs)
        except errors.RelayRLError:
            raise
        except Exception as err:  # the backend's own types (onnxruntime, torch)
            raise errors.ModelRunError(
                f"model version {self.version} ({self.source}): the forward pass of"
                f" {n} rows failed: {type(err).__name__}: {err}"
            ) from err
        head = outputs[self._head]
        if head.shape != (n, self._size):
            raise errors.ModelRunError(
                f"model version {self.version} ({self.source}):"
                f" outputs.{self.metadata.action.output}: expected shape {[n, self._size]},"
                f" got {list(head.shape)}"
            )
        named = dict(zip(self._names, outputs, strict=True))
        if self._discrete:
            if head.size <= _SMALL_LOGP:
                small = _discrete_small(head, mask, rng, sample)
                if small is not None:
                    return PolicyOutput(small[0], named, mask, self.version, small[1])
                # Non-finite logits: the vectorised code below decides (with new noise).
            actions: npt.NDArray[Any] = _discrete(head, mask, rng, sample)
        else:
            spec = self.metadata.action
            actions = head.astype(np.float32, copy=True)
            if sample:
                log_std: npt.NDArray[Any] | float = (
                    outputs[self._log_std] if self._log_std is not None else spec.log_std
                )
                noise = rng.standard_normal(actions.shape, dtype=np.float32)
                actions += np.exp(log_std, dtype=np.float32) * noise
            if spec.low is not None or spec.high is not None:
                np.clip(actions, spec.low, spec.high, out=actions)
        return PolicyOutput(actions, named, mask, self.version)

    def close(self) -> None:
        """Release the backend."""
        self.backend.close()


def _discrete(
    logits: npt.NDArray[np.generic],
    mask: npt.NDArray[np.bool_] | None,
    rng: np.random.Generator,
    sample: bool,
) -> npt.NDArray[np.int64]:
    # A handful of numpy calls: this runs once per request on the hot path. The
    # log-probability is computed later, off the hot path (`log_prob`).
    z: npt.NDArray[Any] = logits
    if mask is not None:
        z = np.where(mask, z, -np.inf)
    chosen: npt.NDArray[np.int64]
    if not sample:
        chosen = np.asarray(np.argmax(z, axis=1), dtype=np.int64)
    else:
        # Gumbel-max: argmax(z - log(-log(U))) is a sample from softmax(z).
        g = _gumbel(rng, z.size).reshape(z.shape)
        chosen = (z - g).argmax(axis=1)
    if mask is not None:
        ok = np.take_along_axis(mask, chosen[:, None], axis=1)[:, 0]
        if not ok.all():
            # Every allowed logit -inf (the model masks too, and disagrees): argmax
            # lands on index 0, allowed or not. An allowed action instead: the first,
            # or one at random when sampling (its log-probability stays -inf).
            for row in np.flatnonzero(~ok):
                allowed = np.flatnonzero(mask[row])
                chosen[row] = allowed[rng.integers(len(allowed))] if sample else allowed[0]
    return chosen


def _discrete_small(
    logits: npt.NDArray[Any],
    mask: npt.NDArray[np.bool_] | None,
    rng: np.random.Generator,
    sample: bool,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]] | None:
    """`_discrete` plus `log_prob` for a few logits, in one pass over Python floats.

    Per row: the argmax of the allowed `z - log(-log(U))` (the same noise `_discrete`
    draws, in the same order; first index on ties) and a running log-sum-exp of the
    allowed logits. Returns None when a row's logits are not all finite (NaN or inf
    give NaN here), leaving those to the vectorised code.
    """
    rows: list[list[float]] = logits.tolist()
    allowed: list[list[bool]] | None = None if mask is None else mask.tolist()
    noise: list[float] | None = None
    if sample:
        if isinstance(rng, Sampler):
            noise = rng.log_neg_log_list(logits.size)
        else:
            noise = _log_neg_log(rng, logits.size).tolist()
    exp, inf = math.exp, math.inf
    actions: list[int] = []
    logps: list[float] = []
    k = 0
    for i, row in enumerate(rows):
        ok = None if allowed is None else allowed[i]
        best = top = -inf
        total = 0.0  # sum of exp(v - top) over the allowed logits so far
        choice = -1
        for j, v in enumerate(row):
            if ok is not None and not ok[j]:
                continue
            score = v if noise is None else v - noise[k + j]
            if score > best:
                best, choice = score, j
            if v > top:
                total = total * exp(top - v) + 1.0
                top = v
            else:
                total += exp(v - top)
        k += len(row)
        lse = top + math.log(total) if total > 0.0 else math.nan
        if choice < 0 or not math.isfinite(lse):
            return None
        actions.append(choice)
        logps.append(row[choice] - lse)
    return np.array(actions, dtype=np.int64), np.array(logps, dtype=np.float32)


class Sampler(np.random.Generator):
    """The random generator agents act with: draws Gumbel noise in blocks.

    `log(-log(U))` (ready to subtract from logits) is computed for a block of values at
    once and handed out in slices, so a request pays one slice instead of five numpy
    calls on fresh arrays. Seeded, it acts reproducibly. A plain `Generator` works too
    (each request then draws its own noise). Small batches take the same values as
    Python floats (`log_neg_log_list`), converted a window at a time.
    """

    _BLOCK = 1 << 16
    _WINDOW = 1 << 10

    def __init__(self, seed: int | None = None) -> None:
        super().__init__(np.random.PCG64(seed))
        self._noise: npt.NDArray[np.float32] = np.zeros(0, dtype=np.float32)
        self._next = 0
        # `_noise[_window_at : _window_at + len(_window)]` as Python floats.
        self._window: list[float] = []
        self._window_at = 0

    def _take(self, count: int) -> int:
        """Where the next `count` values start in `_noise` (drawing a block if needed)."""
        start = self._next
        if start + count > len(self._noise):
            self._noise = _log_neg_log(self, max(self._BLOCK, count))
            self._window, self._window_at = [], 0
            start = 0
        self._next = start + count
        return start

    def log_neg_log(self, count: int) -> npt.NDArray[np.float32]:
        """`count` values of log(-log(U)), U uniform on (0, 1)."""
        start = self._take(count)
        return self._noise[start : start + count]

    def log_neg_log_list(self, count: int) -> list[float]:
        """`log_neg_log(count)` as Python floats (the same values, in the same order)."""
        start = self._take(count)
        at = start - self._window_at
        if at < 0 or at + count > len(self._window):
            self._window = self._noise[start : start + max(count, self._WINDOW)].tolist()
            self._window_at, at = start, 0
        return self._window[at : at + count]


def _log_neg_log(rng: np.random.Generator, count: int) -> npt.NDArray[np.float32]:
    g = rng.random(count, dtype=np.float32)
    g += np.float32(1e-20)
    np.log(g, out=g)
    np.negative(g, out=g)
    np.log(g, out=g)
    return g


def _gumbel(rng: np.random.Generator, count: int) -> npt.NDArray[np.float32]:
    if isinstance(rng, Sampler):
        return rng.log_neg_log(count)
    return _log_neg_log(rng, count)


# At most this many logits: the log-softmax is done in Python (a remote client's one or
# two actors), cheaper than a dozen numpy calls.
_SMALL_LOGP = 64


def _discrete_log_prob_small(
    head: npt.NDArray[Any], actions: npt.NDArray[Any], mask: npt.NDArray[np.bool_] | None
) -> npt.NDArray[np.float32]:
    rows: list[list[float]] = head.tolist()
    allowed: list[list[bool]] | None = None if mask is None else mask.tolist()
    out = []
    for i, (row, a) in enumerate(zip(rows, actions.tolist(), strict=True)):
        values = (
            row if allowed is None else [v for v, ok in zip(row, allowed[i], strict=True) if ok]
        )
        top = max(values)
        lse = top + math.log(math.fsum(math.exp(v - top) for v in values))
        out.append(row[a] - lse if allowed is None or allowed[i][a] else -math.inf)
    return np.asarray(out, dtype=np.float32)


def log_prob(
    kind: model.ActionKind,
    head: npt.NDArray[Any],
    actions: npt.NDArray[Any],
    mask: npt.NDArray[np.bool_] | None = None,
    log_std: npt.NDArray[Any] | float = 0.0,
) -> npt.NDArray[np.float32]:
    """Log-probability of `actions` under the policy head's distribution, per row.

    Discrete: log-softmax of the (masked) logits at the action. Continuous: a diagonal
    Gaussian around the mean with `log_std` (per row or constant).
    """
    if len(head) == 0:
        return np.zeros(0, dtype=np.float32)
    if kind is model.ActionKind.DISCRETE and head.size <= _SMALL_LOGP:
        return _discrete_log_prob_small(head, actions, mask)
    if kind is model.ActionKind.DISCRETE:
        z = head.astype(np.float64)
        if mask is not None:
            z = np.where(mask, z, -np.inf)
        zmax = z.max(axis=1)
        lse = zmax + np.log(np.exp(z - zmax[:, None]).sum(axis=1))
        chosen = z[np.arange(len(z)), actions]
        out: npt.NDArray[np.float32] = (chosen - lse).astype(np.float32)
        return out
    mu = head.astype(np.float64)
    ls = np.broadcast_to(np.asarray(log_std, dtype=np.float64), mu.shape)
    a = np.asarray(actions, dtype=np.float64).reshape(mu.shape)
    zs = (a - mu) / np.exp(ls)
    logp: npt.NDArray[np.float32] = (
        (-0.5 * zs**2 - ls - 0.5 * _LOG_2PI).sum(axis=1).astype(np.float32)
    )
    return logp
