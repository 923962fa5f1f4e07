"""A cold pull of a new combination of known packages, with Nix and without, side by side.

    .venv/bin/python bench/known.py [--size 100000] [--depth 8]

The package set is bench/bigset: ``size`` packages in each of ``depth`` bootstrap stages,
an overlay over every package of each stage, so that evaluating one name costs what it
does in a large package set. First it measures that evaluation alone (``nix-instantiate
--eval`` of one package's derivation: seconds and peak memory). Then two nixeryd
instances on storage of their own:
  - one that has pulled each name alone first (so every name is known), then pulls the
    combination: no Nix process (counted);
  - one that never saw the names, pulling the same combination: a whole Nix evaluation
    (the store paths are already built, so Nix's share is evaluation, not building).
Both answer with the same digest. Prints a table.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.daemon import Daemon, NixCounter, daemon_environment  # noqa: E402

NAMES = ["p101", "p2203", "p17001"]


def evaluation(pkgs: Path, size: int, depth: int) -> tuple[float, float]:
    """Seconds and peak MiB of evaluating one package's derivation in the set."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run(["nix-instantiate", "--eval", "--read-write-mode", "-E",
                    f"(import {pkgs} {{ size = {size}; depth = {depth}; }}).{NAMES[-1]}.drvPath"],
                   check=True, capture_output=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, max(peak, before) / 1024


def pull(daemon: Daemon, name: str) -> tuple[float, str]:
    start = time.perf_counter()
    status, headers, body = daemon.request(f"/v2/{name}/manifests/latest")
    if status != 200:
        raise SystemExit(f"{name}: {status} {body[:300]!r}")
    return time.perf_counter() - start, headers["Docker-Content-Digest"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=100000)
    parser.add_argument("--depth", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nixeryd-bench-known-") as tmp:
        work = Path(tmp)
        pkgs = work / "bigset"
        pkgs.mkdir()
        # The size and depth are the set's defaults here: nixeryd calls it with none.
        source = (ROOT / "bench" / "bigset" / "default.nix").read_text()
        source = source.replace("size ? 100000", f"size ? {args.size}").replace("depth ? 8", f"depth ? {args.depth}")
        (pkgs / "default.nix").write_text(source)
        eval_seconds, eval_mib = evaluation(pkgs, args.size, args.depth)
        combination = "/".join(NAMES)

        counter = NixCounter(work / "counter")
        knowing = Daemon(work / "knowing", counter.env(daemon_environment(
            work / "knowing", NIXERY_PKGS_PATH=str(pkgs), NIXERY_BUILD_DEADLINE="3600")))
        knowing.start()
        try:
            for name in NAMES:
                pull(knowing, name)
            taught = counter.calls
            known_seconds, known_digest = pull(knowing, combination)
            known_calls = counter.calls - taught
        finally:
            knowing.stop()

        fresh_counter = NixCounter(work / "fresh-counter")
        fresh = Daemon(work / "fresh", fresh_counter.env(daemon_environment(
            work / "fresh", NIXERY_PKGS_PATH=str(pkgs), NIXERY_BUILD_DEADLINE="3600")))
        fresh.start()
        try:
            nix_seconds, nix_digest = pull(fresh, combination)
            nix_calls = fresh_counter.calls
        finally:
            fresh.stop()

    print(f"package set: {args.size} packages x {args.depth} stages; evaluating one package: "
          f"{eval_seconds:.2f} s, {eval_mib:.0f} MiB peak\n")
    print(f"{'cold pull of ' + combination:<44}{'seconds':>9}{'Nix evaluations':>17}")
    print(f"{'with Nix (names never seen)':<44}{nix_seconds:>9.2f}{nix_calls:>17}")
    print(f"{'without Nix (every name known)':<44}{known_seconds:>9.2f}{known_calls:>17}")
    print(f"\nspeed-up: {nix_seconds / known_seconds:.1f}x; same digest: {known_digest == nix_digest}")


if __name__ == "__main__":
    main()
