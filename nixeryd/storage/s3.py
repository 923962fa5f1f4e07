"""The S3 backend: Amazon S3, or any service speaking its API, as a fleet's shared store.

The same contracts as the GCS backend, with S3's own means: every boto3 call runs
through the injected ``Offload`` (one client, which is thread-safe), within the
deadline and the circuit breaker; uploads carry ``Content-MD5``, which S3 checks
the bytes against, and the ETag it answers is checked too where it is an MD5
(not under SSE-KMS), so a service that does not check (an emulator) is caught;
blobs are written with ``If-None-Match: *`` (or ``If-Match`` on the damaged
object they replace), so two instances writing the same layer end with one
correct object; versions for conditional writes and deletes are ETags. Clients
fetch blobs through a 307 to a presigned URL (botocore signs it; no hand-made
signatures), or to the object's plain URL for a public bucket.
"""
from __future__ import annotations

import hashlib
import shutil
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from nixeryd.core.blobs import BlobInfo
from nixeryd.core.offload import Offload
from nixeryd.storage.interface import (
    ABSENT,
    INTACT,
    MISSING,
    Generation,
    IStorage,
    StorageError,
    StoredObject,
    check_hex,
    check_key,
    check_prefix,
)
from nixeryd.storage.records import blob_key, is_blob_key
from nixeryd.storage.remote import BLOB_TYPE, Found, HashingSink, RemoteStorage, check_staged, md5_base64

log = Logger()

_CHUNK = 1024 * 1024
_NOT_FOUND = ("404", "NoSuchKey", "NotFound")
_CONFLICT = ("412", "PreconditionFailed", "409", "ConditionalRequestConflict")
# Under these the ETag is not the MD5 of the object's bytes.
_OPAQUE_ETAG = ("aws:kms", "aws:kms:dsse")


def _code(error: Any) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _is(error: BaseException, codes: tuple[str, ...]) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(error, ClientError):
        return False
    status = str(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return _code(error) in codes or status in codes


def _etag_md5(headers: dict[str, Any]) -> str | None:
    """The object's MD5 (hex) as its ETag tells it, or None where the ETag is no MD5
    (multipart uploads, SSE-KMS)."""
    etag = str(headers.get("ETag") or "").strip('"')
    if headers.get("ServerSideEncryption") in _OPAQUE_ETAG or len(etag) != 32 or "-" in etag:
        return None
    return etag


def _errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError, ConnectionError, OSError)


@implementer(IStorage)
class S3Storage(RemoteStorage):
    """Objects in a bucket; blobs served by redirect."""

    backend = "s3"

    def __init__(
        self,
        client: Any,
        bucket: str,
        offload: Offload,
        *,
        url_client: Any | None = None,
        presigned: bool = True,
        url_ttl: int = 300,
        staging_dir: str,
        known_blobs: int = 100_000,
        deadline: float = 15.0,
        cooldown: float = 10.0,
        clock: IReactorTime | None = None,
    ) -> None:
        # botocore may refresh credentials (a network call) before signing: URLs are made
        # in a thread, and reused for half their life.
        super().__init__(offload, failures=_errors(), staging_dir=staging_dir, known_blobs=known_blobs,
                         deadline=deadline, cooldown=cooldown, clock=clock, url_blocks=True,
                         url_lifetime=url_ttl / 2)
        self._client = client
        # Unsigned URLs come from a client that does not sign (botocore still lays out
        # the address: path or virtual-hosted style, the endpoint).
        self._url_client = url_client if url_client is not None else client
        self._bucket = bucket
        self._presigned = presigned
        self._url_ttl = url_ttl

    # --- IStorage ----------------------------------------------------------------

    def put(self, key: str, data: bytes, content_type: str) -> Deferred[None]:
        check_key(key)
        data = bytes(data)

        def upload() -> None:
            md5 = hashlib.md5(data).hexdigest()
            if is_blob_key(key):
                # Named by their content: written once; 412 means it is there already.
                try:
                    answer = self._put(key, data, content_type, md5, IfNoneMatch="*")
                except Exception as e:
                    if _is(e, _CONFLICT):
                        return
                    raise
            else:
                answer = self._put(key, data, content_type, md5)
            self._check_arrived(key, answer, md5)

        d = self._call("writing " + key, upload, size=len(data))
        if is_blob_key(key):
            d.addCallback(lambda _: self._remember(key))
        return d

    def get(self, key: str) -> Deferred[bytes | None]:
        check_key(key)

        def download() -> bytes | None:
            found = self._read(key)
            return None if found is None else found[0]

        return self._call("reading " + key, download)

    def hash_blob(self, hexdigest: str) -> Deferred[tuple[str, int] | None]:
        key = blob_key(check_hex(hexdigest))

        def download() -> tuple[str, int] | None:
            answer = self._get_object(key)
            if answer is None:
                return None
            sink = HashingSink()
            body = answer["Body"]
            try:
                shutil.copyfileobj(body, sink, _CHUNK)
            finally:
                body.close()
            return sink.digest.hexdigest(), sink.size

        return self._call("reading " + key, download)

    def list(self, prefix: str) -> Deferred[list[StoredObject]]:
        start = check_prefix(prefix) + "/"

        def listing() -> list[StoredObject]:
            found = []
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self._bucket, Prefix=start)
            for page in pages:
                for item in page.get("Contents", ()):
                    try:
                        check_key(item["Key"])
                    except ValueError:
                        continue
                    found.append(StoredObject(item["Key"], item["LastModified"].timestamp(), int(item["Size"]),
                                              str(item.get("ETag") or "") or None))
            return found

        return self._call("listing " + prefix, listing)

    def read(self, key: str) -> Deferred[tuple[bytes, Generation] | None]:
        check_key(key)
        return self._call("reading " + key, self._read, key)

    def write_if(self, key: str, data: bytes, content_type: str,
                 generation: Generation) -> Deferred[Generation | None]:
        check_key(key)
        data = bytes(data)

        def upload() -> Generation | None:
            condition = {"IfNoneMatch": "*"} if generation == ABSENT else {"IfMatch": str(generation)}
            md5 = hashlib.md5(data).hexdigest()
            try:
                answer = self._put(key, data, content_type, md5, **condition)
            except Exception as e:
                # If-Match on an object deleted since is a 404 rather than a 412.
                if _is(e, _CONFLICT) or (generation != ABSENT and _is(e, _NOT_FOUND)):
                    return None
                raise
            self._check_arrived(key, answer, md5)
            return str(answer["ETag"])

        return self._call("writing " + key, upload, size=len(data))

    def delete(self, key: str, generation: Generation | None = None) -> Deferred[None]:
        check_key(key)

        def remove() -> None:
            condition = {} if generation is None else {"IfMatch": str(generation)}
            try:
                self._client.delete_object(Bucket=self._bucket, Key=key, **condition)
            except Exception as e:
                if _is(e, _NOT_FOUND):
                    return
                if _is(e, _CONFLICT):
                    log.info("{key} was written again since it was listed; kept", key=key, backend=self.backend)
                    return
                raise

        d = self._call("removing " + key, remove)
        return d.addCallback(lambda _: self._forget(key))

    # --- helpers -----------------------------------------------------------------

    def _put(self, key: str, body: Any, content_type: str, md5: str, **condition: str) -> Any:
        return self._client.put_object(Bucket=self._bucket, Key=key, Body=body, ContentType=content_type,
                                       ContentMD5=md5_base64(md5), **condition)

    def _check_arrived(self, key: str, answer: dict[str, Any], md5: str) -> None:
        """After an upload: where the ETag is an MD5 it must be ours (S3 itself refuses
        bytes not matching Content-MD5; a service that does not is caught here and what
        arrived is removed)."""
        arrived = _etag_md5(answer)
        if arrived is not None and arrived != md5:
            try:
                self._client.delete_object(Bucket=self._bucket, Key=key, IfMatch=str(answer["ETag"]))
            except Exception as e:
                if not _is(e, _NOT_FOUND + _CONFLICT):
                    raise
            raise StorageError(f"upload of {key} arrived corrupted; not stored")

    def _get_object(self, key: str) -> dict[str, Any] | None:
        """The object's GetObject answer (its body still to read), or None when there is none."""
        try:
            answer: dict[str, Any] = self._client.get_object(Bucket=self._bucket, Key=key)
        except Exception as e:
            if _is(e, _NOT_FOUND):
                return None
            raise
        return answer

    def _read(self, key: str) -> tuple[bytes, Generation] | None:
        answer = self._get_object(key)
        if answer is None:
            return None
        body = answer["Body"]
        try:
            data: bytes = body.read()
        finally:
            body.close()
        return data, str(answer["ETag"])

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = self._client.head_object(Bucket=self._bucket, Key=key)
        except Exception as e:
            if _is(e, _NOT_FOUND):
                return None
            raise
        return found

    def _lookup(self, key: str) -> Found | None:
        found = self._head(key)
        return None if found is None else Found(int(found["ContentLength"]))

    def _check(self, key: str, size: int, md5: str | None) -> str:
        found = self._head(key)
        if found is None:
            return MISSING
        stored_md5 = _etag_md5(found)
        if int(found.get("ContentLength", -1)) != size or (
                md5 is not None and stored_md5 is not None and stored_md5 != md5):
            return self._damaged(key, found.get("ContentLength"), size)
        return INTACT

    def _url(self, key: str) -> str:
        client = self._client if self._presigned else self._url_client
        url: str = client.generate_presigned_url(
            "get_object", Params={"Bucket": self._bucket, "Key": key}, ExpiresIn=self._url_ttl)
        return url

    def _commit(self, staged: str, key: str, info: BlobInfo) -> None:
        """Blocking: upload ``staged`` as ``key`` unless an identical object is there:
        the existing object's metadata (skip when its size and MD5 are ours), then one
        upload carrying the MD5, conditional on the object found (none, or the damaged one)."""
        try:
            md5 = check_staged(staged, info)
            existing = self._head(key)
            if existing is not None and int(existing.get("ContentLength", -1)) == info.size and \
                    _etag_md5(existing) in (md5, None):
                log.info("blob {digest} is already in the bucket; upload skipped",
                         digest=info.digest, backend=self.backend)
                return
            condition = {"IfNoneMatch": "*"} if existing is None else {"IfMatch": str(existing["ETag"])}
            try:
                with open(staged, "rb") as body:
                    answer = self._put(key, body, BLOB_TYPE, md5, **condition)
            except Exception as e:
                if _is(e, _CONFLICT):
                    # Another instance committed the same blob first: theirs must match ours.
                    winner = self._head(key)
                    if winner is None or int(winner.get("ContentLength", -1)) != info.size or \
                            _etag_md5(winner) not in (md5, None):
                        raise StorageError(f"a conflicting object is stored as {key}") from None
                    return
                if _is(e, ("400", "BadDigest", "InvalidDigest")):
                    raise StorageError(f"upload of {info.digest} was refused ({_code(e)}); not committed") from None
                raise
            self._check_arrived(key, answer, md5)
        finally:
            self.discard(staged)


def connect(
    bucket: str,
    *,
    region: str,
    connect_timeout: float,
    deadline: float,
    session: Any | None = None,
    endpoint_url: str | None = None,
) -> tuple[Any, Any]:
    """Blocking, for start-up: a client for the bucket, checked to exist and be
    reachable, and a second one that lays out unsigned URLs. The endpoint and the
    credentials come from the AWS SDK's standard chain (``AWS_ENDPOINT_URL``,
    ``AWS_ACCESS_KEY_ID``, profiles, instance roles). ``ValueError`` with one line
    naming the problem when the bucket cannot be used. ``session`` and
    ``endpoint_url``, when given, replace what the chain would find."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config as BotoConfig
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    def config(**extra: Any) -> Any:
        return BotoConfig(
            region_name=region,
            signature_version=extra.pop("signature_version", "s3v4"),
            connect_timeout=connect_timeout,
            read_timeout=deadline,
            retries={"mode": "standard", "max_attempts": 3},
            # Checksums beyond Content-MD5 only where S3 demands them: services that speak
            # S3's API without its newest checksum headers then work too.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            max_pool_connections=10,
            **extra,
        )

    try:
        session = session if session is not None else boto3.session.Session()
        client = session.client("s3", config=config(), endpoint_url=endpoint_url)
        url_client = session.client("s3", config=config(signature_version=UNSIGNED), endpoint_url=endpoint_url)
    except (BotoCoreError, ValueError) as e:
        raise ValueError(f"cannot set up the S3 client: {e}") from None
    try:
        client.list_objects_v2(Bucket=bucket, MaxKeys=1)
    except NoCredentialsError:
        raise ValueError(
            "no AWS credentials found (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile, or a role)"
        ) from None
    except ClientError as e:
        code = _code(e)
        if code == "NoSuchBucket":
            raise ValueError(f"bucket {bucket!r} does not exist") from None
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise ValueError(
                f"no access to bucket {bucket!r} ({code}): these credentials need s3:ListBucket, "
                "s3:GetObject, s3:PutObject and s3:DeleteObject on it"
            ) from None
        raise ValueError(f"cannot use bucket {bucket!r}: {code or e}") from None
    except (BotoCoreError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"cannot reach bucket {bucket!r}: {first}") from None
    return client, url_client
