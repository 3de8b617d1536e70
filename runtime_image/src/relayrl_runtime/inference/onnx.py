"""ONNX backend on onnxruntime: what `loader` builds for `format: onnx`.

onnxruntime is an extra (`relayrl-runtime[onnx]`), imported when a model is loaded.
A cuda device needs the CUDAExecutionProvider; without it loading fails with
`DeviceUnavailableError` instead of running on the CPU behind the user's back.

Small CPU batches (a remote client's actor or two) run through an IOBinding over
preallocated input and output arrays, made once per batch shape: `InferenceSession.run`
converts the feed and allocates every output on each call, a third of the forward
pass at one row.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from relayrl_runtime import errors, spec

log = logging.getLogger(__name__)

# Batches of at most this many rows use a cached IOBinding (one per batch shape).
_BOUND_ROWS = 16

_PROVIDERS = {
    spec.Device.CPU: "CPUExecutionProvider",
    spec.Device.CUDA: "CUDAExecutionProvider",
}


class OnnxBackend:
    """An onnxruntime InferenceSession bound to one device."""

    def __init__(
        self,
        path: Path,
        device: spec.Device,
        output_names: Sequence[str],
        graph: bytes | None = None,
    ) -> None:
        """Load `path`, or the bytes `graph` read from it (named `path` in errors)."""
        try:
            import onnxruntime
        except ImportError as err:  # pragma: no cover - depends on the install
            raise errors.ModelLoadError(
                "format onnx: onnxruntime is not installed (pip install relayrl-runtime[onnx])"
            ) from err
        provider = _PROVIDERS[device]
        preload = getattr(onnxruntime, "preload_dlls", None)
        if device is spec.Device.CUDA and preload is not None:
            # onnxruntime-gpu finds the CUDA libraries of torch's nvidia-* wheels (the
            # cuda image's) only when they are loaded first.
            try:
                preload()
            except Exception as err:  # its own errors; loading below says what is missing
                log.warning("onnxruntime could not preload the CUDA libraries: %s", err)
        available = onnxruntime.get_available_providers()
        if provider not in available:
            raise errors.DeviceUnavailableError(
                f"device: expected {device.value} ({provider}) to be available, "
                f"got only {available}"
            )
        options = onnxruntime.SessionOptions()
        # One actor process per pod slice: keep onnxruntime from spinning a thread per core
        # (its default) which starves the env stepping that shares the cores.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        if graph is not None:
            # A graph loaded from bytes finds the files of its external data (weights kept
            # beside the graph, as models over 2 GB must) where it came from.
            options.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", str(path.parent)
            )
        try:
            self._session: Any = onnxruntime.InferenceSession(
                str(path) if graph is None else graph, sess_options=options, providers=[provider]
            )
        except Exception as err:  # onnxruntime raises its own untyped exceptions
            raise errors.ModelLoadError(f"{path}: not a loadable ONNX model: {err}") from err
        # Compiled in is not loaded: without its libraries onnxruntime falls back to
        # another provider, and a cuda Agent would run on the CPU without a word.
        running = self._session.get_providers()
        if not running or running[0] != provider:
            raise errors.DeviceUnavailableError(
                f"device: expected {device.value} ({provider}), onnxruntime runs {running}"
                " (its libraries did not load)"
            )
        self._device = device
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise errors.ModelMetadataError(
                f"{path}: inputs: expected 1 graph input, got {[i.name for i in inputs]}"
            )
        self._input_name: str = inputs[0].name
        self._input_shape = tuple(d if isinstance(d, int) else None for d in inputs[0].shape)
        self._graph_outputs = tuple(o.name for o in self._session.get_outputs())
        missing = [n for n in output_names if n not in self._graph_outputs]
        if missing:
            raise errors.ModelMetadataError(
                f"{path}: outputs: metadata names {list(output_names)}, "
                f"graph has {list(self._graph_outputs)}"
            )
        self._output_names = list(output_names)
        # InferenceSession.run re-validates every call what the policy has checked
        # already, and may fall back to another provider (never wanted here): the
        # request path calls the bound session underneath when this onnxruntime has it.
        inner = getattr(self._session, "_sess", None)
        self._run = inner.run if inner is not None and hasattr(inner, "run") else None
        # Small batches: an IOBinding per batch shape (None: that shape cannot be bound).
        # One caller at a time uses them (a non-blocking lock); others run unbound.
        self._bind = (
            getattr(inner, "run_with_iobinding", None) if device is spec.Device.CPU else None
        )
        self._bound: dict[tuple[int, ...], _Bound | None] = {}
        self._bound_lock = threading.Lock()

    @property
    def device(self) -> str:
        return self._device.value

    def input_signature(self) -> tuple[str, tuple[int | None, ...]] | None:
        return self._input_name, self._input_shape

    def output_names(self) -> tuple[str, ...] | None:
        return self._graph_outputs

    def run(self, obs: npt.NDArray[np.generic]) -> tuple[npt.NDArray[np.generic], ...]:
        if (
            self._bind is not None
            and obs.shape[0] <= _BOUND_ROWS
            and self._bound_lock.acquire(blocking=False)
        ):
            try:
                bound = self._bound.get(obs.shape)
                if bound is not None and bound.inp.dtype == obs.dtype:
                    try:
                        return bound.run(obs)
                    except Exception:  # e.g. outputs whose shape varies with the values
                        self._bind = None  # run unbound from now on (it raises if bad)
                elif obs.shape not in self._bound:
                    outputs = self._run_plain(obs)
                    self._bound[obs.shape] = self._make_bound(obs, outputs)
                    return outputs
            finally:
                self._bound_lock.release()
        return self._run_plain(obs)

    def _run_plain(self, obs: npt.NDArray[np.generic]) -> tuple[npt.NDArray[np.generic], ...]:
        feed = {self._input_name: obs}
        if self._run is not None:
            outputs = self._run(self._output_names, feed, None)
        else:
            outputs = self._session.run(self._output_names, feed)
        return tuple(outputs)

    def _make_bound(
        self, obs: npt.NDArray[np.generic], outputs: tuple[npt.NDArray[np.generic], ...]
    ) -> _Bound | None:
        """An IOBinding shaped like this call, or None when one cannot be made."""
        if len(self._bound) >= 2 * _BOUND_ROWS:
            return None
        try:
            return _Bound(
                self._session, self._bind, self._input_name, obs, self._output_names, outputs
            )
        except Exception:  # outputs that are not tensors, an onnxruntime without it
            return None

    def close(self) -> None:
        with self._bound_lock:
            self._bound.clear()
            self._bind = None
        self._session = None
        self._run = None


class _Bound:
    """Preallocated input and outputs bound to a session for one batch shape.

    `run` copies the observations in, runs, and returns copies of the outputs (the
    arrays leave with the result, while the bound ones are overwritten by the next call).
    """

    __slots__ = ("_binding", "_keep", "_run", "inp", "outs")

    def __init__(
        self,
        session: Any,
        run: Any,
        input_name: str,
        obs: npt.NDArray[np.generic],
        names: Sequence[str],
        outputs: tuple[npt.NDArray[np.generic], ...],
    ) -> None:
        import onnxruntime

        binding = session.io_binding()
        self.inp = np.empty(obs.shape, dtype=obs.dtype)
        self.outs = tuple(np.empty(o.shape, dtype=o.dtype) for o in outputs)
        values = [onnxruntime.OrtValue.ortvalue_from_numpy(self.inp)]
        binding.bind_ortvalue_input(input_name, values[0])
        for name, out in zip(names, self.outs, strict=True):
            values.append(onnxruntime.OrtValue.ortvalue_from_numpy(out))
            binding.bind_ortvalue_output(name, values[-1])
        self._keep = (binding, values)  # the OrtValues view our arrays: keep both alive
        self._binding = binding._iobinding
        self._run = run

    def run(self, obs: npt.NDArray[np.generic]) -> tuple[npt.NDArray[np.generic], ...]:
        self.inp[...] = obs
        self._run(self._binding, None)
        outs = self.outs
        if len(outs) == 2:  # the usual logits and value, without a loop
            return (outs[0].copy(), outs[1].copy())
        return tuple([out.copy() for out in outs])
