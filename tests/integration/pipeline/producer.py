"""A test-side producer process: the runtime's publishing half, driven by a script.

Run by the pipeline's fault tests as a real process (`python producer.py ...`) so that
SIGTERM, NATS restarts and backpressure hit the publisher as they hit a runtime pod. It
writes deterministic batches (`support.trajectories.batch(producer, i)`) through
`NatsPublisher`; on SIGTERM, or after `--count` batches, it stops writing, closes the
publisher (which flushes: every message acked) and reports how many batches it handed
over, so the test can rebuild exactly what was produced.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from relayrl_runtime import streams
from relayrl_runtime.transport import publisher
from support import trajectories


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--producer", type=int, default=1)
    p.add_argument("--count", type=int, default=0, help="Batches to write; 0: until SIGTERM.")
    p.add_argument("--rate", type=float, default=0.0, help="Batches per second; 0: flat out.")
    p.add_argument("--trajectories", type=int, default=8)
    p.add_argument("--length", type=int, default=50)
    p.add_argument("--max-message-bytes", type=int, default=256 << 10)
    p.add_argument("--max-backlog-bytes", type=int, default=8 << 20)
    p.add_argument("--report", type=Path, required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s producer %(message)s")
    log = logging.getLogger("producer")

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    pub = publisher.NatsPublisher(
        streams.ConnectOptions(servers=(args.url,)),
        publisher.PublisherConfig(
            namespace="default",
            agent=trajectories.AGENT,
            max_message_bytes=args.max_message_bytes,
            max_backlog_bytes=args.max_backlog_bytes,
        ),
    )
    pub.start()
    written = 0
    started = time.monotonic()
    while not stop.is_set() and (args.count == 0 or written < args.count):
        pub.write(
            trajectories.batch(
                args.producer, written, trajectories=args.trajectories, length=args.length
            )
        )
        written += 1
        if args.rate:
            delay = started + written / args.rate - time.monotonic()
            if delay > 0:
                stop.wait(delay)
        if written % 50 == 0:
            tmp = args.report.with_suffix(".progress")
            tmp.write_text(json.dumps({"written": written}))
    log.info("stopping after %d batches; flushing", written)
    pub.close(timeout=240)
    report = {"producer": args.producer, "batches": written, "acked_steps": pub.acked_steps}
    tmp = args.report.with_suffix(".tmp")
    tmp.write_text(json.dumps(report))
    os.replace(tmp, args.report)
    log.info("done: %s", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
