"""Model metadata (`relayrl-model.json`) and model sources: what a model directory holds.

A model directory has the serialized graph and a metadata file that says what the graph
takes and gives, so the runtime can validate observations before a forward pass and
check the graph agrees with its description at load time. Example::

    {
      "schemaVersion": 1,
      "format": "onnx",
      "file": "model.onnx",
      "version": 3,
      "inputs":  [{"name": "obs", "shape": [-1, 4], "dtype": "float32"}],
      "outputs": [{"name": "logits", "shape": [-1, 2], "dtype": "float32"},
                  {"name": "value", "shape": [-1, 1], "dtype": "float32"}],
      "action": {"kind": "discrete", "output": "logits", "size": 2}
    }

Shapes use -1 for the batch dimension (always first). For continuous actions `output`
names the mean, `logStdOutput` an optional log-std output, otherwise `logStd` is a fixed
value. Every other output is kept as an aux column of the trajectory (`value`, ...).
Read by `loader` and written by `export`; the CLI's `model push` ships whole directories.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Final

import pydantic
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from relayrl_runtime import errors, spec

METADATA_FILE: Final = "relayrl-model.json"
METADATA_SCHEMA_VERSION: Final = 1

# Dtypes a model input or output may have (numpy names).
DTYPES: Final = frozenset({"float32", "float64", "float16", "int64", "int32", "uint8", "bool"})

DEFAULT_FILES: Final = {
    spec.ModelFormat.ONNX: "model.onnx",
    spec.ModelFormat.TORCHSCRIPT: "model.pt",
}


class ActionKind(enum.StrEnum):
    """Discrete actions come from logits; continuous ones from a Gaussian mean."""

    DISCRETE = "discrete"
    CONTINUOUS = "continuous"


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class TensorSpec(_Model):
    """One named input or output of the graph."""

    name: str = Field(min_length=1)
    shape: tuple[int, ...] = Field(min_length=1, description="-1 marks the batch dimension.")
    dtype: str

    @pydantic.field_validator("dtype")
    @classmethod
    def _dtype_known(cls, value: str) -> str:
        if value not in DTYPES:
            raise ValueError(f"expected one of {sorted(DTYPES)}, got {value!r}")
        return value

    @pydantic.field_validator("shape")
    @classmethod
    def _batch_first(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if value[0] != -1 or any(d < 1 for d in value[1:]):
            raise ValueError(f"expected [-1, positive dims...], got {list(value)}")
        return value

    @property
    def item_shape(self) -> tuple[int, ...]:
        """Shape of one row (without the batch dimension)."""
        return self.shape[1:]


class ActionSpec(_Model):
    """How actions are read off the outputs."""

    kind: ActionKind
    output: str = Field(min_length=1, description="Logits (discrete) or mean (continuous).")
    size: int = Field(ge=1, description="Number of actions (discrete) or action dims.")
    log_std_output: str | None = Field(default=None, description="Continuous: log-std output.")
    log_std: float = Field(
        default=0.0,
        ge=-20.0,
        le=20.0,
        allow_inf_nan=False,
        description="Continuous: fixed log-std otherwise (a std of e^-20 to e^20).",
    )
    low: float | None = Field(
        default=None, allow_inf_nan=False, description="Continuous: clip actions below."
    )
    high: float | None = Field(
        default=None, allow_inf_nan=False, description="Continuous: clip actions above."
    )


class ModelMetadata(_Model):
    """The contents of `relayrl-model.json`."""

    schema_version: int = Field(
        default=METADATA_SCHEMA_VERSION, ge=METADATA_SCHEMA_VERSION, le=METADATA_SCHEMA_VERSION
    )
    format: spec.ModelFormat
    file: str | None = Field(default=None, description="Graph file name inside the directory.")
    version: int = Field(default=1, ge=1, le=spec.MAX_MODEL_VERSION)
    inputs: tuple[TensorSpec, ...] = Field(min_length=1, max_length=1)
    outputs: tuple[TensorSpec, ...] = Field(min_length=1)
    action: ActionSpec

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> ModelMetadata:
        names = [o.name for o in self.outputs]
        if len(set(names)) != len(names):
            raise ValueError(f"outputs: expected unique names, got {names}")
        by_name = {o.name: o for o in self.outputs}
        low, high = self.action.low, self.action.high
        if low is not None and high is not None and low > high:
            raise ValueError(f"action.low: expected at most action.high ({high}), got {low}")
        head = by_name.get(self.action.output)
        if head is None:
            raise ValueError(f"action.output: expected one of {names}, got {self.action.output!r}")
        if head.item_shape != (self.action.size,):
            raise ValueError(
                f"action.size: output {head.name!r} has shape {list(head.shape)}, "
                f"expected [-1, {self.action.size}]"
            )
        if self.action.log_std_output is not None:
            ls = by_name.get(self.action.log_std_output)
            if ls is None:
                raise ValueError(
                    f"action.logStdOutput: expected one of {names}, "
                    f"got {self.action.log_std_output!r}"
                )
        return self

    @property
    def input(self) -> TensorSpec:
        """The single observation input."""
        return self.inputs[0]

    @property
    def aux_outputs(self) -> tuple[TensorSpec, ...]:
        """Outputs recorded as aux columns: all but the action head and its log-std."""
        skip = {self.action.output, self.action.log_std_output}
        return tuple(o for o in self.outputs if o.name not in skip)

    def graph_file(self) -> str:
        """File name of the graph in the model directory."""
        return self.file or DEFAULT_FILES[self.format]

    def compatible_with(self, other: ModelMetadata) -> str | None:
        """Why `other` cannot replace this model in a running agent, or None if it can.

        A running agent records what this model's metadata describes (its trajectory
        layout is fixed at start): the observation, the action head and how its log-std
        is had, and every output by name, shape and dtype. A fixed log-std must stay the
        same too: the recorded logp is computed with it.
        """
        if other.input.item_shape != self.input.item_shape or other.input.dtype != self.input.dtype:
            return (
                f"inputs: expected {list(self.input.item_shape)} {self.input.dtype}, "
                f"got {list(other.input.item_shape)} {other.input.dtype}"
            )
        mine, theirs = self.action, other.action
        for field, a, b in (
            ("kind", mine.kind.value, theirs.kind.value),
            ("size", mine.size, theirs.size),
            ("output", mine.output, theirs.output),
            ("logStdOutput", mine.log_std_output, theirs.log_std_output),
        ):
            if a != b:
                return f"action.{field}: expected {a!r}, got {b!r}"
        fixed_std = mine.kind is ActionKind.CONTINUOUS and mine.log_std_output is None
        if fixed_std and theirs.log_std != mine.log_std:
            return f"action.logStd: expected {mine.log_std}, got {theirs.log_std}"
        outputs = {o.name: (list(o.item_shape), o.dtype) for o in self.outputs}
        other_outputs = {o.name: (list(o.item_shape), o.dtype) for o in other.outputs}
        if outputs != other_outputs:
            return f"outputs: expected {_describe(outputs)}, got {_describe(other_outputs)}"
        return None

    def to_json(self) -> str:
        """Serialise as the metadata file's text."""
        return json.dumps(self.model_dump(mode="json", by_alias=True, exclude_none=True), indent=2)


def _describe(outputs: dict[str, tuple[list[int], str]]) -> str:
    return ", ".join(f"{name} {shape} {dtype}" for name, (shape, dtype) in sorted(outputs.items()))


def read_metadata(directory: Path) -> ModelMetadata:
    """Read and validate `relayrl-model.json` in a model directory."""
    path = directory / METADATA_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise errors.ModelMetadataError(
            f"{path}: expected a model metadata file ({METADATA_FILE}), got none"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise errors.ModelMetadataError(f"{path}: expected readable UTF-8 JSON: {err}") from err
    return parse_metadata(text, path)


def parse_metadata(text: str | bytes, source: object) -> ModelMetadata:
    """Validate the text of a `relayrl-model.json`; errors name `source` (its path)."""
    try:
        return ModelMetadata.model_validate_json(text)
    except pydantic.ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
            for e in err.errors(include_url=False)
        )
        raise errors.ModelMetadataError(f"{source}: {problems}") from None


def write_metadata(directory: Path, metadata: ModelMetadata) -> Path:
    """Write `relayrl-model.json` into a model directory."""
    path = directory / METADATA_FILE
    path.write_text(metadata.to_json() + "\n")
    return path
