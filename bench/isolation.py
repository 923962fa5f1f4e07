"""Warm requests while cold images pack: latency of warm manifest and blob GETs, idle
and while 8 cold images of 60 MB each build and pack, side by side in one run.

    .venv/bin/python bench/isolation.py [--idle-seconds 8] [--clients 2]

Starts nixeryd (filesystem storage) on the benchmark package set, warms a small image,
then measures GETs of its manifest and of one of its blobs on keep-alive connections:
first with nothing else going on, then while 8 cold pulls of 60 MB images of random
bytes run at once (Nix writes them, nixeryd packs them). Prints p50, p99 and max of
each phase. Targets: p99 while packing at most 3x the idle p99, max at most 250 ms.
"""
from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.daemon import Daemon, daemon_environment  # noqa: E402

WARM = "iana-etc"
COLD = [f"noise60.n{i}" for i in range(1, 9)]


def sample(port: int, paths: list[str], stop: threading.Event, out: list[float]) -> None:
    """GET the paths in turn on one keep-alive connection until ``stop``; latencies in ms."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    while not stop.is_set():
        for path in paths:
            start = time.perf_counter()
            connection.request("GET", path)
            response = connection.getresponse()
            response.read()
            out.append((time.perf_counter() - start) * 1000)
            assert response.status == 200, (path, response.status)
    connection.close()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def phase(port: int, paths: list[str], clients: int, until: threading.Event) -> list[float]:
    samples: list[list[float]] = [[] for _ in range(clients)]
    threads = [threading.Thread(target=sample, args=(port, paths, until, s)) for s in samples]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [v for s in samples for v in s]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--idle-seconds", type=float, default=8)
    parser.add_argument("--clients", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nixeryd-bench-") as tmp:
        storage = Path(tmp) / "storage"
        env = daemon_environment(storage, NIXERY_PKGS_PATH=str(ROOT / "bench" / "pkgs"), NIX_TIMEOUT="600")
        daemon = Daemon(storage, env).start()
        try:
            status, _, body = daemon.request(f"/v2/{WARM}/manifests/latest")
            assert status == 200, body
            manifest = json.loads(body)
            paths = [f"/v2/{WARM}/manifests/latest", f"/v2/{WARM}/blobs/{manifest['layers'][0]['digest']}"]

            idle_stop = threading.Event()
            threading.Timer(args.idle_seconds, idle_stop.set).start()
            idle = phase(daemon.port, paths, args.clients, idle_stop)

            busy_stop = threading.Event()
            statuses: list[int] = []
            started = time.perf_counter()

            def cold_pulls() -> None:
                pulls = [threading.Thread(target=lambda n=name: statuses.append(
                    daemon.request(f"/v2/{n}/manifests/latest")[0])) for name in COLD]
                for t in pulls:
                    t.start()
                for t in pulls:
                    t.join()
                busy_stop.set()

            threading.Thread(target=cold_pulls).start()
            busy = phase(daemon.port, paths, args.clients, busy_stop)
            cold_seconds = time.perf_counter() - started
        finally:
            daemon.stop()
    print(f"8 cold pulls of 60 MB images: {cold_seconds:.1f} s, statuses {sorted(statuses)}")
    print(f"{'warm manifest + blob GET':<28}{'requests':>10}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for name, values in (("idle", idle), ("while 8 images pack", busy)):
        print(f"{name:<28}{len(values):>10}{percentile(values, 0.5):>10.2f}"
              f"{percentile(values, 0.99):>10.2f}{max(values):>10.2f}")
    ratio = percentile(busy, 0.99) / percentile(idle, 0.99)
    print(f"p99 while packing / idle p99: {ratio:.2f} (target <= 3); max while packing: "
          f"{max(busy):.1f} ms (target <= 250)")


if __name__ == "__main__":
    main()
