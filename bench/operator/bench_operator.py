"""Operator benchmark: apply -> Ready latency, 1,000 Agents to Ready, operator memory.

Runs on the local stack (real apiserver, etcd, controller-manager, scheduler; kwok
nodes; a real nats-server) and prints, measured in the same run:

- apply -> Ready latency p50/p99 of one Agent at a time (kwok pods);
- the time for N Agents (default 1,000) created together to all reach Ready, against
  the baseline: creating the same child objects directly with the client (same
  concurrency), and creating them and waiting for their pods to be ready;
- the operator's resident memory with N Agents.

Each phase (the baseline; the latency samples and the N Agents through the operator)
runs on a stack of its own, started fresh, so neither inherits the other's leftovers.
A round is one phase of each; the phase that goes first alternates between rounds,
and the medians over the rounds are reported beside each round's figures.

Targets (issue 6): p50 <= 2 s; N Agents Ready within 1.5x the direct-create time;
<= 200 MB resident.

    python bench/operator/bench_operator.py              # 1,000 Agents, 3 rounds
    python bench/operator/bench_operator.py --rounds 1   # one round
    python bench/operator/bench_operator.py --quick      # 100 Agents, 1 round
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
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
    await streams.ensure_object_store(
        js,
        streams.model_bucket(namespace, name),
        description=streams.models_description(namespace, name),
    )


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


@contextlib.contextmanager
def scratch(prefix: str, what: str) -> Iterator[Path]:
    """A new directory under the system's temporary one: removed when the block ends
    well, kept (and its path printed) when it fails, for the logs in it."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    except BaseException:
        print(f"{what} failed; its logs and data are in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)


@dataclass
class Stack:
    """One fresh local stack: control plane, kwok nodes, NATS, with the CRDs applied."""

    local: cluster.LocalCluster
    api: Any
    kc: kube.Client
    nats_url: str
    pids: dict[str, int]


@contextlib.asynccontextmanager
async def stack(work: Path, n: int) -> AsyncIterator[Stack]:
    """Start a stack for one phase, and stop it after.

    Each phase gets its own: a phase after another on the same control plane would find
    etcd, the garbage collector and the controllers still busy with (or grown by) the
    first phase's thousand objects.
    """
    bins = binaries.ensure_binaries()
    with (
        cluster.LocalCluster(work / "cluster", bins=bins) as local,
        kwok.Kwok(local.kubeconfig, work / "kwok", bins=bins) as kwok_proc,
        cluster.api_client_for(local.kubeconfig) as api,
        natsserver.NatsServer() as nats,
    ):
        kwok.create_nodes(api, cpu=max(2, n // 100 + 2), name_prefix="bench")
        await asyncio.to_thread(apply_crds, bins, local.kubeconfig)
        # Served, and the finalizer comes with the create (else the operator would
        # write it: one more write per Agent than a deployed operator makes).
        await asyncio.to_thread(fleet.wait_finalizer_policy, api)
        assert nats.proc is not None
        assert kwok_proc.pid is not None
        # Who spends the 2 cores: the control plane's processes, kwok, nats-server.
        pids = {**local.pids(), "kwok": kwok_proc.pid, "nats-server": nats.proc.pid}
        kc = kube.Client.from_config(str(local.kubeconfig))
        try:
            yield Stack(local, api, kc, nats.url, pids)
        finally:
            await kc.close()


@dataclass
class Round:
    """One round's figures: a baseline phase and an operator phase, each on its own stack."""

    direct_created: float = 0.0
    direct_ready: float = 0.0
    op_ready: float = 0.0
    latencies: list[float] = field(default_factory=list)
    memory: float = 0.0
    requests: dict[tuple[str, str], float] = field(default_factory=dict)
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)


async def baseline_phase(work: Path, n: int, out: Round) -> None:
    """Create every Agent's children directly and wait for their pods."""
    async with stack(work, n) as st:
        create_namespace(st.api, "direct")
        nc = await streams.connect(streams.ConnectOptions(servers=(st.nats_url,)), deadline=10)
        try:
            # The bench's own process only: the operator it starts shares its group.
            meter = cputime.Meter(st.pids, {"bench client": os.getpid()})
            out.direct_created, out.direct_ready = await baseline(
                st.kc, nc.jetstream(), st.api, "direct", n, st.nats_url
            )
            out.cpu["direct create + ready"] = meter.stop()
        finally:
            await nc.close()


async def operator_phase(work: Path, n: int, samples: int, out: Round) -> None:
    """Latency samples, then N Agents at once, through the operator."""
    async with stack(work, n) as st:
        # As deployed: the default resync period, not the tests' short one.
        operator = fleet.Operator(st.local.kubeconfig, work / "operator.log", resync_seconds=None)
        operator.start()
        try:
            create_namespace(st.api, "latency")
            out.latencies = await latency(st.kc, "latency", samples, st.nats_url)
            create_namespace(st.api, "fleet")
            assert operator.proc is not None
            meter = cputime.Meter(
                st.pids, {"bench client": os.getpid(), "operator": operator.proc.pid}
            )
            before = api_requests(operator.metrics())
            out.op_ready = await operator_scale(st.kc, st.api, "fleet", n, st.nats_url)
            out.cpu["operator: all Ready"] = meter.stop()
            after = api_requests(operator.metrics())
            out.requests = {k: v - before.get(k, 0.0) for k, v in after.items()}
            out.memory = rss_mb(operator.proc.pid)
        finally:
            operator.stop()


async def run(args: argparse.Namespace) -> list[Round]:
    """Measure the rounds; the phase that goes first alternates from round to round."""
    rounds = []
    for i in range(args.rounds):
        out = Round()
        # A round's stacks hold a few hundred MB (etcd, the stream store): gone with it.
        with scratch("relayrl-bench-operator-", f"round {i + 1}") as work:
            phases = [
                functools.partial(baseline_phase, work / "baseline", args.agents, out),
                functools.partial(
                    operator_phase, work / "operator", args.agents, args.samples, out
                ),
            ]
            for phase in phases if i % 2 == 0 else phases[::-1]:
                await phase()
        rounds.append(out)
        print(
            f"round {i + 1}: direct create {out.direct_created:.1f}s, operator "
            f"{out.op_ready:.1f}s, ratio {out.op_ready / out.direct_created:.2f}x",
            flush=True,
        )
    return rounds


def report(n: int, rounds: list[Round]) -> None:
    """Print each round's figures and their medians."""
    med = statistics.median
    lat = [x for r in rounds for x in r.latencies]
    cols = len(rounds) + (1 if len(rounds) > 1 else 0)
    heads = [f"round {i + 1}" for i in range(len(rounds))] + (["median"] if cols > 1 else [])
    print()
    print(f"operator benchmark: {n} Agents, kwok nodes, machine: 2 cores")
    print(f"{'measure':<46}" + "".join(f"{h:>11}" for h in heads) + f"{'target':>12}")

    def row(label: str, values: list[float], fmt: str, target: str = "") -> None:
        """`fmt` is a format spec and a unit: ">10.2f s" prints 10 wide, then "s"."""
        spec_, unit = fmt.split(" ")
        if cols > 1:
            values = [*values, med(values)]
        cells = "".join(format(v, spec_) + unit for v in values)
        print(f"{label:<46}{cells}{target:>12}")

    row("apply -> Ready p50 (one Agent)", [med(r.latencies) for r in rounds], ">9.2f s", "<= 2 s")
    row("apply -> Ready p99 (one Agent)", [percentile(r.latencies, 99) for r in rounds], ">9.2f s")
    row("baseline: create children (k8s + NATS)", [r.direct_created for r in rounds], ">9.1f s")
    row("baseline: create + pods ready", [r.direct_ready for r in rounds], ">9.1f s")
    row(f"operator: {n} Agents created -> all Ready", [r.op_ready for r in rounds], ">9.1f s")
    row(
        "ratio operator / direct create",
        [r.op_ready / r.direct_created for r in rounds],
        ">9.2f x",
        "<= 1.5x",
    )
    row("ratio operator / create + ready", [r.op_ready / r.direct_ready for r in rounds], ">9.2f x")
    memory = [r.memory for r in rounds]
    row(f"operator resident memory, {n} Agents", memory, ">8.0f MB", "<= 200 MB")
    print(
        f"apply -> Ready over all {len(lat)} samples: p50 {med(lat):.2f}s, "
        f"p99 {percentile(lat, 99):.2f}s"
    )
    last = rounds[-1]
    print(f"\noperator API requests per Agent while {n} Agents became Ready (last round)")
    for (verb, resource), count in sorted(last.requests.items(), key=lambda kv: -kv[1]):
        if count and verb != "watch":
            print(f"  {verb:<7} {resource:<28} {count / n:6.2f}")
    writes = sum(c for (verb, _), c in last.requests.items() if verb not in ("get", "watch"))
    print(f"  {'writes':<36} {writes / n:6.2f}")
    print(
        "\nCPU seconds by process in each phase, medians over the rounds "
        "('machine': all processes, all cores)"
    )
    phases = list(last.cpu)
    print(f"{'process':<24}" + "".join(f"{p:>26}" for p in phases))
    names = sorted(
        {k for r in rounds for c in r.cpu.values() for k in c}, key=lambda k: (k == "machine", k)
    )
    for name in names:
        cells = [med([r.cpu[p].get(name, 0.0) for r in rounds]) for p in phases]
        print(f"{name:<24}" + "".join(f"{c:>25.1f}s" for c in cells))


def main() -> None:
    """Parse arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=20, help="latency samples per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (medians are reported)")
    parser.add_argument("--quick", action="store_true", help="100 Agents, 10 samples, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.agents, args.samples, args.rounds = 100, 10, 1
    report(args.agents, asyncio.run(run(args)))


if __name__ == "__main__":
    main()
