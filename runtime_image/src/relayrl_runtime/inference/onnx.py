"""ONNX backend on onnxruntime: what `loader` builds for `format: onnx`.

onnxruntime is an extra (`relayrl-runtime[onnx]`), imported when a model is loaded.
A cuda device needs the CUDAExecutionProvider; without it loading fails with
`DeviceUnavailableError` instead of running on the CPU behind the user's back.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from relayrl_runtime import errors, spec

_PROVIDERS = {
    spec.Device.CPU: "CPUExecutionProvider",
    spec.Device.CUDA: "CUDAExecutionProvider",
}


class OnnxBackend:
    """An onnxruntime InferenceSession bound to one device."""

    def __init__(self, path: Path, device: spec.Device, output_names: Sequence[str]) -> None:
        try:
            import onnxruntime
        except ImportError as err:  # pragma: no cover - depends on the install
            raise errors.ModelLoadError(
                "format onnx: onnxruntime is not installed (pip install relayrl-runtime[onnx])"
            ) from err
        provider = _PROVIDERS[device]
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
        try:
            self._session: Any = onnxruntime.InferenceSession(
                str(path), sess_options=options, providers=[provider]
            )
        except Exception as err:  # onnxruntime raises its own untyped exceptions
            raise errors.ModelLoadError(f"{path}: not a loadable ONNX model: {err}") from err
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

    @property
    def device(self) -> str:
        return self._device.value

    def input_signature(self) -> tuple[str, tuple[int | None, ...]] | None:
        return self._input_name, self._input_shape

    def output_names(self) -> tuple[str, ...] | None:
        return self._graph_outputs

    def run(self, obs: npt.NDArray[np.generic]) -> tuple[npt.NDArray[np.generic], ...]:
        feed = {self._input_name: obs}
        if self._run is not None:
            outputs = self._run(self._output_names, feed, None)
        else:
            outputs = self._session.run(self._output_names, feed)
        return tuple(outputs)

    def close(self) -> None:
        self._session = None
        self._run = None
