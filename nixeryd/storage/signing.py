"""V4 signed URLs for Google Cloud Storage objects, signed with RSA-SHA256.

A signed URL lets a client fetch one object of a private bucket for a few
minutes without credentials of its own. The signature covers the method, the
object's path, the query parameters and the host, following Google's
"GOOG4-RSA-SHA256" scheme. Pure, except for the two key loaders.
"""
from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

ALGORITHM = "GOOG4-RSA-SHA256"
DEFAULT_ENDPOINT = "https://storage.googleapis.com"
MAX_EXPIRES = 7 * 24 * 3600


class Signer(Protocol):
    """Signs for a service account: RSA-SHA256 (PKCS #1 v1.5) over the bytes given."""

    @property
    def account(self) -> str: ...

    def sign(self, data: bytes) -> bytes: ...


@dataclass(frozen=True)
class SigningKey:
    """A service account's e-mail and its RSA private key: signs locally."""

    account: str
    private_key: rsa.RSAPrivateKey = field(repr=False)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data, padding.PKCS1v15(), hashes.SHA256())


IAM_ENDPOINT = "https://iamcredentials.googleapis.com"


@dataclass(frozen=True)
class IAMSigner:
    """Signs through the IAM Credentials API's ``signBlob`` with the caller's own
    credentials (a GKE or Cloud Run workload's): no key ever leaves Google. Blocking, one
    HTTPS call a signature: run it in a thread and keep what it signs for a while.

    ``session`` is an authorized ``requests`` session (``google.auth``'s
    ``AuthorizedSession``); it needs ``iam.serviceAccounts.signBlob`` on ``account``
    (roles/iam.serviceAccountTokenCreator)."""

    account: str
    session: Any = field(repr=False)
    endpoint: str = IAM_ENDPOINT
    timeout: float = 15.0

    def sign(self, data: bytes) -> bytes:
        url = f"{self.endpoint.rstrip('/')}/v1/projects/-/serviceAccounts/{quote(self.account, safe='@')}:signBlob"
        response = self.session.post(url, json={"payload": base64.b64encode(data).decode()},
                                     timeout=self.timeout)
        if response.status_code != 200:
            detail = response.text.strip().splitlines()[0][:200] if response.text.strip() else ""
            raise SigningError(f"IAM signBlob for {self.account} answered {response.status_code} {detail}".strip())
        try:
            return base64.b64decode(response.json()["signedBlob"], validate=True)
        except (ValueError, KeyError, TypeError) as e:
            raise SigningError(f"IAM signBlob for {self.account} gave no signature ({e})") from None


class SigningError(OSError):
    """A signature could not be had (the IAM service refused or is unreachable)."""


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror}") from None


def _rsa_key(pem: bytes, where: str) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where} holds no usable PEM private key ({e})") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{where} holds a {type(key).__name__.lstrip('_')}, not an RSA private key")
    return key


def load_service_account(path: str) -> SigningKey:
    """The signing key of a service-account JSON file."""
    data = _read(path, "service-account file")
    try:
        info: Any = json.loads(data)
    except ValueError:
        raise ValueError(f"{path} is not JSON") from None
    if not isinstance(info, dict) or info.get("type") not in (None, "service_account"):
        kind = info.get("type") if isinstance(info, dict) else type(info).__name__
        raise ValueError(f"{path} holds {kind!r} credentials, not a service account key")
    account, pem = info.get("client_email"), info.get("private_key")
    if not isinstance(account, str) or not isinstance(pem, str):
        raise ValueError(f"{path} has no client_email and private_key: not a service account key")
    return SigningKey(account, _rsa_key(pem.encode(), path))


def load_pem_key(path: str, account: str) -> SigningKey:
    """A signing key from a PEM file and the service account it belongs to."""
    return SigningKey(account, _rsa_key(_read(path, "key file"), path))


def _quote(value: str) -> str:
    return quote(value, safe="~")


def signed_url(
    key: Signer,
    bucket: str,
    object_name: str,
    *,
    now: datetime,
    expires: int = 300,
    endpoint: str = DEFAULT_ENDPOINT,
    method: str = "GET",
) -> str:
    """A URL granting ``method`` on the object for ``expires`` seconds from ``now``."""
    if not 1 <= expires <= MAX_EXPIRES:
        raise ValueError(f"a signed URL lasts 1 to {MAX_EXPIRES} seconds, not {expires}")
    if now.tzinfo is None:
        raise ValueError("the signing time must be timezone-aware")
    moment = now.astimezone(UTC)
    timestamp = moment.strftime("%Y%m%dT%H%M%SZ")
    scope = f"{moment.strftime('%Y%m%d')}/auto/storage/goog4_request"
    endpoint = endpoint.rstrip("/")
    host = urlsplit(endpoint).netloc
    path = f"/{bucket}/{quote(object_name.encode('utf-8'), safe='/~')}"
    params = {
        "X-Goog-Algorithm": ALGORITHM,
        "X-Goog-Credential": f"{key.account}/{scope}",
        "X-Goog-Date": timestamp,
        "X-Goog-Expires": str(expires),
        "X-Goog-SignedHeaders": "host",
    }
    query = "&".join(sorted(f"{_quote(k)}={_quote(v)}" for k, v in params.items()))
    canonical = "\n".join([method, path, query, f"host:{host}\n", "host", "UNSIGNED-PAYLOAD"])
    to_sign = "\n".join(
        [ALGORITHM, timestamp, scope, hashlib.sha256(canonical.encode("ascii")).hexdigest()]
    )
    signature = key.sign(to_sign.encode("ascii"))
    return f"{endpoint}{path}?{query}&X-Goog-Signature={signature.hex()}"


def string_to_sign(url: str) -> bytes:
    """What the signature of a V4 signed URL made by ``signed_url`` covers, rebuilt from the
    URL alone: for checking a signature with the account's public key."""
    parts = urlsplit(url)
    params = dict(p.split("=", 1) for p in parts.query.split("&"))
    params.pop("X-Goog-Signature")
    query = "&".join(sorted(f"{k}={v}" for k, v in params.items()))
    canonical = "\n".join(["GET", parts.path, query, f"host:{parts.netloc}\n", "host", "UNSIGNED-PAYLOAD"])
    credential = params["X-Goog-Credential"].replace("%2F", "/")
    scope = credential.split("/", 1)[1]
    return "\n".join([ALGORITHM, params["X-Goog-Date"], scope,
                      hashlib.sha256(canonical.encode("ascii")).hexdigest()]).encode("ascii")
