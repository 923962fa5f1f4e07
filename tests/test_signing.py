"""V4 signed URLs, compared byte for byte with google-cloud-storage's own signer."""
from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from google.cloud import storage
from google.oauth2 import service_account

from nixeryd.storage.signing import (
    SigningKey,
    load_pem_key,
    load_service_account,
    signed_url,
)

ACCOUNT = "nixeryd@example-project.iam.gserviceaccount.com"
NOW = datetime(2026, 3, 7, 23, 59, 30, tzinfo=UTC)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(key: object) -> str:
    return key.private_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def google_signed(key: rsa.RSAPrivateKey, bucket: str, name: str, expires: int, endpoint: str | None,
                  monkeypatch: pytest.MonkeyPatch) -> str:
    """The URL google-cloud-storage signs, with its clock held at NOW (a library, not ours)."""
    import google.cloud.storage._signing as library_signing

    monkeypatch.setattr(library_signing, "_NOW", lambda tz=None: NOW)
    credentials = service_account.Credentials.from_service_account_info({
        "type": "service_account", "project_id": "example-project", "client_email": ACCOUNT,
        "private_key": pem(key), "private_key_id": "1", "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token",
    })
    from google.auth.credentials import AnonymousCredentials

    client = storage.Client(project="example-project", credentials=AnonymousCredentials())
    blob = storage.Blob(name, storage.Bucket(client, bucket))
    url: str = blob.generate_signed_url(
        version="v4", expiration=timedelta(seconds=expires), method="GET",
        credentials=credentials, api_access_endpoint=endpoint or "https://storage.googleapis.com",
    )
    return url


@pytest.mark.parametrize("name", [
    "layers/" + "0123456789abcdef" * 4, "with space/and+plus", "ünïcødé/日本", "tilde~and/slash", "a%b&c=d",
])
@pytest.mark.parametrize("expires", [1, 300, 3600, 604800])
@pytest.mark.parametrize("endpoint", [None, "http://127.0.0.1:9023"])
def test_same_url_as_google_cloud_storage(rsa_key: rsa.RSAPrivateKey, name: str, expires: int,
                                          endpoint: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our signer gives exactly the URL google-cloud-storage gives for the same inputs."""
    ours = signed_url(SigningKey(ACCOUNT, rsa_key), "images", name, now=NOW, expires=expires,
                      **({} if endpoint is None else {"endpoint": endpoint}))
    assert ours == google_signed(rsa_key, "images", name, expires, endpoint, monkeypatch)


def test_signature_verifies(rsa_key: rsa.RSAPrivateKey) -> None:
    """The signature is RSA-SHA256 over the spec's string to sign, checkable with the public key."""
    url = signed_url(SigningKey(ACCOUNT, rsa_key), "images", "layers/x", now=NOW)
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    assert query["X-Goog-Date"] == ["20260307T235930Z"]
    assert query["X-Goog-Credential"] == [f"{ACCOUNT}/20260307/auto/storage/goog4_request"]
    unsigned_query = parts.query.rsplit("&X-Goog-Signature=", 1)[0]
    canonical = f"GET\n/images/layers/x\n{unsigned_query}\nhost:storage.googleapis.com\n\nhost\nUNSIGNED-PAYLOAD"
    to_sign = "\n".join(["GOOG4-RSA-SHA256", "20260307T235930Z", "20260307/auto/storage/goog4_request",
                         hashlib.sha256(canonical.encode()).hexdigest()])
    signature = bytes.fromhex(query["X-Goog-Signature"][0])
    rsa_key.public_key().verify(signature, to_sign.encode(), padding.PKCS1v15(), hashes.SHA256())


def test_time_zones_and_bounds(rsa_key: rsa.RSAPrivateKey) -> None:
    """Any aware time means the same instant; naive times and out-of-range expiries are refused."""
    key = SigningKey(ACCOUNT, rsa_key)
    elsewhere = NOW.astimezone(timezone(timedelta(hours=5)))
    assert signed_url(key, "b", "o", now=elsewhere) == signed_url(key, "b", "o", now=NOW)
    with pytest.raises(ValueError):
        signed_url(key, "b", "o", now=NOW.replace(tzinfo=None))
    for bad in (0, 604801):
        with pytest.raises(ValueError):
            signed_url(key, "b", "o", now=NOW, expires=bad)


def test_key_not_in_repr(rsa_key: rsa.RSAPrivateKey) -> None:
    """A signing key never shows its private part when printed."""
    shown = repr(SigningKey(ACCOUNT, rsa_key))
    assert "PRIVATE" not in shown and "RSAPrivateKey" not in shown


def test_loaders(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    """Both loaders read a good key and say in one line what is wrong with a bad one."""
    sa = tmp_path / "sa.json"
    sa.write_text(json.dumps({"type": "service_account", "client_email": ACCOUNT, "private_key": pem(rsa_key)}))
    assert load_service_account(str(sa)).account == ACCOUNT
    key_file = tmp_path / "key.pem"
    key_file.write_text(pem(rsa_key))
    assert load_pem_key(str(key_file), ACCOUNT).account == ACCOUNT

    user = tmp_path / "user.json"
    user.write_text(json.dumps({"type": "authorized_user", "client_id": "x"}))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    ec_file = tmp_path / "ec.pem"
    ec_file.write_text(pem(ec.generate_private_key(ec.SECP256R1())))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    cases = [
        (load_service_account, (str(tmp_path / "missing.json"),), "cannot read"),
        (load_service_account, (str(broken),), "not JSON"),
        (load_service_account, (str(user),), "authorized_user"),
        (load_service_account, (str(empty),), "client_email"),
        (load_pem_key, (str(ec_file), ACCOUNT), "not an RSA private key"),
        (load_pem_key, (str(garbage), ACCOUNT), "no usable PEM private key"),
        (load_pem_key, (str(tmp_path / "missing.pem"), ACCOUNT), "cannot read"),
    ]
    for loader, args, words in cases:
        with pytest.raises(ValueError) as error:
            loader(*args)
        assert words in str(error.value) and "\n" not in str(error.value)
