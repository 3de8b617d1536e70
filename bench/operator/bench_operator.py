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
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from kubernetes import client, watch  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from relayrl_localstack import binaries, cluster, kwok, testing  # noqa: E402
from relayrl_operator import kube, settings  # noqa: E402
from relayrl_operator.builders import common, configmap, pdb, services, statefulset  # noqa: E402
from relayrl_runtime import spec, streams  # noqa: E402
from support import cputime, fleet, natsserver  # noqa: E402

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
    """The Kubernetes children the operator would create for one Agent, without an owner."""
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


async def nats_children(js: Any, namespace: str, name: str) -> None:
    """One Agent's stream and model bucket, made as the operator makes them."""
    await streams.ensure_stream(js, streams.stream_config(namespace, name))
    await streams.ensure_object_store(js, streams.model_bucket(namespace, name))


async def remove_nats_children(js: Any, namespace: str, names: list[str]) -> None:
    """Delete what `nats_children` made, so the next phase starts on an empty server."""
    for name in names:
        await streams.delete_stream(js, streams.stream_name(namespace, name))
        await js.delete_object_store(streams.model_bucket(namespace, name))


async def bounded(jobs: list[Callable[[], Awaitable[Any]]], limit: int = CONCURRENCY) -> None:
    """Run coroutine factories with at most `limit` in flight."""
    sem = asyncio.Semaphore(limit)

    async def one(job: Callable[[], Awaitable[Any]]) -> None:
        async with sem:
            await job()

    await asyncio.gather(*(one(j) for j in jobs))


def watch_until(
    api: Any,
    resource: tuple[str, str, str],
    namespace: str,
    n: int,
    ready: Callable[[dict[str, Any]], bool],
    within: float,
    stop: threading.Event | None = None,
) -> None:
    """Block until `n` objects of `resource` (group, version, plural) in `namespace` are ready.

    A watch, not polling: listing 1,000 objects every fraction of a second would load
    the apiserver the benchmark measures (the first version of this bench did, and it
    showed in the operator's figure). Setting `stop` ends the wait within a minute.
    """
    group, version, plural = resource
    custom = client.CustomObjectsApi(api)
    seen: dict[str, bool] = {}
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and not (stop and stop.is_set()):
        stream = watch.Watch()
        try:
            # No resourceVersion: the watch starts with every existing object, then
            # changes; it ends after a minute at most (a fresh list then).
            for event in stream.stream(
                custom.list_namespaced_custom_object,
                group,
                version,
                namespace,
                plural,
                timeout_seconds=max(1, min(60, int(deadline - time.monotonic()))),
            ):
                name = event["object"]["metadata"]["name"]
                if event["type"] == "DELETED":
                    seen.pop(name, None)
                else:
                    seen[name] = ready(event["object"])
                if sum(seen.values()) >= n:
                    stream.stop()
                    return
                if stop and stop.is_set():
                    break
        except client.ApiException as err:
            if err.status != 410:
                raise
            # 410 Gone (the watch fell too far behind): start again from a fresh list.
    if stop and stop.is_set():
        raise RuntimeError("stopped")
    raise TimeoutError(f"{n} {plural} ready in {namespace}")


async def wait_until(check: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    """Poll `check` every 0.2 s until true, or fail after `within` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.2)


def statefulset_ready(sts: dict[str, Any]) -> bool:
    return int((sts.get("status") or {}).get("readyReplicas", 0)) >= 1


def agent_ready(agent: dict[str, Any]) -> bool:
    return (agent.get("status") or {}).get("phase") == "Ready"


async def baseline(
    kc: kube.Client, js: Any, api: Any, namespace: str, n: int, nats_url: str
) -> tuple[float, float]:
    """Seconds to create N Agents' children directly, and until their pods are ready.

    The children are those the operator makes for each Agent (`agent-<i>`): its four
    Kubernetes objects, applied with the client, and its NATS stream and model bucket.
    """
    jobs: list[Callable[[], Awaitable[Any]]] = []
    for i in range(n):  # Agent by Agent, as the operator's passes go
        name = f"agent-{i}"
        jobs += [lambda o=o: kc.apply(o) for o in direct_children(name, namespace, nats_url)]
        jobs.append(lambda name=name: nats_children(js, namespace, name))
    start = time.monotonic()
    await bounded(jobs)
    created = time.monotonic() - start
    await asyncio.to_thread(
        watch_until, api, ("apps", "v1", "statefulsets"), namespace, n, statefulset_ready, 900
    )
    return created, time.monotonic() - start


async def operator_scale(kc: kube.Client, api: Any, namespace: str, n: int, nats_url: str) -> float:
    """Seconds from creating N Agents until all report phase Ready."""
    start = time.monotonic()
    group, version = spec.API_VERSION.split("/")
    stop = threading.Event()
    watching = asyncio.create_task(
        asyncio.to_thread(
            watch_until, api, (group, version, "agents"), namespace, n, agent_ready, 1800, stop
        )
    )
    try:
        await bounded(
            [
                lambda i=i: kc.request(
                    "POST", kube.AGENT.path(namespace), body=agent_manifest(f"agent-{i}", nats_url)
                )
                for i in range(n)
            ]
        )
    except BaseException:
        stop.set()  # the watch thread ends within a minute instead of waiting 30
        with contextlib.suppress(Exception):
            await watching
        raise
    await watching
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


def api_requests(page: str) -> dict[tuple[str, str], float]:
    """The operator's API requests so far, by (verb, resource), from its /metrics page."""
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(page):
        if family.name != "relayrl_operator_api_requests":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                key = (sample.labels["verb"], sample.labels["resource"])
                out[key] = out.get(key, 0.0) + sample.value
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


def apply_crds(bins: binaries.Binaries, kubeconfig: Path, policy: bool = True) -> None:
    """Apply the Agent and peering CRDs, and (with `policy`) the chart's finalizer
    policy, with the pinned kubectl: what `helm install` puts beside the operator."""
    kubectl = [str(bins.kubectl), "--kubeconfig", str(kubeconfig), "apply", "-f"]
    for path in ("agents.relayrl.io.yaml", "kopf.dev.yaml"):
        subprocess.run([*kubectl, str(REPO / "crds" / path)], check=True, capture_output=True)
    if policy:
        yaml = fleet.finalizer_policy_yaml()
        subprocess.run([*kubectl, "-"], input=yaml, text=True, check=True, capture_output=True)


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
    cpu: dict[str, dict[str, float]] = {}
    with (
        cluster.LocalCluster(work / "cluster", bins=bins) as local,
        kwok.Kwok(local.kubeconfig, work / "kwok", bins=bins) as kwok_proc,
        cluster.api_client_for(local.kubeconfig) as api,
        natsserver.NatsServer() as nats,
    ):
        kwok.create_nodes(api, cpu=max(2, n // 100 + 2), name_prefix="bench")
        await asyncio.to_thread(apply_crds, bins, local.kubeconfig)
        kc = kube.Client.from_config(str(local.kubeconfig))
        try:
            # Who spends the 2 cores in each phase: the control plane's processes, kwok,
            # nats-server, and (second phase) the operator.
            assert nats.proc is not None
            assert kwok_proc.pid is not None
            pids = {**local.pids(), "kwok": kwok_proc.pid, "nats-server": nats.proc.pid}
            # The bench's own process only: the operator it starts shares its group.
            client_pid = {"bench client": os.getpid()}
            create_namespace(api, "direct")
            nc = await streams.connect(streams.ConnectOptions(servers=(nats.url,)), deadline=10)
            try:
                meter = cputime.Meter(pids, client_pid)
                direct_created, direct_ready = await baseline(
                    kc, nc.jetstream(), api, "direct", n, nats.url
                )
                cpu["direct create + ready"] = meter.stop()
                names = [f"agent-{i}" for i in range(n)]
                await remove_nats_children(nc.jetstream(), "direct", names)
            finally:
                await nc.close()
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
                assert operator.proc is not None
                meter = cputime.Meter(pids, {**client_pid, "operator": operator.proc.pid})
                before = api_requests(operator.metrics())
                op_ready = await operator_scale(kc, api, "fleet", n, nats.url)
                cpu["operator: all Ready"] = meter.stop()
                after = api_requests(operator.metrics())
                requests = {k: v - before.get(k, 0.0) for k, v in after.items()}
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
    print(f"{'baseline: create children (k8s + NATS) directly':<52} {direct_created:>11.1f}s")
    print(f"{'baseline: create directly + pods ready':<52} {direct_ready:>11.1f}s")
    print(f"{f'operator: {n} Agents created -> all Ready':<52} {op_ready:>11.1f}s")
    print(
        f"{'ratio operator / direct create':<52} {op_ready / direct_created:>11.2f}x "
        f"{'<= 1.5x':>12}"
    )
    print(f"{'ratio operator / direct create + ready':<52} {op_ready / direct_ready:>11.2f}x")
    print(f"{f'operator resident memory at {n} Agents':<52} {memory:>10.0f}MB {'<= 200 MB':>12}")
    print(f"\noperator API requests per Agent while {n} Agents became Ready (watches aside)")
    for (verb, resource), count in sorted(requests.items(), key=lambda kv: -kv[1]):
        if count and verb != "watch":
            print(f"  {verb:<7} {resource:<28} {count / n:6.2f}")
    writes = sum(c for (verb, _), c in requests.items() if verb not in ("get", "watch"))
    print(f"  {'writes':<36} {writes / n:6.2f}")
    print("\nCPU seconds by process in each phase ('machine': all processes, all cores)")
    phases = list(cpu)
    print(f"{'process':<24}" + "".join(f"{p:>26}" for p in phases))
    names = sorted({k for c in cpu.values() for k in c}, key=lambda k: (k == "machine", k))
    for name in names:
        print(f"{name:<24}" + "".join(f"{cpu[p].get(name, 0.0):>25.1f}s" for p in phases))


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
