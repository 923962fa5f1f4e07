"""Soak: thousands of mixed requests against a real daemon on loopback.

    .venv/bin/python bench/soak.py [--requests 5000] [--seconds 120] [--concurrency 16]

Starts nixeryd on the test package set with its own storage, builds a few
images, then sends manifest GETs and HEADs, whole and ranged blob GETs, bad
names and unknown digests, bounded in count and in time. Prints a table:
statuses seen, requests per second, and the daemon's file descriptors and
memory before and after (they should stay flat).
"""
from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.daemon import Daemon, daemon_environment  # noqa: E402

IMAGES = ["hello", "shell/alpha", "beta/gamma", "shell/hello/git/htop"]


def fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def plan(blobs: list[str], count: int, rng: random.Random) -> list[tuple[str, str, dict[str, str]]]:
    requests = []
    for _ in range(count):
        roll = rng.random()
        image = rng.choice(IMAGES)
        if roll < 0.35:
            requests.append(("GET", f"/v2/{image}/manifests/latest", {}))
        elif roll < 0.45:
            requests.append(("HEAD", f"/v2/{image}/manifests/latest", {}))
        elif roll < 0.65:
            requests.append(("GET", f"/v2/{image}/blobs/{rng.choice(blobs)}", {}))
        elif roll < 0.75:
            requests.append(("GET", f"/v2/{image}/blobs/{rng.choice(blobs)}", {"Range": "bytes=0-99"}))
        elif roll < 0.85:
            requests.append(("GET", f"/v2/Bad..Name/manifests/{rng.random()}", {}))
        else:
            requests.append(("GET", f"/v2/{image}/blobs/sha256:{rng.getrandbits(256):064x}", {}))
    return requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()

    storage = Path(tempfile.mkdtemp(prefix="nixeryd-soak-"))
    daemon = Daemon(storage, daemon_environment(storage)).start()
    assert daemon.process is not None
    pid = daemon.process.pid
    try:
        blobs = []
        for image in IMAGES:
            status, _, body = daemon.request(f"/v2/{image}/manifests/latest")
            assert status == 200, body
            doc = json.loads(body)
            blobs += [doc["config"]["digest"]] + [layer["digest"] for layer in doc["layers"]]
        start_fds, start_rss = fds(pid), rss_mib(pid)
        statuses: Counter[int] = Counter()
        lock = threading.Lock()
        deadline = time.monotonic() + args.seconds
        local = threading.local()

        def send(request: tuple[str, str, dict[str, str]]) -> None:
            if time.monotonic() > deadline:
                return
            method, path, headers = request
            connection = getattr(local, "connection", None)
            if connection is None:
                connection = local.connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60)
            try:
                connection.request(method, path, headers=headers)
                response = connection.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                connection.close()
                local.connection = None
                status = 599
            with lock:
                statuses[status] += 1

        requests = plan(blobs, args.requests, random.Random(7))
        began = time.monotonic()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(send, requests))
        elapsed = time.monotonic() - began
        end_fds, end_rss = fds(pid), rss_mib(pid)
    finally:
        daemon.stop()

    done = sum(statuses.values())
    print(f"{'measure':<28}{'value':>14}")
    print(f"{'requests sent':<28}{done:>14}")
    print(f"{'seconds':<28}{elapsed:>14.1f}")
    print(f"{'requests per second':<28}{done / elapsed:>14.0f}")
    for status, count in sorted(statuses.items()):
        print(f"{'status ' + str(status):<28}{count:>14}")
    print(f"{'open fds before / after':<28}{f'{start_fds} / {end_fds}':>14}")
    print(f"{'RSS MiB before / after':<28}{f'{start_rss:.1f} / {end_rss:.1f}':>14}")
    if statuses.get(500) or statuses.get(599):
        sys.exit("server errors or dropped connections seen")


if __name__ == "__main__":
    main()
