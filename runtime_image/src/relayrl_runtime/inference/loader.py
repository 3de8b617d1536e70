"""Load a policy from a model directory or a single graph file, validated before use.

Called by the agent at build time and by hot reload. A model is only handed out after a
dummy forward pass has shown the graph agrees with its metadata (input shape, output
names, shapes and dtypes), so a bad model fails here with a clear error and never
reaches a running agent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import numpy as np

from relayrl_runtime import errors, spec
from relayrl_runtime.inference import backend as backend_mod
from relayrl_runtime.inference import model, policy

# The batch sizes a model is tried on before it is taken.
_DUMMY_BATCHES: Final = (1, 3)


def load_policy(
    path: Path,
    device: spec.Device = spec.Device.CPU,
    *,
    model_format: spec.ModelFormat | None = None,
    version: int | None = None,
    metadata: model.ModelMetadata | None = None,
    keep_graph: bool = False,
) -> policy.Policy:
    """Load and validate a model.

    `path` is a model directory with `relayrl-model.json`, or a graph file together
    with explicit `metadata`. `model_format` and `version`, when given, must agree with
    the directory's metadata (for a single file, `version` overrides the metadata's).
    `keep_graph`: the policy keeps the graph's bytes, for `copy_policy`.
    """
    if path.is_dir():
        # Both files from one directory: a link moved to another version between
        # reading the metadata and the graph would pair one's version with the other's
        # weights.
        path = path.resolve()
        if metadata is not None:
            raise errors.InvalidArgumentError.mismatch(
                "metadata", f"None for a model directory (it has {model.METADATA_FILE})", "a value"
            )
        meta = model.read_metadata(path)
        graph = path / meta.graph_file()
        if version is not None and version != meta.version:
            raise errors.ModelMetadataError(
                f"{path}: version: expected {version}, got {meta.version} in {model.METADATA_FILE}"
            )
    elif path.is_file():
        if metadata is None:
            raise errors.InvalidArgumentError.mismatch(
                "metadata",
                f"explicit settings for the single file {path}",
                "None (or pass a model directory)",
            )
        meta = metadata if version is None else metadata.model_copy(update={"version": version})
        graph = path
    else:
        raise errors.ModelLoadError(f"{path}: expected a model directory or file, got nothing")
    if model_format is not None and model_format is not meta.format:
        raise errors.ModelMetadataError(
            f"{path}: format: expected {model_format.value}, got {meta.format.value}"
        )
    if not graph.is_file():
        raise errors.ModelLoadError(f"{graph}: expected the model graph file, got nothing")
    data = None
    if keep_graph:
        try:
            data = graph.read_bytes()
        except OSError as err:
            raise errors.ModelLoadError(f"{graph}: cannot read the model graph: {err}") from err
    return _open(graph, device, meta, data)


def copy_policy(source: policy.Policy, device: spec.Device) -> policy.Policy:
    """Another instance of a loaded policy (its own backend), from the bytes it kept;
    from its file when it kept none."""
    if source.graph is None:
        return load_policy(Path(source.source), device, metadata=source.metadata)
    return _open(Path(source.source), device, source.metadata, source.graph)


def _open(
    path: Path, device: spec.Device, meta: model.ModelMetadata, data: bytes | None
) -> policy.Policy:
    backend = _open_backend(path, device, meta, data)
    try:
        _validate(backend, meta, str(path))
    except BaseException:
        backend.close()
        raise
    return policy.Policy(backend, meta, source=str(path), graph=data)


def _open_backend(
    graph: Path, device: spec.Device, meta: model.ModelMetadata, data: bytes | None
) -> backend_mod.Backend:
    names = [o.name for o in meta.outputs]
    if meta.format is spec.ModelFormat.ONNX:
        from relayrl_runtime.inference import onnx

        return onnx.OnnxBackend(graph, device, names, data)
    from relayrl_runtime.inference import torchscript

    return torchscript.TorchScriptBackend(graph, device, names, data)


def _validate(backend: backend_mod.Backend, meta: model.ModelMetadata, where: str) -> None:
    signature = backend.input_signature()
    if signature is not None:
        name, shape = signature
        expected = meta.input.shape
        if name != meta.input.name:
            raise errors.ModelMetadataError(
                f"{where}: inputs[0].name: metadata says {meta.input.name!r}, graph has {name!r}"
            )
        agrees = len(shape) == len(expected) and all(
            g is None or e == -1 or g == e for g, e in zip(shape, expected, strict=True)
        )
        if not agrees:
            raise errors.ModelMetadataError(
                f"{where}: inputs[0].shape: metadata says {list(expected)}, "
                f"graph has {[-1 if d is None else d for d in shape]}"
            )
    # Batches of one and of several, of values other than zero: a graph that drops
    # the batch dimension of one row (a squeeze) or fails on real values would pass a
    # single batch of zeros, and fail the first step after a hot reload, and again
    # after every restart.
    rng = np.random.default_rng(0)
    for batch in _DUMMY_BATCHES:
        dummy = rng.standard_normal((batch, *meta.input.item_shape)).astype(meta.input.dtype)
        _check_forward(backend, meta, where, dummy)


def _check_forward(
    backend: backend_mod.Backend, meta: model.ModelMetadata, where: str, dummy: Any
) -> None:
    try:
        outputs = backend.run(dummy)
    except errors.RelayRLError:
        raise
    except Exception as err:  # backends raise their own exception types
        raise errors.ModelMetadataError(
            f"{where}: dummy forward with inputs[0] {list(dummy.shape)} {dummy.dtype} failed: {err}"
        ) from err
    if len(outputs) != len(meta.outputs):
        raise errors.ModelMetadataError(
            f"{where}: outputs: metadata lists {len(meta.outputs)}, graph returned {len(outputs)}"
        )
    batch = len(dummy)
    for out, tensor in zip(meta.outputs, outputs, strict=True):
        want = (batch, *out.item_shape)
        if tuple(tensor.shape) != want:
            raise errors.ModelMetadataError(
                f"{where}: outputs.{out.name}.shape: metadata says {list(out.shape)}, "
                f"graph gives {list(tensor.shape)} for a batch of {batch}"
            )
        if str(tensor.dtype) != out.dtype:
            raise errors.ModelMetadataError(
                f"{where}: outputs.{out.name}.dtype: metadata says {out.dtype}, "
                f"graph gives {tensor.dtype}"
            )
