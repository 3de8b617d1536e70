"""`relayrl-runtime simulate` against a real endpoint: it rides out a runtime restart."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

from relayrl_runtime import agent as agent_mod
from relayrl_runtime import simulate
from relayrl_runtime.transport import endpoint


def test_the_simulator_reconnects_when_its_runtime_restarts(models: dict[str, Path]) -> None:
    """An actor pod restarted (or rolled) mid-run: the simulator's request gets no reply,
    or its actors are unknown; it makes new ones on the runtime that is back."""

    def serve(address: str) -> tuple[agent_mod.Agent, endpoint.RemoteEndpoint, str]:
        a = agent_mod.Agent(models["onnx"], actor_count=0, seed=0)
        ep = endpoint.RemoteEndpoint(a, address, first_actor_id=endpoint.first_remote_id(0))
        return a, ep, ep.start()

    a, ep, address = serve("tcp://127.0.0.1:0")
    out = io.StringIO()
    stop = threading.Event()
    done: list[simulate.Summary] = []
    sim = threading.Thread(
        target=lambda: done.append(
            simulate.run(
                address, envs=2, connect_timeout=30, report_seconds=3600, stop=stop, out=out
            )
        )
    )
    sim.start()
    try:
        deadline = time.monotonic() + 30
        while len(a.get_actor_ids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        first_ids = sorted(a.get_actor_ids())
        assert len(first_ids) == 2
        ep.stop()
        a.shutdown()
        time.sleep(0.5)
        a, ep, _ = serve(address)
        deadline = time.monotonic() + 30
        while '"reconnected"' not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # a few steps on the new runtime
        stop.set()
        sim.join(30)
        assert not sim.is_alive()
    finally:
        stop.set()
        sim.join(30)
        ep.stop()
        a.shutdown()
    (summary,) = done
    assert summary.reconnects == 1, out.getvalue()
    assert not set(summary.actor_ids) & set(first_ids)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["reconnecting", "reconnected", "done"]
    assert "no reply to op 3" in lines[0]["error"] or "unknown_actor" in lines[0]["error"]
    assert lines[-1]["steps"] > 0
