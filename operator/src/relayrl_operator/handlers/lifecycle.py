"""Operator startup and shutdown: Kopf settings, the reconciler, health probes.

The reconciler is built here and kept in Kopf's `memo`, so every handler reaches the
same instance; the cleanup handler cancels and awaits its tasks.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from relayrl_operator import constants, kube, reconcile

log = logging.getLogger(__name__)

# Child kinds watched server-side filtered to objects this operator manages.
WATCHED_CHILDREN = ("pods", "statefulsets", "deployments", "configmaps", "services")


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Configure Kopf and start the reconciler."""
    selector = f"{constants.LABEL_MANAGED_BY}={constants.OPERATOR_NAME}"
    for plural in WATCHED_CHILDREN:
        settings.watching.label_selectors[plural] = selector
    # Our own finalizer and status, no Kopf annotations on the Agents: handlers here
    # are watch-event handlers only, so nothing needs Kopf's progress storage.
    settings.persistence.finalizer = constants.FINALIZER
    settings.posting.enabled = False
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    # One operator acts at a time (Kopf peering); more replicas wait as standbys.
    settings.peering.name = constants.OPERATOR_NAME
    settings.peering.mandatory = False

    client = kube.Client.from_config(memo.kubeconfig)
    memo.client = client
    memo.reconciler = reconcile.Reconciler(client, memo.config, memo.streams, workers=memo.workers)
    await memo.reconciler.start()
    log.info("reconciler started with %d workers", memo.workers)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    """Stop the reconciler and close connections."""
    await memo.reconciler.stop()
    await memo.client.close()
    if memo.streams is not None:
        await memo.streams.close()


@kopf.on.probe(id="reconciler")
def reconciler_alive(memo: kopf.Memo, **_: Any) -> bool:
    """Liveness: the reconciler's workers are running."""
    healthy: bool = memo.reconciler.healthy
    if not healthy:
        raise kopf.PermanentError("reconciler workers stopped")
    return healthy
