"""The remote simulator against an in-process endpoint (no servers)."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from relayrl_runtime import agent as agent_mod
from relayrl_runtime import simulate
from relayrl_runtime.sinks import local
from relayrl_runtime.transport import endpoint


def _until(what: str, done: object) -> None:
    deadline = time.monotonic() + 30
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_simulator_waits_while_the_runtime_model_fails(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """The runtime started on version 2, which fails on the simulator's requests of 4
    rows with no version to go back to: the simulator asks again (saying so) rather
    than exit, and goes on once version 1 is loaded. Each step is recorded once."""
    sink = local.LocalFileSink(tmp_path / "out")
    a = agent_mod.Agent(models["failing_v2"], actor_count=0, seed=0, sink=sink)
    ep = endpoint.RemoteEndpoint(a, "tcp://127.0.0.1:0")
    address = ep.start()
    out = io.StringIO()
    summaries: list[simulate.Summary] = []
    runner = threading.Thread(
        target=lambda: summaries.append(
            simulate.run(address, envs=4, steps=400, report_seconds=60.0, out=out)
        )
    )
    try:
        runner.start()
        _until("the stall", lambda: a.stalled == 2)
        _until("the simulator's wait", lambda: '"event": "waiting"' in out.getvalue())
        assert runner.is_alive()
        a.reload_model(models["onnx"])
        runner.join(60)
        assert not runner.is_alive()
    finally:
        ep.stop()
        a.shutdown()
    [summary] = summaries
    assert summary.steps == 400
    assert summary.versions == {1}
    assert "with no version before it to go back to" in out.getvalue()
    table = pa.concat_tables([pq.read_table(f) for f in sink.files])
    assert table.num_rows == 400
    assert set(table["policy_version"].to_pylist()) == {1}
