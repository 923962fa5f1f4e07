"""Image signatures in the sigstore format, checked by the real verifier: skopeo with a
policy that requires them (containers/image, as podman and CRI-O use it)."""
from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from nixeryd.image import cosign
from nixeryd.image.manifest import OCI_MANIFEST
from tests.daemon import TWISTD, Daemon, daemon_environment


def key_pair(where: Path, name: str) -> tuple[Path, Path]:
    """An ECDSA P-256 key (SEC1 PEM, as `openssl ecparam -genkey` writes it) and its public key."""
    key = ec.generate_private_key(ec.SECP256R1())
    private = where / f"{name}.key"
    public = where / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def test_signature_artifact_verifies_and_is_deterministic(tmp_path: Path) -> None:
    """The payload names the repository and digest; the annotation verifies with the public
    key; signing twice gives the same bytes."""
    private, _ = key_pair(tmp_path, "k")
    key = cosign.load_signing_key(str(private))
    one = cosign.signature_artifact(key, "registry.internal/shell/hello", "sha256:" + "a" * 64)
    assert one == cosign.signature_artifact(key, "registry.internal/shell/hello", "sha256:" + "a" * 64)
    signed = json.loads(one.payload)["critical"]
    assert signed["identity"]["docker-reference"] == "registry.internal/shell/hello"
    assert signed["image"]["docker-manifest-digest"] == "sha256:" + "a" * 64
    (layer,) = json.loads(one.manifest)["layers"]
    assert layer["mediaType"] == cosign.SIMPLE_SIGNING
    signature = base64.b64decode(layer["annotations"][cosign.SIGNATURE_ANNOTATION])
    key.private_key.public_key().verify(signature, one.payload, ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize("content, message", [
    (b"not a key", "no usable PEM private key"),
    (ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
     "not hold an ECDSA P-256"),
])
def test_bad_keys_are_refused(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        cosign.load_signing_key(str(path))


@pytest.fixture(scope="module")
def signing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Path, Path]]:
    """A daemon signing with one key; that key's public half, and another public key."""
    where = tmp_path_factory.mktemp("keys")
    private, public = key_pair(where, "nixeryd")
    _, other = key_pair(where, "other")
    storage = tmp_path_factory.mktemp("storage")
    daemon = Daemon(storage, daemon_environment(storage, NIXERY_SIGNING_KEY=str(private),
                                                NIXERY_SIGNING_IDENTITY="registry.test, mirror.test:5000")).start()
    yield daemon, public, other
    daemon.stop()


def verify_as_containers_image_does(daemon: Daemon, name: str, public: Path) -> str:
    """What containers/image's sigstoreSigned policy does for a pull of ``name`` (Debian's
    skopeo and podman are built with it disabled: "Debian-local change: sigstore disabled",
    so the steps are followed here): read the image's digest, fetch the ``sha256-<hex>.sig``
    manifest, fetch each simple-signing layer by digest, check its digest, verify the
    annotation's signature with the public key, and compare what it signs with the image.
    Returns the signed repository; raises on any mismatch."""
    import hashlib

    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    status, headers, _ = daemon.request(f"/v2/{name}/manifests/latest", "HEAD",
                                        {"Accept": OCI_MANIFEST})
    assert status == 200
    digest = headers["Docker-Content-Digest"]
    status, headers, body = daemon.request(f"/v2/{name}/manifests/{digest.replace(':', '-')}.sig",
                                           headers={"Accept": OCI_MANIFEST})
    assert status == 200, body
    assert headers["Content-Type"] == OCI_MANIFEST
    key = load_pem_public_key(public.read_bytes())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    (layer,) = [layer for layer in json.loads(body)["layers"] if layer["mediaType"] == cosign.SIMPLE_SIGNING]
    status, _, signed = daemon.request(f"/v2/{name}/blobs/{layer['digest']}")
    assert status == 200 and "sha256:" + hashlib.sha256(signed).hexdigest() == layer["digest"]
    key.verify(base64.b64decode(layer["annotations"][cosign.SIGNATURE_ANNOTATION]), signed,
               ec.ECDSA(hashes.SHA256()))
    critical = json.loads(signed)["critical"]
    assert critical["type"] == "cosign container image signature"
    assert critical["image"]["docker-manifest-digest"] == digest
    reference: str = critical["identity"]["docker-reference"]
    return reference


def test_a_signed_image_verifies(signing: tuple[Daemon, Path, Path]) -> None:
    """Every image is signed: the signature verifies with nixeryd's public key, names the
    manifest the tag serves and the repository as it was asked for, and is the same bytes
    each time it is asked for."""
    daemon, public, _ = signing
    assert verify_as_containers_image_does(daemon, "shell/hello", public) == "registry.test/shell/hello"
    status, headers, _ = daemon.request("/v2/shell/hello/manifests/latest", "HEAD", {"Accept": OCI_MANIFEST})
    tag = headers["Docker-Content-Digest"].replace(":", "-") + ".sig"
    first, second = (daemon.request(f"/v2/shell/hello/manifests/{tag}")[2] for _ in range(2))
    assert first == second


def test_another_key_does_not_verify(signing: tuple[Daemon, Path, Path]) -> None:
    """Checked with another public key, the signature is refused."""
    from cryptography.exceptions import InvalidSignature

    daemon, _, other = signing
    with pytest.raises(InvalidSignature):
        verify_as_containers_image_does(daemon, "hello", other)


def test_no_signature_for_a_manifest_never_served(signing: tuple[Daemon, Path, Path]) -> None:
    """A .sig tag for a digest nixeryd does not store is a 404, not a signature of nothing."""
    daemon, _, _ = signing
    status, _, body = daemon.request(f"/v2/hello/manifests/sha256-{'b' * 64}.sig")
    assert (status, daemon.error_codes(body)) == (404, ["MANIFEST_UNKNOWN"])


def test_the_image_page_names_the_signature_tag_that_answers(signing: tuple[Daemon, Path, Path]) -> None:
    """With signing on, the image page shows the signature tag, and that tag answers 200."""
    daemon, _, _ = signing
    status, _, body = daemon.request("/image/hello", headers={"Accept": "application/json"})
    assert status == 200, body
    tag = json.loads(body)["signature_tag"]
    assert tag is not None and tag.endswith(".sig")
    assert daemon.request(f"/v2/hello/manifests/{tag}")[0] == 200


def test_a_request_never_chooses_what_is_signed(signing: tuple[Daemon, Path, Path]) -> None:
    """A name that was never built, or one that does not stand for the digest, gets no
    signature, and asking writes nothing; the Host header picks among the configured
    identities and adds none."""
    daemon, public, _ = signing
    _, headers, _ = daemon.request("/v2/hello/manifests/latest", "HEAD", {"Accept": OCI_MANIFEST})
    tag = headers["Docker-Content-Digest"].replace(":", "-") + ".sig"
    blobs = set(os.listdir(daemon.storage / "layers"))
    for name, host in [("library/ubuntu", "docker.io"), ("alpha", "docker.io"), ("library/ubuntu", "registry.test")]:
        status, _, body = daemon.request(f"/v2/{name}/manifests/{tag}", headers={"Host": host})
        assert (status, daemon.error_codes(body)) == (404, ["MANIFEST_UNKNOWN"]), (name, host)
    assert set(os.listdir(daemon.storage / "layers")) == blobs
    for host, identity in [("docker.io", "registry.test"), ("mirror.test:5000", "mirror.test:5000"),
                           ("REGISTRY.TEST", "registry.test")]:
        status, _, body = daemon.request(f"/v2/hello/manifests/{tag}", headers={"Host": host})
        assert status == 200, body
        (layer,) = [item for item in json.loads(body)["layers"] if item["mediaType"] == cosign.SIMPLE_SIGNING]
        signed = json.loads(daemon.request(f"/v2/hello/blobs/{layer['digest']}")[2])
        assert signed["critical"]["identity"]["docker-reference"] == f"{identity}/hello", host


def test_signing_needs_an_identity(tmp_path: Path) -> None:
    """A key without NIXERY_SIGNING_IDENTITY stops start-up with one line naming it."""
    private, _ = key_pair(tmp_path, "k")
    env = daemon_environment(tmp_path / "s", NIXERY_SIGNING_KEY=str(private))
    result = subprocess.run([str(TWISTD), "--nodaemon", "--pidfile=", "nixeryd"], env=env, capture_output=True,
                            text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("nixeryd: NIXERY_SIGNING_IDENTITY: must be set with NIXERY_SIGNING_KEY"), lines
