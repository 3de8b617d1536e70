"""Actor runtime benchmark (issue 3): throughput and latency against hand-written baselines.

    python bench/runtime/bench_runtime.py [--quick] [--sections 3]

1. CartPole-v1 env steps/s, MLP 4-64-64-2 in ONNX, one process: the runtime's gymnasium
   driver (trajectories recorded and written to Parquet) against a hand-written gymnasium
   vector loop (same env count, same onnxruntime settings, same sampling), for 1/8/64/256
   envs. Rounds alternate between the two and the median round is reported, because
   this machine is shared and a single round is noisy.
2. Agent.request_action p50/p99 for 1 and 64 actors.
3. Remote-client round trip p50/p99 against a bare pyzmq DEALER/ROUTER echo of the same
   request bytes, and the gap (runtime minus echo, in us). Both servers run in this
   process; the client, like a remote simulator, in a process of its own (and, for
   reference, as a thread of this one), measuring in alternating blocks of calls.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import onnxruntime
import zmq

from relayrl_runtime import agent as agent_mod
from relayrl_runtime import spec
from relayrl_runtime.envs import driver, gym
from relayrl_runtime.inference import export
from relayrl_runtime.sinks import local
from relayrl_runtime.transport import client, endpoint, wire


def runtime_round(model: Path, out: Path, n: int, seconds: float) -> float:
    sink = local.LocalFileSink(out)
    a = agent_mod.Agent(model, actor_count=n, sink=sink, max_length=1000, seed=0)
    env = gym.make("CartPole-v1", n)
    drv = driver.EnvDriver(a, env, np.arange(n), seed=0)
    stats = drv.run(max_seconds=seconds)
    drv.close()
    a.shutdown()
    return stats.steps_per_second


def baseline_round(model: Path, n: int, seconds: float) -> float:
    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = onnxruntime.InferenceSession(
        str(model / "model.onnx"), opts, providers=["CPUExecutionProvider"]
    )
    env = gym.make("CartPole-v1", n)
    rng = np.random.default_rng(0)
    obs, _ = env.reset(seed=0)
    steps = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        logits, _value = sess.run(None, {"obs": obs})
        g = -np.log(-np.log(rng.random(logits.shape, dtype=np.float32) + np.float32(1e-20)))
        obs, _r, _te, _tr, _ = env.step(np.argmax(logits + g, axis=1))
        steps += n
    elapsed = time.perf_counter() - start
    env.close()
    return steps / elapsed


def throughput(model: Path, tmp: Path, rounds: int, seconds: float) -> None:
    print(f"\n1. CartPole-v1 env steps/s (median of {rounds} alternating rounds of {seconds}s)")
    print(f"{'envs':>6} {'runtime':>12} {'hand loop':>12} {'ratio':>7}  target >= 0.8 from 64")
    for n in (1, 8, 64, 256):
        rt, base = [], []
        for r in range(rounds):
            rt.append(runtime_round(model, tmp / f"t{n}-{r}", n, seconds))
            base.append(baseline_round(model, n, seconds))
        a, b = statistics.median(rt), statistics.median(base)
        print(f"{n:>6} {a:>12,.0f} {b:>12,.0f} {a / b:>7.2f}")


def latency(model: Path, calls: int) -> None:
    print(f"\n2. request_action latency ({calls} calls, trajectories recorded, no sink)")
    print(f"{'actors':>6} {'p50 us':>10} {'p99 us':>10}")
    for n in (1, 64):
        a = agent_mod.Agent(model, actor_count=n, max_length=1000, seed=0)
        ids = np.arange(n)
        obs = np.random.default_rng(0).standard_normal((n, 4)).astype(np.float32)
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            a.request_action(ids, obs, reward=1.0)
            times.append(time.perf_counter() - t0)
        a.shutdown()
        us = np.asarray(times) * 1e6
        print(f"{n:>6} {np.percentile(us, 50):>10.1f} {np.percentile(us, 99):>10.1f}")


def _echo(sock_addr: list[str], ready: threading.Event, stop: threading.Event) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:0")
    sock_addr.append(sock.getsockopt_string(zmq.LAST_ENDPOINT))
    ready.set()
    while not stop.is_set():
        if sock.poll(50):
            sock.send_multipart(sock.recv_multipart(copy=False), copy=False)
    sock.close()


def _client_blocks(
    runtime_addr: str, echo_addr: str, calls: int, blocks: int
) -> tuple[list[float], list[float]]:
    """Round trips to the runtime and to the echo, in alternating blocks of calls.

    Blocks alternate, so a change in machine load hits both alike; both servers are up
    throughout (the idle one waits in a blocking receive, off the GIL).
    """
    obs = np.zeros((1, 4), dtype=np.float32)
    c = client.RemoteClient(runtime_addr)
    ids = c.new_actors(1)
    # The echo gets the very bytes a runtime request carries.
    frames = [
        wire.header(wire.Op.REQUEST_ACTION, 1),
        wire.pack_array(np.asarray(ids, np.int64)),
        wire.pack_array(obs),
        wire.pack_array(np.ones(1)),
        b"",
    ]
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(echo_addr)
    rt: list[float] = []
    echo: list[float] = []
    per_block = max(1, calls // blocks)
    for _ in range(blocks):
        for _ in range(per_block):
            t0 = time.perf_counter()
            c.request_action(ids, obs, reward=1.0)
            rt.append(time.perf_counter() - t0)
        for _ in range(per_block):
            t0 = time.perf_counter()
            sock.send_multipart(frames)
            sock.recv_multipart()
            echo.append(time.perf_counter() - t0)
    sock.close()
    c.remove_actors(ids)
    c.close()
    return rt, echo


def _client_process(
    runtime_addr: str, echo_addr: str, calls: int, blocks: int, out: Connection
) -> None:
    out.send(_client_blocks(runtime_addr, echo_addr, calls, blocks))
    out.close()


def _print_round_trips(title: str, rt: list[float], echo: list[float]) -> None:
    r50, r99 = np.percentile(np.asarray(rt) * 1e6, [50, 99])
    e50, e99 = np.percentile(np.asarray(echo) * 1e6, [50, 99])
    print(f"  {title}")
    print(f"{'':>12} {'p50 us':>10} {'p99 us':>10}")
    print(f"{'runtime':>12} {r50:>10.1f} {r99:>10.1f}")
    print(f"{'zmq echo':>12} {e50:>10.1f} {e99:>10.1f}")
    print(f"{'ratio':>12} {r50 / e50:>10.2f} {r99 / e99:>10.2f}   target <= 1.5")
    # The runtime's own cost per round trip: steadier than the ratio when the machine's
    # load moves the echo (a wake-up bound figure) up and down.
    print(f"{'gap us':>12} {r50 - e50:>10.1f} {r99 - e99:>10.1f}   runtime minus echo")


def remote(model: Path, calls: int, blocks: int = 10) -> None:
    print(f"\n3. remote round trip, 1 actor ({calls} calls each, {blocks} alternating blocks)")
    a = agent_mod.Agent(model, actor_count=0, seed=0)
    ep = endpoint.RemoteEndpoint(a, "tcp://127.0.0.1:0")
    address = ep.start()
    addr: list[str] = []
    ready, stop = threading.Event(), threading.Event()
    thread = threading.Thread(target=_echo, args=(addr, ready, stop))
    thread.start()
    ready.wait()
    try:
        # As a remote simulator runs: the client in a process of its own, both servers
        # (the runtime's endpoint and the echo) in this one.
        ctx = multiprocessing.get_context("spawn")
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_client_process, args=(address, addr[0], calls, blocks, send))
        proc.start()
        rt, echo = receive.recv()
        proc.join(60)
        _print_round_trips("client in its own process (the target's measure):", rt, echo)
        # For reference: the client as a thread of the servers' process, sharing its GIL.
        rt, echo = _client_blocks(address, addr[0], calls, blocks)
        _print_round_trips("client in the servers' process (reference):", rt, echo)
    finally:
        stop.set()
        thread.join()
        ep.stop()
        a.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short rounds (~30s in all)")
    parser.add_argument(
        "--sections",
        default="123",
        help="which sections to run, e.g. 3 or 13 (default: all)",
    )
    args = parser.parse_args()
    rounds, seconds, calls = (3, 0.5, 2000) if args.quick else (5, 1.5, 10000)
    with tempfile.TemporaryDirectory(prefix="relayrl-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model = tmp / "model"
        export.export_mlp(model, spec.ModelFormat.ONNX, obs_dim=4, action_size=2, hidden=(64, 64))
        print("relayrl-runtime benchmark: CartPole-v1, ONNX MLP 4-64-64-2, 1 process")
        if "1" in args.sections:
            throughput(model, tmp, rounds, seconds)
        if "2" in args.sections:
            latency(model, calls)
        if "3" in args.sections:
            remote(model, calls)


if __name__ == "__main__":
    main()
