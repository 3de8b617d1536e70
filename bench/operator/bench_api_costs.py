"""What each kind of request the operator makes costs the local control plane.

    python bench/operator/bench_api_costs.py            # 300 requests of each kind
    python bench/operator/bench_api_costs.py --count 1000
    python bench/operator/bench_api_costs.py --quick    # 50 of each kind

Starts the local control plane (real apiserver and etcd), applies the CRDs, and sends
`--count` requests of each kind, 16 in flight, as the operator does for each Agent:
create the Agent, add its finalizer, two status updates, post an Event, server-side
apply a ConfigMap (new, then unchanged), a GET for comparison, a status update written
whole (PUT) instead of as a merge patch, and last creating an Agent with the chart's
finalizer policy installed (the finalizer comes with the create). For each kind it
prints the apiserver's and etcd's CPU per request (from /proc), so the operator's
writes per Agent (`bench_operator.py` prints them) can be priced. Machine noise
shows in single runs; compare kinds within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "tests"))
sys.path.insert(0, str(HERE))

import bench_operator  # noqa: E402

from relayrl_localstack import binaries, cluster  # noqa: E402
from relayrl_operator import constants, kube, status  # noqa: E402
from relayrl_operator.builders import common, configmap  # noqa: E402
from relayrl_runtime import spec  # noqa: E402
from support import cputime, fleet  # noqa: E402

NAMESPACE = "costs"
NATS_URL = "nats://127.0.0.1:4222"  # only rendered into specs; nothing connects


def event(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"a{i}.", "namespace": NAMESPACE},
        "involvedObject": {
            "apiVersion": spec.API_VERSION,
            "kind": spec.KIND,
            "name": f"a{i}",
            "namespace": NAMESPACE,
        },
        "type": "Normal",
        "reason": "PhaseReady",
        "message": "all 1 actor pods ready",
        "source": {"component": constants.OPERATOR_NAME},
        "count": 1,
    }


async def measure(
    pids: dict[str, int], count: int, jobs: list[Callable[[], Awaitable[Any]]]
) -> tuple[float, dict[str, float]]:
    """Run the jobs 16 at a time; wall seconds and CPU seconds per process."""
    await asyncio.sleep(2)  # let the last phase's background work settle
    meter = cputime.Meter(pids)
    start = time.monotonic()
    await bench_operator.bounded(jobs)
    return time.monotonic() - start, meter.stop()


async def run(count: int) -> list[tuple[str, float, dict[str, float]]]:
    """Measure every kind; the stack's files are removed after, kept after a failure."""
    with bench_operator.scratch("relayrl-bench-api-", "the measurement") as work:
        return await measure_all(work, count)


async def measure_all(work: Path, count: int) -> list[tuple[str, float, dict[str, float]]]:
    """Start the control plane in `work` and measure each kind of request."""
    bins = binaries.ensure_binaries()
    out = []
    with (
        cluster.LocalCluster(work / "cluster", bins=bins) as local,
        cluster.api_client_for(local.kubeconfig) as api,
    ):
        # Without the finalizer policy first: the finalizer write priced below is the
        # one the operator makes where the cluster has no policy.
        await asyncio.to_thread(bench_operator.apply_crds, bins, local.kubeconfig, False)
        bench_operator.create_namespace(api, NAMESPACE)
        kc = kube.Client.from_config(str(local.kubeconfig))
        all_pids = local.pids()
        pids = {"kube-apiserver": all_pids["kube-apiserver"], "etcd": all_pids["etcd"]}
        agent_spec = spec.parse_agent(bench_operator.agent_manifest("x", NATS_URL)).spec
        # The two statuses an Agent gets on its way to Ready, as the operator computes them.
        progressing = status.compute(
            agent_spec,
            1,
            "relayrl.io/agent=x",
            status.Observed(pods=[status.PodView(0, ready=False, current=True)], stream_ready=True),
        )
        ready = status.compute(
            agent_spec,
            1,
            "relayrl.io/agent=x",
            status.Observed(pods=[status.PodView(0, ready=True, current=True)], stream_ready=True),
            progressing["conditions"],
        )

        def configmap_of(i: int) -> dict[str, Any]:
            obj = configmap.build(common.AgentRef(f"a{i}", NAMESPACE, "uid", 1, agent_spec))
            obj["metadata"].pop("ownerReferences")
            return obj

        configmaps = [configmap_of(i) for i in range(count)]
        phases: list[tuple[str, list[Callable[[], Awaitable[Any]]]]] = [
            (
                "create Agent",
                [
                    lambda i=i: kc.request(
                        "POST",
                        kube.AGENT.path(NAMESPACE),
                        body=bench_operator.agent_manifest(f"a{i}", NATS_URL),
                    )
                    for i in range(count)
                ],
            ),
            (
                "add the Agent's finalizer",
                [
                    lambda i=i: kc.merge_patch(
                        kube.AGENT,
                        NAMESPACE,
                        f"a{i}",
                        {"metadata": {"finalizers": [constants.FINALIZER]}},
                    )
                    for i in range(count)
                ],
            ),
            *(
                (
                    f"Agent status: {name}",
                    [
                        lambda i=i, body=body: kc.merge_patch(
                            kube.AGENT, NAMESPACE, f"a{i}", {"status": body}, sub="status"
                        )
                        for i in range(count)
                    ],
                )
                for name, body in (("Progressing", progressing), ("Ready", ready))
            ),
            (
                "post an Event",
                [
                    lambda i=i: kc.request(
                        "POST", f"/api/v1/namespaces/{NAMESPACE}/events", body=event(i)
                    )
                    for i in range(count)
                ],
            ),
            ("apply a new ConfigMap", [lambda o=o: kc.apply(o) for o in configmaps]),
            ("apply it again, unchanged", [lambda o=o: kc.apply(o) for o in configmaps]),
            (
                "GET an Agent",
                [lambda i=i: kc.get(kube.AGENT, NAMESPACE, f"a{i}") for i in range(count)],
            ),
        ]
        try:
            for name, jobs in phases:
                seconds, cpu = await measure(pids, count, jobs)
                out.append((name, seconds, cpu))
            # The same status change written whole (PUT with the resourceVersion)
            # instead of as a merge patch, for comparison: the Agents as they are now.
            agents = await asyncio.gather(
                *(kc.get(kube.AGENT, NAMESPACE, f"a{i}") for i in range(count))
            )

            async def put(agent: dict[str, Any]) -> None:
                meta = agent["metadata"]
                await kc.request(
                    "PUT",
                    kube.AGENT.path(NAMESPACE, meta["name"], "status"),
                    body={**agent, "status": progressing},
                )

            seconds, cpu = await measure(pids, count, [lambda a=a: put(a) for a in agents])
            out.append(("Agent status: PUT, Progressing", seconds, cpu))
            # The chart's policy puts the finalizer on at create instead.
            await asyncio.to_thread(bench_operator.apply_crds, bins, local.kubeconfig)
            await asyncio.to_thread(fleet.wait_finalizer_policy, api)
            jobs = [
                lambda i=i: kc.request(
                    "POST",
                    kube.AGENT.path(NAMESPACE),
                    body=bench_operator.agent_manifest(f"p{i}", NATS_URL),
                )
                for i in range(count)
            ]
            seconds, cpu = await measure(pids, count, jobs)
            out.append(("create Agent, finalizer policy", seconds, cpu))
        finally:
            await kc.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300, help="requests of each kind")
    parser.add_argument("--quick", action="store_true", help="50 requests of each kind")
    args = parser.parse_args()
    if args.quick:
        args.count = 50
    results = asyncio.run(run(args.count))
    print(f"\nper request, {args.count} of each kind, 16 in flight, 2-core machine")
    print(f"{'request':<32} {'wall ms':>9} {'apiserver CPU ms':>17} {'etcd CPU ms':>12}")
    for name, seconds, cpu in results:
        print(
            f"{name:<32} {seconds / args.count * 1e3:>9.2f}"
            f" {cpu['kube-apiserver'] / args.count * 1e3:>17.2f}"
            f" {cpu['etcd'] / args.count * 1e3:>12.2f}"
        )


if __name__ == "__main__":
    main()
