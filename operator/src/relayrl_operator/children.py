"""An Agent's Kubernetes children: applied together, pruned when no longer desired.

Called by relayrl_operator.reconcile on the passes that need the children applied (a
new spec, drift, a resync's turn, a slice handover's step). Builds every desired
manifest with the pure builders, server-side applies them (the runtime ConfigMap
first on a running Agent), records what each apply returned in the Agent's memory
(relayrl_operator.cache: generations and resourceVersions, to tell drift from our
own writes), and deletes the optional children no longer desired. `push_config`
asks the actor pods to mount a new runtime config at once: after an apply that
changed it, and on each pass of a slice handover.
"""

from __future__ import annotations

import asyncio
import copy
import decimal
import logging
import time
from collections.abc import Mapping
from typing import Any, cast

from kubernetes.utils import quantity

from relayrl_operator import cache, constants, kube, metrics, settings
from relayrl_operator.builders import (
    common,
    configmap,
    monitoring,
    pdb,
    services,
    sinks,
    statefulset,
)

log = logging.getLogger(__name__)

# Kinds the operator may have created for an Agent and may need to delete again.
_PRUNABLE = (kube.SERVICE, kube.DEPLOYMENT, kube.PODMONITOR)


class Children:
    """Applies and prunes the children of every Agent of one reconciler."""

    def __init__(self, client: kube.Client, cfg: settings.Settings) -> None:
        self._client = client
        self._settings = cfg
        # Whether Agents get PodMonitors now: the Prometheus Operator's API was served
        # at the reconciler's last check, and no apply has found it gone since.
        self.podmonitors = False

    def desired(
        self, agent: common.AgentRef, *, handing_over: bool = False
    ) -> list[dict[str, Any]]:
        """Every child manifest the Agent should have now: the runtime config first, the
        actor workload second (`apply` relies on both)."""
        out = [
            configmap.build(agent, handing_over=handing_over),
            statefulset.build(agent, self._settings),
            services.build_headless(agent),
            pdb.build(agent),
        ]
        remote = services.build_remote(agent)
        if remote is not None:
            out.append(remote)
        out += sinks.build_all(agent, self._settings)
        if self.podmonitors:
            out.append(monitoring.build(agent, self._settings.monitor_labels))
        return out

    async def _apply(
        self, agent: common.AgentRef, state: cache.AgentState, obj: dict[str, Any]
    ) -> kube.Applied:
        """Apply a child; one this process has neither applied nor seen (a new Agent's,
        or one deleted meanwhile) is looked up first, and not applied where an object of
        another owner has its name."""
        child = (obj["kind"], obj["metadata"]["name"])
        if child not in state.seen and child not in state.applied:
            live = await self._client.get_metadata(
                kube.kind_of(obj), agent.namespace, obj["metadata"]["name"]
            )
            if live is not None and not _of_agent(live, agent):
                raise kube.ForeignObjectError(obj)
        return await self._client.apply(obj)

    async def _claim_as_grown(self, claim: dict[str, Any], err: kube.ApiError) -> Any:
        """A claim grown beyond `storage.size` (by hand, or an expansion controller)
        refuses the smaller size for good: applied at the size it has instead, so the
        Agent does not fail at every pass. A `storage.size` below the one the claim was
        last applied for is a shrink, and stays refused. Anything else: `err` as it
        was."""
        if err.transient:
            return err
        meta = claim["metadata"]
        try:
            live = await self._client.get(kube.PVC, meta["namespace"], meta["name"])
        except kube.ApiError as failed:
            return failed
        want = claim["spec"]["resources"]["requests"]["storage"]
        has = (((live or {}).get("spec") or {}).get("resources") or {}).get("requests", {})
        size = has.get("storage")
        if size is None or _bytes(size) <= _bytes(want):
            return err
        annotations = ((live or {}).get("metadata") or {}).get("annotations") or {}
        try:
            asked = _bytes(annotations[constants.ANNOTATION_STORAGE_SIZE])
        except (KeyError, TypeError, ValueError):
            asked = None  # a claim from before the annotation, or one edited by hand
        if asked is not None and _bytes(want) < asked:
            # storage.size itself went down (from `asked`): refused, as the claim says.
            return err
        log.info(
            "claim %s/%s holds %s, more than storage.size %s: kept at %s",
            meta["namespace"],
            meta["name"],
            size,
            want,
            size,
        )
        grown = copy.deepcopy(claim)
        grown["spec"]["resources"]["requests"]["storage"] = size
        try:
            return await self._client.apply(grown)
        except kube.ApiError as again:
            return again

    async def apply(
        self, agent: common.AgentRef, state: cache.AgentState, *, handing_over: bool = False
    ) -> None:
        """Apply every desired child and delete those no longer desired.

        Raises a transient error (retried by the pass) at once; a child rejected for
        good is left as it is while the others are applied and pruned, then raised.
        """
        desired = self.desired(agent, handing_over=handing_over)
        state.layout_attempted = configmap.layout(agent, handing_over=handing_over)
        results: list[Any] = []
        state.config_rejected = False
        if state.applied_generation is not None or cache.has_status(state):
            # A change to a running Agent (applied by this process, or by an operator
            # before it): the config first. A pod the StatefulSet replaces meanwhile
            # must mount the new one, or it runs the old settings while it counts as
            # updated (its restart hash is the new template's).
            try:
                results.append(await self._apply(agent, state, desired[0]))
            except kube.ApiError as err:
                if err.transient:
                    raise  # retried before the pods are touched
                # Rejected for good: reported with the rest. The actor workload stays as
                # it is too, so its pods keep a template and replica count that match
                # the config they have.
                results += [err, err]
                state.config_rejected = True
        results += await asyncio.gather(
            *(self._apply(agent, state, obj) for obj in desired[len(results) :]),
            return_exceptions=True,
        )
        for i, (obj, result) in enumerate(zip(desired, results, strict=True)):
            if (
                obj["kind"] == kube.PVC.kind
                and isinstance(result, kube.ApiError)
                and not isinstance(result, kube.ForeignObjectError)
            ):
                results[i] = await self._claim_as_grown(obj, result)
        rejected: kube.ApiError | None = None
        state.rejected_children = set()
        state.foreign_children = set()
        for obj, result in zip(list(desired), results, strict=True):
            if (
                isinstance(result, kube.ApiError)
                and result.status == 404
                and obj["kind"] == kube.PODMONITOR.kind
            ):
                # The Prometheus Operator's CRDs went away: no PodMonitors until they
                # are back (the reconciler checks on every resync).
                self.podmonitors = False
                desired.remove(obj)
                continue
            if isinstance(result, kube.ApiError) and result.namespace_terminating:
                # A child the namespace's deletion took: the Agent goes next, nothing
                # is made again (not drift to repair, nor a rejection to report).
                log.info(
                    "%s %s/%s not made again: its namespace is being deleted",
                    obj["kind"],
                    agent.namespace,
                    obj["metadata"]["name"],
                )
                continue
            if isinstance(result, kube.ApiError) and not result.transient:
                # Rejected for good (e.g. a claim asked to shrink, a policy refusing an
                # update): the other children are still applied and pruned, this one
                # is left as it is (still desired: never pruned); the pass reports it.
                rejected = rejected or result
                state.rejected_children.add((obj["kind"], obj["metadata"]["name"]))
                if isinstance(result, kube.ForeignObjectError):
                    state.foreign_children.add(result.child)
                continue
            if isinstance(result, BaseException):
                raise result
            child = (obj["kind"], obj["metadata"]["name"])
            before = state.child_versions.get(child)
            state.child_versions[child] = result.resource_version
            if result.created:
                metrics.CHILDREN.labels(obj["kind"], "created").inc()
            elif before is not None and before != result.resource_version:
                metrics.CHILDREN.labels(obj["kind"], "updated").inc()
            generation = result.obj.get("metadata", {}).get("generation")
            if generation is not None:
                state.child_generations[child] = generation
            if obj is desired[0]:
                revision = cache.take_config_meta(state, result.obj.get("metadata", {}))
                if state.config_revision is not None and revision != state.config_revision:
                    await self.push_config(agent, state, revision or "")
                state.config_revision = revision
        now = {(obj["kind"], obj["metadata"]["name"]) for obj in desired}
        # What may exist but is not desired: what we applied before, and any optional
        # child this Agent could have had that the watch shows (after a restart).
        candidates = state.applied | (self._optional(agent) & state.seen)
        prunable = {k.kind: k for k in _PRUNABLE}
        for kind_name, name in sorted(candidates - now):
            kind = prunable.get(kind_name)
            if kind is None:
                # A sink's claim that is no longer used keeps its data: the Agent's owner
                # reference collects it with the Agent, or the user deletes it.
                log.info("kept %s %s/%s: no longer used", kind_name, agent.namespace, name)
            elif await self._client.delete(kind, agent.namespace, name):
                metrics.CHILDREN.labels(kind_name, "deleted").inc()
                log.info("deleted %s %s/%s: no longer desired", kind_name, agent.namespace, name)
            state.child_generations.pop((kind_name, name), None)
            state.child_versions.pop((kind_name, name), None)
        # Not one whose name another owner's object has: never pruned (that would delete
        # the object), and looked up again before the next apply.
        state.applied = now - state.foreign_children
        state.applied_at = time.monotonic()
        if rejected is not None:
            raise rejected

    async def push_config(
        self, agent: common.AgentRef, state: cache.AgentState, revision: str
    ) -> None:
        """Annotate the actor pods with the config revision they should mount.

        A pod update makes its kubelet sync the pod and refresh its ConfigMap volume
        at once, instead of at its next periodic sync (up to a minute or two): the
        hot fields take effect in seconds. Each pod is asked once per revision (a
        failed request is asked again on a later call); the periodic sync still comes.
        """
        names = [
            name
            for name, pod in cache.actor_pods(state)
            if not pod["metadata"].get("deletionTimestamp")
            and (pod["metadata"].get("annotations") or {}).get(constants.ANNOTATION_CONFIG_HASH)
            != revision
            and state.pushed.get(name) != revision
        ]
        patch = {"metadata": {"annotations": {constants.ANNOTATION_CONFIG_HASH: revision}}}
        results = await asyncio.gather(
            *(self._client.merge_patch(kube.POD, agent.namespace, n, patch) for n in names),
            return_exceptions=True,
        )
        for name, result in zip(names, results, strict=True):
            if isinstance(result, kube.ApiError) and result.status == 404:
                continue  # gone meanwhile
            if isinstance(result, Exception):
                log.info(
                    "pod %s/%s: config refresh not requested: %s", agent.namespace, name, result
                )
            else:
                state.pushed[name] = revision

    def _optional(self, agent: common.AgentRef) -> set[tuple[str, str]]:
        out = {(kube.SERVICE.kind, common.remote_service_name(agent))}
        out |= {(kube.DEPLOYMENT.kind, n) for n in sinks.possible_names(agent)}
        if self.podmonitors:
            out.add((kube.PODMONITOR.kind, agent.name))
        return out


def _of_agent(live: Mapping[str, Any], agent: common.AgentRef) -> bool:
    """Whether an object is this Agent's to apply: owned by it, or labelled as made by
    this operator for an Agent of its name (one before it: a claim kept by
    retainOnDelete, children the garbage collector has yet to delete)."""
    meta = live.get("metadata") or {}
    if common.owned_by(meta, agent):
        return True
    labels = meta.get("labels") or {}
    return (
        labels.get(constants.LABEL_AGENT) == agent.name
        and labels.get(constants.LABEL_MANAGED_BY) == constants.OPERATOR_NAME
    )


def _bytes(size: str) -> decimal.Decimal:
    """A storage quantity (`5Gi`, `5G`, `5368709120`) as a number."""
    return cast(decimal.Decimal, quantity.parse_quantity(size))  # type: ignore[no-untyped-call]
