"""Layer packing: nixeryd's archive writer against `tar -c | gzip -6`, `pigz` and the
`zstd` command, side by side (`make bench-tools` installs pigz and zstd).

    .venv/bin/python bench/pack.py [--rounds 5]

Builds the benchmark package set (bench/pkgs: documentation, locales, the
Python standard library; about 340 MB), then packs the same store paths:
  - with `tar -c | gzip -6` (one stream, as a shell would), and, in nixeryd's order
    (`tar --sort=name`, so that ratios compare), `| pigz -6 -p N` and `| zstd -3 -T N`
    (every core on one stream),
  - with nixeryd's writer, every path in one layer, on one thread and on every core
    (one big layer: a toolchain, a TeX or CUDA closure), gzip and zstd, as for a
    filesystem storage (no MD5) and as for a bucket (with one),
  - with nixeryd's writer, one layer per path, in one thread and in parallel
    threads (as nixeryd packs an image's layers), gzip (level 6) and the opt-in
    zstd (its own parameters),
and reports input throughput and compression ratio. The command-line tools and
nixeryd's one layer on every core take turns, ``--rounds`` times, and the median of
each is shown (these machines are shared: a neighbour's burst lands on both sides).
Then it packs a 1 GB closure as a single layer in a child process and reports its
peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nixeryd.image.archive import write_layer  # noqa: E402

OFFLINE = dict(os.environ, NIX_CONFIG="substituters =\nbuild-users-group =\nsandbox = false\n")


def build(packages: list[str]) -> list[str]:
    source = json.dumps({"type": "path", "path": str(ROOT / "bench" / "pkgs")})
    out = subprocess.run(
        ["nix-build", str(ROOT / "nix" / "build.nix"), "-A", "packages", "--no-out-link", "--argstr", "source", source,
         "--argstr", "packages", json.dumps(packages), "--argstr", "system", "x86_64-linux"],
        env=OFFLINE, check=True, capture_output=True, text=True,
    )
    return out.stdout.split()


def size_of(paths: list[str]) -> int:
    total = 0
    for path in paths:
        for directory, _, files in os.walk(path):
            for name in files:
                full = os.path.join(directory, name)
                if not os.path.islink(full):
                    total += os.path.getsize(full)
    return total


def tar_gzip(paths: list[str], out: str) -> tuple[float, int]:
    start = time.perf_counter()
    subprocess.run(f"tar -cf - {' '.join(paths)} 2>/dev/null | gzip -6 > {out}", shell=True, check=True)
    return time.perf_counter() - start, os.path.getsize(out)


def tar_piped(paths: list[str], out: str, command: str) -> tuple[float, int]:
    """``tar`` in nixeryd's order (sorted by name: about 11% better zstd ratio than the
    directory order) piped into ``command``."""
    start = time.perf_counter()
    subprocess.run(f"tar --sort=name -cf - {' '.join(paths)} 2>/dev/null | {command} > {out}", shell=True,
                   check=True)
    return time.perf_counter() - start, os.path.getsize(out)


def one_layer(paths: list[str], workdir: str, workers: int, compression: str, md5: bool = False
              ) -> tuple[float, int]:
    start = time.perf_counter()
    with open(os.path.join(workdir, f"one.{compression}"), "wb") as out:
        size = write_layer(paths, out, compression=compression, workers=workers, md5=md5).size
    return time.perf_counter() - start, size


def nixeryd_pack(paths: list[str], workdir: str, threads: int, compression: str = "gzip") -> tuple[float, int]:
    def one(index_path: tuple[int, str]) -> int:
        index, path = index_path
        with open(os.path.join(workdir, f"layer{index}.{compression}"), "wb") as out:
            return write_layer([path], out, compression=compression, workers=1).size

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        sizes = list(pool.map(one, enumerate(paths)))
    return time.perf_counter() - start, sum(sizes)


def peak_rss_packing(paths: list[str], workdir: str, compression: str) -> float:
    """Peak RSS in MB of a child process packing ``paths`` as one layer, as it reports
    itself (its high-water mark: the children's maximum would be Nix's evaluation, and
    a child's own maximum counts the parent it was forked from)."""
    code = (
        "from nixeryd.image.archive import write_layer\n"
        f"write_layer({paths!r}, open({os.path.join(workdir, 'big')!r}, 'wb'), compression={compression!r})\n"
        "print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=str(ROOT), capture_output=True, text=True)
    return int(out.stdout.split()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    paths = build(["docs", "locales", "pystdlib"])
    big = build(["docs", "locales", "pystdlib", "libs"])
    data = size_of(paths)
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="nixeryd-bench-") as workdir:
        seconds, packed = tar_gzip(paths, os.path.join(workdir, "tar.gz"))
        rows.append(("tar -c | gzip -6", seconds, packed))
        # Side by side: each round runs every one of these once, in turn.
        turns: dict[str, Callable[[], tuple[float, int]]] = {
            f"tar --sort=name -c | pigz -6 -p{cores}":
                lambda: tar_piped(paths, os.path.join(workdir, "piped"), f"pigz -6 -p{cores}"),
            f"nixeryd one layer gzip, {cores} cores": lambda: one_layer(paths, workdir, cores, "gzip"),
            f"nixeryd one layer gzip, {cores} cores, MD5": lambda: one_layer(paths, workdir, cores, "gzip", True),
            f"tar --sort=name -c | zstd -3 -T{cores}":
                lambda: tar_piped(paths, os.path.join(workdir, "piped"), f"zstd -q -3 -T{cores}"),
            f"nixeryd one layer zstd, {cores} cores": lambda: one_layer(paths, workdir, cores, "zstd"),
            f"nixeryd one layer zstd, {cores} cores, MD5": lambda: one_layer(paths, workdir, cores, "zstd", True),
        }
        timings: dict[str, list[tuple[float, int]]] = {name: [] for name in turns}
        for _ in range(args.rounds):
            for name, run in turns.items():
                timings[name].append(run())
        for name, runs in timings.items():
            rows.append((name, statistics.median(seconds for seconds, _ in runs), runs[0][1]))
        for compression in ("gzip", "zstd"):
            seconds, packed = one_layer(paths, workdir, 1, compression)
            rows.append((f"nixeryd one layer {compression}, 1 core", seconds, packed))
        for compression in ("gzip", "zstd"):
            for threads in (1, cores):
                seconds, packed = nixeryd_pack(paths, workdir, threads, compression)
                rows.append((f"nixeryd layer a path {compression}, {threads} thread(s)", seconds, packed))
        big_size = size_of(big)
        rss = {compression: peak_rss_packing(big, workdir, compression) for compression in ("gzip", "zstd")}
    base = rows[0][1]
    print(f"input: {len(paths)} store paths, {data / 1e6:.0f} MB of file data; medians of {args.rounds} "
          f"rounds where side by side\n")
    print(f"{'packer':<46}{'seconds':>9}{'MB/s in':>10}{'ratio':>8}{'speed vs tar|gzip':>19}")
    for name, seconds, packed in rows:
        print(f"{name:<46}{seconds:>9.2f}{data / seconds / 1e6:>10.1f}{packed / data:>8.3f}{base / seconds:>18.2f}x")
    speed = {name: seconds for name, seconds, _ in rows}
    gzip_ratio = speed[f"tar --sort=name -c | pigz -6 -p{cores}"] / speed[f"nixeryd one layer gzip, {cores} cores"]
    zstd_ratio = speed[f"tar --sort=name -c | zstd -3 -T{cores}"] / speed[f"nixeryd one layer zstd, {cores} cores"]
    print(f"\none layer on {cores} cores against the command-line tools, same rounds: "
          f"gzip {gzip_ratio:.2f}x, zstd {zstd_ratio:.2f}x")
    print(f"peak RSS packing {big_size / 1e9:.2f} GB as one layer: gzip {rss['gzip']:.0f} MB, "
          f"zstd {rss['zstd']:.0f} MB")


if __name__ == "__main__":
    main()
