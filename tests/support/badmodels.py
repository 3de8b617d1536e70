"""Models that pass the runtime's load check and fail later, on some requests."""

from __future__ import annotations

from pathlib import Path

from relayrl_runtime import spec
from relayrl_runtime.inference import export, model


def export_failing(
    directory: Path,
    *,
    version: int,
    max_rows: int | None = None,
    max_abs: float | None = None,
    seed: int = 0,
) -> None:
    """An ONNX MLP model directory whose forward pass raises on batches of more than
    `max_rows` rows, or holding a value larger than `max_abs`: its logits are then
    reshaped to one column more than they have.

    The load check runs batches of 1 and 3 random rows (standard normal): with
    `max_rows` at least 3, or `max_abs` far above 1, the model loads.
    """
    import onnx
    from onnx import TensorProto, helper

    meta = export.export_mlp(directory, spec.ModelFormat.ONNX, version=version, seed=seed)
    graph_file = directory / meta.graph_file()
    proto = onnx.load(str(graph_file))
    g = proto.graph
    head = meta.action.output
    for node in g.node:
        node.output[:] = [f"{head}_raw" if o == head else o for o in node.output]
    g.initializer.extend(
        [
            helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
            helper.make_tensor("width", TensorProto.INT64, [1], [meta.action.size]),
            helper.make_tensor("no", TensorProto.BOOL, [1], [False]),
        ]
    )
    nodes = [
        helper.make_node("Shape", ["obs"], ["obs_shape"]),
        helper.make_node("Gather", ["obs_shape", "zero"], ["rows"], axis=0),
    ]
    bad = "no"
    if max_rows is not None:
        g.initializer.append(helper.make_tensor("max_rows", TensorProto.INT64, [1], [max_rows]))
        nodes.append(helper.make_node("Greater", ["rows", "max_rows"], ["too_many"]))
        nodes.append(helper.make_node("Or", [bad, "too_many"], ["bad_rows"]))
        bad = "bad_rows"
    if max_abs is not None:
        g.initializer.append(helper.make_tensor("max_abs", TensorProto.FLOAT, [1], [max_abs]))
        nodes.append(helper.make_node("Abs", ["obs"], ["obs_abs"]))
        nodes.append(helper.make_node("ReduceMax", ["obs_abs"], ["largest"], keepdims=1))
        nodes.append(helper.make_node("Reshape", ["largest", "one"], ["largest_1"]))
        g.initializer.append(helper.make_tensor("one", TensorProto.INT64, [1], [1]))
        nodes.append(helper.make_node("Greater", ["largest_1", "max_abs"], ["too_large"]))
        nodes.append(helper.make_node("Or", [bad, "too_large"], ["bad_values"]))
        bad = "bad_values"
    nodes += [
        helper.make_node("Cast", [bad], ["extra"], to=TensorProto.INT64),
        helper.make_node("Add", ["width", "extra"], ["cols"]),
        helper.make_node("Concat", ["rows", "cols"], ["shape"], axis=0),
        helper.make_node("Reshape", [f"{head}_raw", "shape"], [head]),
    ]
    g.node.extend(nodes)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(graph_file))
    model.read_metadata(directory)  # still a valid model directory
