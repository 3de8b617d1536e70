"""Operator benchmark: apply -> Ready latency, 1,000 Agents to Ready, operator memory.

Runs on the local stack (real apiserver, etcd, controller-manager, scheduler; kwok
nodes; a real nats-server) and prints, measured in the same run:

- apply -> Ready latency p50/p99 of one Agent at a time (kwok pods);
- the time for N Agents (default 1,000) created together to all reach Ready, against
  the baseline: creating the same child objects directly with the client (same
  concurrency), and creating them and waiting for their pods to be ready;
- the operator's resident memory with N Agents.

Targets (issue 6): p50 <= 2 s; N Agents Ready within 1.5x the direct-create time;
<= 200 MB resident.

    python bench/operator/bench_operator.py            # 1,000 Agents
    python bench/operator/bench_operator.py --quick    # 100 Agents, fewer samples
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from kubernetes import client  # noqa: E402

from relayrl_localstack import binaries, cluster, kwok, testing  # noqa: E402
from relayrl_operator import kube, settings  # noqa: E402
from relayrl_operator.builders import common, configmap, pdb, services, statefulset  # noqa: E402
from relayrl_runtime import spec  # noqa: E402
from support import fleet, natsserver  # noqa: E402

CONCURRENCY = 16


def agent_manifest(name: str, nats_url: str) -> dict[str, Any]:
    """The benchmark's Agent: 4 actors in one pod, CartPole, no sinks."""
    return {
        "apiVersion": spec.API_VERSION,
        "kind": spec.KIND,
        "metadata": {"name": name},
        "spec": {
            "actors": 4,
            "actorsPerPod": 4,
            "model": {"uri": "objectstore://models/cartpole", "format": "onnx"},
            "environment": {"gymnasium": {"id": "CartPole-v1"}},
            "trajectories": {"nats": {"url": nats_url}},
        },
    }


def direct_children(name: str, namespace: str, nats_url: str) -> list[dict[str, Any]]:
    """The children the operator would create for one Agent, without an owner."""
    parsed = spec.parse_agent(agent_manifest(name, nats_url))
    ref = common.AgentRef(name, namespace, "none", 1, parsed.spec)
    out = [
        configmap.build(ref),
        statefulset.build(ref, settings.Settings()),
        services.build_headless(ref),
        pdb.build(ref),
    ]
    for obj in out:
        obj["metadata"].pop("ownerReferences")
    return out


async def bounded(jobs: list[Callable[[], Awaitable[Any]]], limit: int = CONCURRENCY) -> None:
    """Run coroutine factories with at most `limit` in flight."""
    sem = asyncio.Semaphore(limit)

    async def one(job: Callable[[], Awaitable[Any]]) -> None:
        async with sem:
            await job()

    await asyncio.gather(*(one(j) for j in jobs))


async def wait_until(check: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    """Poll `check` every 0.2 s until true, or fail after `within` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.2)


async def baseline(kc: kube.Client, namespace: str, n: int, nats_url: str) -> tuple[float, float]:
    """Seconds to create N Agents' children directly, and until their pods are ready."""
    objs = [o for i in range(n) for o in direct_children(f"agent-{i}", namespace, nats_url)]
    start = time.monotonic()
    await bounded([lambda o=o: kc.apply(o) for o in objs])
    created = time.monotonic() - start

    async def all_ready() -> bool:
        items = await kc.list(kube.STATEFULSET, namespace)
        ready = sum(1 for s in items if (s.get("status") or {}).get("readyReplicas", 0) >= 1)
        return ready >= n

    await wait_until(all_ready, 900, "direct StatefulSets ready")
    return created, time.monotonic() - start


async def operator_scale(kc: kube.Client, namespace: str, n: int, nats_url: str) -> float:
    """Seconds from creating N Agents until all report phase Ready."""
    start = time.monotonic()
    await bounded(
        [
            lambda i=i: kc.request(
                "POST", kube.AGENT.path(namespace), body=agent_manifest(f"agent-{i}", nats_url)
            )
            for i in range(n)
        ]
    )

    async def all_ready() -> bool:
        items = await kc.list(kube.AGENT, namespace)
        ready = sum(1 for a in items if (a.get("status") or {}).get("phase") == "Ready")
        return ready >= n

    await wait_until(all_ready, 1800, "agents ready")
    return time.monotonic() - start


async def latency(kc: kube.Client, namespace: str, samples: int, nats_url: str) -> list[float]:
    """apply -> Ready seconds for one Agent at a time."""
    out = []
    for i in range(samples):
        name = f"latency-{i}"
        start = time.monotonic()
        await kc.request("POST", kube.AGENT.path(namespace), body=agent_manifest(name, nats_url))

        async def ready(name: str = name) -> bool:
            agent = await kc.get(kube.AGENT, namespace, name)
            return bool(agent and (agent.get("status") or {}).get("phase") == "Ready")

        await wait_until(ready, 120, f"{name} ready")
        out.append(time.monotonic() - start)
    return out


def rss_mb(pid: int) -> float:
    """Resident set size of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def apply_crds(bins: binaries.Binaries, kubeconfig: Path) -> None:
    """Apply the Agent and peering CRDs with the pinned kubectl."""
    for path in ("agents.relayrl.io.yaml", "kopf.dev.yaml"):
        subprocess.run(
            [
                str(bins.kubectl),
                "--kubeconfig",
                str(kubeconfig),
                "apply",
                "-f",
                str(REPO / "crds" / path),
            ],
            check=True,
            capture_output=True,
        )


def create_namespace(k8s_api: Any, name: str) -> None:
    """Create a namespace and wait for its default ServiceAccount."""
    core = client.CoreV1Api(k8s_api)
    core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    testing.wait_for(
        lambda: bool(core.list_namespaced_service_account(name).items),
        timeout=60,
        what=f"service account in {name}",
    )


async def run(args: argparse.Namespace) -> None:
    """Start the stack, measure, print the table."""
    n = args.agents
    bins = binaries.ensure_binaries()
    work = Path(tempfile.mkdtemp(prefix="relayrl-bench-operator-"))
    with (
        cluster.LocalCluster(work / "cluster", bins=bins) as local,
        kwok.Kwok(local.kubeconfig, work / "kwok", bins=bins),
        cluster.api_client_for(local.kubeconfig) as api,
        natsserver.NatsServer() as nats,
    ):
        kwok.create_nodes(api, cpu=max(2, n // 100 + 2), name_prefix="bench")
        await asyncio.to_thread(apply_crds, bins, local.kubeconfig)
        kc = kube.Client.from_config(str(local.kubeconfig))
        try:
            create_namespace(api, "direct")
            direct_created, direct_ready = await baseline(kc, "direct", n, nats.url)
            # The latency samples come after the baseline's 1,000 StatefulSets and pods
            # are garbage collected, not while the control plane is busy with them.
            core = client.CoreV1Api(api)
            core.delete_namespace("direct")
            testing.wait_for(
                lambda: not any(n.metadata.name == "direct" for n in core.list_namespace().items),
                timeout=900,
                what="namespace direct deleted",
                interval=2,
            )

            # As deployed: the default resync period, not the tests' short one.
            operator = fleet.Operator(local.kubeconfig, work / "operator.log", resync_seconds=None)
            operator.start()
            try:
                create_namespace(api, "latency")
                lat = await latency(kc, "latency", args.samples, nats.url)
                create_namespace(api, "fleet")
                op_ready = await operator_scale(kc, "fleet", n, nats.url)
                assert operator.proc is not None
                memory = rss_mb(operator.proc.pid)
            finally:
                operator.stop()
        finally:
            await kc.close()

    print()
    print(f"operator benchmark: {n} Agents, kwok nodes, machine: 2 cores")
    print(f"{'measure':<52} {'value':>12} {'target':>12}")
    print(f"{'apply -> Ready p50 (one Agent)':<52} {statistics.median(lat):>11.2f}s {'<= 2 s':>12}")
    print(f"{'apply -> Ready p99 (one Agent)':<52} {percentile(lat, 99):>11.2f}s {'':>12}")
    print(f"{'baseline: create children directly':<52} {direct_created:>11.1f}s")
    print(f"{'baseline: create directly + pods ready':<52} {direct_ready:>11.1f}s")
    print(f"{f'operator: {n} Agents created -> all Ready':<52} {op_ready:>11.1f}s")
    print(
        f"{'ratio operator / direct create':<52} {op_ready / direct_created:>11.2f}x "
        f"{'<= 1.5x':>12}"
    )
    print(f"{'ratio operator / direct create + ready':<52} {op_ready / direct_ready:>11.2f}x")
    print(f"{f'operator resident memory at {n} Agents':<52} {memory:>10.0f}MB {'<= 200 MB':>12}")


def main() -> None:
    """Parse arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=20, help="latency samples")
    parser.add_argument("--quick", action="store_true", help="100 Agents, 10 samples")
    args = parser.parse_args()
    if args.quick:
        args.agents, args.samples = 100, 10
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
