"""The runtime process config: what `relayrl-runtime run --config FILE` reads.

The operator renders one of these per Agent into a ConfigMap (all actor pods share
it; each pod finds its actor slice from its pod index), and a user running the
runtime by hand writes the same YAML. It reuses the Agent spec models for the parts
the two share, so a field means the same thing in both places.

Light on purpose (pydantic and yaml only): the operator imports it.
"""

from __future__ import annotations

import copy
import enum
import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Self

import pydantic
import yaml
from pydantic import Field
from pydantic_core import PydanticCustomError

from relayrl_runtime import spec

CONFIG_VERSION: Final = 1

# Environment variables the runtime reads; the operator sets them on actor pods.
ENV_POD_INDEX: Final = "RELAYRL_POD_INDEX"
ENV_POD_NAME: Final = "RELAYRL_POD_NAME"
ENV_NAMESPACE: Final = "RELAYRL_NAMESPACE"
# Address the HTTP server and the ZMQ endpoint bind instead of `server.host`: the
# operator sets it from the pod IP (the local stack's process node runs several pods as
# host processes, each with its own 127.0.0.0/8 address).
ENV_BIND_ADDRESS: Final = "RELAYRL_BIND_ADDRESS"
# The config's cold fields as the pod's template has them (JSON, `cold_fields`). The
# process takes them over its file's: the file always holds the newest config, so a pod
# of an older template that restarts during a rolling update would otherwise run the
# new settings under its old template. Only the hot fields come from the file.
ENV_POD_CONFIG: Final = "RELAYRL_POD_CONFIG"


# Paths (wire names) of the fields a running process applies from its mounted config
# file without a restart (`live`); a change to any other field needs a new pod.
HOT_FIELDS: Final = (
    ("model", "version"),
    ("routers",),
    ("actors",),
    ("actorsPerPod",),
    ("sliceHandover",),
)
# Fields the rendered config carries for the reader's sake that no runtime reads (the
# operator's finalizer does): a change to them neither restarts nor reloads anything.
UNUSED_FIELDS: Final = (("trajectories", "nats", "retainOnDelete"),)


class LocalSink(spec.SpecModel):
    """Write trajectories to local Arrow/Parquet files instead of NATS (standalone use)."""

    path: str = Field(min_length=1, description="Directory the files are written under.")
    format: spec.SinkFormat = Field(
        default=spec.SinkFormat.PARQUET, description="parquet or arrow."
    )
    rotate_rows: int = Field(
        default=1_000_000, ge=1, description="Start a new file after this many rows."
    )
    rotate_seconds: float = Field(
        default=300.0, gt=0, description="Start a new file after this many seconds."
    )


class PolicyConfig(spec.SpecModel):
    """How actions are chosen from the model's outputs."""

    sample: bool = Field(
        default=True, description="Sample actions (true) or take the most likely one (false)."
    )
    seed: int | None = Field(default=None, ge=0, description="Seed of the action sampler.")


class ReloadConfig(spec.SpecModel):
    """Hot reload of the model from its path or the model registry."""

    enabled: bool = Field(default=True, description="Watch for new model versions.")
    poll_seconds: float = Field(
        default=2.0, ge=0.05, le=3600, description="How often the model source is checked."
    )


class RunLimits(spec.SpecModel):
    """Bounds: stop by itself after a run limit (demos, tests; unset runs until SIGTERM),
    and forget remote clients that went quiet."""

    max_env_steps: int | None = Field(default=None, ge=1, description="Env steps, then drain.")
    max_seconds: float | None = Field(default=None, gt=0, description="Seconds, then drain.")
    remote_client_idle_seconds: float = Field(
        default=60.0,
        gt=0,
        description=(
            "A remote client that sends nothing for this long is gone: its actors are "
            "removed and their partial trajectories flushed."
        ),
    )
    env_call_seconds: float = Field(
        default=600.0,
        gt=0,
        description=(
            "An environment step or reset running longer than this fails /healthz (the"
            " pod's liveness probe): a hung environment gets its pod restarted."
        ),
    )


class LogFormat(enum.StrEnum):
    """Log line format."""

    JSON = "json"
    TEXT = "text"


class ServerConfig(spec.SpecModel):
    """The HTTP server for /metrics, /healthz and /readyz."""

    host: str = Field(default="0.0.0.0", description="Listen address.")
    port: int = Field(default=9090, ge=0, le=65535, description="Listen port (0: any free).")


class RuntimeConfig(spec.SpecModel):
    """Everything one runtime process needs to run its slice of an Agent."""

    config_version: int = Field(
        default=CONFIG_VERSION,
        ge=CONFIG_VERSION,
        le=CONFIG_VERSION,
        description="Version of this config format.",
    )
    agent: str = Field(
        min_length=1,
        max_length=spec.MAX_NAME_LENGTH,
        pattern=spec.AGENT_NAME,
        description="Name of the Agent (a DNS-1035 label).",
    )
    namespace: str = Field(
        default="default",
        min_length=1,
        max_length=63,
        pattern=spec.DNS_LABEL,
        description="Namespace of the Agent (a DNS-1123 label).",
    )
    actors: int = Field(ge=0, le=100_000, description="Actors of the whole Agent.")
    actors_per_pod: int | None = Field(
        default=None, ge=1, description="Actors per pod; unset: this process runs all."
    )
    pod_index: int = Field(
        default=0,
        ge=0,
        le=(1 << 31) - 1,  # remote clients' actor ids start at pod_index << 32 (int64)
        description=f"Which slice of actors this process runs; {ENV_POD_INDEX} overrides it.",
    )
    slice_handover: bool | None = Field(
        default=None,
        description=(
            "Set by the operator while actors move between pods (an actorsPerPod change): "
            "run only those actors of this pod's slice that it already runs (none at "
            "start), so no actor runs in two pods at once. Cleared once every pod has."
        ),
    )
    routers: int = Field(default=1, ge=1, le=64, description="Router workers.")
    device: spec.Device = Field(default=spec.Device.CPU, description="Inference device.")
    model: spec.ModelSpec = Field(description="The policy.")
    environment: spec.EnvironmentSpec = Field(description="Where observations come from.")
    trajectories: spec.TrajectoriesSpec = Field(
        default_factory=spec.TrajectoriesSpec, description="Trajectory length and transport."
    )
    local_sink: LocalSink | None = Field(
        default=None, description="Write to local files instead of publishing to NATS."
    )
    create_stream: bool = Field(
        default=True,
        description=(
            "Make the trajectory stream where none stores the subject (standalone use). "
            "The operator sets false: the stream is the Agent's, made and deleted with it, "
            "so a pod still running after the Agent was deleted does not make it again."
        ),
    )
    server: ServerConfig = Field(default_factory=ServerConfig, description="HTTP endpoints.")
    policy: PolicyConfig = Field(default_factory=PolicyConfig, description="Action selection.")
    reload: ReloadConfig = Field(default_factory=ReloadConfig, description="Model hot reload.")
    limits: RunLimits = Field(default_factory=RunLimits, description="Optional run bounds.")
    log_format: LogFormat = Field(default=LogFormat.JSON, description="json or text logs.")
    drain_seconds: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="Longest SIGTERM drain (stop stepping, flush, close the sink); then exit 3.",
    )

    @pydantic.model_validator(mode="after")
    def _no_step_limit_for_remote_clients(self) -> Self:
        # Not a CRD rule (the runtime config is no custom resource): checked here only.
        if self.environment.remote is not None and self.limits.max_env_steps is not None:
            raise PydanticCustomError(
                "rule",
                "{message}",
                {
                    "message": "expected unset with environment.remote: it counts the steps of"
                    " environments in the pod, and remote clients step their own"
                    " (limits.maxSeconds bounds a remote run)",
                    "field": "limits.maxEnvSteps",
                },
            )
        return self

    def actor_slice(self) -> range:
        """Global actor indices of this process's slice (under `slice_handover` it runs
        only those it already ran)."""
        per_pod = self.actors_per_pod or self.actors
        start = min(self.pod_index * per_pod, self.actors)
        return range(start, min(start + per_pod, self.actors))


def revision(data: bytes) -> str:
    """A config file's revision: what a pod reports it applied, and the operator compares
    with the ConfigMap it wrote."""
    return hashlib.sha256(data).hexdigest()[:16]


def cold_fields(config: RuntimeConfig) -> dict[str, Any]:
    """The config in wire form without its hot and unused fields: what a pod runs
    until it is replaced (the operator puts it in the actor pods' template)."""
    data = config.model_dump(mode="json", by_alias=True, exclude_none=True)
    for path in (*HOT_FIELDS, *UNUSED_FIELDS):
        node = data
        for key in path[:-1]:
            node = node.get(key, {})
        node.pop(path[-1], None)
    return data


# What names a model (as the operator tells models apart): a file naming another one
# holds a `model.version` of that model, not of the pod's.
_MODEL_IDENTITY: Final = ("uri", "format")


def pod_fields(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The pod's own cold fields (`RELAYRL_POD_CONFIG`); None where it has none (a
    process started by hand, or by an older operator)."""
    environ = os.environ if environ is None else environ
    text = environ.get(ENV_POD_CONFIG, "").strip()
    if not text:
        return None
    try:
        cold = json.loads(text)
    except ValueError as err:
        raise spec.InvalidSpecError([(ENV_POD_CONFIG, f"not valid JSON: {err}")]) from None
    if not isinstance(cold, dict):
        raise spec.InvalidSpecError([(ENV_POD_CONFIG, "expected a JSON object")])
    return cold


def parse_as_run(
    text: str | bytes, source: str = "config", environ: Mapping[str, str] | None = None
) -> RuntimeConfig:
    """A config file as this process runs it. Where the pod has its own cold fields
    (`pod_fields`), only the file's hot fields are read, so the file may hold fields
    this runtime does not know (a newer operator's) or other values for the rest (a
    rolling update under way). Else the file as `parse` reads it.

    The file's `model.version` is taken only where the file names the pod's model
    (`_MODEL_IDENTITY`); otherwise the pod runs the newest version of its own."""
    environ = os.environ if environ is None else environ
    pod = pod_fields(environ)
    if pod is None:
        return parse(text, source, environ)
    data = _mapping(text, source)
    merged = copy.deepcopy(pod)
    file_model = data.get("model")
    pod_model = pod.get("model")
    same_model = (
        isinstance(file_model, Mapping)
        and isinstance(pod_model, Mapping)
        and all(file_model.get(k) == pod_model.get(k) for k in _MODEL_IDENTITY)
    )
    for path in HOT_FIELDS:
        if path == ("model", "version") and not same_model:
            continue
        value: Any = data
        for key in path:
            value = value.get(key) if isinstance(value, Mapping) else None
        if value is None:
            continue
        node = merged
        for key in path[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[path[-1]] = value
    try:
        return from_mapping(merged, environ)
    except spec.InvalidSpecError as err:
        hot = {".".join(p) for p in HOT_FIELDS}
        raise spec.InvalidSpecError(
            [
                (p if p in hot or "(from " in p else f"{p} (from {ENV_POD_CONFIG})", msg)
                for p, msg in err.problems
            ]
        ) from None


def bind_host(cfg: RuntimeConfig, environ: Mapping[str, str] | None = None) -> str:
    """The address servers listen on: `RELAYRL_BIND_ADDRESS` if set, else `server.host`."""
    environ = os.environ if environ is None else environ
    return environ.get(ENV_BIND_ADDRESS, "").strip() or cfg.server.host


def bind_field(environ: Mapping[str, str] | None = None) -> str:
    """Where the listen address comes from, for an error about it."""
    environ = os.environ if environ is None else environ
    return ENV_BIND_ADDRESS if environ.get(ENV_BIND_ADDRESS, "").strip() else "server.host"


def pod_name(cfg: RuntimeConfig, environ: Mapping[str, str] | None = None) -> str:
    """This pod's name: `RELAYRL_POD_NAME`, else `<agent>-<pod index>` (StatefulSet naming)."""
    environ = os.environ if environ is None else environ
    return environ.get(ENV_POD_NAME, "").strip() or f"{cfg.agent}-{cfg.pod_index}"


_ORDINAL: Final = re.compile(r"-(\d+)$")


def from_mapping(
    data: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> RuntimeConfig:
    """Validate a config mapping, applying the pod-index override from the environment."""
    environ = os.environ if environ is None else environ
    merged = dict(data)
    override = environ.get(ENV_POD_INDEX, "").strip()  # empty: unset, as for the others
    if not override and ENV_POD_INDEX in environ:
        # Set by the operator from the pod-index label, which clusters before 1.28 do
        # not put on pods: the ordinal ending the StatefulSet pod's name says the same.
        ordinal = _ORDINAL.search(environ.get(ENV_POD_NAME, ""))
        if ordinal is not None:
            override = ordinal.group(1)
    if override:
        merged["podIndex"] = override
    try:
        return RuntimeConfig.model_validate(merged)
    except pydantic.ValidationError as err:
        problems = spec.InvalidSpecError.from_validation_error(err).problems
        if override:
            # The override, not the file, is where a bad pod index came from.
            problems = tuple(
                (f"{path} (from {ENV_POD_INDEX})" if path == "podIndex" else path, msg)
                for path, msg in problems
            )
        raise spec.InvalidSpecError(problems) from None


def load(path: Path, environ: Mapping[str, str] | None = None) -> RuntimeConfig:
    """Read and validate a YAML (or JSON) config file."""
    return parse(path.read_bytes(), str(path), environ)


_DUMPER: Final = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def parse(
    text: str | bytes, source: str = "config", environ: Mapping[str, str] | None = None
) -> RuntimeConfig:
    """Validate the YAML (or JSON) text of a config file."""
    return from_mapping(_mapping(text, source), environ)


def _mapping(text: str | bytes, source: str) -> Mapping[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise spec.InvalidSpecError([(source, f"not valid YAML: {err}")]) from None
    if not isinstance(data, Mapping):
        raise spec.InvalidSpecError([(source, "expected a mapping at the top level")])
    return data


def dump(config: RuntimeConfig) -> str:
    """Render a config as YAML, the way the operator writes it into a ConfigMap."""
    data = config.model_dump(mode="json", by_alias=True, exclude_none=True)
    # libyaml's emitter when PyYAML has it: the same text, a tenth of the CPU (the
    # operator renders one per Agent on every apply).
    return yaml.dump(data, Dumper=_DUMPER, sort_keys=False)
