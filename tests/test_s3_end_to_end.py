"""End to end on S3: the real daemon on moto's S3 server, real Nix, skopeo following
the presigned redirects to the bucket, an outage and a stall, start-up refusals,
and garbage collection and verification on the bucket."""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.daemon import TWISTD, Daemon, daemon_environment
from tests.moto import REGION, Moto, shared_moto
from tests.test_end_to_end import pull_and_run_bash
from tests.test_gcs_end_to_end import no_redirect_get


def s3_environment(storage: Path, moto: Moto, bucket: str, **extra: str) -> dict[str, str]:
    env = daemon_environment(storage, NIXERY_STORAGE_BACKEND="s3", S3_BUCKET=bucket, **moto.environment())
    for name in ("AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        env.pop(name, None)
    env.update(extra)
    return env


def test_pull_through_presigned_redirects(tmp_path: Path) -> None:
    """skopeo pulls an image whose blobs are 307s to presigned URLs on the bucket, and it runs."""
    moto = shared_moto()
    bucket = moto.new_bucket()
    daemon = Daemon(tmp_path / "local", s3_environment(tmp_path / "local", moto, bucket)).start()
    manifest = pull_and_run_bash(daemon, tmp_path)
    listed = moto.client().list_objects_v2(Bucket=bucket, Prefix="layers/")["Contents"]
    stored = {item["Key"] for item in listed}
    for descriptor in [manifest["config"], *manifest["layers"]]:
        assert "layers/" + descriptor["digest"].split(":")[1] in stored
    layer = manifest["layers"][0]["digest"]
    status, headers, _ = no_redirect_get(daemon, f"/v2/shell/hello/blobs/{layer}")
    assert status == 307
    location = urlsplit(headers["Location"])
    query = parse_qs(location.query)
    assert f"{location.scheme}://{location.netloc}" == moto.url
    assert location.path == f"/{bucket}/layers/{layer.split(':')[1]}"
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    credential = query["X-Amz-Credential"][0]
    assert credential.startswith("nixeryd-test/") and f"/{REGION}/s3/" in credential
    assert query["X-Amz-Expires"] == ["300"]
    assert headers["Location"] not in daemon.log, "presigned URLs must never be logged"
    daemon.stop()


def test_public_bucket_redirects_to_plain_urls(tmp_path: Path) -> None:
    """S3_USE_PRESIGNED_URLS=false: redirects to the objects' own addresses."""
    moto = shared_moto()
    bucket = moto.new_bucket()
    env = s3_environment(tmp_path / "local", moto, bucket, S3_USE_PRESIGNED_URLS="false")
    daemon = Daemon(tmp_path / "local", env).start()
    status, _, body = daemon.request("/v2/alpha/manifests/latest")
    assert status == 200, body
    layer = json.loads(body)["layers"][0]["digest"]
    status, headers, _ = no_redirect_get(daemon, f"/v2/alpha/blobs/{layer}")
    assert status == 307
    assert headers["Location"] == f"{moto.url}/{bucket}/layers/{layer.split(':')[1]}"
    daemon.stop()


def test_outage_and_stall_are_503_then_recover(tmp_path: Path) -> None:
    """With S3 stalled (SIGSTOP) a pull of a new image is a 503 with Retry-After within the
    storage deadline, not a hang, and a warm image still serves from memory; with S3 gone
    (killed) it is a 503 at once; once S3 is back, pulls work again."""
    moto = Moto().start()
    try:
        bucket = moto.new_bucket()
        env = s3_environment(tmp_path / "local", moto, bucket, NIXERY_STORAGE_DEADLINE="2",
                             NIXERY_STORAGE_CONNECT_TIMEOUT="1", NIXERY_STORAGE_COOLDOWN="1")
        daemon = Daemon(tmp_path / "local", env).start()
        assert daemon.request("/v2/alpha/manifests/latest")[0] == 200
        assert moto.process is not None
        moto.process.send_signal(signal.SIGSTOP)
        try:
            status, headers, body = daemon.request("/v2/beta/manifests/latest")
            assert status == 503, body
            assert headers["Retry-After"] == "10"
            assert daemon.request("/v2/alpha/manifests/latest")[0] == 200
        finally:
            moto.process.send_signal(signal.SIGCONT)
        port = moto.port
        moto.stop()
        status, headers, body = daemon.request("/v2/gamma/manifests/latest")
        assert status == 503 and headers["Retry-After"] == "10", body
        assert "Traceback" not in body.decode()
        moto.start(port)
        moto.client().create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
        status, _, body = daemon.request("/v2/gamma/manifests/latest")
        assert status == 200, body
        config = json.loads(body)["config"]["digest"]
        assert no_redirect_get(daemon, f"/v2/gamma/blobs/{config}")[0] == 307
        daemon.stop()
    finally:
        moto.stop()


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({"S3_BUCKET": "no-such-bucket"}, "S3_BUCKET: bucket 'no-such-bucket' does not exist"),
        ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "NIXERY_STORAGE_DEADLINE": "2",
          "NIXERY_STORAGE_CONNECT_TIMEOUT": "1"}, "S3_BUCKET: cannot reach bucket"),
        ({"S3_BUCKET": ""}, "S3_BUCKET: must be set when NIXERY_STORAGE_BACKEND is s3"),
        ({"S3_USE_PRESIGNED_URLS": "maybe"}, "S3_USE_PRESIGNED_URLS: must be true or false, got 'maybe'"),
    ],
)
def test_bad_s3_settings_stop_start_up(tmp_path: Path, extra: dict[str, str], expected: str) -> None:
    """A bucket that does not exist, a service out of reach, or a bad setting: start-up
    stops with one line naming it, and no traceback."""
    moto = shared_moto()
    env = s3_environment(tmp_path / "local", moto, moto.new_bucket(), **extra)
    run = subprocess.run([str(TWISTD), "--nodaemon", "--pidfile=", "nixeryd"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert expected in run.stderr + run.stdout
    assert "Traceback" not in run.stderr + run.stdout


def test_gc_and_verify_work_on_the_bucket(tmp_path: Path) -> None:
    """``nixeryd verify`` finds a damaged blob in the bucket and ``--repair`` removes it;
    ``nixeryd gc`` removes blobs no image needs and keeps the image's."""
    moto = shared_moto()
    bucket = moto.new_bucket()
    env = s3_environment(tmp_path / "local", moto, bucket)
    daemon = Daemon(tmp_path / "local", env).start()
    status, _, body = daemon.request("/v2/alpha/manifests/latest")
    assert status == 200, body
    daemon.stop()
    manifest = json.loads(body)
    client = moto.client()
    orphan = "layers/" + "ab" * 32
    client.put_object(Bucket=bucket, Key=orphan, Body=b"nobody's")
    damaged = "layers/" + manifest["layers"][0]["digest"].split(":")[1]
    client.put_object(Bucket=bucket, Key=damaged, Body=b"garbage")
    nixeryd = TWISTD.parent / "nixeryd"

    run = subprocess.run([str(nixeryd), "verify"], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0, run.stdout + run.stderr
    assert damaged.split("/")[1] in run.stdout + run.stderr
    run = subprocess.run([str(nixeryd), "verify", "--repair"], env=env, capture_output=True, text=True,
                         timeout=120)
    keys = {item["Key"] for item in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert damaged not in keys, run.stdout + run.stderr

    run = subprocess.run([str(nixeryd), "gc", "--keep-days", "7"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert json.loads(run.stdout)["removed_blobs"] == 0, "everything is younger than a week"

    # A month on (the clock handed to the collector; S3 keeps its own times), the orphan
    # and the image no one pulled go, through the S3 backend's listings and conditional deletes.
    from twisted.internet.defer import Deferred

    from nixeryd.core.offload import inline
    from nixeryd.registry.gc import collect
    from nixeryd.storage.s3 import S3Storage

    storage = S3Storage(client, bucket, inline, staging_dir=str(tmp_path / "staging"))
    done = Deferred.fromCoroutine(collect(storage, keep_seconds=7 * 86400, now=time.time() + 30 * 86400))
    report = done.result
    assert report.removed_images == 1 and report.removed_blobs >= 2
    keys = {item["Key"] for item in client.list_objects_v2(Bucket=bucket).get("Contents", [])}
    assert orphan not in keys
    assert not any(k.startswith(("layers/", "manifests/")) for k in keys), keys
