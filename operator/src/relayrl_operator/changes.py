"""Say, for a spec change, which way it took effect: hot, scaled, rolled, or paused.

The reconciler puts the result in an Event and in the Progressing condition, so a
user who changed a field can see whether pods restarted for it.
"""

from __future__ import annotations

from relayrl_runtime import spec


def _pairs(old: spec.AgentSpec, new: spec.AgentSpec) -> dict[str, tuple[object, object]]:
    a = old.model_dump(mode="json", by_alias=True)
    b = new.model_dump(mode="json", by_alias=True)
    return {k: (a.get(k), b.get(k)) for k in b if a.get(k) != b.get(k)}


def describe(old: spec.AgentSpec | None, new: spec.AgentSpec) -> list[str]:
    """One line per changed top-level field, saying how it was applied."""
    if old is None:
        return []
    out: list[str] = []
    for key, (before, after) in _pairs(old, new).items():
        if key == "paused":
            out.append("paused: actor pods scaled to zero" if after else "resumed: actor pods back")
        elif key == "actors" or key == "actorsPerPod":
            out.append(
                f"{key} {before} -> {after}: scaled to {new.pods()} actor pods; running "
                "pods adjust their actor slices without a restart"
            )
        elif key == "routers":
            out.append(f"routers {before} -> {after}: rescaled in running pods (hot)")
        elif key == "model":
            if _only_version_changed(old.model, new.model):
                out.append(
                    f"model.version {old.model.version} -> {new.model.version}: "
                    "hot reload from the model registry (no restart)"
                )
            else:
                out.append("model changed: rolling update of the actor pods")
        elif key == "sinks":
            kinds = {_kind(s) for s in new.sinks}
            before_kinds = {_kind(s) for s in old.sinks}
            for added in sorted(kinds - before_kinds):
                out.append(f"sink {added} added")
            for removed in sorted(before_kinds - kinds):
                out.append(f"sink {removed} removed (its data is kept)")
            if kinds == before_kinds:
                out.append("sink settings changed: sink pods rolled")
        else:
            out.append(f"{key} changed: rolling update of the actor pods")
    return out


def _only_version_changed(a: spec.ModelSpec, b: spec.ModelSpec) -> bool:
    return a.model_copy(update={"version": b.version}) == b


def _kind(sink: spec.SinkSpec) -> str:
    return "arrow" if sink.arrow is not None else "postgres"
