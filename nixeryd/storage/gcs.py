"""The Google Cloud Storage backend: the shared store of a fleet of instances.

Every google-cloud-storage call runs through the injected ``Offload`` (a thread
pool: one shared client, a Blob object per call). Blobs are uploaded to
``staging/`` first, checked, then copied into ``layers/<sha256>`` with a
generation precondition, so that two instances writing the same layer end with
one correct object; an object already there with the same MD5 is not uploaded
again. Clients fetch blobs from the bucket through a redirect.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable
from urllib.parse import quote

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from nixeryd.core.blobs import BlobInfo
from nixeryd.core.offload import Offload
from nixeryd.storage.interface import (
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

UPLOAD_CHUNK = 8 * 1024 * 1024
"""Bytes of a resumable upload sent (and held in memory) at a time; a multiple of 256 KiB."""

DEFAULT_ENDPOINT = "https://storage.googleapis.com"


def plain_url(endpoint: str, bucket: str) -> Callable[[str], str]:
    """Redirect URLs to the object itself: for public buckets and the emulator."""

    def url(name: str) -> str:
        return f"{endpoint.rstrip('/')}/{bucket}/{quote(name, safe='/~')}"

    return url


def _errors() -> tuple[type[BaseException], ...]:
    from google.api_core import exceptions as api
    from google.auth import exceptions as auth
    from requests import exceptions as http

    return (api.GoogleAPIError, auth.GoogleAuthError, http.RequestException, ConnectionError, OSError)


@implementer(IStorage)
class GCSStorage(RemoteStorage):
    """Objects in a bucket; blobs served by redirect."""

    backend = "gcs"

    def __init__(
        self,
        bucket: Any,
        offload: Offload,
        *,
        redirect: Callable[[str], str],
        redirect_blocks: bool = False,
        url_lifetime: float = 150.0,
        staging_dir: str,
        known_blobs: int = 100_000,
        connect_timeout: float = 5.0,
        deadline: float = 15.0,
        cooldown: float = 10.0,
        clock: IReactorTime | None = None,
    ) -> None:
        from google.cloud.storage.retry import DEFAULT_RETRY

        # A redirect that blocks is a signature from IAM signBlob.
        super().__init__(offload, failures=_errors(), staging_dir=staging_dir, known_blobs=known_blobs,
                         deadline=deadline, cooldown=cooldown, clock=clock, url_blocks=redirect_blocks,
                         url_lifetime=url_lifetime)
        # Each call: connections time out on their own, and the whole call, retries
        # included, is bounded by the deadline (the breaker fails it when it is past).
        self._retry = DEFAULT_RETRY.with_timeout(deadline)
        self._timeout = (connect_timeout, deadline)
        self._bucket = bucket
        self._redirect = redirect

    # --- IStorage ----------------------------------------------------------------

    def put(self, key: str, data: bytes, content_type: str) -> Deferred[None]:
        check_key(key)

        def upload() -> None:
            from google.api_core.exceptions import PreconditionFailed

            blob = self._bucket.blob(key)
            if is_blob_key(key):
                # Named by their content: written once; 412 means it is there already.
                blob.md5_hash = md5_base64(hashlib.md5(data).hexdigest())
                try:
                    blob.upload_from_string(bytes(data), content_type=content_type, if_generation_match=0,
                                            retry=self._retry, timeout=self._timeout)
                except PreconditionFailed:
                    pass
                return
            blob.upload_from_string(bytes(data), content_type=content_type, retry=self._retry,
                                    timeout=self._timeout)

        d = self._call("writing " + key, upload, size=len(data))
        if is_blob_key(key):
            d.addCallback(lambda _: self._remember(key))  # served next: no lookup needed
        return d

    def get(self, key: str) -> Deferred[bytes | None]:
        check_key(key)

        def download() -> bytes | None:
            from google.api_core.exceptions import NotFound

            try:
                data: bytes = self._bucket.blob(key).download_as_bytes(
                    retry=self._retry, timeout=self._timeout
                )
                return data
            except NotFound:
                return None

        return self._call("reading " + key, download)

    def hash_blob(self, hexdigest: str) -> Deferred[tuple[str, int] | None]:
        key = blob_key(check_hex(hexdigest))

        def download() -> tuple[str, int] | None:
            from google.api_core.exceptions import NotFound

            sink = HashingSink()
            try:
                self._bucket.blob(key).download_to_file(sink, retry=self._retry, timeout=self._timeout)
            except NotFound:
                return None
            return sink.digest.hexdigest(), sink.size

        return self._call("reading " + key, download)

    def list(self, prefix: str) -> Deferred[list[StoredObject]]:
        start = check_prefix(prefix) + "/"

        def listing() -> list[StoredObject]:
            found = []
            for blob in self._bucket.list_blobs(prefix=start, retry=self._retry, timeout=self._timeout):
                try:
                    check_key(blob.name)
                except ValueError:
                    continue
                found.append(StoredObject(blob.name, blob.updated.timestamp(), int(blob.size or 0),
                                          blob.generation))
            return found

        return self._call("listing " + prefix, listing)

    def read(self, key: str) -> Deferred[tuple[bytes, Generation] | None]:
        check_key(key)

        def download() -> tuple[bytes, Generation] | None:
            from google.api_core.exceptions import NotFound

            blob = self._bucket.blob(key)
            try:
                data: bytes = blob.download_as_bytes(retry=self._retry, timeout=self._timeout)
            except NotFound:
                return None
            if blob.generation is not None:  # GCS says it in a response header
                return data, int(blob.generation)
            # A service that does not (an emulator): ask for the metadata.
            found = self._stat(key)
            return None if found is None else (data, int(found.generation))

        return self._call("reading " + key, download)

    def write_if(self, key: str, data: bytes, content_type: str,
                 generation: Generation) -> Deferred[Generation | None]:
        check_key(key)

        def upload() -> Generation | None:
            from google.api_core.exceptions import PreconditionFailed

            blob = self._bucket.blob(key)
            try:
                blob.upload_from_string(bytes(data), content_type=content_type,
                                        if_generation_match=int(generation), retry=self._retry,
                                        timeout=self._timeout)
            except PreconditionFailed:
                return None
            return int(blob.generation)

        return self._call("writing " + key, upload, size=len(data))

    def delete(self, key: str, generation: Generation | None = None) -> Deferred[None]:
        check_key(key)

        def remove() -> None:
            from google.api_core.exceptions import NotFound, PreconditionFailed

            try:
                self._bucket.blob(key).delete(if_generation_match=None if generation is None else int(generation),
                                              retry=self._retry,
                                              timeout=self._timeout)
            except NotFound:
                pass
            except PreconditionFailed:
                log.info("{key} was written again since it was listed; kept", key=key, backend=self.backend)

        d = self._call("removing " + key, remove)
        return d.addCallback(lambda _: self._forget(key))

    # --- helpers -----------------------------------------------------------------

    def _lookup(self, key: str) -> Found | None:
        found = self._stat(key)
        return None if found is None else Found(None if found.size is None else int(found.size))

    def _check(self, key: str, size: int, md5: str | None) -> str:
        # The object's metadata, one call, carries both its size and its MD5.
        found = self._stat(key)
        if found is None:
            return MISSING
        if int(found.size or 0) != size or (md5 is not None and found.md5_hash != md5_base64(md5)):
            # No MD5 at all (a composite object) counts as damaged: it is uploaded again.
            return self._damaged(key, found.size, size)
        return INTACT

    def _url(self, key: str) -> str:
        return self._redirect(key)

    def _stat(self, key: str) -> Any:
        return self._bucket.get_blob(key, retry=self._retry, timeout=self._timeout)

    def _commit(self, staged: str, key: str, info: BlobInfo) -> None:
        """Blocking: upload ``staged`` as ``key`` unless an identical object is there.

        The library's way, in two calls for a new blob: the existing object's metadata
        (skip when its MD5 is ours), then one upload carrying the MD5, which the service
        checks the bytes against, with a generation precondition (0: only if absent; the
        damaged object's generation: only that one is replaced). No staging object.
        """
        from google.api_core.exceptions import BadRequest, NotFound, PreconditionFailed

        try:
            md5 = md5_base64(check_staged(staged, info))
            existing = self._stat(key)
            if existing is not None and existing.md5_hash == md5:
                log.info("blob {digest} is already in the bucket; upload skipped",
                         digest=info.digest, backend=self.backend)
                return
            # Resumable uploads send UPLOAD_CHUNK at a time: the client's default (100 MB)
            # held a whole large layer in memory per upload thread.
            blob = self._bucket.blob(key, chunk_size=UPLOAD_CHUNK)
            blob.md5_hash = md5
            try:
                blob.upload_from_filename(
                    staged, content_type=BLOB_TYPE,
                    if_generation_match=0 if existing is None else existing.generation,
                    retry=self._retry, timeout=self._timeout,
                )
            except PreconditionFailed:
                # Another instance committed the same blob first: theirs must match ours.
                winner = self._stat(key)
                if winner is None or winner.md5_hash != md5:
                    raise StorageError(f"a conflicting object is stored as {key}") from None
                return
            except BadRequest as e:
                raise StorageError(f"upload of {info.digest} was refused ({e}); not committed") from None
            # The response describes the object as stored. A service that did not check
            # the MD5 it was given (an emulator) is caught here: what arrived is removed.
            if blob.md5_hash != md5 or blob.size != info.size:
                try:
                    blob.delete(if_generation_match=blob.generation, retry=self._retry, timeout=self._timeout)
                except (NotFound, PreconditionFailed):
                    pass
                raise StorageError(f"upload of {info.digest} arrived corrupted; not committed")
        finally:
            self.discard(staged)


def connect(
    bucket_name: str,
    *,
    emulator: str | None,
    credentials_file: str | None,
) -> Any:
    """Blocking, for start-up: the bucket, checked to exist and be reachable.

    With an emulator the client runs with anonymous credentials (a service
    account would make it fetch a token from Google). ``ValueError`` with one
    line naming the problem when the bucket cannot be used.
    """
    from google.api_core import exceptions as api
    from google.auth import exceptions as auth
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    try:
        if emulator is not None:
            client = storage.Client(
                project="nixeryd", credentials=AnonymousCredentials(), client_options={"api_endpoint": emulator}
            )
        elif credentials_file is not None:
            client = storage.Client.from_service_account_json(credentials_file)
        else:
            client = storage.Client()
    except (auth.GoogleAuthError, OSError, ValueError) as e:
        raise ValueError(f"cannot set up the Google Cloud Storage client: {e}") from None
    bucket = client.bucket(bucket_name)
    try:
        # Listing needs storage.objects.list, which roles/storage.objectAdmin (and
        # objectViewer) grant; reading the bucket's own metadata would need
        # storage.buckets.get, which they do not.
        next(iter(client.list_blobs(bucket, max_results=1, timeout=30)), None)
    except api.NotFound:
        raise ValueError(f"bucket {bucket_name!r} does not exist") from None
    except api.Forbidden:
        raise ValueError(
            f"no access to bucket {bucket_name!r}: these credentials lack storage.objects.list "
            "(roles/storage.objectAdmin grants it, with the object permissions nixeryd needs)"
        ) from None
    except (api.GoogleAPIError, auth.GoogleAuthError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"cannot reach bucket {bucket_name!r}: {first}") from None
    return bucket
