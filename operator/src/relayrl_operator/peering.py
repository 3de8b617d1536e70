"""Whether this operator may act now, by the rule Kopf's peering pauses itself with.

Kopf keeps every running operator's identity, priority and last keep-alive in a
peering object (a ClusterKopfPeering, or a KopfPeering in each watched namespace) and
stops its own watches while a live peer of higher or equal priority is listed there.
The reconciler, though, also acts on its own: the periodic resync, retries, pod
reports from NATS. It asks `Peering.blockers` (the same rule, read from the same
objects) and waits while the answer is not empty, so a standby operator writes nothing.
"""

from __future__ import annotations

import datetime as dt
import getpass
import os
import secrets
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from relayrl_operator import kube

# How often the reconciler reads the peering objects. Kopf reacts to them through a
# watch; a second of overlap at a hand-over is what polling costs (one small GET).
POLL_SECONDS: Final = 1.0
# Kopf's default keep-alive lifetime, for an entry that does not give its own.
DEFAULT_LIFETIME_SECONDS: Final = 60

_GROUP_VERSION: Final = "kopf.dev/v1"


def own_identity() -> str:
    """This process's peer identity: the pod name when the chart sets POD_ID.

    Passed to Kopf too, so the entry Kopf keeps alive is the one `blockers` skips.
    """
    pod = os.environ.get("POD_ID")
    if pod:
        return pod
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a uid with no passwd entry, as in many images
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}/{os.getpid()}-{secrets.token_hex(3)}"


def blockers(
    status: Mapping[str, Any], identity: str, priority: int, now: dt.datetime
) -> list[str]:
    """Live peers in one peering object's status that pause us: priority >= ours.

    Kopf pauses for a higher priority, and pauses every operator of the same priority
    (it cannot tell which of them should act). An entry whose last keep-alive plus its
    lifetime has passed is dead and does not count.
    """
    out = []
    for peer, info in status.items():
        if peer == identity or not isinstance(info, Mapping):
            continue
        lifetime = dt.timedelta(seconds=int(info.get("lifetime", DEFAULT_LIFETIME_SECONDS)))
        seen = info.get("lastseen")
        if seen is not None:
            try:
                last = dt.datetime.fromisoformat(str(seen))
            except ValueError:
                last = now  # unreadable: taken as alive, as a pause is the safe side
            if last.tzinfo is None:
                last = last.replace(tzinfo=dt.UTC)
            if last + lifetime <= now:
                continue
        if int(info.get("priority", 0)) >= priority:
            out.append(peer)
    return sorted(out)


@dataclass(frozen=True)
class Peering:
    """The peering objects of one operator deployment and this process's place in them."""

    client: kube.Client
    name: str
    identity: str
    priority: int
    namespaces: Sequence[str] = ()  # empty: cluster-wide (a ClusterKopfPeering)

    def paths(self) -> list[str]:
        """REST paths of the peering objects Kopf keeps for this operator."""
        root = f"/apis/{_GROUP_VERSION}"
        if not self.namespaces:
            return [f"{root}/clusterkopfpeerings/{self.name}"]
        return [f"{root}/namespaces/{ns}/kopfpeerings/{self.name}" for ns in self.namespaces]

    async def blockers(self) -> list[str]:
        """Live peers that pause this operator now (empty: act). Raises ApiError."""
        now = dt.datetime.now(dt.UTC)
        out: list[str] = []
        for path in self.paths():
            try:
                obj = await self.client.request("GET", path)
            except kube.ApiError as err:
                if err.status == 404:  # no object: Kopf finds no peers there either
                    continue
                raise
            out += blockers(obj.get("status") or {}, self.identity, self.priority, now)
        return sorted(set(out))
