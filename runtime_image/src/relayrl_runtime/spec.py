"""The Agent custom resource, as typed models: the one source of truth for its API.

Everything about an Agent's shape lives here: fields, defaults, bounds, enums, the
description `kubectl explain` prints, and the cross-field rules. The operator
generates the CRD from these models (`make crds`), validates specs with them, and
renders the runtime config from them; the runtime reads the parts it needs.

This module is deliberately light (pydantic only): the operator imports it without
pulling in torch, onnxruntime or gymnasium (an import-linter contract keeps it so).

Cross-field rules are declared once, as `Rule`s next to the model they constrain.
Each carries a CEL expression for the apiserver (`x-kubernetes-validations`) and the
same predicate in Python, with one message, so a bad spec is rejected with the same
words by `Agent.model_validate` and by `kubectl apply`.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, ClassVar, Final, Literal, Self

import pydantic
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

GROUP: Final = "relayrl.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "Agent"
PLURAL: Final = "agents"
SINGULAR: Final = "agent"

# Child object names are built as "<agent>-<suffix>" and StatefulSet pods add
# "-<ordinal>" plus a 10-character revision hash label; 40 leaves room for all.
MAX_NAME_LENGTH: Final = 40

# Model versions travel as int64 (the wire format, the Arrow columns, Postgres bigint);
# the bound is also a float64 exactly, as the apiserver reads a CRD schema's bounds.
MAX_MODEL_VERSION: Final = (1 << 53) - 1

# The port of the runtime's and the sinks' HTTP server (/metrics, /healthz, /readyz).
METRICS_PORT: Final = 9090
# Environment variables the operator sets in the Agent's containers itself.
OPERATOR_ENV: Final = (
    "RELAYRL_POD_INDEX",
    "RELAYRL_POD_NAME",
    "RELAYRL_NAMESPACE",
    "RELAYRL_BIND_ADDRESS",
    "RELAYRL_POD_CONFIG",
    "RELAYRL_NATS_CREDENTIALS_DIR",
    "RELAYRL_NATS_TLS_DIR",
)
# Where the operator mounts volumes of its own in the Agent's containers.
SCRATCH_DIR: Final = "/tmp"
CONFIG_DIR: Final = "/etc/relayrl"

GPU_RESOURCE: Final = "nvidia.com/gpu"

# What nats-py can connect to: nats:// or tls:// URLs, comma separated (a trailing comma
# is skipped), each with a host (name, with or without the final dot, IPv4 or [IPv6]),
# optional user info and an optional port in 1..65535. Whitespace is spelled out: the
# apiserver's RE2 and Python differ on what \s matches.
_PORT: Final = (
    r"(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
)
_HOST: Final = r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?\.?)"
_NATS_URL: Final = rf"(nats|tls)://([^ \t\n\f\r\v/,]+@)?{_HOST}(:{_PORT})?/?"
NATS_URLS: Final = rf"^{_NATS_URL}(,{_NATS_URL})*,?$"
# User info in a URL (an Agent's credentials go in a Secret instead).
_USER_INFO: Final = r"://[^/,]*@"
NATS_URLS_EXPECTED: Final = (
    "nats:// or tls:// URLs, comma separated, each with a host and an optional port in 1..65535"
)
# A model's place: a path, a file:// URI, or a registry object (registry.ModelRef).
MODEL_URI: Final = r"^(/.*|file://.*|objectstore://[A-Za-z0-9_-]+/[^/?# \t\n\f\r\v]+)$"


@dataclass(frozen=True)
class Rule:
    """A cross-field rule, checked by the model and by the apiserver.

    `cel` is the expression the apiserver evaluates with `self` bound to the
    object the rule sits on; `holds` is the same predicate over the parsed model.
    `field` names the (camelCase) field the error is reported on, relative to
    that object, or "" for the object itself.
    """

    cel: str
    message: str
    holds: Callable[[Any], bool]
    field: str = ""

    def to_openapi(self) -> dict[str, str]:
        """The `x-kubernetes-validations` entry for this rule."""
        return _validation(self.cel, self.message, self.field)


@dataclass(frozen=True)
class Transition:
    """A rule on how a field may change on an existing Agent: the apiserver's alone.

    `cel` sees `self` (the new object) and `oldSelf` (the stored one); a model holds
    one spec at a time, so there is no Python side to it.
    """

    cel: str
    message: str
    field: str = ""

    def to_openapi(self) -> dict[str, str]:
        """The `x-kubernetes-validations` entry for this transition rule."""
        return _validation(self.cel, self.message, self.field)


def _validation(cel: str, message: str, field: str) -> dict[str, str]:
    out = {"rule": cel, "message": message}
    if field:
        out["fieldPath"] = f".{field}"
    return out


class SpecModel(BaseModel):
    """Base for every Agent model: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_enum_values=False,
        validate_default=True,
    )

    rules: ClassVar[tuple[Rule, ...]] = ()
    transitions: ClassVar[tuple[Transition, ...]] = ()

    @pydantic.model_validator(mode="after")
    def _check_rules(self) -> Self:
        for rule in type(self).rules:
            if not rule.holds(self):
                raise PydanticCustomError(
                    "rule", "{message}", {"message": rule.message, "field": rule.field}
                )
        return self

    @classmethod
    def __get_pydantic_json_schema__(
        cls,
        core_schema: Any,
        handler: pydantic.GetJsonSchemaHandler,
    ) -> dict[str, Any]:
        schema: dict[str, Any] = handler(core_schema)
        if cls.rules or cls.transitions:
            target = handler.resolve_ref_schema(schema)
            target["x-kubernetes-validations"] = [r.to_openapi() for r in cls.rules] + [
                t.to_openapi() for t in cls.transitions
            ]
        return schema


def _one_of(*fields: str) -> Callable[[Any], bool]:
    def holds(obj: Any) -> bool:
        return sum(getattr(obj, f) is not None for f in fields) == 1

    return holds


def _one_of_cel(*fields: str) -> str:
    present = ", ".join(f"has(self.{f})" for f in fields)
    return f"[{present}].filter(x, x).size() == 1"


def _preserve_unknown(description: str) -> Any:
    """A free-form object field (kwargs, affinity): kept as given by the apiserver."""
    return Field(
        default_factory=dict,
        description=description,
        json_schema_extra={"type": "object", "x-kubernetes-preserve-unknown-fields": True},
    )


# Largest keyword arguments of an environment, as compact JSON. They go into the actor
# pods' template (in one environment variable with the rest of the runtime config,
# where the kernel allows 128 KiB); no schema rule can count bytes, so the operator
# refuses a larger spec by this check.
MAX_KWARGS_BYTES: Final = 32 * 1024


def _bounded_kwargs(value: dict[str, Any]) -> dict[str, Any]:
    size = len(json.dumps(value, separators=(",", ":"), default=str).encode())
    if size > MAX_KWARGS_BYTES:
        raise PydanticCustomError(
            "rule",
            "{message}",
            {"message": f"expected at most {MAX_KWARGS_BYTES} bytes as JSON, got {size}"},
        )
    return value


Kwargs = Annotated[dict[str, Any], pydantic.AfterValidator(_bounded_kwargs)]


# Fields whose model default is built by a factory get `default: {}` in the CRD, so
# the apiserver fills in their nested defaults as the models do.
_EMPTY_OBJECT_DEFAULT: Final[dict[str, Any]] = {"default": {}}

# A Kubernetes resource quantity ("500m", "2Gi", 4): a number with an optional SI or
# binary suffix or exponent, never negative. Checked here and by the apiserver, so a
# "2GB" fails `kubectl apply` instead of the StatefulSet the operator makes of it.
QUANTITY: Final = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)(([KMGTPE]i)|[numkMGTPE]|[eE][+-]?[0-9]+)?$"


def _quantity_input(value: Any) -> Any:
    # YAML reads an unquoted 0.5 as a number and `true` as a bool; the apiserver takes
    # neither for an int-or-string field, so neither is taken here.
    if isinstance(value, bool):
        raise ValueError("expected a quantity such as 500m, 2Gi or 4, not true/false")
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise ValueError(
            f"expected a quantity; YAML reads {value} as a number: quote it"
            f' ("{value}", or "500m" for half a CPU)'
        )
    return value


def _quantity(value: int | str) -> int | str:
    if isinstance(value, int):
        if value < 0:
            raise ValueError("expected a quantity >= 0")
    elif re.fullmatch(QUANTITY, value) is None:
        raise ValueError("expected a Kubernetes quantity such as 500m, 2Gi or 4")
    return value


Quantity = Annotated[
    int | str,
    pydantic.BeforeValidator(_quantity_input),
    pydantic.AfterValidator(_quantity),
    pydantic.WithJsonSchema(
        {"x-kubernetes-int-or-string": True, "minimum": 0, "pattern": QUANTITY}
    ),
]

DNS_LABEL: Final = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# Agent names: DNS-1035 labels, as Service names are (and NATS subject tokens: no dot).
AGENT_NAME: Final = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
# Secret and claim names: DNS subdomains (labels joined by dots).
_DNS_SUBDOMAIN: Final = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
SQL_IDENT: Final = r"^[a-z_][a-z0-9_]{0,62}$"
_GYM_ID: Final = r"^[A-Za-z0-9_./:-]+$"
_ENTRY_POINT: Final = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$"
_SECRET_KEY: Final = r"^[-._a-zA-Z0-9]+$"
_STREAM_NAME: Final = r"^[A-Za-z0-9_-]+$"
# Label values (labels, node selectors): at most 63 characters, alphanumeric at both
# ends, '-', '_' and '.' between; empty is one too.
_LABEL_VALUE: Final = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
LabelValue = Annotated[str, pydantic.StringConstraints(max_length=63, pattern=_LABEL_VALUE)]
# Label and annotation keys: qualified names, a name of at most 63 characters after an
# optional DNS subdomain prefix (at most 253) and '/'.
_QUALIFIED_NAME: Final = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
_PREFIX_MAX: Final = 253
_ABSOLUTE_PATH: Final = r"^/"
_ENV_NAME: Final = r"^[A-Za-z_][A-Za-z0-9_]*$"


class Device(enum.StrEnum):
    """Where inference runs."""

    CPU = "cpu"
    CUDA = "cuda"


class ModelFormat(enum.StrEnum):
    """Serialized policy formats the runtime can load."""

    ONNX = "onnx"
    TORCHSCRIPT = "torchscript"


class ModelMode(enum.StrEnum):
    """Whether a pod's actors share one policy instance or each hold their own."""

    SHARED = "shared"
    INDEPENDENT = "independent"


class SinkFormat(enum.StrEnum):
    """File format written by the Arrow sink."""

    PARQUET = "parquet"
    ARROW = "arrow"


class ParquetCompression(enum.StrEnum):
    """Codec of the Arrow sink's Parquet files.

    snappy, the default (as in pyarrow, Spark and DuckDB), is read everywhere and costs the
    sink about a quarter less CPU per step than zstd; zstd files are about an eighth smaller.
    """

    SNAPPY = "snappy"
    ZSTD = "zstd"
    LZ4 = "lz4"
    NONE = "none"


class VectorMode(enum.StrEnum):
    """How a pod steps its gymnasium environments."""

    SYNC = "sync"
    ASYNC = "async"


class PullPolicy(enum.StrEnum):
    """Container image pull policy."""

    ALWAYS = "Always"
    IF_NOT_PRESENT = "IfNotPresent"
    NEVER = "Never"


class Phase(enum.StrEnum):
    """The coarse state of an Agent, shown by `kubectl get agents`."""

    PENDING = "Pending"
    PROGRESSING = "Progressing"
    READY = "Ready"
    DEGRADED = "Degraded"
    PAUSED = "Paused"
    FAILED = "Failed"


class ConditionType(enum.StrEnum):
    """Condition types reported in `status.conditions`."""

    READY = "Ready"
    PROGRESSING = "Progressing"
    DEGRADED = "Degraded"
    PAUSED = "Paused"
    STREAM_READY = "StreamReady"
    SINKS_READY = "SinksReady"
    MODEL_READY = "ModelReady"


class ConditionStatus(enum.StrEnum):
    """Kubernetes condition status values."""

    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


# --------------------------------------------------------------------------- model


class ModelSpec(SpecModel):
    """The policy every actor runs."""

    rules = (
        Rule(
            cel=f"self.uri.matches(r'{MODEL_URI}')",
            message="expected an absolute path, a file:// URI or objectstore://<bucket>/<name>",
            holds=lambda m: re.fullmatch(MODEL_URI, m.uri) is not None,
            field="uri",
        ),
    )

    uri: str = Field(
        min_length=1,
        max_length=2048,
        description=(
            "Where the model is: an absolute path or file:// URI of a model directory "
            "(with relayrl-model.json), or objectstore://<bucket>/<name> for the "
            "NATS JetStream object store used as the model registry."
        ),
    )
    format: ModelFormat = Field(description="Serialized model format: onnx or torchscript.")
    version: int | None = Field(
        default=None,
        ge=1,
        le=MAX_MODEL_VERSION,
        description=(
            "Model version to run. Unset means the newest version the registry has; "
            "a change is hot-reloaded by running pods."
        ),
    )
    mode: ModelMode = Field(
        default=ModelMode.SHARED,
        description=(
            "shared: one model instance per pod, one batched forward pass for all its "
            "actors; independent: one instance per actor."
        ),
    )


# --------------------------------------------------------------------- environment


class GymnasiumEnv(SpecModel):
    """A gymnasium environment stepped inside the actor pod."""

    id: str = Field(
        min_length=1,
        max_length=253,
        pattern=_GYM_ID,
        description="Registered gymnasium environment id, e.g. CartPole-v1.",
    )
    envs_per_actor: int = Field(
        default=1, ge=1, le=1024, description="Environment copies each actor steps."
    )
    vector_mode: VectorMode = Field(
        default=VectorMode.SYNC,
        description="sync steps all copies in the runtime process; async uses subprocesses.",
    )
    kwargs: Kwargs = _preserve_unknown(
        "Keyword arguments passed to gymnasium.make (at most 32 KiB as JSON)."
    )


class RemoteEnv(SpecModel):
    """Environments outside the pod, connecting over ZMQ with the client library."""

    rules = (
        Rule(
            cel=f"!has(self.port) || self.port != {METRICS_PORT}",
            message=f"port {METRICS_PORT} is the runtime's metrics port: choose another",
            holds=lambda r: r.port != METRICS_PORT,
            field="port",
        ),
    )

    port: int = Field(default=5555, ge=1024, le=65535, description="TCP port of the ZMQ endpoint.")
    max_frame_bytes: int = Field(
        default=1 << 20,
        ge=1024,
        le=64 << 20,
        description="Largest request frame accepted; bigger frames get an error reply.",
    )
    max_clients: int = Field(
        default=1024, ge=1, le=65536, description="Most remote clients served at once."
    )
    max_actors: int = Field(
        default=65536,
        ge=1,
        le=65536,
        description=(
            "Most actors the remote clients of one pod hold at once (all together): each"
            " holds a trajectory buffer, so this bounds the pod's memory."
        ),
    )


class PythonEnv(SpecModel):
    """A custom environment factory loaded from a Python entry point."""

    entry_point: str = Field(
        max_length=512,
        pattern=_ENTRY_POINT,
        description=(
            "module.path:callable returning a gymnasium-style environment, or a vector "
            "env (num_envs) with same-step autoreset."
        ),
    )
    envs_per_actor: int = Field(
        default=1, ge=1, le=1024, description="Environment copies each actor steps."
    )
    kwargs: Kwargs = _preserve_unknown(
        "Keyword arguments passed to the callable (at most 32 KiB as JSON)."
    )


class EnvironmentSpec(SpecModel):
    """Where observations come from: exactly one of gymnasium, remote or python."""

    rules = (
        Rule(
            cel=_one_of_cel("gymnasium", "remote", "python"),
            message="exactly one of gymnasium, remote or python must be set",
            holds=_one_of("gymnasium", "remote", "python"),
        ),
    )

    gymnasium: GymnasiumEnv | None = Field(
        default=None, description="Step a gymnasium environment in the pod."
    )
    remote: RemoteEnv | None = Field(
        default=None, description="Serve remote environment clients over ZMQ."
    )
    python: PythonEnv | None = Field(
        default=None, description="Load a custom environment from a Python entry point."
    )

    def copies_per_actor(self) -> int:
        """Environment copies each actor steps in its pod (0: remote clients bring them)."""
        local = self.gymnasium or self.python
        return local.envs_per_actor if local is not None else 0


# --------------------------------------------------------------------- trajectories


class SecretRef(SpecModel):
    """A Secret in the Agent's namespace."""

    name: str = Field(
        min_length=1, max_length=253, pattern=_DNS_SUBDOMAIN, description="Secret name."
    )


class SecretKeyRef(SpecModel):
    """One key of a Secret in the Agent's namespace."""

    name: str = Field(
        min_length=1, max_length=253, pattern=_DNS_SUBDOMAIN, description="Secret name."
    )
    key: str = Field(
        default="dsn",
        min_length=1,
        max_length=253,
        pattern=_SECRET_KEY,
        description="Key within the Secret.",
    )


class NatsTLS(SpecModel):
    """TLS towards NATS."""

    secret_name: str = Field(
        max_length=253,
        pattern=_DNS_SUBDOMAIN,
        description="Secret holding ca.crt and, for mutual TLS, tls.crt and tls.key.",
    )


class NatsSpec(SpecModel):
    """How the runtime reaches NATS JetStream."""

    transitions = (
        Transition(
            "has(self.stream) == has(oldSelf.stream)"
            " && (!has(self.stream) || self.stream == oldSelf.stream)",
            "stream cannot change on an existing Agent (the stream holds its trajectories"
            " and the sinks' positions in it); create a new Agent for a new stream",
            "stream",
        ),
    )

    rules = (
        Rule(
            cel=f"!has(self.url) || self.url.matches(r'{NATS_URLS}')",
            message=f"expected {NATS_URLS_EXPECTED}",
            holds=lambda n: re.fullmatch(NATS_URLS, n.url) is not None,
            field="url",
        ),
        Rule(
            cel=f"!has(self.url) || !self.url.matches(r'{_USER_INFO}')",
            message="expected no user:password@ in the URL (it would be copied into the"
            " runtime ConfigMap, the sink pods' arguments, logs and Events): put the"
            " credentials in credentialsSecret",
            holds=lambda n: re.search(_USER_INFO, n.url) is None,
            field="url",
        ),
    )

    url: str = Field(
        default="nats://nats:4222",
        max_length=2048,
        description="NATS server URL(s), comma separated; credentials go in credentialsSecret.",
    )
    stream: str | None = Field(
        default=None,
        max_length=200,
        pattern=_STREAM_NAME,
        description="JetStream stream name; defaults to one derived from namespace and agent.",
    )
    credentials_secret: SecretRef | None = Field(
        default=None,
        description=(
            "Secret with NATS credentials: keys user and password, or token, or creds "
            "(a .creds file)."
        ),
    )
    tls: NatsTLS | None = Field(default=None, description="TLS settings; unset means plain TCP.")
    max_batch_bytes: int = Field(
        default=1 << 20,
        ge=64 << 10,
        le=8 << 20,
        description="Largest published message; several trajectories go in one message.",
    )
    retain_on_delete: bool = Field(
        default=False,
        description=(
            "Keep the stream, the model bucket and an arrow sink's claim made from"
            " storage.size when the Agent is deleted."
        ),
    )


class TrajectoriesSpec(SpecModel):
    """How trajectories are cut and shipped."""

    max_length: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="Steps after which a trajectory is cut and marked truncated.",
    )
    nats: NatsSpec = Field(
        default_factory=NatsSpec,
        description="NATS JetStream transport.",
        json_schema_extra=_EMPTY_OBJECT_DEFAULT,
    )


# ---------------------------------------------------------------------------- sinks


class Resources(SpecModel):
    """Compute resources of a container."""

    requests: dict[str, Quantity] = Field(
        default_factory=dict,
        description="Minimum resources, e.g. cpu: 500m.",
        json_schema_extra=_EMPTY_OBJECT_DEFAULT,
    )
    limits: dict[str, Quantity] = Field(
        default_factory=dict,
        description="Maximum resources, e.g. memory: 2Gi.",
        json_schema_extra=_EMPTY_OBJECT_DEFAULT,
    )


def _no_gpu_in(resources: Resources | None) -> bool:
    return resources is None or (
        GPU_RESOURCE not in resources.limits and GPU_RESOURCE not in resources.requests
    )


def _no_gpu_rule(message: str) -> Rule:
    """No GPUs in `resources` (they come from spec.gpusPerPod, on actor pods only)."""
    return Rule(
        cel=(
            "!has(self.resources) || "
            "(!('nvidia.com/gpu' in self.resources.limits) && "
            "!('nvidia.com/gpu' in self.resources.requests))"
        ),
        message=message,
        holds=lambda m: _no_gpu_in(m.resources),
        field="resources",
    )


class ArrowStorage(SpecModel):
    """Volume for the Arrow sink's files."""

    rules = (
        Rule(
            cel="!(has(self.existingClaim) && has(self.size))",
            message="set either existingClaim or size, not both",
            holds=lambda s: not (s.existing_claim is not None and s.size is not None),
        ),
    )

    existing_claim: str | None = Field(
        default=None,
        max_length=253,
        pattern=_DNS_SUBDOMAIN,
        description="Use this PersistentVolumeClaim.",
    )
    size: Quantity | None = Field(
        default=None, description="Create a PersistentVolumeClaim of this size."
    )
    storage_class_name: str | None = Field(
        default=None, max_length=253, description="Storage class for a created claim."
    )


class ArrowSink(SpecModel):
    """Write trajectories to Parquet or Arrow IPC files."""

    rules = (
        Rule(
            cel=(
                f"!has(self.path) || (!self.path.matches('^{SCRATCH_DIR}/*$')"
                f" && self.path != '{CONFIG_DIR}' && !self.path.startsWith('{CONFIG_DIR}/'))"
            ),
            message=(
                f"{SCRATCH_DIR} and {CONFIG_DIR} are the sink's own mounts: choose another"
                " directory"
            ),
            holds=lambda a: _own_mount(a.path) is None,
            field="path",
        ),
        _no_gpu_rule("a sink uses no GPU"),
    )

    format: SinkFormat = Field(default=SinkFormat.PARQUET, description="parquet or arrow.")
    compression: ParquetCompression = Field(
        default=ParquetCompression.SNAPPY,
        description="Parquet codec: snappy (fastest to write), zstd (smallest), lz4 or none.",
    )
    path: str = Field(
        default="/data/trajectories",
        max_length=1024,
        pattern=_ABSOLUTE_PATH,
        description="Directory in the sink pod files are written under.",
    )
    storage: ArrowStorage | None = Field(
        default=None, description="Persistent volume for path; unset means an emptyDir."
    )
    rotate_bytes: int = Field(
        default=128 << 20,
        ge=1 << 20,
        le=4 << 30,
        description="Start a new file after this many bytes.",
    )
    rotate_seconds: int = Field(
        default=300, ge=1, le=86400, description="Start a new file after this many seconds."
    )
    resources: Resources | None = Field(
        default=None,
        description="Compute resources of the sink container (none: the namespace's defaults).",
    )


class PostgresSink(SpecModel):
    """Write trajectory steps as PostgreSQL rows."""

    rules = (_no_gpu_rule("a sink uses no GPU"),)

    dsn_secret: SecretKeyRef = Field(description="Secret key holding the libpq connection string.")
    schema_name: str = Field(
        default="relayrl",
        pattern=SQL_IDENT,
        description="Database schema the sink creates and migrates.",
    )
    table: str = Field(
        default="steps", pattern=SQL_IDENT, description="Table the steps are written to."
    )
    batch_rows: int = Field(default=10_000, ge=1, le=1_000_000, description="Rows per COPY batch.")
    resources: Resources | None = Field(
        default=None,
        description="Compute resources of the sink container (none: the namespace's defaults).",
    )


class SinkSpec(SpecModel):
    """One trajectory sink: exactly one of arrow or postgres."""

    rules = (
        Rule(
            cel=_one_of_cel("arrow", "postgres"),
            message="exactly one of arrow or postgres must be set",
            holds=_one_of("arrow", "postgres"),
        ),
    )

    arrow: ArrowSink | None = Field(default=None, description="An Arrow/Parquet file sink.")
    postgres: PostgresSink | None = Field(default=None, description="A PostgreSQL sink.")


# ------------------------------------------------------------------------- template


class Toleration(SpecModel):
    """A pod toleration (see core/v1 Toleration)."""

    # Kubernetes' own rules between the fields, checked here so that a bad toleration
    # fails `kubectl apply`, not the pods the operator makes.
    rules = (
        Rule(
            cel="!has(self.operator) || self.operator != 'Exists' || !has(self.value)"
            " || self.value == ''",
            message="value must be empty with operator Exists",
            holds=lambda t: t.operator != "Exists" or not t.value,
            field="value",
        ),
        Rule(
            cel="(has(self.key) && self.key != '')"
            " || (has(self.operator) && self.operator == 'Exists')",
            message="an empty key needs operator Exists (it then tolerates every taint)",
            holds=lambda t: bool(t.key) or t.operator == "Exists",
            field="key",
        ),
        Rule(
            cel="!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
            message="tolerationSeconds needs effect NoExecute",
            holds=lambda t: t.toleration_seconds is None or t.effect == "NoExecute",
            field="tolerationSeconds",
        ),
    )

    key: str | None = Field(default=None, max_length=316, description="Taint key.")
    operator: Literal["Exists", "Equal"] | None = Field(
        default=None, description="Exists or Equal."
    )
    value: str | None = Field(default=None, max_length=63, description="Taint value.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; unset tolerates all."
    )
    toleration_seconds: int | None = Field(
        default=None, description="How long a NoExecute taint is tolerated."
    )


class KeyRef(SpecModel):
    """One key of a Secret or ConfigMap in the Agent's namespace."""

    name: str = Field(
        min_length=1, max_length=253, pattern=_DNS_SUBDOMAIN, description="Object name."
    )
    key: str = Field(
        min_length=1, max_length=253, pattern=_SECRET_KEY, description="Key within it."
    )
    optional: bool = Field(
        default=False, description="Start the container without it when it is missing."
    )


class EnvVarSource(SpecModel):
    """Where a variable's value comes from (see core/v1 EnvVarSource): a Secret's key
    keeps a credential the Agent's environment needs out of the spec and the pod."""

    rules = (
        Rule(
            cel=_one_of_cel("secretKeyRef", "configMapKeyRef"),
            message="exactly one of secretKeyRef or configMapKeyRef must be set",
            holds=_one_of("secret_key_ref", "config_map_key_ref"),
        ),
    )

    secret_key_ref: KeyRef | None = Field(default=None, description="A key of a Secret.")
    config_map_key_ref: KeyRef | None = Field(default=None, description="A key of a ConfigMap.")


class EnvVar(SpecModel):
    """An extra environment variable for the runtime container."""

    rules = (
        Rule(
            cel=f"!(self.name in {list(OPERATOR_ENV)})",
            message=f"set by the operator, not the template: {', '.join(OPERATOR_ENV)}",
            holds=lambda e: e.name not in OPERATOR_ENV,
            field="name",
        ),
        Rule(
            cel="!has(self.valueFrom) || !has(self.value) || self.value == ''",
            message="expected value or valueFrom, not both",
            holds=lambda e: e.value_from is None or not e.value,
            field="value",
        ),
    )

    name: str = Field(
        min_length=1,
        max_length=256,
        pattern=_ENV_NAME,
        description="Variable name.",
    )
    value: str = Field(default="", max_length=32768, description="Variable value.")
    value_from: EnvVarSource | None = Field(
        default=None, description="The value from a Secret's or a ConfigMap's key."
    )

    def manifest(self) -> dict[str, Any]:
        """The variable as a container's env entry."""
        if self.value_from is None:
            return {"name": self.name, "value": self.value}
        return {
            "name": self.name,
            "valueFrom": self.value_from.model_dump(by_alias=True, exclude_none=True),
        }


def _own_mount(path: str) -> str | None:
    """The operator's mount `path` falls on, if any."""
    bare = path.rstrip("/") or "/"
    if bare == SCRATCH_DIR:
        return SCRATCH_DIR
    if bare == CONFIG_DIR or bare.startswith(CONFIG_DIR + "/"):
        return CONFIG_DIR
    return None


def _unique_names(env: Sequence[EnvVar]) -> bool:
    return len({e.name for e in env}) == len(env)


def _qualified(key: str) -> bool:
    prefix, _, _ = key.rpartition("/")
    return re.fullmatch(_QUALIFIED_NAME, key) is not None and len(prefix) <= _PREFIX_MAX


def _keys_rule(field: str, attribute: str, what: str) -> Rule:
    """Every key of the map `field` a qualified name, as Kubernetes takes them."""
    return Rule(
        cel=(
            f"!has(self.{field}) || self.{field}.all(k, k.matches(r'{_QUALIFIED_NAME}')"
            f" && (!k.contains('/') || k.indexOf('/') <= {_PREFIX_MAX}))"
        ),
        message=(
            f"{what} keys: expected an optional DNS subdomain prefix and '/', then at most"
            " 63 letters, digits, '-', '_' and '.', starting and ending alphanumeric"
            " (e.g. example.com/team)"
        ),
        holds=lambda t: all(_qualified(k) for k in getattr(t, attribute)),
        field=field,
    )


class PodTemplate(SpecModel):
    """Overrides for the Agent's pods.

    Image, pull policy and placement (node selector, tolerations, affinity, priority
    class, service account) apply to the sink pods as well; the rest to actor pods only.
    """

    rules = (
        _no_gpu_rule("set GPUs with spec.gpusPerPod, not template.resources"),
        Rule(
            # No default in the schema: a template without env has no such key.
            cel=(
                "!has(self.env)"
                " || self.env.all(e, self.env.filter(f, f.name == e.name).size() == 1)"
            ),
            message="each variable name at most once",
            holds=lambda t: _unique_names(t.env),
            field="env",
        ),
        _keys_rule("labels", "labels", "label"),
        _keys_rule("nodeSelector", "node_selector", "label"),
        _keys_rule("annotations", "annotations", "annotation"),
    )

    image: str | None = Field(
        default=None,
        max_length=1024,
        description=(
            "Image of the actor and sink pods; defaults to the operator's runtime image"
            " setting (RELAYRL_RUNTIME_IMAGE, the chart's runtimeImage)."
        ),
    )
    image_pull_policy: PullPolicy | None = Field(
        default=None, description="Image pull policy of the actor and sink containers."
    )
    node_selector: dict[str, LabelValue] = Field(
        default_factory=dict,
        max_length=64,
        description="Node labels the actor and sink pods must match.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        max_length=64,
        description=(
            "Taints the actor and sink pods tolerate (actor pods of a cuda Agent"
            " tolerate nvidia.com/gpu without it)."
        ),
    )
    affinity: dict[str, Any] = _preserve_unknown(
        "Affinity rules of the actor and sink pods (core/v1 Affinity)."
    )
    priority_class_name: str | None = Field(
        default=None,
        max_length=253,
        pattern=_DNS_SUBDOMAIN,
        description="PriorityClass of the actor and sink pods.",
    )
    runtime_class_name: str | None = Field(
        default=None,
        max_length=253,
        pattern=_DNS_SUBDOMAIN,
        description="RuntimeClass of the actor pods (e.g. nvidia).",
    )
    service_account_name: str | None = Field(
        default=None,
        max_length=253,
        pattern=_DNS_SUBDOMAIN,
        description="ServiceAccount the actor and sink pods run as.",
    )
    resources: Resources | None = Field(
        default=None, description="CPU and memory of the runtime container."
    )
    env: list[EnvVar] = Field(
        default_factory=list, max_length=128, description="Extra environment variables."
    )
    labels: dict[str, LabelValue] = Field(
        default_factory=dict, max_length=64, description="Extra labels on the actor pods."
    )
    annotations: dict[str, str] = Field(
        default_factory=dict, max_length=64, description="Extra annotations on the actor pods."
    )


# ----------------------------------------------------------------------------- spec


def _at_most_one_per_kind(sinks: Sequence[SinkSpec]) -> bool:
    return (
        sum(s.arrow is not None for s in sinks) <= 1
        and sum(s.postgres is not None for s in sinks) <= 1
    )


class AgentSpec(SpecModel):
    """The desired state of an actor fleet."""

    rules = (
        Rule(
            cel="self.device != 'cuda' || self.gpusPerPod >= 1",
            message="device cuda needs gpusPerPod >= 1",
            holds=lambda s: s.device != Device.CUDA or s.gpus_per_pod >= 1,
            field="gpusPerPod",
        ),
        Rule(
            cel="self.device != 'cpu' || self.gpusPerPod == 0",
            message="device cpu must not request GPUs: gpusPerPod must be 0",
            holds=lambda s: s.device != Device.CPU or s.gpus_per_pod == 0,
            field="gpusPerPod",
        ),
        Rule(
            cel=(
                "self.sinks.filter(s, has(s.arrow)).size() <= 1 && "
                "self.sinks.filter(s, has(s.postgres)).size() <= 1"
            ),
            message="at most one arrow and one postgres sink",
            holds=lambda s: _at_most_one_per_kind(s.sinks),
            field="sinks",
        ),
    )

    actors: int = Field(
        default=1,
        ge=0,
        le=100_000,
        description="Number of actors; the scale subresource maps to this field.",
    )
    routers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Router workers per pod that encode and ship finished trajectories.",
    )
    actors_per_pod: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="Actors each pod runs (pods = ceil(actors / actorsPerPod)); unset: one pod.",
    )
    device: Device = Field(default=Device.CPU, description="Inference device: cpu or cuda.")
    gpus_per_pod: int = Field(
        default=0,
        ge=0,
        le=16,
        description="nvidia.com/gpu each actor pod requests; >= 1 for cuda, 0 for cpu.",
    )
    model: ModelSpec = Field(description="The policy the actors run.")
    environment: EnvironmentSpec = Field(description="Where observations come from.")
    trajectories: TrajectoriesSpec = Field(
        default_factory=TrajectoriesSpec,
        description="Trajectory length and NATS transport.",
        json_schema_extra=_EMPTY_OBJECT_DEFAULT,
    )
    sinks: list[SinkSpec] = Field(
        default_factory=list,
        max_length=2,
        description="Where trajectories are written: at most one arrow and one postgres sink.",
        json_schema_extra={"default": []},
    )
    template: PodTemplate | None = Field(
        default=None,
        description=(
            "Overrides for the actor pods (scheduling, resources, image); image and"
            " placement apply to the sink pods too."
        ),
    )
    paused: bool = Field(
        default=False,
        description="Scale actors to zero while keeping the stream and sinks.",
    )

    def pods(self) -> int:
        """Actor pods the spec asks for."""
        if self.paused or self.actors == 0:
            return 0
        per_pod = self.actors_per_pod or self.actors
        return -(-self.actors // per_pod)


# --------------------------------------------------------------------------- status


class Condition(SpecModel):
    """A status condition, as Kubernetes conventions define it."""

    type: ConditionType = Field(description="Condition type.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(
        default="", max_length=1024, description="CamelCase reason for the last transition."
    )
    message: str = Field(default="", max_length=32768, description="Human-readable details.")
    last_transition_time: datetime | None = Field(
        default=None, description="When the status last changed."
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="Spec generation the condition was computed from."
    )


class AgentStatus(SpecModel):
    """The observed state of an actor fleet, written by the operator."""

    model_config = ConfigDict(extra="ignore")

    observed_generation: int | None = Field(
        default=None, ge=0, description="Spec generation the operator last acted on."
    )
    phase: Phase | None = Field(default=None, description="Coarse state of the Agent.")
    conditions: list[Condition] = Field(
        default_factory=list, max_length=16, description="Detailed status conditions."
    )
    desired_actors: int | None = Field(
        default=None, ge=0, description="Actors the spec asks for (0 while paused)."
    )
    ready_actors: int | None = Field(default=None, ge=0, description="Actors in ready pods.")
    desired_pods: int | None = Field(default=None, ge=0, description="Actor pods wanted.")
    ready_pods: int | None = Field(default=None, ge=0, description="Actor pods ready.")
    model_version: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Lowest version of spec.model.uri that ready pods run (pods still on a "
            "model a rollout replaces are not counted)."
        ),
    )
    model_rollout: int | None = Field(
        default=None,
        ge=0,
        description=(
            "The last model version running pods could not hot-reload (another layout), "
            "for which the actor pods were rolled instead."
        ),
    )
    selector: str | None = Field(
        default=None, description="Label selector of the actor pods (for the scale subresource)."
    )


# --------------------------------------------------------------------------- object


class ObjectMeta(BaseModel):
    """The part of metadata the Agent API constrains; everything else passes through."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = Field(
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        pattern=AGENT_NAME,
        description="Agent name.",
    )
    namespace: str | None = None


class Agent(BaseModel):
    """A whole Agent object as read from a manifest or the apiserver."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    api_version: str = Field(default=API_VERSION, alias="apiVersion", pattern=f"^{API_VERSION}$")
    kind: str = Field(default=KIND, pattern=f"^{KIND}$")
    metadata: ObjectMeta
    spec: AgentSpec
    status: AgentStatus | None = None


# ------------------------------------------------------------------------- errors


class InvalidSpecError(ValueError):
    """A spec that breaks the Agent API, with one line per broken field."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems: tuple[tuple[str, str], ...] = tuple(problems)
        super().__init__("; ".join(f"{path}: {msg}" for path, msg in self.problems))

    @classmethod
    def from_validation_error(cls, err: pydantic.ValidationError, root: str = "") -> Self:
        """Translate pydantic's errors into `field.path: rule` lines in wire (camelCase) names."""
        problems = []
        for e in err.errors(include_url=False):
            parts = [root] if root else []
            loc = e["loc"]
            for i, p in enumerate(loc):
                if _is_bad_key(e) and i >= len(loc) - (2 if loc[-1] == "[key]" else 1):
                    break  # the key itself (pydantic puts True as 1), which the message names
                if isinstance(p, int) and parts:
                    parts[-1] += f"[{p}]"  # a list index
                elif not _is_union_tag(str(p)) or (
                    # The unknown key itself, even one named like a union member.
                    e["type"] == "extra_forbidden" and i == len(loc) - 1
                ):
                    parts.append(str(p))
            field = (e.get("ctx") or {}).get("field")
            if field:
                parts.append(str(field))
            problems.append((".".join(parts) or "<root>", _describe(e)))
        return cls(problems)


def _is_union_tag(part: object) -> bool:
    # pydantic puts the chosen union member ("int", "str") in the location of
    # errors under a union; it names no field, so it is left out.
    return isinstance(part, str) and part in {"int", "str", "function-after[...]"}


def _is_bad_key(e: Mapping[str, Any]) -> bool:
    """A mapping key that is not text (YAML's `on:` or `1:`), top level or nested."""
    return e["type"] == "invalid_key" or (bool(e["loc"]) and e["loc"][-1] == "[key]")


# What each pattern asks for, in words (the apiserver can only quote the pattern).
_PATTERN_WORDS: Final = {
    DNS_LABEL: "lower-case letters, digits and '-', starting and ending alphanumeric",
    AGENT_NAME: (
        "lower-case letters, digits and '-', starting with a letter and ending alphanumeric"
    ),
    _DNS_SUBDOMAIN: (
        "lower-case letters, digits, '-' and '.', each dot-separated part starting and"
        " ending alphanumeric"
    ),
    SQL_IDENT: (
        "a SQL name: lower-case letters, digits and '_', not starting with a digit,"
        " at most 63 characters"
    ),
    _GYM_ID: "letters, digits and _ . / : -",
    _ENTRY_POINT: "module.path:callable",
    _SECRET_KEY: "letters, digits and - . _",
    _STREAM_NAME: "letters, digits, '_' and '-'",
    _LABEL_VALUE: (
        "a label value: at most 63 letters, digits, '-', '_' and '.', starting and ending"
        " alphanumeric"
    ),
    _ABSOLUTE_PATH: "an absolute path",
    _ENV_NAME: "letters, digits and '_', not starting with a digit",
}


def _describe(e: Mapping[str, Any]) -> str:
    msg = str(e["msg"]).removeprefix("Value error, ")
    if e["type"] == "string_pattern_mismatch":
        words = _PATTERN_WORDS.get(str((e.get("ctx") or {}).get("pattern")))
        if words is not None:
            msg = f"expected {words}"
    if _is_bad_key(e):
        # YAML reads bare on/off/yes/no as booleans and digits as numbers.
        return f"expected text keys, got the key {e['input']!r} (quote it)"
    if e["type"] in {"rule", "missing", "extra_forbidden"}:
        return {"missing": "required field is missing", "extra_forbidden": "unknown field"}.get(
            e["type"], msg
        )
    return f"{msg} (got {e['input']!r})"


def parse_agent(obj: Mapping[str, Any]) -> Agent:
    """Validate a whole Agent object; raise InvalidSpecError naming each bad field."""
    try:
        return Agent.model_validate(obj)
    except pydantic.ValidationError as err:
        raise InvalidSpecError.from_validation_error(err) from None


def parse_spec(spec: Mapping[str, Any]) -> AgentSpec:
    """Validate just a spec (as Kopf hands it over); errors are rooted at `spec`."""
    try:
        return AgentSpec.model_validate(spec)
    except pydantic.ValidationError as err:
        raise InvalidSpecError.from_validation_error(err, root="spec") from None


def check_name(name: str) -> None:
    """An Agent's name as the API takes it now (one stored before a stricter rule may
    break it); errors are rooted at `metadata.name`."""
    try:
        ObjectMeta.model_validate({"name": name})
    except pydantic.ValidationError as err:
        raise InvalidSpecError.from_validation_error(err, root="metadata") from None


def parse_nats(spec: Mapping[str, Any], *, url_credentials: bool = False) -> NatsSpec:
    """Just a spec's `trajectories.nats` (its defaults where the spec leaves it out):
    where an Agent's stream is, even when the rest of its spec is invalid. Errors are
    rooted at `spec.trajectories.nats`.

    `url_credentials`: take user info in the URL, as Agents stored before that was
    refused have it (their cleanup connects with it)."""
    section: Any = spec
    path = "spec"
    for key in ("trajectories", "nats"):
        section = section.get(key) if isinstance(section, Mapping) else None
        path = f"{path}.{key}"
        if section is None:
            section = {}
        elif not isinstance(section, Mapping):
            raise InvalidSpecError([(path, f"expected a mapping, got {type(section).__name__}")])
    url = section.get("url")
    try:
        if url_credentials and isinstance(url, str) and re.search(_USER_INFO, url):
            bare = NatsSpec.model_validate({**section, "url": re.sub(_USER_INFO, "://", url)})
            return bare.model_copy(update={"url": url})
        return NatsSpec.model_validate(section)
    except pydantic.ValidationError as err:
        raise InvalidSpecError.from_validation_error(err, root=path) from None
