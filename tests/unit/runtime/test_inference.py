"""Model loading, validation and the policy head (ONNX and TorchScript, no servers)."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from relayrl_runtime import errors, spec
from relayrl_runtime.inference import export, loader, model, policy


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_both_backends_compute_the_reference_mlp(models: dict[str, Path], fmt: str) -> None:
    pol = loader.load_policy(models[fmt], model_format=spec.ModelFormat(fmt))
    obs = np.random.default_rng(3).standard_normal((7, 4)).astype(np.float32)
    logits, value = export.mlp_weights(4, 2, seed=0).forward(obs)
    out = pol.act(obs, None, np.random.default_rng(0), sample=False)
    np.testing.assert_allclose(
        np.asarray(out.outputs["logits"], np.float32), logits, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(out.outputs["value"], np.float32), value, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_array_equal(out.actions, logits.argmax(axis=1))
    assert out.version == 1


def test_single_file_needs_explicit_settings(models: dict[str, Path]) -> None:
    graph = models["onnx"] / "model.onnx"
    with pytest.raises(errors.InvalidArgumentError, match="explicit settings"):
        loader.load_policy(graph)
    meta = model.read_metadata(models["onnx"])
    pol = loader.load_policy(graph, metadata=meta, version=7)
    assert pol.version == 7


def test_format_and_version_must_agree_with_metadata(models: dict[str, Path]) -> None:
    with pytest.raises(errors.ModelMetadataError, match="format: expected torchscript, got onnx"):
        loader.load_policy(models["onnx"], model_format=spec.ModelFormat.TORCHSCRIPT)
    with pytest.raises(errors.ModelMetadataError, match="version: expected 5, got 1"):
        loader.load_policy(models["onnx"], version=5)


def test_corrupt_model_file_is_a_load_error(models: dict[str, Path], tmp_path: Path) -> None:
    for fmt, name in (("onnx", "model.onnx"), ("torchscript", "model.pt")):
        bad = tmp_path / fmt
        shutil.copytree(models[fmt], bad)
        (bad / name).write_bytes(b"\x00not a model" * 10)
        with pytest.raises(errors.ModelLoadError, match=name):
            loader.load_policy(bad)


def test_missing_metadata_file(tmp_path: Path) -> None:
    with pytest.raises(errors.ModelMetadataError, match=r"relayrl-model\.json"):
        loader.load_policy(tmp_path)


def _edit_metadata(src: Path, dst: Path, edit: dict[str, object]) -> Path:
    shutil.copytree(src, dst)
    data = json.loads((dst / model.METADATA_FILE).read_text())
    data.update(edit)
    (dst / model.METADATA_FILE).write_text(json.dumps(data))
    return dst


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_metadata_that_disagrees_with_graph(
    models: dict[str, Path], tmp_path: Path, fmt: str
) -> None:
    wrong_shape = _edit_metadata(
        models[fmt],
        tmp_path / "shape",
        {
            "outputs": [
                {"name": "logits", "shape": [-1, 3], "dtype": "float32"},
                {"name": "value", "shape": [-1, 1], "dtype": "float32"},
            ],
            "action": {"kind": "discrete", "output": "logits", "size": 3},
        },
    )
    with pytest.raises(errors.ModelMetadataError, match=r"outputs.logits.shape.*\[-1, 3\]"):
        loader.load_policy(wrong_shape)
    wrong_input = _edit_metadata(
        models[fmt],
        tmp_path / "input",
        {"inputs": [{"name": "obs", "shape": [-1, 5], "dtype": "float32"}]},
    )
    with pytest.raises(errors.ModelMetadataError, match="inputs"):
        loader.load_policy(wrong_input)


def test_invalid_metadata_names_the_field(models: dict[str, Path], tmp_path: Path) -> None:
    bad = _edit_metadata(
        models["onnx"], tmp_path / "bad", {"action": {"kind": "discrete", "output": "q", "size": 2}}
    )
    with pytest.raises(errors.ModelMetadataError, match=r"action\.output"):
        loader.load_policy(bad)


def test_cuda_without_cuda_is_an_error_not_a_fallback(models: dict[str, Path]) -> None:
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        assert loader.load_policy(models["onnx"], spec.Device.CUDA).backend.device == "cuda"
    else:
        with pytest.raises(errors.DeviceUnavailableError, match="CUDAExecutionProvider"):
            loader.load_policy(models["onnx"], spec.Device.CUDA)
    if torch.cuda.is_available():
        assert loader.load_policy(models["torchscript"], spec.Device.CUDA).backend.device == "cuda"
    else:
        with pytest.raises(errors.DeviceUnavailableError, match="cuda"):
            loader.load_policy(models["torchscript"], spec.Device.CUDA)


def test_a_cuda_provider_whose_libraries_did_not_load_is_an_error(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime-gpu lists CUDA as available when compiled in, and runs the session
    on the CPU when the CUDA libraries are missing: that must not pass for cuda."""

    class FallsBack(onnxruntime.InferenceSession):  # type: ignore[misc]
        def __init__(self, path: object, sess_options: object = None, **kw: object) -> None:
            super().__init__(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    available = onnxruntime.get_available_providers()
    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: [*available, "CUDAExecutionProvider"]
    )
    monkeypatch.setattr(onnxruntime, "InferenceSession", FallsBack)
    with pytest.raises(errors.DeviceUnavailableError, match="did not load"):
        loader.load_policy(models["onnx"], spec.Device.CUDA)


def test_mask_is_applied_to_logits(models: dict[str, Path]) -> None:
    pol = loader.load_policy(models["onnx"])
    obs = np.random.default_rng(0).standard_normal((256, 4)).astype(np.float32)
    mask = np.zeros((256, 2), dtype=bool)
    mask[:128, 0] = True
    mask[128:, 1] = True
    out = pol.act(obs, pol.check_mask(mask, 256), np.random.default_rng(1), sample=True)
    np.testing.assert_array_equal(out.actions[:128], 0)
    np.testing.assert_array_equal(out.actions[128:], 1)
    logp = policy.log_prob(model.ActionKind.DISCRETE, out.outputs["logits"], out.actions, mask)
    np.testing.assert_allclose(logp, 0.0, atol=1e-6)
    with pytest.raises(errors.InvalidArgumentError, match="none allowed in rows"):
        pol.check_mask(np.zeros((2, 2), dtype=bool), 2)


def test_sampling_follows_softmax(models: dict[str, Path]) -> None:
    pol = loader.load_policy(models["onnx"])
    obs = np.tile(np.array([[0.5, -1.0, 0.2, 0.3]], dtype=np.float32), (20_000, 1))
    out = pol.act(obs, None, np.random.default_rng(0), sample=True)
    logits = out.outputs["logits"][0].astype(np.float64)
    p1 = np.exp(logits[1]) / np.exp(logits).sum()
    assert abs(out.actions.mean() - p1) < 0.02
    logp = policy.log_prob(model.ActionKind.DISCRETE, out.outputs["logits"], out.actions)
    expected = np.where(out.actions == 1, np.log(p1), np.log(1 - p1))
    np.testing.assert_allclose(logp, expected, rtol=1e-4)


def test_continuous_actions(tmp_path: Path) -> None:
    export.export_mlp(
        tmp_path / "c",
        spec.ModelFormat.ONNX,
        obs_dim=3,
        action_size=2,
        action_kind=model.ActionKind.CONTINUOUS,
    )
    pol = loader.load_policy(tmp_path / "c")
    obs = np.zeros((4000, 3), dtype=np.float32)
    mean = pol.act(obs, None, np.random.default_rng(0), sample=False)
    sampled = pol.act(obs, None, np.random.default_rng(0), sample=True)
    assert mean.actions.shape == (4000, 2)
    assert mean.actions.dtype == np.float32
    std = float(np.exp(-0.5))
    np.testing.assert_allclose(sampled.actions.std(axis=0), std, rtol=0.1)
    with pytest.raises(errors.InvalidArgumentError, match="None for continuous"):
        pol.check_mask(np.ones((1, 2)), 1)


def test_obs_checks_say_expected_and_got(models: dict[str, Path]) -> None:
    pol = loader.load_policy(models["onnx"])
    with pytest.raises(
        errors.InvalidArgumentError, match=r"obs.shape: expected \[2, 4\], got \[2, 5\]"
    ):
        pol.check_obs(np.zeros((2, 5), np.float32), 2)
    with pytest.raises(
        errors.InvalidArgumentError, match=r"obs\.dtype: expected float32, got float64"
    ):
        pol.check_obs(np.zeros((2, 4)), 2)


def _meta(**changes: object) -> model.ModelMetadata:
    """A continuous-action model's metadata: mean `mu`, an aux `value` output."""
    raw: dict[str, object] = {
        "format": "onnx",
        "inputs": [{"name": "obs", "shape": [-1, 3], "dtype": "float32"}],
        "outputs": [
            {"name": "mu", "shape": [-1, 2], "dtype": "float32"},
            {"name": "value", "shape": [-1, 1], "dtype": "float32"},
        ],
        "action": {"kind": "continuous", "output": "mu", "size": 2, "logStd": -0.5},
    }
    raw.update(changes)
    return model.ModelMetadata.model_validate(raw)


def test_a_running_agent_takes_only_a_model_it_records_the_same_way() -> None:
    base = _meta()
    assert base.compatible_with(_meta(version=2)) is None
    # Clipping bounds are not recorded: they may change in place.
    clipped = _meta(action={"kind": "continuous", "output": "mu", "size": 2, "logStd": -0.5,
                            "low": -1.0, "high": 1.0})  # fmt: skip
    assert base.compatible_with(clipped) is None
    renamed = _meta(
        outputs=[
            {"name": "pi", "shape": [-1, 2], "dtype": "float32"},
            {"name": "value", "shape": [-1, 1], "dtype": "float32"},
        ],
        action={"kind": "continuous", "output": "pi", "size": 2, "logStd": -0.5},
    )
    assert base.compatible_with(renamed) == "action.output: expected 'mu', got 'pi'"
    # The recorded logp is computed with the fixed log-std of the model the agent started with.
    annealed = _meta(action={"kind": "continuous", "output": "mu", "size": 2, "logStd": -1.0})
    assert base.compatible_with(annealed) == "action.logStd: expected -0.5, got -1.0"
    learned = _meta(
        outputs=[
            {"name": "mu", "shape": [-1, 2], "dtype": "float32"},
            {"name": "log_std", "shape": [-1, 2], "dtype": "float32"},
            {"name": "value", "shape": [-1, 1], "dtype": "float32"},
        ],
        action={"kind": "continuous", "output": "mu", "size": 2, "logStdOutput": "log_std"},
    )
    assert base.compatible_with(learned) == "action.logStdOutput: expected None, got 'log_std'"
    more = _meta(
        outputs=[
            {"name": "mu", "shape": [-1, 2], "dtype": "float32"},
            {"name": "value", "shape": [-1, 1], "dtype": "float32"},
            {"name": "entropy", "shape": [-1, 1], "dtype": "float32"},
        ]
    )
    assert base.compatible_with(more) == (
        "outputs: expected mu [2] float32, value [1] float32, "
        "got entropy [1] float32, mu [2] float32, value [1] float32"
    )
    wider = _meta(inputs=[{"name": "obs", "shape": [-1, 4], "dtype": "float32"}])
    assert base.compatible_with(wider) == "inputs: expected [3] float32, got [4] float32"


class _DropsTheBatchOfOne(torch.nn.Module):
    """A common slip: `squeeze(0)` drops the batch dimension of a batch of one."""

    def __init__(self) -> None:
        super().__init__()
        self.logits = torch.nn.Linear(4, 2)
        self.value = torch.nn.Linear(4, 1)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logits(obs).squeeze(0), self.value(obs).squeeze(0)


def test_a_graph_that_fails_on_a_batch_of_one_is_refused_at_load(
    models: dict[str, Path], tmp_path: Path
) -> None:
    squeezed = _edit_metadata(models["torchscript"], tmp_path / "squeeze", {})
    graph = model.read_metadata(squeezed).graph_file()
    with warnings.catch_warnings():  # torch.jit is deprecated, and still what it loads
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(_DropsTheBatchOfOne()).save(str(squeezed / graph))
    with pytest.raises(errors.ModelMetadataError, match=r"outputs\.logits\.shape.*batch of 1"):
        loader.load_policy(squeezed)


def test_both_files_come_from_where_the_link_pointed_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The link moves to version 3 after the metadata (version 2) was read: the graph
    must still be version 2's."""
    for version in (2, 3):
        export.export_mlp(tmp_path / f"v{version}", spec.ModelFormat.ONNX, seed=version,
                          version=version)  # fmt: skip
    link = tmp_path / "model"
    link.symlink_to(tmp_path / "v2")
    real = model.read_metadata

    def read_then_move(path: Path) -> model.ModelMetadata:
        meta = real(path)
        (tmp_path / "next").symlink_to(tmp_path / "v3")
        (tmp_path / "next").replace(link)
        return meta

    monkeypatch.setattr(model, "read_metadata", read_then_move)
    pol = loader.load_policy(link)
    monkeypatch.setattr(model, "read_metadata", real)
    obs = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    want = loader.load_policy(tmp_path / "v2").backend.run(obs)[0]
    assert pol.version == 2
    np.testing.assert_allclose(pol.backend.run(obs)[0], want)


@pytest.mark.parametrize(
    ("action", "says"),
    [
        ({"logStd": float("nan")}, "action.logStd: Input should be a finite number"),
        ({"logStd": 1e6}, "action.logStd"),
        ({"low": float("inf")}, "action.low: Input should be a finite number"),
        ({"low": 1.0, "high": -1.0}, "action.low: expected at most action.high"),
    ],
)
def test_action_settings_that_give_no_usable_action_are_refused(
    tmp_path: Path, action: dict[str, float], says: str
) -> None:
    export.export_mlp(tmp_path / "m", spec.ModelFormat.ONNX, seed=1, version=1)
    meta = json.loads((tmp_path / "m" / model.METADATA_FILE).read_text())
    meta["action"].update(action)
    (tmp_path / "m" / model.METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(errors.ModelMetadataError, match=re.escape(says)):
        model.read_metadata(tmp_path / "m")


@pytest.mark.parametrize("sample", [False, True])
def test_an_action_the_mask_forbids_is_never_chosen(sample: bool) -> None:
    """The model masks too, and gives every allowed action -inf: an allowed one still."""
    logits = np.tile(np.array([[0.0, -np.inf, -np.inf]], np.float32), (64, 1))
    mask = np.tile(np.array([[False, True, True]]), (64, 1))
    actions = policy._discrete(logits, mask, np.random.default_rng(0), sample)
    assert set(actions.tolist()) <= {1, 2}
    if sample:
        assert set(actions.tolist()) == {1, 2}
    else:
        assert set(actions.tolist()) == {1}


def test_a_forward_pass_that_fails_says_which_model(models: dict[str, Path]) -> None:
    pol = loader.load_policy(models["onnx"])

    def fails(obs: np.ndarray) -> None:
        raise RuntimeError("shape mismatch in layer 3")

    pol.backend.run = fails  # type: ignore[method-assign]
    with pytest.raises(errors.ModelLoadError, match=r"model version 1 \(.*\): the forward pass"):
        pol.act(np.zeros((2, 4), np.float32), None, np.random.default_rng(0), sample=False)


def test_independent_copies_of_a_model_with_external_data_load(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """Weights kept beside the graph (ONNX external data, as models over 2 GB must be):
    `model.mode: independent` loads each actor's copy from the graph's bytes, which
    must still find them."""
    directory = tmp_path / "external"
    shutil.copytree(models["onnx"], directory)
    graph = directory / model.read_metadata(directory).graph_file()
    onnx.save_model(
        onnx.load(str(graph)),
        str(graph),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    assert (directory / "weights.bin").stat().st_size > 0
    kept = loader.load_policy(directory, keep_graph=True)
    copy = loader.copy_policy(kept, spec.Device.CPU)
    obs = np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32)
    logits, _ = export.mlp_weights(4, 2, seed=0).forward(obs)
    for pol in (kept, copy):
        out = pol.act(obs, None, np.random.default_rng(0), sample=False)
        np.testing.assert_allclose(
            np.asarray(out.outputs["logits"], np.float32), logits, rtol=1e-4, atol=1e-5
        )
