"""Reading a build log: nixeryd's line assembly against joining the unfinished line with
each new read (`partial + data`), side by side, on one endless line.

    .venv/bin/python bench/buildlog.py

A builder that prints one line of N MB reaches the protocol in 64 KiB reads (a pipe's
size). Joining the partial line with each read copies it again every time: time grows
with the square of N. nixeryd's assembler keeps at most MAX_LINE bytes and counts the
rest: time grows with N, and memory stays bounded.
"""
from __future__ import annotations

import sys
import time
import tracemalloc
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nixeryd.build.nixoutput import MAX_LINE, LineAssembler  # noqa: E402

READ = 64 * 1024


def joining(reads: int, chunk: bytes) -> None:
    partial = b""
    for _ in range(reads):
        lines = (partial + chunk).split(b"\n")
        partial = lines.pop()


def assembling(reads: int, chunk: bytes) -> None:
    lines = LineAssembler(MAX_LINE)
    for _ in range(reads):
        lines.feed(chunk)
    lines.flush()


def measure(fn: Callable[[int, bytes], None], megabytes: int) -> tuple[float, int]:
    chunk = b"x" * READ
    reads = megabytes * 1024 * 1024 // READ
    tracemalloc.start()
    start = time.perf_counter()
    fn(reads, chunk)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return seconds, peak


def main() -> None:
    print(f"{'line':>8} | {'partial + data':>22} | {'LineAssembler':>22} | speed-up")
    print(f"{'':>8} | {'seconds':>10} {'peak MB':>11} | {'seconds':>10} {'peak MB':>11} |")
    for megabytes in (1, 4, 16, 24):
        old_s, old_m = measure(joining, megabytes)
        new_s, new_m = measure(assembling, megabytes)
        print(f"{megabytes:>5} MB | {old_s:>10.3f} {old_m / 2**20:>11.1f} | "
              f"{new_s:>10.4f} {new_m / 2**20:>11.2f} | {old_s / new_s:>7.0f}x")


if __name__ == "__main__":
    main()
