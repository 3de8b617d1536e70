"""Build a small MLP policy and write it as a model directory (ONNX or TorchScript).

Used by the tests, the benchmark, the demo and `relayrl-runtime model export`. The
weights are drawn from a seeded numpy generator so the ONNX and the TorchScript export
of the same seed compute the same function. The ONNX graph is written with the `onnx`
helpers directly (no torch needed); TorchScript needs torch, imported lazily.

The MLP maps obs -> hidden layers (ReLU) -> an action head (`logits` for discrete
actions, `mean` for continuous) and a `value` head, both in float32.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from relayrl_runtime import errors, spec
from relayrl_runtime.inference import model

Layer = tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]  # weight (in, out), bias (out,)


@dataclasses.dataclass(frozen=True)
class MlpWeights:
    """Weights of the exported MLP, shared by both formats."""

    hidden: tuple[Layer, ...]
    head: Layer
    value: Layer

    @property
    def obs_dim(self) -> int:
        """Input width."""
        return int(self.hidden[0][0].shape[0] if self.hidden else self.head[0].shape[0])

    @property
    def action_size(self) -> int:
        """Width of the action head."""
        return int(self.head[0].shape[1])

    def forward(
        self, obs: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Reference forward pass in numpy (what both exports compute)."""
        x = obs
        for w, b in self.hidden:
            x = np.maximum(x @ w + b, 0.0)
        return x @ self.head[0] + self.head[1], x @ self.value[0] + self.value[1]


def mlp_weights(
    obs_dim: int, action_size: int, hidden: Sequence[int] = (64, 64), seed: int = 0
) -> MlpWeights:
    """Random (He-scaled) weights for an obs_dim-hidden...-action_size MLP."""
    if obs_dim < 1 or action_size < 1 or any(h < 1 for h in hidden):
        raise errors.InvalidArgumentError.mismatch(
            "mlp dims", "positive sizes", f"obs_dim={obs_dim} action={action_size} {list(hidden)}"
        )
    rng = np.random.default_rng(seed)

    def layer(n_in: int, n_out: int, scale: float) -> Layer:
        w = rng.standard_normal((n_in, n_out)).astype(np.float32) * np.float32(scale / n_in**0.5)
        b = rng.standard_normal(n_out).astype(np.float32) * np.float32(0.01)
        return w, b

    dims = [obs_dim, *hidden]
    layers = tuple(layer(a, b, 2**0.5) for a, b in itertools.pairwise(dims))
    return MlpWeights(
        hidden=layers, head=layer(dims[-1], action_size, 1.0), value=layer(dims[-1], 1, 1.0)
    )


def metadata_for(
    weights: MlpWeights,
    model_format: spec.ModelFormat,
    version: int,
    action_kind: model.ActionKind = model.ActionKind.DISCRETE,
) -> model.ModelMetadata:
    """The `relayrl-model.json` describing an exported MLP."""
    head = "logits" if action_kind is model.ActionKind.DISCRETE else "mean"
    return model.ModelMetadata(
        format=model_format,
        file=model.DEFAULT_FILES[model_format],
        version=version,
        inputs=(model.TensorSpec(name="obs", shape=(-1, weights.obs_dim), dtype="float32"),),
        outputs=(
            model.TensorSpec(name=head, shape=(-1, weights.action_size), dtype="float32"),
            model.TensorSpec(name="value", shape=(-1, 1), dtype="float32"),
        ),
        action=model.ActionSpec(
            kind=action_kind,
            output=head,
            size=weights.action_size,
            log_std=-0.5 if action_kind is model.ActionKind.CONTINUOUS else 0.0,
        ),
    )


def export_mlp(
    directory: Path,
    model_format: spec.ModelFormat,
    *,
    obs_dim: int = 4,
    action_size: int = 2,
    hidden: Sequence[int] = (64, 64),
    version: int = 1,
    seed: int = 0,
    action_kind: model.ActionKind = model.ActionKind.DISCRETE,
) -> model.ModelMetadata:
    """Write an MLP model directory: the graph file plus `relayrl-model.json`."""
    weights = mlp_weights(obs_dim, action_size, hidden, seed)
    meta = metadata_for(weights, model_format, version, action_kind)
    directory.mkdir(parents=True, exist_ok=True)
    graph = directory / meta.graph_file()
    head = meta.action.output
    if model_format is spec.ModelFormat.ONNX:
        write_onnx(weights, graph, head)
    else:
        write_torchscript(weights, graph)
    model.write_metadata(directory, meta)
    return meta


def write_onnx(weights: MlpWeights, path: Path, head_name: str = "logits") -> None:
    """Write the MLP as an ONNX graph with a dynamic batch dimension."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits: list[Any] = []
    nodes: list[Any] = []
    x = "obs"
    for i, (w, b) in enumerate(weights.hidden):
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"g{i}"]))
        nodes.append(helper.make_node("Relu", [f"g{i}"], [f"h{i}"]))
        x = f"h{i}"
    for name, (w, b) in ((head_name, weights.head), ("value", weights.value)):
        inits += [numpy_helper.from_array(w, f"w_{name}"), numpy_helper.from_array(b, f"b_{name}")]
        nodes.append(helper.make_node("Gemm", [x, f"w_{name}", f"b_{name}"], [name]))
    graph = helper.make_graph(
        nodes,
        "relayrl_mlp",
        [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["batch", weights.obs_dim])],
        [
            helper.make_tensor_value_info(
                head_name, TensorProto.FLOAT, ["batch", weights.action_size]
            ),
            helper.make_tensor_value_info("value", TensorProto.FLOAT, ["batch", 1]),
        ],
        initializer=inits,
    )
    # Opset 17 and IR 8 are read by every onnxruntime from 1.14 on.
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="relayrl-runtime"
    )
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def write_torchscript(weights: MlpWeights, path: Path) -> None:
    """Write the MLP as a scripted torch module returning (head, value)."""
    import torch

    class Mlp(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hidden = torch.nn.ModuleList(
                [torch.nn.Linear(w.shape[0], w.shape[1]) for w, _ in weights.hidden]
            )
            self.head = torch.nn.Linear(*weights.head[0].shape)
            self.value = torch.nn.Linear(*weights.value[0].shape)

        def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = obs
            for layer in self.hidden:
                x = torch.relu(layer(x))
            return self.head(x), self.value(x)

    module = Mlp()
    with torch.no_grad():
        pairs: list[tuple[Any, Layer]] = [*zip(module.hidden, weights.hidden, strict=True)]
        pairs += [(module.head, weights.head), (module.value, weights.value)]
        for linear, (w, b) in pairs:
            linear.weight.copy_(torch.from_numpy(w.T.copy()))
            linear.bias.copy_(torch.from_numpy(b))
    module.eval()
    with warnings.catch_warnings():
        # torch.jit warns that TorchScript is in maintenance mode; it is still the
        # format the issue asks us to load, and the warning is not ours to act on.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(module)
        torch.jit.save(scripted, str(path))
