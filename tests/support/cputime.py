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
    """CPU seconds all cores have spent running something since boot.

    user + nice + system + irq + softirq (guest time is inside user); idle, iowait and
    steal (time the hypervisor gave to other machines) are not.
    """
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return (sum(fields) - fields[3] - fields[4]) / _TICKS


def _stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name, or None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def process_cpu(pid: int) -> float:
    """CPU seconds of one process, so far (its threads; not its children)."""
    fields = _stat(pid)
    return 0.0 if fields is None else (int(fields[11]) + int(fields[12])) / _TICKS


def group_cpu(pid: int) -> float:
    """CPU seconds of `pid`, of the process group it leads and of its direct children,
    so far.

    Children count even when they lead groups of their own, as postgres backends do.
    Members that exited count through the leader's reaped-children times.
    """
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(entry.name)
        # After the command name: state, ppid, pgrp.
        if fields is None or pid not in (int(entry.name), int(fields[1]), int(fields[2])):
            continue
        total += int(fields[11]) + int(fields[12])
        if int(entry.name) == pid:
            total += int(fields[13]) + int(fields[14])  # children it has waited for
    return total / _TICKS


class Meter:
    """CPU seconds of the machine, of named process groups and of single processes,
    between two readings."""

    def __init__(self, groups: dict[str, int], processes: dict[str, int] | None = None) -> None:
        self.groups = dict(groups)
        self.processes = dict(processes or {})
        self._start = self._read()

    def _read(self) -> dict[str, float]:
        out = {name: group_cpu(pid) for name, pid in self.groups.items()}
        out |= {name: process_cpu(pid) for name, pid in self.processes.items()}
        out["machine"] = machine_busy()
        return out

    def stop(self) -> dict[str, float]:
        """CPU seconds since the meter started: one entry per name, and "machine"."""
        end = self._read()
        return {name: end[name] - self._start[name] for name in end}
