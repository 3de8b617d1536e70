"""Typed errors of the runtime: every message names the field, what was expected and what came.

Raised by the agent API, model loading and the process; the ZMQ endpoint turns them into
error replies (their `kind` goes on the wire), so a remote client sees the same words.
"""

from __future__ import annotations


class RelayRLError(Exception):
    """Base of every error the runtime raises on purpose."""

    kind = "error"


class InvalidArgumentError(RelayRLError, ValueError):
    """A caller passed something the agent cannot use; the agent's state is unchanged."""

    kind = "invalid_argument"

    @classmethod
    def mismatch(cls, field: str, expected: object, got: object) -> InvalidArgumentError:
        """`field: expected X, got Y`."""
        return cls(f"{field}: expected {expected}, got {got}")


class UnknownActorError(RelayRLError, KeyError):
    """An actor id the agent does not have."""

    kind = "unknown_actor"

    def __init__(self, actor_ids: object) -> None:
        self.actor_ids = actor_ids
        super().__init__(f"actor_ids: unknown actor id(s) {actor_ids}")

    def __str__(self) -> str:
        return str(self.args[0])


class DuplicateActorError(RelayRLError, ValueError):
    """An actor id that is already in use."""

    kind = "duplicate_actor"


class ModelLoadError(RelayRLError):
    """A model that cannot be read or run (missing, corrupt, wrong format)."""

    kind = "model_load"


class ModelMissingError(ModelLoadError):
    """The registry has no such model (or version, or bucket) yet: it may be pushed."""


class ModelMetadataError(ModelLoadError):
    """A model directory whose metadata is invalid or disagrees with the graph."""

    kind = "model_metadata"


class ModelIncompatibleError(ModelMetadataError):
    """A model that loads but cannot replace the running one in place (other layout).

    A process started with it would run it: the operator answers with a rolling update.
    """

    kind = "model_incompatible"


class ModelRunError(ModelLoadError):
    """A model that loaded but failed on a request: its forward pass raised, or gave
    outputs of another shape than its metadata says. The agent goes back to the version
    it ran before, if it has one (`Agent.request_action`)."""

    kind = "model_run"


class ModelRunNoFallbackError(ModelRunError):
    """The running version failed on a request and there is no version before it to
    try the request on: the version or the request may be to blame. `version` is the
    one that failed. The environment driver holds the step (`Agent.hold`)."""

    def __init__(self, version: int, message: str) -> None:
        self.version = version
        super().__init__(message)


class DeviceUnavailableError(ModelLoadError):
    """A device (cuda) asked for on a host that cannot provide it: never a silent fallback."""

    kind = "device_unavailable"


class EnvironmentFailedError(RelayRLError):
    """The environment raised, hung or returned what cannot be recorded (its source named)."""

    kind = "environment"


class AgentClosedError(RelayRLError):
    """The agent was shut down."""

    kind = "closed"


class RemoteError(RelayRLError):
    """An error reply from a remote runtime endpoint: `kind` is the runtime's (e.g.
    "unknown_actor", "invalid_argument"), as on the wire; `remote_kind` the same."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        self.remote_kind = kind
        super().__init__(f"{kind}: {message}")
