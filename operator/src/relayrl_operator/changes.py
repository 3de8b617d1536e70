"""Say, for a spec change, which way it took effect: hot, scaled, rolled, or paused.

The reconciler puts the result in an Event and in the Progressing condition, so a
user who changed a field can see whether pods restarted for it.
"""

from __future__ import annotations

from typing import Final

from relayrl_runtime import spec


def _pairs(old: spec.AgentSpec, new: spec.AgentSpec) -> dict[str, tuple[object, object]]:
    a = old.model_dump(mode="json", by_alias=True)
    b = new.model_dump(mode="json", by_alias=True)
    return {k: (a.get(k), b.get(k)) for k in b if a.get(k) != b.get(k)}


# Fields only the actor pods use: while paused there are none to apply them to.
_ACTOR_FIELDS = frozenset(
    {"actors", "actorsPerPod", "routers", "model", "environment", "device", "gpusPerPod"}
)
_PAUSED: Final = "paused, so the actor pods start with it when resumed"


def describe(
    old: spec.AgentSpec | None, new: spec.AgentSpec, *, handover: bool = False
) -> list[str]:
    """One line per changed top-level field, saying how it was applied.

    `handover`: the change moves actors between running pods in two steps
    (relayrl_operator.handover).
    """
    if old is None:
        return []
    out: list[str] = []
    for key, (before, after) in _pairs(old, new).items():
        if key == "paused":
            out.append("paused: actor pods scaled to zero" if after else "resumed: actor pods back")
        elif new.paused and key in _ACTOR_FIELDS:
            change = f"{key} {before} -> {after}" if key.startswith("actors") else f"{key} changed"
            out.append(f"{change}: {_PAUSED}")
        elif key == "actors" and (new.pods() == 0 or old.pods() == 0):
            # No running pods to adjust: all of them go, or the first ones start.
            out.append(f"{key} {before} -> {after}: scaled to {new.pods()} actor pods")
        elif key == "actors":
            out.append(
                f"{key} {before} -> {after}: scaled to {new.pods()} actor pods; running "
                "pods adjust their actor slices without a restart"
            )
        elif key == "actorsPerPod":
            moved = (
                ", and hand actors over (an actor that moves to another pod starts there "
                "once its old pod has given it up)"
                if handover
                else ""
            )
            out.append(
                f"{key} {before} -> {after}: scaled to {new.pods()} actor pods; running "
                f"pods adjust their actor slices without a restart{moved}"
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
            out += _sinks(old, new)
        elif key == "trajectories":
            out += _trajectories(old.trajectories, new.trajectories, bool(new.sinks), new.paused)
        elif key == "template" and new.paused:
            sinks = "; sink pods roll where their image or placement changed" if new.sinks else ""
            out.append(f"template changed: {_PAUSED}{sinks}")
        elif key == "template" and new.sinks:
            out.append(
                "template changed: rolling update of the actor pods, and of the sink pods "
                "where their image or placement changed"
            )
        else:
            out.append(f"{key} changed: rolling update of the actor pods")
    return out


def _sinks(old: spec.AgentSpec, new: spec.AgentSpec) -> list[str]:
    before = {_kind(s): s for s in old.sinks}
    after = {_kind(s): s for s in new.sinks}
    out = [f"sink {k} added" for k in sorted(after.keys() - before.keys())]
    out += [f"sink {k} removed (its data is kept)" for k in sorted(before.keys() - after.keys())]
    changed = sorted(k for k in after.keys() & before.keys() if after[k] != before[k])
    for k in changed:
        resized = _resized(before[k].arrow, after[k].arrow)
        if resized is not None:
            out.append(
                f"sink {k} storage.size {resized[0]} -> {resized[1]}: its claim asked for"
                " the new size (a claim grows, never shrinks); no pod restarts"
            )
        else:
            out.append(f"sink {k} settings changed: its pods rolled")
    return out


def _resized(a: spec.ArrowSink | None, b: spec.ArrowSink | None) -> tuple[str, str] | None:
    """(old, new) storage.size where that is all that changed between two Arrow sinks."""
    if a is None or b is None or a.storage is None or b.storage is None:
        return None
    if a.storage.size is None or b.storage.size is None:
        return None
    same_size = b.storage.model_copy(update={"size": a.storage.size})
    if b.model_copy(update={"storage": same_size}) != a:
        return None
    return str(a.storage.size), str(b.storage.size)


def _trajectories(
    old: spec.TrajectoriesSpec, new: spec.TrajectoriesSpec, sinks: bool, paused: bool
) -> list[str]:
    a, b = old.nats, new.nats
    out = []
    if a.retain_on_delete != b.retain_on_delete:
        out.append(
            f"trajectories.nats.retainOnDelete {str(a.retain_on_delete).lower()} -> "
            f"{str(b.retain_on_delete).lower()}: "
            "read when the Agent is deleted (no restart)"
        )
    if a.url != b.url:
        out.append(
            "trajectories.nats.url changed: stream and model bucket made on the new server "
            "(those on the old one are left in place)"
        )
    rest = old.model_copy(update={"nats": a.model_copy(update={"retain_on_delete": False})})
    if rest != new.model_copy(update={"nats": b.model_copy(update={"retain_on_delete": False})}):
        # Sink pods read how to reach NATS and which stream.
        sink_pods = sinks and connection(a) != connection(b)
        if paused:
            also = "; the sink pods roll" if sink_pods else ""
            out.append(f"trajectories changed: {_PAUSED}{also}")
        else:
            pods = "actor and sink pods" if sink_pods else "actor pods"
            out.append(f"trajectories changed: rolling update of the {pods}")
    return out


def connection(nats: spec.NatsSpec) -> tuple[object, ...]:
    """Which server, which stream, as whom: a change means the stream is made anew there."""
    return (nats.url, nats.stream, nats.credentials_secret, nats.tls)


def _only_version_changed(a: spec.ModelSpec, b: spec.ModelSpec) -> bool:
    return a.model_copy(update={"version": b.version}) == b


def _kind(sink: spec.SinkSpec) -> str:
    return "arrow" if sink.arrow is not None else "postgres"
