"""A cold pull of a new combination of known packages, with Nix and without, side by side.

    .venv/bin/python bench/known.py [--size 100000] [--depth 8]

The package set is bench/bigset: ``size`` packages in each of ``depth`` bootstrap stages,
an overlay over every package of each stage, so that evaluating one name costs what it
does in a large package set. First it measures that evaluation alone (``nix-instantiate
--eval`` of one package's derivation: seconds and peak memory). Then two nixeryd
instances on storage of their own for each combination of names:
  - one that has pulled each name alone first (so every name is known), then pulls the
    combinations: no Nix process (counted);
  - one that never saw the names, pulling the same combination: a whole Nix evaluation
    (the store paths are already built, so Nix's share is evaluation, not building).
Both answer with the same digest. A combination with one name never seen is asked of Nix
for that name alone by the first. Prints a row a combination, then the medians.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.daemon import Daemon, NixCounter, daemon_environment  # noqa: E402

NAMES = ["p101", "p2203", "p17001", "p555", "p40009"]
"""Each pulled alone first, so that every one is known."""
COMBINATIONS = ["p101/p2203/p17001", "p555/p2203/p40009", "p101/p555/p17001/p40009"]
NEW = "p30001"  # never pulled alone
PARTIAL = [f"p101/p2203/{NEW}"]


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
        env = {"NIXERY_PKGS_PATH": str(pkgs), "NIXERY_BUILD_DEADLINE": "3600"}
        rows: list[tuple[str, float, int, float, int, bool]] = []
        with Instance(work / "knowing", env) as knowing:
            for name in NAMES:
                knowing.pull(name)
            for number, combination in enumerate(COMBINATIONS + PARTIAL):
                known_seconds, known_digest, known_calls = knowing.pull(combination)
                # The same combination on an instance that never saw a name: Nix answers.
                with Instance(work / f"fresh-{number}", env) as fresh:
                    nix_seconds, nix_digest, nix_calls = fresh.pull(combination)
                rows.append((combination, nix_seconds, nix_calls, known_seconds, known_calls,
                             known_digest == nix_digest))

    print(f"package set: {args.size} packages x {args.depth} stages; evaluating one package: "
          f"{eval_seconds:.2f} s, {eval_mib:.0f} MiB peak\n")
    print(f"{'cold pull of':<26}{'names never seen':>18}{'Nix':>5}{'names known':>13}{'Nix':>5}"
          f"{'speed-up':>10}  same digest")
    for combination, nix_seconds, nix_calls, known_seconds, known_calls, same in rows:
        print(f"{combination:<26}{nix_seconds:>17.3f}s{nix_calls:>5}{known_seconds:>12.3f}s{known_calls:>5}"
              f"{nix_seconds / known_seconds:>9.1f}x  {same}")
    for label, how, chosen in (("every name known", "no Nix", COMBINATIONS),
                               (f"one name ({NEW}) new", f"Nix for {NEW} alone", PARTIAL)):
        picked = [row for row in rows if row[0] in chosen]
        nix, known = statistics.median(r[1] for r in picked), statistics.median(r[3] for r in picked)
        print(f"median, {label}: {nix:.3f} s with a whole evaluation, {known:.3f} s with {how}: {nix / known:.1f}x")


class Instance:
    """A nixeryd on storage of its own, counting the Nix evaluations of its pulls."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.counter = NixCounter(root / "counter")
        self.daemon = Daemon(root / "storage", self.counter.env(daemon_environment(root / "storage", **env)))

    def __enter__(self) -> Instance:
        self.daemon.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.daemon.stop()

    def pull(self, name: str) -> tuple[float, str, int]:
        """Seconds, digest and Nix evaluations of one cold pull."""
        before = self.counter.calls
        seconds, digest = pull(self.daemon, name)
        return seconds, digest, self.counter.calls - before


if __name__ == "__main__":
    main()
