"""Memory an upload of a large layer costs, on GCS (gcp-storage-emulator) and S3 (moto's
server), side by side with what the client libraries do with their own defaults.

    .venv/bin/python bench/upload_memory.py [MB]

Each upload runs in a child process of its own: the figure is the growth of its peak
resident memory (VmHWM, reset before the upload) over what it held before, for one upload
and for four at once (threads, as an instance uploads an image's layers). Target: a
bounded cost per upload whatever the layer's size (about UPLOAD_CHUNK on GCS, one read
buffer on S3), where the libraries' defaults hold up to 100 MB per GCS upload.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.emulator import Emulator  # noqa: E402
from tests.moto import Moto  # noqa: E402


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def child(backend: str, url: str, bucket: str, path: str, uploads: int, library_defaults: bool) -> None:
    """In the child: upload ``path`` ``uploads`` times at once; print the peak growth in MiB."""
    from nixeryd.core.blobs import BlobInfo
    from nixeryd.core.offload import inline

    data = Path(path).read_bytes()
    info = BlobInfo("sha256:" + hashlib.sha256(data).hexdigest(), "", len(data), hashlib.md5(data).hexdigest())
    del data
    staging = tempfile.mkdtemp(prefix="nixeryd-bench-staging-")
    storage: Any
    if backend == "gcs":
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage as gcs

        from nixeryd.storage import gcs as ours
        from nixeryd.storage.gcs import GCSStorage

        client = gcs.Client(project="bench", credentials=AnonymousCredentials(),
                            client_options={"api_endpoint": url})
        if library_defaults:
            ours.UPLOAD_CHUNK = 100 * 1024 * 1024  # the client library's own default
        storage = GCSStorage(client.bucket(bucket), inline, redirect=lambda key: url, staging_dir=staging)
    else:
        from nixeryd.storage.s3 import S3Storage

        moto = Moto()
        moto.port = int(url.rsplit(":", 1)[1])
        storage = S3Storage(moto.client(), bucket, inline, staging_dir=staging)
    staged = []
    for _ in range(uploads):
        target = storage.staging_path()
        shutil.copyfile(path, target)
        staged.append(target)
    # Each upload its own object (an object already there is not uploaded again).
    infos = [BlobInfo("sha256:" + hashlib.sha256(f"{os.getpid()}:{i}:{info.digest}".encode()).hexdigest(), "",
                      info.size, info.md5) for i in range(uploads)]
    before = _kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    errors: list[BaseException] = []

    def upload(target: str, blob: BlobInfo) -> None:
        try:
            d = storage.commit_blob(target, blob)
            d.addErrback(errors.append)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=upload, args=args) for args in zip(staged, infos, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit(f"upload failed: {errors[0]}")
    print(json.dumps({"growth_mib": (_kib("VmHWM") - before) / 1024}))


def measure(backend: str, url: str, bucket: str, path: str, uploads: int, library_defaults: bool) -> float:
    run = subprocess.run(
        [sys.executable, __file__, "--child", backend, url, bucket, path, str(uploads), str(int(library_defaults))],
        capture_output=True, text=True, check=False,
        env=dict(os.environ, **Moto().environment()) if backend == "s3" else None)
    if run.returncode != 0:
        raise SystemExit(run.stderr[-2000:])
    return float(json.loads(run.stdout.strip().splitlines()[-1])["growth_mib"])


def main() -> None:
    megabytes = int(sys.argv[1]) if len(sys.argv) > 1 else 120
    emulator = Emulator().start()
    moto = Moto().start()
    try:
        gcs_bucket = emulator.new_bucket()
        s3_bucket = "bench-uploads"
        moto.client().create_bucket(Bucket=s3_bucket,
                                    CreateBucketConfiguration={"LocationConstraint": "eu-west-3"})
        with tempfile.TemporaryDirectory(prefix="nixeryd-bench-") as tmp:
            path = os.path.join(tmp, "layer")
            with open(path, "wb") as out:
                for _ in range(megabytes):
                    out.write(os.urandom(1024 * 1024))
            rows = []
            for uploads in (1, 4):
                ours_gcs = measure("gcs", emulator.url, gcs_bucket, path, uploads, False)
                lib_gcs = measure("gcs", emulator.url, gcs_bucket, path, uploads, True)
                ours_s3 = measure("s3", moto.url, s3_bucket, path, uploads, False)
                rows.append((uploads, ours_gcs, lib_gcs, ours_s3))
        print(f"peak memory growth uploading a {megabytes} MB layer (MiB)")
        print(f"{'uploads at once':>16} | {'GCS, nixeryd':>13} | {'GCS, 100 MB chunks':>18} | {'S3, nixeryd':>12}")
        for uploads, ours_gcs, lib_gcs, ours_s3 in rows:
            print(f"{uploads:>16} | {ours_gcs:>13.1f} | {lib_gcs:>18.1f} | {ours_s3:>12.1f}")
    finally:
        emulator.stop()
        moto.stop()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        backend, url, bucket, path, uploads, defaults = sys.argv[2:8]
        child(backend, url, bucket, path, int(uploads), defaults == "1")
    else:
        main()
