"""Operator startup and shutdown: Kopf settings, the reconciler, health probes.

The reconciler is built here and kept in Kopf's `memo`, so every handler reaches the
same instance; the cleanup handler cancels and awaits its tasks.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final

import kopf

from relayrl_operator import constants, kube, peering, reconcile, watch

log = logging.getLogger(__name__)

CRD_GROUP: Final = "apiextensions.k8s.io"


class NoDiffBase(kopf.DiffBaseStorage):
    """No last-handled state: with watch-event handlers only, Kopf never reads it.

    Kopf builds an object's "essence" (a deep copy) on every watch event for the
    diffs that on.create/on.update handlers receive; this operator has none, so at
    thousands of pods and children that copy is pure cost.
    """

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        """An empty essence: nothing to compare."""
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        """Nothing was stored."""
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        """Store nothing."""


@kopf.on.login()
def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    """Kopf's own API access: the same credentials as the reconciler's client."""
    cfg = kube.load_configuration(memo.kubeconfig)
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        token=kube.bearer_token(cfg),
        scheme="Bearer" if kube.bearer_token(cfg) else None,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
        username=cfg.username or None,
        password=cfg.password or None,
    )


async def _may_discover(client: kube.Client) -> bool:
    """Whether Kopf may watch the cluster's namespaces and CRDs (its discovery)."""
    checks = [
        (verb, resource, group)
        for resource, group in (("namespaces", ""), ("customresourcedefinitions", CRD_GROUP))
        for verb in ("list", "watch")
    ]
    return all(await asyncio.gather(*(client.can(*check) for check in checks)))


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Configure Kopf, start the reconciler and the watches of its children."""
    # Kopf watches the Agents (handlers/agents.py); the reconciler's children are
    # watched by relayrl_operator.watch, without Kopf's per-event machinery.
    # The handlers here are watch-event handlers only: Kopf stores no progress on
    # Agents and adds no finalizer of its own. The reconciler manages its own
    # finalizer (constants.FINALIZER), which must not be Kopf's: Kopf removes its
    # finalizer from objects that have no deletion handlers.
    settings.posting.enabled = False
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    # One operator acts at a time (Kopf peering): one of a higher priority pauses the
    # others, and operators of equal priority all pause. Kopf pauses its watches; the
    # reconciler, which also acts on its own, follows the same peering objects.
    settings.peering.name = constants.OPERATOR_NAME
    settings.peering.mandatory = False

    client = kube.Client.from_config(memo.kubeconfig)
    memo.client = client
    if memo.namespaces and not await _may_discover(client):
        # Watching named namespaces with Roles only (the chart's namespaced install),
        # Kopf would list the cluster's namespaces and CRDs to discover them, be
        # refused, and log the refusals as errors while it retried for minutes before
        # it fell back to the named namespaces. Without discovery it serves those and
        # the Agent CRD as they are at startup.
        settings.scanning.disabled = True
        log.info(
            "no cluster-wide list/watch of namespaces and CRDs: watching %s as named; an"
            " Agent CRD installed or replaced later takes an operator restart",
            ", ".join(memo.namespaces),
        )
    peers = None
    if not settings.peering.standalone:
        peers = peering.Peering(
            client,
            settings.peering.name,
            memo.identity,
            settings.peering.priority,
            tuple(memo.namespaces),
        )
    memo.reconciler = reconcile.Reconciler(
        client, memo.config, memo.streams, workers=memo.workers, peers=peers
    )
    await memo.reconciler.start()
    log.info("reconciler started with %d workers", memo.workers)
    # Only objects this operator manages, filtered server-side. The watches run while
    # a peer pauses this operator too: the caches stay current, and the reconciler
    # writes nothing until it resumes.
    selector = f"{constants.LABEL_MANAGED_BY}={constants.OPERATOR_NAME}"
    memo.watches = watch.Watches(
        watch.Watch(
            client,
            kind,
            namespace,
            selector,
            memo.reconciler.child_event,
            metadata_only=kind in reconcile.METADATA_ONLY,
        )
        for kind in reconcile.WATCHED_CHILDREN
        for namespace in (memo.namespaces or [None])
    )
    listing = [w for w in memo.watches.watches if w.kind in (kube.POD, kube.CONFIGMAP)]
    memo.reconciler.set_children_listed(lambda: all(w.listed.is_set() for w in listing))
    memo.watches.start()


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    """Stop the watches and the reconciler, and close connections."""
    # What startup made, in reverse; a startup that failed part way made less.
    for name in ("watches", "reconciler"):
        part = getattr(memo, name, None)
        if part is not None:
            await part.stop()
    client = getattr(memo, "client", None)
    if client is not None:
        await client.close()
    if memo.streams is not None:
        await memo.streams.close()


@kopf.on.probe(id="reconciler")
async def reconciler_alive(memo: kopf.Memo, **_: Any) -> bool:
    """Liveness: the reconciler's workers and the child watches are running."""
    parts = [getattr(memo, name, None) for name in ("reconciler", "watches")]
    healthy = all(part is not None and part.healthy for part in parts)
    if not healthy:
        raise kopf.PermanentError("reconciler workers or child watches stopped")
    return healthy
