"""The inference backend protocol: one forward pass over a batch of observations.

Implemented by `onnx.OnnxBackend` and `torchscript.TorchScriptBackend`; the policy calls
`run` once per request batch. Backends know nothing about actions or trajectories.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt


class Backend(Protocol):
    """A loaded graph on a device."""

    @property
    def device(self) -> str:
        """Device the graph runs on: cpu or cuda."""
        ...

    def input_signature(self) -> tuple[str, tuple[int | None, ...]] | None:
        """Name and shape (None for dynamic dims) of the graph input, if the format tells."""
        ...

    def output_names(self) -> tuple[str, ...] | None:
        """Output names the graph declares, if the format tells."""
        ...

    def run(self, obs: npt.NDArray[np.generic]) -> tuple[npt.NDArray[np.generic], ...]:
        """Forward a batch; returns the outputs in metadata order."""
        ...

    def close(self) -> None:
        """Release the graph (sessions, device memory)."""
        ...
