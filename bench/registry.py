"""nixeryd against CNCF distribution (Debian's docker-registry), side by side.

    make bench-tools && .venv/bin/python bench/registry.py [--seconds 10]

Starts nixeryd on the benchmark package set and a distribution registry, both
on loopback with filesystem storage; builds an image with a 120 MB layer of
incompressible bytes and copies it into distribution with skopeo, so both hold
the same blobs. Then, with wrk:
  1. warm manifest GETs: throughput and latency;
  2. blob GETs of the 120 MB layer: throughput.
And the cold pull of a new image from nixeryd, split into Nix's time and
nixeryd's own (from its log). Prints a table.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.daemon import Daemon, daemon_environment, free_port  # noqa: E402

OCI = "application/vnd.oci.image.manifest.v1+json"
IMAGE = "random120"


def start_distribution(root: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    process = subprocess.Popen(["docker-registry", "serve", str(config)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        if subprocess.run(["curl", "-sf", f"http://127.0.0.1:{port}/v2/"], capture_output=True).returncode == 0:
            return process, port
        time.sleep(0.05)
    process.kill()
    raise SystemExit("distribution did not start")


def wrk(url: str, seconds: int, connections: int, accept: str | None = None) -> dict[str, float]:
    args = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    if accept:
        args[1:1] = ["-H", f"Accept: {accept}"]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out)
    scale = {"B": 1e-6, "KB": 1e-3, "MB": 1, "GB": 1e3}
    mbps = float(transfer.group(1)) * scale.get(transfer.group(2), 1) if transfer else 0.0  # type: ignore[union-attr]
    latencies = {}
    for pct in ("50", "99"):
        found = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out)
        if found:
            factor = {"us": 1e-3, "ms": 1, "s": 1e3}[found.group(2)]
            latencies[pct] = float(found.group(1)) * factor
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "mbps": mbps, "p50": latencies.get("50", 0), "p99": latencies.get("99", 0),
            "errors": float(errors.group(1)) if errors else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    for tool in ("wrk", "docker-registry", "skopeo", "curl"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: run `make bench-tools`")

    work = Path(tempfile.mkdtemp(prefix="nixeryd-bench-"))
    env = daemon_environment(work / "nixeryd", NIXERY_PKGS_PATH=str(ROOT / "bench" / "pkgs"), NIX_TIMEOUT="600",
                              NIXERY_ACCESS_LOG="false")  # as distribution runs here: no access log
    nixeryd = Daemon(work / "nixeryd", env).start()
    try:
        distribution, port = start_distribution(work / "distribution")
    except BaseException:
        nixeryd.stop()
        raise
    try:
        status, _, body = nixeryd.request(f"/v2/{IMAGE}/manifests/latest", headers={"Accept": OCI})
        assert status == 200, body
        manifest = json.loads(body)
        big = max(manifest["layers"], key=lambda layer: layer["size"])
        subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", "--dest-tls-verify=false",
                        f"docker://{nixeryd.registry}/{IMAGE}:latest",
                        f"docker://127.0.0.1:{port}/{IMAGE}:latest"], check=True)
        results = {}
        for name, base in (("nixeryd", nixeryd.url), ("distribution", f"http://127.0.0.1:{port}")):
            results[name, "manifest"] = wrk(f"{base}/v2/{IMAGE}/manifests/latest", args.seconds, 32, OCI)
            results[name, "blob"] = wrk(f"{base}/v2/{IMAGE}/blobs/{big['digest']}", args.seconds, 4)

        # A cold pull: an image never built, with a storage of its own.
        cold_env = daemon_environment(work / "cold", NIXERY_PKGS_PATH=str(ROOT / "bench" / "pkgs"),
                                      NIX_TIMEOUT="600")
        cold = Daemon(work / "cold", cold_env).start()
        try:
            start = time.perf_counter()
            subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                            f"docker://{cold.registry}/docs/pystdlib:latest", f"oci:{work / 'cold-oci'}:x"],
                           check=True)
            pull = time.perf_counter() - start
        finally:
            cold.stop()
        built = re.search(r"built docs/pystdlib in ([\d.]+)s \(([\d.]+)s in Nix\)", cold.log)
        total_build, nix_seconds = (float(built.group(1)), float(built.group(2))) if built else (0.0, 0.0)
    finally:
        nixeryd.stop()
        distribution.terminate()
        distribution.wait()
        shutil.rmtree(work, ignore_errors=True)

    n, d = results["nixeryd", "manifest"], results["distribution", "manifest"]
    print(f"{'measure':<40}{'nixeryd':>12}{'distribution':>14}{'ratio':>8}")
    print(f"{'warm manifest GET, requests/s':<40}{n['rps']:>12.0f}{d['rps']:>14.0f}{n['rps'] / d['rps']:>8.2f}")
    print(f"{'warm manifest GET, p50 latency ms':<40}{n['p50']:>12.2f}{d['p50']:>14.2f}")
    print(f"{'warm manifest GET, p99 latency ms':<40}{n['p99']:>12.2f}{d['p99']:>14.2f}")
    nb, db = results["nixeryd", "blob"], results["distribution", "blob"]
    print(f"{'120 MB blob GET, MB/s':<40}{nb['mbps']:>12.0f}{db['mbps']:>14.0f}{nb['mbps'] / db['mbps']:>8.2f}")
    errors = (n["errors"] + nb["errors"], d["errors"] + db["errors"])
    print(f"{'non-2xx responses (manifest, blob)':<40}{errors[0]:>12.0f}{errors[1]:>14.0f}")
    print(f"\ncold pull of docs/pystdlib ({pull:.1f}s with skopeo): build {total_build:.1f}s, "
          f"of which Nix {nix_seconds:.2f}s and nixeryd {total_build - nix_seconds:.2f}s")


if __name__ == "__main__":
    main()
