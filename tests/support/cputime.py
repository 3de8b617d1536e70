"""CPU time from /proc, for the benchmarks: the whole machine, and named processes.

On a 2-core machine the processes of a path (publisher, nats-server, sink; or the
apiserver, etcd, controllers and the operator) share the cores, so what a phase cost in
CPU, and who spent it, explains its wall time.
"""

from __future__ import annotations

import os
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def machine_busy() -> float:
    """CPU seconds all cores have spent busy since boot (idle and iowait excluded)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / _TICKS


def group_cpu(pid: int) -> float:
    """CPU seconds of the process group led by `pid` (its own if it leads none), so far."""
    total = 0
    own = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        ticks = int(fields[11]) + int(fields[12])
        if int(fields[2]) == pid:
            total += ticks
        if int(entry.name) == pid:
            own = ticks
    return (total or own) / _TICKS


class Meter:
    """CPU seconds of the machine and of named process groups between two readings."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = dict(pids)
        self._start = self._read()

    def _read(self) -> dict[str, float]:
        out = {name: group_cpu(pid) for name, pid in self.pids.items()}
        out["machine"] = machine_busy()
        return out

    def stop(self) -> dict[str, float]:
        """CPU seconds since the meter started: one entry per name, and "machine"."""
        end = self._read()
        return {name: end[name] - self._start[name] for name in end}
