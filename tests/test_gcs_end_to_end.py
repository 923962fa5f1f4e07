"""End to end on Google Cloud Storage: the real daemon on gcp-storage-emulator,
real Nix, skopeo following the redirects to the bucket."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.daemon import TWISTD, Daemon, daemon_environment
from tests.emulator import Emulator, shared_emulator
from tests.test_end_to_end import pull_and_run_bash

ACCOUNT = "nixeryd-test@example-project.iam.gserviceaccount.com"


def gcs_environment(storage: Path, emulator: Emulator, bucket: str, **extra: str) -> dict[str, str]:
    return daemon_environment(
        storage,
        NIXERY_STORAGE_BACKEND="gcs",
        GCS_BUCKET=bucket,
        STORAGE_EMULATOR_HOST=emulator.url,
        DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA="true",
        **extra,
    )


@pytest.fixture
def signing_key(tmp_path: Path) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "signing.pem"
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    return path


@pytest.fixture
def gcs_daemon(tmp_path: Path, signing_key: Path) -> Iterator[tuple[Daemon, str]]:
    emulator = shared_emulator()
    bucket = emulator.new_bucket()
    env = gcs_environment(tmp_path / "local", emulator, bucket,
                          GCS_SIGNING_KEY=str(signing_key), GCS_SIGNING_ACCOUNT=ACCOUNT)
    daemon = Daemon(tmp_path / "local", env).start()
    yield daemon, bucket
    daemon.stop()


def test_pull_through_signed_redirects(gcs_daemon: tuple[Daemon, str], tmp_path: Path) -> None:
    """skopeo pulls an image whose blobs are 307s to signed bucket URLs, and it runs."""
    daemon, bucket = gcs_daemon
    manifest = pull_and_run_bash(daemon, tmp_path)
    stored = {b.name for b in shared_emulator().client().bucket(bucket).list_blobs(prefix="layers/")}
    for descriptor in [manifest["config"], *manifest["layers"]]:
        assert "layers/" + descriptor["digest"].split(":")[1] in stored
    layer = manifest["layers"][0]["digest"]
    status, headers, _ = no_redirect_get(daemon, f"/v2/shell/hello/blobs/{layer}")
    assert status == 307
    location = urlsplit(headers["Location"])
    query = parse_qs(location.query)
    assert location.path == f"/{bucket}/layers/{layer.split(':')[1]}"
    assert query["X-Goog-Algorithm"] == ["GOOG4-RSA-SHA256"]
    assert query["X-Goog-Credential"][0].startswith(ACCOUNT + "/")
    assert query["X-Goog-Expires"] == ["300"]
    assert headers["Location"] not in daemon.log, "signed URLs must never be logged"


def no_redirect_get(daemon: Daemon, path: str) -> tuple[int, dict[str, str], bytes]:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60)
    connection.request("GET", path)
    response = connection.getresponse()
    result = response.status, dict(response.getheaders()), response.read()
    connection.close()
    return result


def test_storage_outage_is_503_then_recovers(tmp_path: Path) -> None:
    """With the bucket's service down a pull is 503 with Retry-After; once it is back, pulls work."""
    emulator = Emulator().start()
    try:
        bucket = emulator.new_bucket()
        daemon = Daemon(tmp_path / "local", gcs_environment(tmp_path / "local", emulator, bucket)).start()
        try:
            emulator.stop()
            status, headers, body = daemon.request("/v2/alpha/manifests/latest")
            assert status == 503, body
            assert headers["Retry-After"] == "10"
            assert json.loads(body)["errors"][0]["code"] == "UNKNOWN"
            emulator.start(emulator.port)
            emulator.client().create_bucket(bucket)
            status, _, body = daemon.request("/v2/alpha/manifests/latest")
            assert status == 200, body
            manifest = json.loads(body)
            status, _, _ = daemon.request(f"/v2/alpha/blobs/{manifest['config']['digest']}")
            assert status == 200
        finally:
            daemon.stop()
    finally:
        emulator.stop()


@pytest.mark.parametrize(
    "setting, extra",
    [
        ("GCS_BUCKET", {"GCS_BUCKET": "no-such-bucket"}),
        ("GCS_SIGNING_KEY", {"GCS_SIGNING_KEY": "/nonexistent/key.pem", "GCS_SIGNING_ACCOUNT": ACCOUNT}),
        ("GOOGLE_APPLICATION_CREDENTIALS", {"GOOGLE_APPLICATION_CREDENTIALS": "/nonexistent/sa.json"}),
    ],
)
def test_bad_gcs_settings_stop_start_up(tmp_path: Path, setting: str, extra: dict[str, str]) -> None:
    """A missing bucket or an unreadable key stops start-up with one line naming the setting."""
    emulator = shared_emulator()
    env = gcs_environment(tmp_path / "local", emulator, emulator.new_bucket())
    env.update(extra)
    result = subprocess.run([str(TWISTD), "--nodaemon", "--pidfile=", "nixeryd"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and setting in lines[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_an_object_damaged_in_the_bucket_is_refused_then_rebuilt(tmp_path: Path) -> None:
    """A layer object replaced in the bucket by other bytes: an instance that looks it up is
    told its size by the same lookup and answers 404 instead of a redirect to it; the next
    manifest GET finds the damage (size, MD5) and uploads the layer again."""
    emulator = shared_emulator()
    bucket_name = emulator.new_bucket()
    first = Daemon(tmp_path / "one", gcs_environment(tmp_path / "one", emulator, bucket_name)).start()
    status, _, body = first.request("/v2/alpha/manifests/latest")
    assert status == 200, body
    first.stop()
    layer = max(json.loads(body)["layers"], key=lambda layer: layer["size"])
    bucket = emulator.client().bucket(bucket_name)
    key = "layers/" + layer["digest"].split(":")[1]
    bucket.blob(key).upload_from_string(b"damaged", content_type="application/octet-stream")
    second = Daemon(tmp_path / "two", gcs_environment(tmp_path / "two", emulator, bucket_name)).start()
    status, _, again = second.request("/v2/alpha/manifests/latest")
    assert status == 200 and again == body
    assert bucket.get_blob(key).size == layer["size"], "the damaged layer was not uploaded again"
    third = Daemon(tmp_path / "three", gcs_environment(tmp_path / "three", emulator, bucket_name)).start()
    assert third.request("/v2/alpha/manifests/latest")[0] == 200  # loaded from the bucket, checked
    bucket.blob(key).upload_from_string(b"damaged again", content_type="application/octet-stream")
    status, _, error = no_redirect_get(third, f"/v2/alpha/blobs/{layer['digest']}")
    assert status == 404 and json.loads(error)["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert third.request("/v2/alpha/manifests/latest")[0] == 200
    assert no_redirect_get(third, f"/v2/alpha/blobs/{layer['digest']}")[0] == 307
    assert bucket.get_blob(key).size == layer["size"]


def test_a_stalled_bucket_is_a_quick_503_and_warm_images_keep_serving(tmp_path: Path) -> None:
    """The emulator stopped (SIGSTOP) under a running daemon: a cold pull is a 503 with
    Retry-After within the storage deadline, and once the breaker is open at once; a warm
    image keeps answering, manifest and blob redirects. Continued (SIGCONT), the next pull
    after the cooldown builds."""
    import signal

    emulator = Emulator().start()
    bucket = emulator.new_bucket()
    env = gcs_environment(tmp_path / "local", emulator, bucket, NIXERY_STORAGE_DEADLINE="3",
                          NIXERY_STORAGE_CONNECT_TIMEOUT="1", NIXERY_STORAGE_COOLDOWN="2")
    daemon = Daemon(tmp_path / "local", env).start()
    status, _, body = daemon.request("/v2/alpha/manifests/latest")
    assert status == 200, body
    blobs = [d["digest"] for d in [json.loads(body)["config"], *json.loads(body)["layers"]]]
    for digest in blobs:
        assert no_redirect_get(daemon, f"/v2/alpha/blobs/{digest}")[0] == 307
    assert emulator.process is not None
    emulator.process.send_signal(signal.SIGSTOP)
    try:
        for _ in range(6):  # enough failures in a row to open the breaker
            status, headers, body = daemon.request("/v2/beta/manifests/latest")
            assert status == 503, body
            assert headers["Retry-After"] == "10"
            assert json.loads(body)["errors"][0]["code"] == "UNKNOWN"
        assert daemon.logged("not asked again")
        assert daemon.request("/v2/alpha/manifests/latest")[0] == 200
        for digest in blobs:
            assert no_redirect_get(daemon, f"/v2/alpha/blobs/{digest}")[0] == 307
    finally:
        emulator.process.send_signal(signal.SIGCONT)
    # A client retries; once the cooldown has passed a probe goes through and the pull works.
    for _ in range(5000):
        status, _, body = daemon.request("/v2/beta/manifests/latest")
        if status != 503:
            break
    assert status == 200, body


class FakeIAM:
    """The IAM Credentials API's signBlob, at the edge we cannot reach here: a loopback
    server holding the service account's key, answering as the real one does
    (POST /v1/projects/-/serviceAccounts/<account>:signBlob, {"payload": base64} ->
    {"keyId", "signedBlob": base64}). It counts the calls."""

    def __init__(self, account: str) -> None:
        import http.server
        import threading

        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.calls: list[str] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                import base64

                from cryptography.hazmat.primitives import hashes
                from cryptography.hazmat.primitives.asymmetric import padding

                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                fake.calls.append(self.path)
                if self.path != f"/v1/projects/-/serviceAccounts/{account}:signBlob":
                    self.send_error(404)
                    return
                signature = fake.key.sign(base64.b64decode(body["payload"]), padding.PKCS1v15(), hashes.SHA256())
                answer = json.dumps({"keyId": "k1", "signedBlob": base64.b64encode(signature).decode()}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_iam() -> Iterator[FakeIAM]:
    iam = FakeIAM(ACCOUNT)
    yield iam
    iam.stop()


def test_keyless_signing_through_iam(tmp_path: Path, fake_iam: FakeIAM) -> None:
    """With NIXERY_SIGNING_ACCOUNT and no key, blob URLs are signed by IAM signBlob: the
    signature verifies with the account's public key, and a URL is reused while it has
    long to live (one signBlob call for repeated pulls)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    from nixeryd.storage.signing import string_to_sign

    emulator = shared_emulator()
    bucket = emulator.new_bucket()
    env = gcs_environment(tmp_path / "local", emulator, bucket, NIXERY_SIGNING_ACCOUNT=ACCOUNT,
                          NIXERY_IAM_ENDPOINT=fake_iam.url)
    daemon = Daemon(tmp_path / "local", env).start()
    status, _, body = daemon.request("/v2/alpha/manifests/latest")
    assert status == 200, body
    layer = json.loads(body)["layers"][0]["digest"]
    status, headers, _ = no_redirect_get(daemon, f"/v2/alpha/blobs/{layer}")
    assert status == 307
    url = headers["Location"]
    query = parse_qs(urlsplit(url).query)
    assert query["X-Goog-Credential"][0].startswith(ACCOUNT + "/")
    signature = bytes.fromhex(query["X-Goog-Signature"][0])
    fake_iam.key.public_key().verify(signature, string_to_sign(url), padding.PKCS1v15(), hashes.SHA256())
    for _ in range(3):
        assert no_redirect_get(daemon, f"/v2/alpha/blobs/{layer}")[1]["Location"] == url
    assert len(fake_iam.calls) == 1
    assert url not in daemon.log, "signed URLs must never be logged"


def test_iam_refusing_to_sign_is_a_503(tmp_path: Path, fake_iam: FakeIAM) -> None:
    """When IAM will not sign for the account, a blob request is a 503 with Retry-After,
    not a redirect to an unsigned URL, and not a hang."""
    emulator = shared_emulator()
    bucket = emulator.new_bucket()
    env = gcs_environment(tmp_path / "local", emulator, bucket,
                          NIXERY_SIGNING_ACCOUNT="someone-else@example-project.iam.gserviceaccount.com",
                          NIXERY_IAM_ENDPOINT=fake_iam.url)
    daemon = Daemon(tmp_path / "local", env).start()
    status, _, body = daemon.request("/v2/alpha/manifests/latest")
    assert status == 200, body
    layer = json.loads(body)["layers"][0]["digest"]
    status, headers, body = no_redirect_get(daemon, f"/v2/alpha/blobs/{layer}")
    assert status == 503 and headers["Retry-After"] == "10", body
    assert daemon.logged("answered 404"), daemon.log
