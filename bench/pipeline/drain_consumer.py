"""A consumer that only takes messages: fetch and ack, nothing decoded or written.

    python bench/pipeline/drain_consumer.py URL STREAM DURABLE STEPS

`bench_pipeline.py` runs it against a raw publish of the publisher's own messages: the
transport alone (JetStream stores each message, delivers it, and nats-py receives it
in another process). A sink receives as this does and then decodes, checks and
writes, so this process's CPU per step is the least a sink's receive costs; the bench's
ceiling adds it to the other parts of a step (`print_ceiling`).

It pulls from DURABLE (made by the bench, ack-all), counts the steps each message's
header says it holds, acks the last message of each fetch, prints "ready" once
subscribed and the steps once STEPS are in and acked, then waits for its standard input
to close (the bench reads its CPU time first).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import nats
import nats.errors

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "runtime_image" / "src"))

from relayrl_runtime import streams  # noqa: E402
from relayrl_runtime.sinks import service  # noqa: E402

# Pulls of up to 64 messages (40 MB of CartPole steps): few round trips between them.
FETCH_BATCH = 12


async def drain(url: str, stream: str, durable: str, steps: int) -> int:
    service._widen_nats_reads()  # the sink's read size
    nc = await nats.connect(url)
    sub = await nc.jetstream().pull_subscribe_bind(durable=durable, stream=stream)
    print("ready", flush=True)
    taken = 0
    while taken < steps:
        try:
            msgs = await sub.fetch(FETCH_BATCH, timeout=1.0)
        except nats.errors.TimeoutError:
            continue
        for msg in msgs:
            taken += int((msg.headers or {}).get(streams.HEADER_STEPS, 0))
        await msgs[-1].ack()  # ack-all: everything up to here
    await nc.flush()
    await nc.close()
    return taken


def main() -> int:
    url, stream, durable, steps = sys.argv[1:5]
    print(asyncio.run(drain(url, stream, durable, int(steps))), flush=True)
    sys.stdin.read()
    return 0


if __name__ == "__main__":
    sys.exit(main())
