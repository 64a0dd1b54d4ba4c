"""Summarise a ``py-spy record -f raw`` file: top frames by self and by inclusive samples.

python -m benchmarks.pyspy_summary model.txt [--top 25]
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path


def summarise(path: Path, top: int) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n, frames = int(count), stack.split(";")
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    lines = [f"{path.name}: {total} samples", "-- self"]
    lines += [f"{100 * n / total:5.1f}% {f[:170]}" for f, n in own.most_common(top)]
    lines += ["-- inclusive"]
    lines += [f"{100 * n / total:5.1f}% {f[:170]}" for f, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    for path in args.files:
        print(summarise(path, args.top), end="\n\n")


if __name__ == "__main__":
    main()
