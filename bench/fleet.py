"""What a fleet costs its bucket: storage calls per pull, requests/s per instance.

    make bench-tools && .venv/bin/python bench/fleet.py [--seconds 10]

For each storage (a local directory, GCS on gcp-storage-emulator, S3 on moto's
server), starts nixeryd on the test package set and counts the requests the
storage service receives (from its own request log) while a client pulls an
image the way Docker does (manifest, then config and layers, redirects not
followed):
  1. cold: nobody built it;
  2. warm: the same instance again;
  3. first pull on a second instance, which finds the image in the bucket.
Then wrk measures warm manifest GETs and blob GETs (a 307 for a bucket) per
second on one instance, and the instance's resident memory is read. Last, two
instances take twelve concurrent cold pulls of an image that builds in about six
seconds, and the table shows how much later the waiting instance answered than
the one that built. Prints a table.
"""
from __future__ import annotations

import argparse
import http.client
import json
import re
import secrets
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.registry import wrk  # noqa: E402
from tests.daemon import PKGS, Daemon, daemon_environment  # noqa: E402
from tests.emulator import Emulator  # noqa: E402
from tests.gcs_preconditions import PreconditionProxy  # noqa: E402
from tests.moto import Moto  # noqa: E402

OCI = "application/vnd.oci.image.manifest.v1+json"
# A request line as either service logs it (moto colours some statuses with ANSI escapes).
REQUEST = re.compile(r'"(?:\x1b\[[0-9;]*m)*(GET|POST|PUT|DELETE|HEAD|PATCH) /')


class Storage:
    """A storage service, its daemon environment, and a count of requests it received."""

    def __init__(self, name: str, env: Callable[[Path], dict[str, str]], output: list[str] | None,
                 stop: Callable[[], None], own: Callable[[], int] = lambda: 0) -> None:
        self.name, self.env, self.output, self.stop, self.own = name, env, output, stop, own

    def requests(self) -> int:
        """Requests from nixeryd: all the service logged, less the proxy's own lookups."""
        if self.output is None:
            return 0
        return sum(1 for line in self.output if REQUEST.search(line)) - self.own()


def storages(work: Path) -> list[Storage]:
    # The emulator behind the proxy that enforces GCS's generation preconditions, as GCS
    # does: without it, both instances would take the same lease.
    emulator = Emulator().start()
    proxy = PreconditionProxy(emulator.port)
    gcs_bucket = emulator.new_bucket()
    moto = Moto().start()
    s3_bucket = moto.new_bucket()
    return [
        Storage("directory", lambda local: daemon_environment(work / "shared"), None, lambda: None),
        Storage("gcs", lambda local: daemon_environment(
            local, NIXERY_STORAGE_BACKEND="gcs", GCS_BUCKET=gcs_bucket, STORAGE_EMULATOR_HOST=proxy.url,
            DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA="true"), emulator.output, emulator.stop,
            lambda: proxy.lookups),
        Storage("s3", lambda local: daemon_environment(
            local, NIXERY_STORAGE_BACKEND="s3", S3_BUCKET=s3_bucket, **moto.environment()),
            moto.output, moto.stop),
    ]


def get(daemon: Daemon, path: str, accept: str | None = None) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=300)
    connection.request("GET", path, headers={"Accept": accept} if accept else {})
    response = connection.getresponse()
    result = response.status, dict(response.getheaders()), response.read()
    connection.close()
    return result


def pull(daemon: Daemon, name: str) -> dict[str, Any]:
    """A client's pull, redirects not followed: the manifest, then every blob."""
    status, _, body = get(daemon, f"/v2/{name}/manifests/latest", OCI)
    assert status == 200, body
    manifest = json.loads(body)
    for descriptor in [manifest["config"], *manifest["layers"]]:
        assert get(daemon, f"/v2/{name}/blobs/{descriptor['digest']}")[0] in (200, 307)
    return manifest


def counted(storage: Storage, action: Callable[[], Any]) -> int:
    """Requests the storage service received during ``action``; its log is read after a
    short settle, since the service prints each line after answering."""
    before = storage.requests()
    action()
    time.sleep(0.3)
    return storage.requests() - before


def rss_mib(daemon: Daemon) -> float:
    assert daemon.process is not None
    status = Path(f"/proc/{daemon.process.pid}/status").read_text()
    found = re.search(r"VmRSS:\s+(\d+) kB", status)
    return int(found.group(1)) / 1024 if found else 0.0


def measure(storage: Storage, work: Path, pkgs: Path, seconds: int) -> tuple[str, ...]:
    """One row of the table for ``storage``."""
    name = "shell/alpha/beta"
    env = dict(storage.env(work / f"{storage.name}-1"), NIXERY_PKGS_PATH=str(pkgs))
    one = Daemon(work / f"{storage.name}-1", env).start()
    cold = counted(storage, lambda: pull(one, name))
    warm = counted(storage, lambda: pull(one, name))
    env2 = dict(storage.env(work / f"{storage.name}-2"), NIXERY_PKGS_PATH=str(pkgs))
    two = Daemon(work / f"{storage.name}-2", env2).start()
    other = counted(storage, lambda: pull(two, name))
    manifest = pull(one, name)
    base = f"http://127.0.0.1:{one.port}/v2/{name}"
    manifests = wrk(f"{base}/manifests/latest", seconds, 32, OCI)
    blobs = wrk(f"{base}/blobs/{manifest['layers'][0]['digest']}", seconds, 32)
    rss = rss_mib(one)
    one.stop()
    two.stop()

    (pkgs / "slow-nonce").write_text(secrets.token_hex(8))
    fleet = [Daemon(work / f"{storage.name}-f{i}", dict(storage.env(work / f"{storage.name}-f{i}"),
                                                          NIXERY_PKGS_PATH=str(pkgs))).start()
             for i in (1, 2)]
    finished: dict[int, float] = {}

    def timed(i: int) -> None:
        get(fleet[i % 2], "/v2/shell/slow/manifests/latest", OCI)
        finished[i] = time.monotonic()

    start = time.monotonic()
    with ThreadPoolExecutor(12) as threads:
        list(threads.map(timed, range(12)))
    by_instance = [max(t for i, t in finished.items() if i % 2 == k) - start for k in (0, 1)]
    for daemon in fleet:
        daemon.stop()
    return (storage.name, str(cold), str(warm), str(other), f"{manifests['rps']:.0f}",
            f"{manifests['p99']:.1f}", f"{blobs['rps']:.0f}", f"{rss:.0f}",
            f"{min(by_instance):.1f}", f"{max(by_instance) - min(by_instance):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nixeryd-fleet-"))
    pkgs = work / "pkgs"
    shutil.copytree(PKGS, pkgs)
    rows: list[tuple[str, ...]] = []
    try:
        for storage in storages(work):
            rows.append(measure(storage, work, pkgs, args.seconds))
            storage.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    header = ("storage", "calls cold", "calls warm", "calls 2nd inst", "manifest req/s", "p99 ms",
              "blob req/s", "RSS MiB", "built in s", "waiter later s")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
