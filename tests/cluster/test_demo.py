"""`relayrl-localstack demo` (what `make demo` runs), end to end, then `up`/`down` with --keep.

The demo starts a stack of its own (control plane, kwok, process node, nats-server,
PostgreSQL), installs the operator with the chart, runs examples/cartpole-cpu/
localstack.yaml on the process node and prints a summary. With ``--keep`` it leaves
everything running, recorded so that ``relayrl-localstack down --dir`` stops it all.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from relayrl_localstack import procs

CLI = [sys.executable, "-m", "relayrl_localstack.cli"]


def figure(out: str, label: str) -> int:
    """The integer after ``label`` in the summary."""
    found = re.search(re.escape(label) + r" +(\d+)", out)
    assert found, f"no {label!r} in:\n{out}"
    return int(found.group(1))


@pytest.mark.timeout(600)
def test_demo_runs_a_fleet_summarises_it_and_down_stops_everything(tmp_path: Path) -> None:
    directory = tmp_path / "demo"
    result = subprocess.run(
        [*CLI, "demo", "--dir", str(directory), "--seconds", "8", "--keep"],
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    out = result.stdout
    state_file = directory / "state.json"
    try:
        assert result.returncode == 0, f"{out}\n{result.stderr}"
        assert "operator Ready: relayrl-operator-" in out
        assert "on relayrl-process-node" in out
        assert figure(out, "env steps (Postgres rows):") > 1000
        assert figure(out, "episodes completed:") > 10
        assert figure(out, "Parquet files written:") >= 1
        assert re.search(r"mean return: +\d+\.\d", out), out
        assert "policy versions recorded:  [1]" in out
        assert list((directory / "output" / "parquet").glob("*.parquet"))
        assert "down --dir" in out
        state = json.loads(state_file.read_text())
        assert {"nats-server", "postgres"} <= set(state["components"])
        pids = [int(state["pid"]), *(int(p) for p in state["components"].values())]
        assert all(procs.group_alive(pid) for pid in pids)
    finally:
        subprocess.run([*CLI, "down", "--dir", str(directory)], timeout=180, check=False)
    assert not state_file.exists()
    assert not any(procs.group_alive(pid) for pid in pids)
