"""TorchScript backend on torch: what `loader` builds for `format: torchscript`.

torch is an extra (`relayrl-runtime[torch]`), imported only when such a model is loaded.
The scripted module's `forward` takes the observation batch and returns one tensor, a
tuple of tensors in metadata output order, or a dict keyed by output name.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from relayrl_runtime import errors, spec


class TorchScriptBackend:
    """A `torch.jit` module in eval mode on one device."""

    def __init__(
        self,
        path: Path,
        device: spec.Device,
        output_names: Sequence[str],
        graph: bytes | None = None,
    ) -> None:
        """Load `path`, or the bytes `graph` read from it (named `path` in errors)."""
        try:
            import torch
        except ImportError as err:  # pragma: no cover - depends on the install
            raise errors.ModelLoadError(
                "format torchscript: torch is not installed (pip install relayrl-runtime[torch])"
            ) from err
        if device is spec.Device.CUDA and not torch.cuda.is_available():
            raise errors.DeviceUnavailableError(
                "device: expected cuda to be available to torch, got "
                f"torch.cuda.is_available() == False (torch {torch.__version__})"
            )
        self._torch: Any = torch
        self._device = device
        try:
            with warnings.catch_warnings():
                # torch >= 2.9 flags torch.jit as deprecated in favour of torch.export;
                # TorchScript files are what this backend exists to load.
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                source = str(path) if graph is None else io.BytesIO(graph)
                module = torch.jit.load(source, map_location=device.value)  # type: ignore[no-untyped-call]
        except Exception as err:  # torch raises RuntimeError and friends for bad files
            raise errors.ModelLoadError(f"{path}: not a loadable TorchScript model: {err}") from err
        module.eval()
        self._module: Any = module
        self._output_names = tuple(output_names)

    @property
    def device(self) -> str:
        return self._device.value

    def input_signature(self) -> tuple[str, tuple[int | None, ...]] | None:
        return None

    def output_names(self) -> tuple[str, ...] | None:
        return None

    def run(self, obs: npt.NDArray[np.generic]) -> tuple[npt.NDArray[np.generic], ...]:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(obs))
            if self._device is spec.Device.CUDA:
                x = x.to("cuda", non_blocking=True)
            out = self._module(x)
        if isinstance(out, dict):
            try:
                tensors = [out[name] for name in self._output_names]
            except KeyError as err:
                raise errors.ModelMetadataError(
                    f"outputs: metadata names {list(self._output_names)}, "
                    f"module returned keys {sorted(out)}"
                ) from err
        elif isinstance(out, (tuple, list)):
            tensors = list(out)
        else:
            tensors = [out]
        if len(tensors) != len(self._output_names):
            raise errors.ModelMetadataError(
                f"outputs: expected {len(self._output_names)} ({list(self._output_names)}), "
                f"module returned {len(tensors)}"
            )
        return tuple(t.detach().cpu().numpy() for t in tensors)

    def close(self) -> None:
        self._module = None
