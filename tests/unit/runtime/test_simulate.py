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


def test_a_slow_reply_lets_the_old_actors_go_before_making_new_ones(
    models: dict[str, Path],
) -> None:
    """A runtime that was only slow still holds the actors of the timed-out request: they
    are removed first, or they would count against maxActors until the idle timeout."""
    a = agent_mod.Agent(models["onnx"], actor_count=0, seed=0)
    real = a.request_action
    calls = [0]

    def slow_once(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        if calls[0] == 20:
            time.sleep(6)  # past the simulator's 5 s
        return real(*args, **kwargs)  # type: ignore[arg-type]

    a.request_action = slow_once  # type: ignore[method-assign]
    ep = endpoint.RemoteEndpoint(
        a, "tcp://127.0.0.1:0", max_actors=2, first_actor_id=endpoint.first_remote_id(0)
    )
    address = ep.start()
    out = io.StringIO()
    try:
        summary = simulate.run(
            address, envs=2, connect_timeout=20, steps=200, report_seconds=3600, out=out
        )
    finally:
        ep.stop()
        a.shutdown()
    assert summary.reconnects == 1, out.getvalue()
    assert summary.steps >= 200


def test_a_stop_while_reconnecting_ends_the_run_at_once(models: dict[str, Path]) -> None:
    a = agent_mod.Agent(models["onnx"], actor_count=0, seed=0)
    ep = endpoint.RemoteEndpoint(a, "tcp://127.0.0.1:0")
    address = ep.start()
    out, stop = io.StringIO(), threading.Event()
    sim = threading.Thread(
        target=lambda: simulate.run(
            address, envs=2, connect_timeout=60, report_seconds=3600, stop=stop, out=out
        )
    )
    sim.start()
    try:
        deadline = time.monotonic() + 30
        while len(a.get_actor_ids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        ep.stop()
        a.shutdown()  # the actor pod goes away: the simulator reconnects, and waits
        deadline = time.monotonic() + 30
        while '"reconnecting"' not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
        asked = time.monotonic()
        stop.set()  # SIGTERM
        sim.join(30)
        assert not sim.is_alive()
        assert time.monotonic() - asked < 7  # at most one attempt's reply wait
    finally:
        stop.set()
        sim.join(30)
    assert json.loads(out.getvalue().splitlines()[-1])["event"] == "done"
