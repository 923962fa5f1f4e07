"""Image signatures in the sigstore format that containers/image (skopeo, podman,
CRI-O) and cosign verify. Pure, except the key loader.

A signature of the manifest ``sha256:<hex>`` is found under the tag
``sha256-<hex>.sig`` of the same repository. That tag holds an OCI manifest whose one
layer is the "simple signing" payload (what is signed: the repository and the manifest
digest), with the signature in the layer's ``dev.cosignproject.cosign/signature``
annotation: ECDSA P-256 over the payload, DER, base64. Signatures are deterministic
(RFC 6979), so the same image signed twice gives the same bytes and digests.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from nixeryd.image.manifest import OCI_MANIFEST

SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


SIGNATURE_TAG = re.compile(r"sha256-[0-9a-f]{64}\.(sig|att|sbom)")
"""Tags sigstore clients look signatures and attachments up by."""


@dataclass(frozen=True)
class SigningKey:
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)


def load_signing_key(path: str) -> SigningKey:
    """An ECDSA P-256 private key from a PEM file (SEC1 or PKCS #8, unencrypted);
    ValueError with one line saying what is wrong."""
    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path} holds no usable PEM private key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"{path} does not hold an ECDSA P-256 private key")
    return SigningKey(key)


def payload(reference: str, manifest_digest: str) -> bytes:
    """The simple-signing payload: this repository's manifest ``manifest_digest``."""
    return json.dumps({
        "critical": {
            "identity": {"docker-reference": reference},
            "image": {"docker-manifest-digest": manifest_digest},
            "type": "cosign container image signature",
        },
        "optional": None,
    }, sort_keys=True, separators=(",", ":")).encode()


def sign(key: SigningKey, data: bytes) -> str:
    signature = key.private_key.sign(data, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    return base64.b64encode(signature).decode()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class SignatureArtifact:
    """The blobs of a signature: the payload, a config, and the manifest naming both."""

    payload: bytes
    config: bytes
    manifest: bytes


def signature_artifact(key: SigningKey, reference: str, manifest_digest: str) -> SignatureArtifact:
    signed = payload(reference, manifest_digest)
    config = json.dumps({
        "architecture": "", "os": "", "config": {},
        "created": "0001-01-01T00:00:00Z",
        "rootfs": {"type": "layers", "diff_ids": [_digest(signed)]},
    }, sort_keys=True, separators=(",", ":")).encode()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": _digest(config), "size": len(config)},
        "layers": [{
            "mediaType": SIMPLE_SIGNING,
            "digest": _digest(signed),
            "size": len(signed),
            "annotations": {SIGNATURE_ANNOTATION: sign(key, signed)},
        }],
    }, sort_keys=True, separators=(",", ":")).encode()
    return SignatureArtifact(signed, config, manifest)
