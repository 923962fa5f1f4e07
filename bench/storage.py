"""nixeryd on a Google Cloud Storage bucket (gcp-storage-emulator): calls per layer and
per warm pull, counted at the emulator, and how long a cold pull takes to get its 503
when the bucket is stalled (SIGSTOP) or down, with the default settings.

    .venv/bin/python bench/storage.py

Targets: the write path in at most 2 calls per new layer; 0 calls per warm pull; a 503
within 20 s with the bucket stalled or down, warm pulls answering 200 meanwhile.
"""
from __future__ import annotations

import http.client
import json
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.daemon import Daemon  # noqa: E402
from tests.emulator import Emulator  # noqa: E402
from tests.test_gcs_end_to_end import gcs_environment  # noqa: E402


def calls(emulator: Emulator, since: int) -> Counter[str]:
    """The emulator's logged requests since line ``since``, by method and kind."""
    counted: Counter[str] = Counter()
    for line in emulator.output[since:]:
        if line.startswith('"'):
            method, path = line.split(" ")[0].strip('"'), line.split(" ")[1]
            kind = "upload" if path.startswith("/upload/") else ("list" if "/o?" in path else "object")
            counted[f"{method} {kind}"] += 1
    return counted


def pull(daemon: Daemon, name: str) -> tuple[int, float]:
    """A pull as a client makes it: the manifest, then every blob (redirects not followed)."""
    start = time.perf_counter()
    status, _, body = daemon.request(f"/v2/{name}/manifests/latest")
    if status == 200:
        manifest = json.loads(body)
        for descriptor in [manifest["config"], *manifest["layers"]]:
            connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=120)
            connection.request("GET", f"/v2/{name}/blobs/{descriptor['digest']}")
            response = connection.getresponse()
            response.read()
            connection.close()
            if response.status != 307:
                status = response.status
    return status, time.perf_counter() - start


def main() -> None:
    emulator = Emulator().start()
    with tempfile.TemporaryDirectory(prefix="nixeryd-bench-") as tmp:
        bucket = emulator.new_bucket()
        env = gcs_environment(Path(tmp) / "local", emulator, bucket,
                              NIXERY_PKGS_PATH=str(ROOT / "bench" / "pkgs"), NIX_TIMEOUT="600")
        daemon = Daemon(Path(tmp) / "local", env).start()
        try:
            mark = len(emulator.output)
            status, _, body = daemon.request("/v2/noise60.n1/manifests/latest")
            assert status == 200, body
            cold = calls(emulator, mark)
            layers = len(json.loads(body)["layers"])
            blobs = layers + 1 + 2  # layers, the config, two manifests
            mark = len(emulator.output)
            status, _ = pull(daemon, "noise60.n1")
            assert status == 200
            warm = calls(emulator, mark)

            assert emulator.process is not None
            emulator.process.send_signal(signal.SIGSTOP)
            stalled_status, stalled_seconds = pull(daemon, "noise60.n2")
            warm_status, warm_seconds = pull(daemon, "noise60.n1")
            emulator.process.send_signal(signal.SIGCONT)

            emulator.stop()
            down_status, down_seconds = pull(daemon, "noise60.n3")
            warm_down_status, warm_down_seconds = pull(daemon, "noise60.n1")
        finally:
            daemon.stop()
            emulator.stop()
    records = layers + 1  # builds/<key> for each layer, manifests/<key> for the image
    lookups = cold["GET object"] - records  # the cache lookups of those records come first
    uploads = cold["POST upload"] - records  # a resumable upload adds a PUT of its own
    print(f"cold pull of an image of {layers} layers: {blobs} blobs (layers, config, two manifests) "
          f"and {records} records written")
    print(f"  calls at the bucket: {dict(cold)}")
    print(f"  write path per new layer: {lookups / layers:.2f} metadata lookups + "
          f"{uploads / blobs:.2f} uploads per blob (target: at most 2 calls); "
          f"{cold['PUT upload']} resumable upload(s) sent in a second request")
    print(f"warm pull (manifest and every blob): {sum(warm.values())} calls at the bucket (target 0)")
    print(f"{'bucket':<10}{'cold pull':>12}{'seconds':>10}{'warm pull':>12}{'seconds':>10}")
    print(f"{'stalled':<10}{stalled_status:>12}{stalled_seconds:>10.1f}{warm_status:>12}{warm_seconds:>10.2f}")
    print(f"{'down':<10}{down_status:>12}{down_seconds:>10.1f}{warm_down_status:>12}{warm_down_seconds:>10.2f}")


if __name__ == "__main__":
    main()
