"""Where a process's CPU goes, by thread: user and system seconds per thread over a window.

py-spy shows Python frames; a serving process also burns CPU in native threads (the event
loop's socket I/O, grpc's C core, Ray's core worker) and in the kernel (loopback copies).
This reads ``/proc/<pid>/task/<tid>/stat`` at the window's start and end.

    python -m benchmarks.thread_cpu PID [PID ...] --seconds 8
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def threads(pid: int) -> dict[int, tuple[str, int, int]]:
    """tid -> (name, utime ticks, stime ticks)."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "stat").read_text()
        except OSError:
            continue  # ended
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        found[int(task.name)] = (name, int(fields[11]), int(fields[12]))
    return found


def report(pid: int, before: dict[int, tuple[str, int, int]], seconds: float) -> str:
    tick = os.sysconf("SC_CLK_TCK")
    rows: list[tuple[str, float, float]] = []
    for tid, (name, user_ticks, system_ticks) in threads(pid).items():
        _, user0, system0 = before.get(tid, (name, 0, 0))
        rows.append((name, (user_ticks - user0) / tick, (system_ticks - system0) / tick))
    merged: dict[str, list[float]] = {}
    for name, user, system in rows:  # same-named threads (pools) together
        entry = merged.setdefault(name, [0.0, 0.0, 0.0])
        entry[0] += user
        entry[1] += system
        entry[2] += 1.0
    total_user = sum(v[0] for v in merged.values())
    total_system = sum(v[1] for v in merged.values())
    lines = [
        f"pid {pid}: {(total_user + total_system) / seconds:.2f} cores "
        f"(user {total_user / seconds:.2f}, system {total_system / seconds:.2f}) over {seconds:g} s"
    ]
    for name, (user, system, count) in sorted(
        merged.items(), key=lambda kv: -(kv[1][0] + kv[1][1])
    ):
        if user + system > 0:
            share = f"user {user / seconds:5.2f}  system {system / seconds:5.2f} cores"
            lines.append(f"  {name:24s} x{int(count):<3d} {share}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pids", type=int, nargs="+")
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    before = {pid: threads(pid) for pid in args.pids}
    time.sleep(args.seconds)
    for pid in args.pids:
        print(report(pid, before[pid], args.seconds))


if __name__ == "__main__":
    main()
