"""Storage backends: one contract for every backend, then what only the filesystem does.

A new backend (GCS on its emulator, say) joins the contract by adding one
subclass of ``StorageContract`` with its own ``make_storage``.
"""
from __future__ import annotations

import errno
import hashlib
import os
import resource
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from nixeryd.core.blobs import BlobInfo, blob_info
from nixeryd.core.offload import inline
from nixeryd.storage import (
    BlobLocation,
    InMemory,
    IStorage,
    LocalFile,
    Redirect,
    StorageError,
)
from nixeryd.storage.filesystem import FilesystemStorage
from nixeryd.storage.gcs import GCSStorage, plain_url
from nixeryd.storage.interface import ABSENT, DAMAGED, INTACT, MISSING
from tests.emulator import guarded_emulator, shared_emulator
from tests.memory import MemoryStorage
from tests.moto import CREDENTIALS, REGION, Moto, shared_moto

HEX = "0123456789abcdef" * 4
INVALID_KEYS = [
    "../x",
    "layers/../../etc/passwd",
    "layers/ABC",
    "layers/" + HEX.upper(),
    "layers/" + HEX[:63],
    "layers/" + HEX + "0",
    "layers/" + HEX + "\n",
    "other/" + HEX,
    "staging/" + HEX,
    "/layers/" + HEX,
    "layers//" + HEX[:63],
    "layers/" + HEX[:63] + "\x00",
    "",
]


def key(prefix: str, name: str) -> str:
    """A valid key: ``prefix`` and the sha256 of ``name``."""
    return prefix + "/" + hashlib.sha256(name.encode()).hexdigest()


def leftover_uploads(staging: str) -> str:
    """Staging files as uploads leave them when cut short: one of a dead process, one of
    an earlier process with this one's id, one of a live process (pid 1, which runs as
    long as we do); the name of the live one, which must stay."""

    from nixeryd.storage.staging import HOST as host

    os.makedirs(staging)
    names = [f"blob-{host}-{2**22 + 7}-{'a' * 32}",  # past any pid_max
             f"blob-{host}-{os.getpid()}-{'b' * 32}", f"blob-{host}-1-{'c' * 32}"]
    for name in names:
        with open(os.path.join(staging, name), "wb") as f:
            f.write(b"x" * 1000)
    return names[-1]


class StorageContract:
    """What every ``IStorage`` backend must do; mixed into one TestCase per backend."""

    storage: IStorage

    # Provided by SynchronousTestCase.
    successResultOf: Callable[..., Any]
    failureResultOf: Callable[..., Any]
    assertRaises: Callable[..., Any]
    assertEqual: Callable[..., Any]
    assertIsNone: Callable[..., Any]
    assertTrue: Callable[..., Any]
    assertFalse: Callable[..., Any]
    assertNotEqual: Callable[..., Any]
    assertIsNotNone: Callable[..., Any]
    subTest: Callable[..., Any]

    def make_storage(self) -> IStorage:
        raise NotImplementedError

    def damage(self, key_: str, data: bytes) -> None:
        """Replace what is stored under ``key_`` behind the backend's back (a disk error,
        someone's hand), where ``put`` itself would keep a blob that is already there."""
        self.result(self.storage.put(key_, data, "application/octet-stream"))

    def setUp(self) -> None:
        self.storage = self.make_storage()

    def result(self, d: Deferred[Any]) -> Any:
        return self.successResultOf(d)

    def stage(self, data: bytes) -> tuple[str, BlobInfo]:
        """Write ``data`` where the storage wants new blobs; the path and its BlobInfo."""
        path = self.storage.staging_path()
        with open(path, "wb") as f:
            f.write(data)
        return path, blob_info(data)

    def located_bytes(self, location: BlobLocation | None) -> bytes:
        """The bytes a client would be served from ``location``."""
        if isinstance(location, LocalFile):
            data = Path(location.path).read_bytes()
            self.assertEqual(location.size, len(data))
            return data
        if isinstance(location, InMemory):
            return location.data
        if isinstance(location, Redirect):
            with urllib.request.urlopen(location.url, timeout=30) as response:
                data = response.read()
            return data
        raise AssertionError(f"unexpected location {location!r}")

    def test_provides_interface(self) -> None:
        """The backend provides IStorage fully and names itself."""
        self.assertTrue(verifyObject(IStorage, self.storage))
        self.assertTrue(isinstance(self.storage.backend, str) and self.storage.backend)

    def test_put_get_round_trip(self) -> None:
        """What is put under a key of any prefix is got back unchanged."""
        for prefix in ("layers", "manifests", "builds"):
            k = key(prefix, "round trip")
            data = b'{"digest":"sha256:...","built":1}' + prefix.encode()
            self.result(self.storage.put(k, data, "application/json"))
            self.assertEqual(self.result(self.storage.get(k)), data)

    def test_put_replaces(self) -> None:
        """A second put under the same key replaces the object."""
        k = key("manifests", "replace")
        self.result(self.storage.put(k, b"old", "application/json"))
        self.result(self.storage.put(k, b"new", "application/json"))
        self.assertEqual(self.result(self.storage.get(k)), b"new")

    def test_put_empty(self) -> None:
        """An empty object is stored and got back as empty bytes, not None."""
        k = key("builds", "empty")
        self.result(self.storage.put(k, b"", "application/json"))
        self.assertEqual(self.result(self.storage.get(k)), b"")

    def test_get_absent(self) -> None:
        """Getting a key that was never put gives None."""
        self.assertIsNone(self.result(self.storage.get(key("manifests", "absent"))))

    def test_has(self) -> None:
        """has is false before a put and true after it, for that key only."""
        k = key("builds", "has")
        self.assertFalse(self.result(self.storage.has(k)))
        self.result(self.storage.put(k, b"{}", "application/json"))
        self.assertTrue(self.result(self.storage.has(k)))
        self.assertFalse(self.result(self.storage.has(key("manifests", "has"))))

    def test_invalid_keys_rejected(self) -> None:
        """Keys outside the three prefixes plus 64 lowercase hex raise ValueError at once."""
        for bad in INVALID_KEYS:
            with self.subTest(key=bad):
                self.assertRaises(ValueError, self.storage.put, bad, b"x", "text/plain")
                self.assertRaises(ValueError, self.storage.get, bad)
                self.assertRaises(ValueError, self.storage.has, bad)

    def test_invalid_blob_digests_rejected(self) -> None:
        """locate_blob and commit_blob refuse digests that are not 64 lowercase hex."""
        for bad in ["../" + HEX[:61], HEX.upper(), HEX[:63], "sha256:" + HEX, HEX[:63] + "\x00"]:
            with self.subTest(digest=bad):
                self.assertRaises(ValueError, self.storage.locate_blob, bad)
        path, info = self.stage(b"blob")
        bad_info = BlobInfo(info.digest.removeprefix("sha256:"), info.diff_id, info.size, info.md5)
        self.assertRaises(ValueError, self.storage.commit_blob, path, bad_info)
        self.storage.discard(path)

    def test_commit_then_locate(self) -> None:
        """A committed blob is located with its bytes and size, and is gettable by key."""
        data = b"layer bytes " * 1000
        path, info = self.stage(data)
        self.result(self.storage.commit_blob(path, info))
        hexdigest = info.digest.removeprefix("sha256:")
        self.assertEqual(self.located_bytes(self.result(self.storage.locate_blob(hexdigest))), data)
        self.assertEqual(self.result(self.storage.get("layers/" + hexdigest)), data)
        self.assertTrue(self.result(self.storage.has("layers/" + hexdigest)))

    def test_commit_removes_staged_file(self) -> None:
        """After a commit the staged file no longer exists."""
        path, info = self.stage(b"gone afterwards")
        self.result(self.storage.commit_blob(path, info))
        self.assertFalse(os.path.exists(path))

    def test_commit_twice_is_idempotent(self) -> None:
        """Committing the same blob again keeps it and just discards the new staged file."""
        data = b"the same layer"
        first, info = self.stage(data)
        self.result(self.storage.commit_blob(first, info))
        second, _ = self.stage(data)
        self.result(self.storage.commit_blob(second, info))
        self.assertFalse(os.path.exists(second))
        location = self.result(self.storage.locate_blob(info.digest.removeprefix("sha256:")))
        self.assertEqual(self.located_bytes(location), data)

    def test_check_blob(self) -> None:
        """check_blob tells a blob as recorded from a missing one and from one truncated or
        replaced in storage."""
        data = b"layer bytes " * 1000
        path, info = self.stage(data)
        hexdigest = info.digest.removeprefix("sha256:")
        self.assertEqual(self.result(self.storage.check_blob(hexdigest, info.size, info.md5)), MISSING)
        self.result(self.storage.commit_blob(path, info))
        self.assertEqual(self.result(self.storage.check_blob(hexdigest, info.size, info.md5)), INTACT)
        self.assertEqual(self.result(self.storage.check_blob(hexdigest, info.size, None)), INTACT)
        self.damage("layers/" + hexdigest, data[:100])
        self.assertEqual(self.result(self.storage.check_blob(hexdigest, info.size, info.md5)), DAMAGED)
        self.assertEqual(self.result(self.storage.check_blob(hexdigest, info.size, None)), DAMAGED)
        with self.assertRaises(ValueError):
            self.storage.check_blob("../" + hexdigest[3:], 1, None)

    def test_blob_packed_without_an_md5(self) -> None:
        """A blob written without an MD5 (packed for a storage that checks none) is
        committed all the same; a storage that checks MD5s reads it from the staged bytes,
        so the stored blob is intact against its real MD5 and damaged against another."""
        data = b"packed without an md5 " * 700
        path, info = self.stage(data)
        hexdigest = info.digest.removeprefix("sha256:")
        self.result(self.storage.commit_blob(path, BlobInfo(info.digest, info.diff_id, info.size, None)))
        self.assertEqual(self.located_bytes(self.result(self.storage.locate_blob(hexdigest))), data)
        self.assertEqual(self.result(self.storage.check_blob(hexdigest, info.size, info.md5)), INTACT)
        if self.storage.checks_md5:
            other = hashlib.md5(b"other").hexdigest()
            self.assertEqual(self.result(self.storage.check_blob(hexdigest, info.size, other)), DAMAGED)

    def test_hash_blob(self) -> None:
        """hash_blob reads the whole stored blob: its sha256 and size, or None when absent."""
        data = os.urandom(3 * 1024 * 1024 + 7)
        path, info = self.stage(data)
        hexdigest = info.digest.removeprefix("sha256:")
        self.assertIsNone(self.result(self.storage.hash_blob(hexdigest)))
        self.result(self.storage.commit_blob(path, info))
        self.assertEqual(self.result(self.storage.hash_blob(hexdigest)), (hexdigest, len(data)))
        self.damage("layers/" + hexdigest, b"other")
        self.assertEqual(self.result(self.storage.hash_blob(hexdigest)),
                         (hashlib.sha256(b"other").hexdigest(), 5))

    def test_commit_replaces_a_damaged_blob(self) -> None:
        """Committing a blob over a damaged copy of itself puts the right bytes back."""
        data = b"the right bytes " * 500
        path, info = self.stage(data)
        self.result(self.storage.commit_blob(path, info))
        hexdigest = info.digest.removeprefix("sha256:")
        self.damage("layers/" + hexdigest, data[:-1])
        again, _ = self.stage(data)
        self.result(self.storage.commit_blob(again, info))
        self.assertEqual(self.located_bytes(self.result(self.storage.locate_blob(hexdigest))), data)
        self.assertEqual(self.result(self.storage.check_blob(hexdigest, info.size, info.md5)), INTACT)

    def test_commit_wrong_size(self) -> None:
        """A staged file whose size is not the announced one is refused and not served."""
        path, info = self.stage(b"truncated")
        wrong = BlobInfo(info.digest, info.diff_id, info.size + 1, info.md5)
        self.failureResultOf(self.storage.commit_blob(path, wrong), StorageError)
        self.assertIsNone(self.result(self.storage.locate_blob(info.digest.removeprefix("sha256:"))))
        self.assertFalse(os.path.exists(path))

    def test_put_blob_is_locatable(self) -> None:
        """A small blob written with put (a config, a manifest) is located like a committed one."""
        data = b'{"schemaVersion":2}'
        info = blob_info(data)
        hexdigest = info.digest.removeprefix("sha256:")
        self.result(self.storage.put("layers/" + hexdigest, data, "application/octet-stream"))
        self.assertEqual(self.located_bytes(self.result(self.storage.locate_blob(hexdigest))), data)

    def test_locate_unknown(self) -> None:
        """Locating a blob that was never stored gives None."""
        self.assertIsNone(self.result(self.storage.locate_blob(HEX)))

    def test_staged_files_are_not_visible(self) -> None:
        """A staged, uncommitted blob is neither located nor found by key."""
        path, info = self.stage(b"not yet")
        hexdigest = info.digest.removeprefix("sha256:")
        self.assertIsNone(self.result(self.storage.locate_blob(hexdigest)))
        self.assertFalse(self.result(self.storage.has("layers/" + hexdigest)))
        self.assertIsNone(self.result(self.storage.get("layers/" + hexdigest)))
        self.assertRaises(ValueError, self.storage.get, "staging/" + os.path.basename(path))
        self.storage.discard(path)

    def test_discard(self) -> None:
        """discard removes a staged file and accepts one that is already gone."""
        path, info = self.stage(b"unwanted")
        self.storage.discard(path)
        self.assertFalse(os.path.exists(path))
        self.storage.discard(path)
        self.assertIsNone(self.result(self.storage.locate_blob(info.digest.removeprefix("sha256:"))))

    def test_staging_paths_are_fresh(self) -> None:
        """Each staging path is new, absent and in an existing directory."""
        first, second = self.storage.staging_path(), self.storage.staging_path()
        self.assertNotEqual(first, second)
        for path in (first, second):
            self.assertFalse(os.path.exists(path))
            self.assertTrue(os.path.isdir(os.path.dirname(path)))


class ListingContract(StorageContract):
    """Listing and deleting, for garbage collection."""

    def test_list_by_prefix(self) -> None:
        """Listing gives every object under a prefix with its size, and nothing staged."""
        self.result(self.storage.put(key("manifests", "a"), b"12345", "application/json"))
        self.result(self.storage.put(key("builds", "b"), b"xy", "application/json"))
        path, info = self.stage(b"a layer")
        self.result(self.storage.commit_blob(path, info))
        self.stage(b"staged only")
        listed = self.result(self.storage.list("manifests"))
        self.assertEqual([(o.key, o.size) for o in listed], [(key("manifests", "a"), 5)])
        self.assertTrue(listed[0].modified > 0)
        layers = self.result(self.storage.list("layers"))
        self.assertEqual([o.key for o in layers], ["layers/" + info.digest.removeprefix("sha256:")])
        self.assertRaises(ValueError, self.storage.list, "staging")
        self.assertRaises(ValueError, self.storage.list, "../")

    def test_delete(self) -> None:
        """A deleted object is gone from get, has, locate and listings; deleting again is fine."""
        path, info = self.stage(b"short-lived")
        self.result(self.storage.commit_blob(path, info))
        hexdigest = info.digest.removeprefix("sha256:")
        self.assertIsNotNone(self.result(self.storage.locate_blob(hexdigest)))
        self.result(self.storage.delete("layers/" + hexdigest))
        self.result(self.storage.delete("layers/" + hexdigest))
        self.assertIsNone(self.result(self.storage.locate_blob(hexdigest)))
        self.assertFalse(self.result(self.storage.has("layers/" + hexdigest)))
        self.assertEqual(self.result(self.storage.list("layers")), [])
        self.assertRaises(ValueError, self.storage.delete, "layers/../../x")


class ConditionalContract(ListingContract):
    """Reads with a generation and writes that hold only while it is current: what build
    leases are made of, and what keeps exactly one instance building an image."""

    race_rounds = 10

    def make_peer(self) -> IStorage:
        """Another instance's storage on the same objects (the same one where there is none)."""
        return self.storage

    def test_read_gives_bytes_and_generation(self) -> None:
        """``read`` is None for no object, else the bytes with a generation that changes on every write."""
        k = key("leases", "read")
        self.assertIsNone(self.result(self.storage.read(k)))
        self.result(self.storage.put(k, b"one", "application/json"))
        data, first = self.result(self.storage.read(k))
        self.assertEqual(data, b"one")
        self.result(self.storage.put(k, b"two", "application/json"))
        data, second = self.result(self.storage.read(k))
        self.assertEqual(data, b"two")
        self.assertNotEqual(first, second)

    def test_create_only_when_absent(self) -> None:
        """Of two writes "only if absent", the second is refused and changes nothing."""
        k = key("leases", "create")
        peer = self.make_peer()
        won = self.result(self.storage.write_if(k, b"mine", "application/json", ABSENT))
        self.assertIsNotNone(won)
        self.assertIsNone(self.result(peer.write_if(k, b"theirs", "application/json", ABSENT)))
        self.assertEqual(self.result(peer.read(k)), (b"mine", won))

    def test_replace_only_the_version_read(self) -> None:
        """A write naming the generation read replaces it; a second one naming the same
        (now old) generation is refused, as is one naming a generation never seen."""
        k = key("leases", "replace")
        first = self.result(self.storage.write_if(k, b"v1", "application/json", ABSENT))
        peer = self.make_peer()
        _, seen = self.result(peer.read(k))
        self.assertEqual(seen, first)
        second = self.result(peer.write_if(k, b"v2", "application/json", seen))
        self.assertIsNotNone(second)
        self.assertNotEqual(second, first)
        self.assertIsNone(self.result(self.storage.write_if(k, b"v3", "application/json", first)))
        self.assertEqual(self.result(self.storage.read(k)), (b"v2", second))
        # After a delete, neither the old generation nor "absent then present" applies.
        self.result(self.storage.delete(k))
        self.assertIsNone(self.result(self.storage.write_if(k, b"v4", "application/json", second)))
        self.assertIsNone(self.result(self.storage.read(k)))

    def test_delete_of_an_old_generation_keeps_the_new(self) -> None:
        """Deleting with a generation removes that version only: an object written since stays."""
        k = key("leases", "delete")
        old = self.result(self.storage.write_if(k, b"old", "application/json", ABSENT))
        new = self.result(self.storage.write_if(k, b"new", "application/json", old))
        self.result(self.storage.delete(k, old))
        self.assertEqual(self.result(self.storage.read(k)), (b"new", new))
        self.result(self.storage.delete(k, new))
        self.assertIsNone(self.result(self.storage.read(k)))

    def test_one_of_many_racing_creates_wins(self) -> None:
        """Eight instances on the same storage, each in its own thread, all creating the
        same lease at once: exactly one succeeds, every round."""
        peers = [self.make_peer() for _ in range(8)]
        for round_ in range(self.race_rounds):
            k = key("leases", f"race-{round_}")
            start = threading.Barrier(len(peers))
            wins: list[object] = []

            def race(peer: IStorage, data: bytes, k: str, start: threading.Barrier, wins: list[object]) -> None:
                start.wait()
                won = self.result(peer.write_if(k, data, "application/json", ABSENT))
                if won is not None:
                    wins.append(data)

            threads = [threading.Thread(target=race, args=(peer, b"%d" % i, k, start, wins))
                       for i, peer in enumerate(peers)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            self.assertEqual(len(wins), 1)
            self.assertEqual(self.result(self.storage.read(k))[0], wins[0])

    def test_racing_commits_of_one_blob_end_with_one_correct_object(self) -> None:
        """Four instances packing the same layer at once all succeed, and one correct
        object is stored."""
        data = b"the same layer " * 4096
        info = blob_info(data)
        peers = [self.make_peer() for _ in range(4)]
        staged = []
        for peer in peers:
            path = peer.staging_path()
            Path(path).write_bytes(data)
            staged.append(path)
        start = threading.Barrier(len(peers))
        outcomes: list[object] = []

        def commit(peer: IStorage, path: str) -> None:
            start.wait()
            d = peer.commit_blob(path, info)
            d.addBoth(outcomes.append)

        threads = [threading.Thread(target=commit, args=pair) for pair in zip(peers, staged, strict=True)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(outcomes, [None] * len(peers))
        hexdigest = info.digest.removeprefix("sha256:")
        self.assertEqual(self.result(self.storage.hash_blob(hexdigest)), (hexdigest, len(data)))
        self.assertEqual(len(self.result(self.storage.list("layers"))), 1)

    def test_leases_are_listed(self) -> None:
        """Lease records are listed under their own prefix, with their generation."""
        k = key("leases", "listed")
        generation = self.result(self.storage.write_if(k, b"{}", "application/json", ABSENT))
        listed = self.result(self.storage.list("leases"))
        self.assertEqual([(o.key, o.generation) for o in listed], [(k, generation)])
        self.assertEqual(self.result(self.storage.list("manifests")), [])


class MemoryStorageTests(ConditionalContract, SynchronousTestCase):
    def make_storage(self) -> IStorage:
        return MemoryStorage()


class FilesystemStorageTests(ConditionalContract, SynchronousTestCase):
    def make_storage(self) -> IStorage:
        self.root = Path(self.mktemp()).absolute()
        return FilesystemStorage(str(self.root), inline)

    def make_peer(self) -> IStorage:
        return FilesystemStorage(str(self.root), inline)

    def test_located_file_is_under_layers(self) -> None:
        """A committed blob is served from root/layers/<hex>."""
        path, info = self.stage(b"on disk")
        self.result(self.storage.commit_blob(path, info))
        hexdigest = info.digest.removeprefix("sha256:")
        location = self.result(self.storage.locate_blob(hexdigest))
        self.assertEqual(location, LocalFile(str(self.root / "layers" / hexdigest), len(b"on disk")))

class GCSStorageTests(ConditionalContract, SynchronousTestCase):
    """The contract on a real bucket of gcp-storage-emulator (calls run inline), reached
    through the proxy that adds GCS's generation preconditions (``tests.gcs_preconditions``)."""

    def make_storage(self) -> IStorage:
        emulator = shared_emulator()
        self.bucket_name = emulator.new_bucket()
        self.bucket = emulator.client().bucket(self.bucket_name)
        return self.connect()

    def connect(self) -> GCSStorage:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        endpoint = guarded_emulator().url
        client = storage.Client(project="test", credentials=AnonymousCredentials(),
                                client_options={"api_endpoint": endpoint})
        return GCSStorage(
            client.bucket(self.bucket_name), inline, redirect=plain_url(endpoint, self.bucket_name),
            staging_dir=os.path.abspath(self.mktemp()),
        )

    def make_peer(self) -> IStorage:
        return self.connect()

    def damage(self, key_: str, data: bytes) -> None:
        self.bucket.blob(key_).upload_from_string(data, content_type="application/octet-stream")

    def test_uploads_a_dead_process_left_are_removed_at_start(self) -> None:
        """Local copies of uploads a kill -9 cut short (named with a dead process's id) are
        removed when a backend starts on their directory; a live process's stay."""
        staging = os.path.abspath(self.mktemp())
        live = leftover_uploads(staging)
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        client = storage.Client(project="test", credentials=AnonymousCredentials(),
                                client_options={"api_endpoint": guarded_emulator().url})
        GCSStorage(client.bucket(self.bucket_name), inline, redirect=plain_url("http://x", self.bucket_name),
                   staging_dir=staging)
        self.assertEqual(sorted(os.listdir(staging)), [live])

    def test_a_blob_removed_behind_its_back_is_not_redirected_to_for_long(self) -> None:
        """A blob known to be in the bucket is redirected to without a lookup for a minute;
        removed by another process (verify --repair, gc), it is looked up again after that
        and found missing, rather than redirected to for good."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage
        from twisted.internet.task import Clock

        clock = Clock()
        client = storage.Client(project="test", credentials=AnonymousCredentials(),
                                client_options={"api_endpoint": guarded_emulator().url})
        serving = GCSStorage(client.bucket(self.bucket_name), inline,
                             redirect=plain_url(guarded_emulator().url, self.bucket_name), clock=clock,
                             staging_dir=os.path.abspath(self.mktemp()))
        path, info = self.stage(b"removed by another process")
        self.result(serving.commit_blob(path, info))
        hexdigest = info.digest.removeprefix("sha256:")
        self.assertIsNotNone(self.result(serving.locate_blob(hexdigest)))
        self.bucket.blob("layers/" + hexdigest).delete()
        clock.advance(30)
        self.assertIsNotNone(self.result(serving.locate_blob(hexdigest)))  # within the minute
        clock.advance(31)
        self.assertIsNone(self.result(serving.locate_blob(hexdigest)))

    def test_a_large_transfer_gets_time_for_its_bytes(self) -> None:
        """A call moving 100 MiB gets the deadline plus time for its bytes at 10 MiB/s (here
        1 + 10 s), where a small one gets the deadline alone (1 s)."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage
        from twisted.internet.task import Clock

        clock = Clock()
        held: list[Deferred[Any]] = []

        def never(fn: Any, *args: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            held.append(d)
            return d

        client = storage.Client(project="test", credentials=AnonymousCredentials(),
                                client_options={"api_endpoint": guarded_emulator().url})
        slow = GCSStorage(client.bucket(self.bucket_name), never, redirect=plain_url("http://x", self.bucket_name),
                          deadline=1.0, connect_timeout=1.0, clock=clock, staging_dir=os.path.abspath(self.mktemp()))
        large = BlobInfo(digest="sha256:" + "a" * 64, diff_id="sha256:" + "b" * 64, size=100 * 1024 * 1024,
                         md5="0" * 32)
        upload = slow.commit_blob("/nonexistent", large)
        small = slow.has("layers/" + "c" * 64)
        clock.advance(1.5)
        self.failureResultOf(small, StorageError)
        self.assertNoResult(upload)
        clock.advance(10)
        self.failureResultOf(upload, StorageError)

    def test_large_uploads_go_in_bounded_chunks(self) -> None:
        """A 20 MiB layer goes up in 8 MiB pieces (three requests), so an upload holds at most
        one piece in memory (the client's default was one 100 MB piece); it arrives whole."""
        data = os.urandom(20 * 1024 * 1024)
        path, info = self.stage(data)
        seen = len(shared_emulator().output)
        self.result(self.storage.commit_blob(path, info))
        pieces = [line for line in shared_emulator().output[seen:]
                  if '"PUT /upload/' in line and "upload_id=" in line]
        self.assertEqual(len(pieces), 3, pieces)
        hexdigest = info.digest.removeprefix("sha256:")
        self.assertEqual(self.bucket.blob("layers/" + hexdigest).download_as_bytes(), data)

    def test_a_signed_url_is_made_once_per_half_its_life(self) -> None:
        """Redirects reuse a signed URL for its lifetime (here 150 s) rather than signing one
        for every pull; after it, a new one is made."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage
        from twisted.internet.task import Clock

        signed: list[str] = []

        def sign(name: str) -> str:
            signed.append(name)
            return f"https://signed.example/{name}?n={len(signed)}"

        clock = Clock()
        client = storage.Client(project="test", credentials=AnonymousCredentials(),
                                client_options={"api_endpoint": guarded_emulator().url})
        signing = GCSStorage(client.bucket(self.bucket_name), inline, redirect=sign, url_lifetime=150,
                             clock=clock, staging_dir=os.path.abspath(self.mktemp()))
        path, info = self.stage(b"a blob behind signed URLs")
        self.result(signing.commit_blob(path, info))
        hexdigest = info.digest.removeprefix("sha256:")
        first = self.result(signing.locate_blob(hexdigest))
        for _ in range(5):
            self.assertEqual(self.result(signing.locate_blob(hexdigest)).url, first.url)
        self.assertEqual(len(signed), 1)
        clock.advance(151)
        self.assertNotEqual(self.result(signing.locate_blob(hexdigest)).url, first.url)
        self.assertEqual(len(signed), 2)

    def test_identical_blob_is_not_uploaded_again(self) -> None:
        """A blob already in the bucket with the same MD5 is not uploaded again."""
        data = b"uploaded once"
        path, info = self.stage(data)
        self.result(self.storage.commit_blob(path, info))
        key_ = "layers/" + info.digest.removeprefix("sha256:")
        generation = self.bucket.get_blob(key_).generation
        again, _ = self.stage(data)
        self.result(self.storage.commit_blob(again, info))
        self.assertEqual(self.bucket.get_blob(key_).generation, generation)
        self.assertFalse(os.path.exists(again))

    def test_corrupt_object_is_replaced(self) -> None:
        """An object under a blob's key whose MD5 differs is replaced by the right bytes."""
        data = b"the right bytes"
        path, info = self.stage(data)
        key_ = "layers/" + info.digest.removeprefix("sha256:")
        self.bucket.blob(key_).upload_from_string(b"wrong", content_type="application/octet-stream")
        self.result(self.storage.commit_blob(path, info))
        self.assertEqual(self.bucket.blob(key_).download_as_bytes(), data)

    def test_bytes_that_arrive_wrong_are_not_committed(self) -> None:
        """When what reaches the bucket does not have the blob's MD5 (here: a staged file
        whose bytes differ from the announced blob), nothing is stored under its key."""
        announced = blob_info(b"A" * 64)
        path = self.storage.staging_path()
        with open(path, "wb") as f:
            f.write(b"B" * 64)
        self.failureResultOf(self.storage.commit_blob(path, announced), StorageError)
        hexdigest = announced.digest.removeprefix("sha256:")
        self.assertIsNone(self.bucket.get_blob("layers/" + hexdigest))
        self.assertEqual(self.result(self.storage.check_blob(hexdigest, 64, announced.md5)), MISSING)

    def test_delete_of_a_listed_version_names_that_version(self) -> None:
        """Deleting with the generation a listing gave sends it as a precondition, so that
        GCS removes that version only and keeps an object written again since (a layer
        packed anew). gcp-storage-emulator ignores the precondition, so what is checked is
        the request it logs; real GCS answers 412, which the backend takes as "kept"."""
        k = key("layers", "rewritten")
        self.result(self.storage.put(k, b"first", "application/octet-stream"))
        (listed,) = [o for o in self.result(self.storage.list("layers")) if o.key == k]
        self.assertIsNotNone(listed.generation)
        seen = len(shared_emulator().output)
        self.result(self.storage.delete(k, listed.generation))
        deletes = [line for line in shared_emulator().output[seen:] if line.startswith('"DELETE ')]
        self.assertEqual(len(deletes), 1)
        self.assertIn(f"ifGenerationMatch={listed.generation}", deletes[0])
        self.assertIsNone(self.result(self.storage.get(k)))

    def test_same_size_other_bytes_is_damaged(self) -> None:
        """An object of the right size whose MD5 differs is damaged; so is one with no MD5."""
        data = b"0123456789" * 10
        path, info = self.stage(data)
        self.result(self.storage.commit_blob(path, info))
        hexdigest = info.digest.removeprefix("sha256:")
        self.bucket.blob("layers/" + hexdigest).upload_from_string(
            b"9876543210" * 10, content_type="application/octet-stream")
        self.assertEqual(self.result(self.storage.check_blob(hexdigest, info.size, info.md5)), DAMAGED)

    def test_no_staging_objects_left(self) -> None:
        """After commits nothing remains under staging/ in the bucket."""
        for data in (b"one", b"two"):
            path, info = self.stage(data)
            self.result(self.storage.commit_blob(path, info))
        self.assertEqual([b.name for b in self.bucket.list_blobs(prefix="staging/")], [])

    def test_unreachable_bucket_is_storage_error(self) -> None:
        """When the service cannot be reached, calls fail with StorageError."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        client = storage.Client(project="t", credentials=AnonymousCredentials(),
                                client_options={"api_endpoint": "http://127.0.0.1:9"})
        broken = GCSStorage(
            client.bucket("gone"), inline, redirect=plain_url("http://127.0.0.1:9", "gone"),
            staging_dir=os.path.abspath(self.mktemp()), connect_timeout=0.5, deadline=1,
        )
        self.failureResultOf(broken.get(key("manifests", "x")), StorageError)
        self.failureResultOf(broken.locate_blob(HEX), StorageError)


class S3StorageTests(ConditionalContract, SynchronousTestCase):
    """The contract on a real bucket of moto's S3 server (calls run inline)."""

    race_rounds = 5

    def make_storage(self) -> IStorage:
        self.bucket_name = shared_moto().new_bucket()
        self.raw = shared_moto().client()
        return self.connect()

    def connect(self, presigned: bool = True, staging: str | None = None) -> IStorage:
        import boto3

        from nixeryd.storage.s3 import S3Storage, connect

        session = boto3.session.Session(
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region_name=REGION)
        client, url_client = connect(self.bucket_name, region=REGION, connect_timeout=5, deadline=15,
                                     session=session, endpoint_url=shared_moto().url)
        return S3Storage(client, self.bucket_name, inline, url_client=url_client, presigned=presigned,
                         staging_dir=staging or os.path.abspath(self.mktemp()))

    def make_peer(self) -> IStorage:
        return self.connect()

    def damage(self, key_: str, data: bytes) -> None:
        self.raw.put_object(Bucket=self.bucket_name, Key=key_, Body=data)

    def test_redirects_are_presigned_for_five_minutes(self) -> None:
        """A blob's redirect is a SigV4 presigned URL valid for the configured time; a
        public bucket's (presigning off) is the object's plain address."""
        path, info = self.stage(b"signed")
        self.result(self.storage.commit_blob(path, info))
        hexdigest = info.digest.removeprefix("sha256:")
        location = self.result(self.make_peer().locate_blob(hexdigest))
        self.assertIn("X-Amz-Expires=300", location.url)
        self.assertIn("X-Amz-Signature=", location.url)
        self.assertEqual(location.size, len(b"signed"), "the lookup tells the size")
        self.assertEqual(self.located_bytes(location), b"signed")
        plain = self.result(self.connect(presigned=False).locate_blob(hexdigest))
        self.assertEqual(plain.url, f"{shared_moto().url}/{self.bucket_name}/layers/{hexdigest}")

    def test_bytes_that_arrive_wrong_are_not_committed(self) -> None:
        """When what reaches the bucket does not have the blob's MD5 (a staged file whose
        bytes differ from the announced blob; moto, unlike S3, takes them), nothing is left
        under its key."""
        announced = blob_info(b"A" * 64)
        path = self.storage.staging_path()
        with open(path, "wb") as f:
            f.write(b"B" * 64)
        self.failureResultOf(self.storage.commit_blob(path, announced), StorageError)
        hexdigest = announced.digest.removeprefix("sha256:")
        self.assertEqual(self.result(self.storage.check_blob(hexdigest, 64, announced.md5)), MISSING)

    def test_uploads_a_dead_process_left_are_removed_at_start(self) -> None:
        """Local copies of uploads a kill -9 cut short (named with a dead process's id) are
        removed when a backend starts on their directory; a live process's stay."""
        staging = os.path.abspath(self.mktemp())
        live = leftover_uploads(staging)
        self.connect(staging=staging)
        self.assertEqual(sorted(os.listdir(staging)), [live])

    def test_identical_blob_is_not_uploaded_again(self) -> None:
        """A blob already in the bucket with the same MD5 is not uploaded again."""
        data = b"uploaded once"
        path, info = self.stage(data)
        self.result(self.storage.commit_blob(path, info))
        key_ = "layers/" + info.digest.removeprefix("sha256:")
        before = self.raw.head_object(Bucket=self.bucket_name, Key=key_)["LastModified"]
        again, _ = self.stage(data)
        self.result(self.storage.commit_blob(again, info))
        self.assertEqual(self.raw.head_object(Bucket=self.bucket_name, Key=key_)["LastModified"], before)
        self.assertFalse(os.path.exists(again))

    def test_missing_bucket_and_bad_credentials_are_one_line(self) -> None:
        """A bucket that does not exist, or credentials S3 refuses, stop start-up with one line."""
        import boto3

        from nixeryd.storage.s3 import connect

        session = boto3.session.Session(
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region_name=REGION)
        with self.assertRaises(ValueError) as raised:
            connect("no-such-bucket", region=REGION, connect_timeout=5, deadline=15, session=session,
                    endpoint_url=shared_moto().url)
        self.assertEqual(str(raised.exception), "bucket 'no-such-bucket' does not exist")
        with self.assertRaises(ValueError) as raised:
            connect(self.bucket_name, region=REGION, connect_timeout=0.5, deadline=1, session=session,
                    endpoint_url="http://127.0.0.1:9")
        self.assertIn("cannot reach bucket", str(raised.exception))
        self.assertNotIn("\n", str(raised.exception))

    def test_refused_credentials_are_one_line(self) -> None:
        """Credentials S3 does not know stop start-up with one line naming the refusal (moto
        checking credentials, as S3 does)."""
        import boto3

        from nixeryd.storage.s3 import connect

        strict = Moto(environ={"INITIAL_NO_AUTH_ACTION_COUNT": "0"}).start()
        self.addCleanup(strict.stop)
        session = boto3.session.Session(aws_access_key_id="AKIAUNKNOWN", aws_secret_access_key="wrong",
                                        region_name=REGION)
        with self.assertRaises(ValueError) as raised:
            connect("some-bucket", region=REGION, connect_timeout=5, deadline=15, session=session,
                    endpoint_url=strict.url)
        self.assertRegex(str(raised.exception), r"^no access to bucket 'some-bucket' \(InvalidAccessKeyId\)")

    def test_unreachable_bucket_is_storage_error(self) -> None:
        """When the service cannot be reached, calls fail with StorageError."""
        import boto3
        from botocore.config import Config as BotoConfig

        from nixeryd.storage.s3 import S3Storage

        client = boto3.client("s3", endpoint_url="http://127.0.0.1:9", region_name=REGION,
                              aws_access_key_id="x", aws_secret_access_key="y",
                              config=BotoConfig(connect_timeout=0.5, retries={"max_attempts": 1}))
        broken = S3Storage(client, "gone", inline, staging_dir=os.path.abspath(self.mktemp()), deadline=1)
        self.failureResultOf(broken.get(key("manifests", "x")), StorageError)
        self.failureResultOf(broken.locate_blob(HEX), StorageError)


class FilesystemOnlyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp()).absolute()

    def listing(self, name: str) -> list[str]:
        return sorted(os.listdir(self.root / name))

    def commit(self, storage: FilesystemStorage, data: bytes) -> tuple[str, Path]:
        staged = storage.staging_path()
        Path(staged).write_bytes(data)
        info = blob_info(data)
        self.successResultOf(storage.commit_blob(staged, info))
        hexdigest = info.digest.removeprefix("sha256:")
        return hexdigest, self.root / "layers" / hexdigest

    def test_a_blob_rewritten_in_place_is_damaged(self) -> None:
        """A blob with one byte flipped and the same size (no stat shows it) is damaged: not
        located, not intact, and committed anew over; a truncated one too."""
        storage = FilesystemStorage(str(self.root), inline)
        data = b"layer bytes " * 1000
        hexdigest, path = self.commit(storage, data)
        self.assertIsNotNone(self.successResultOf(storage.locate_blob(hexdigest)))
        with open(path, "r+b") as f:
            f.seek(100)
            f.write(b"X")
        self.assertEqual(path.stat().st_size, len(data))
        self.assertIsNone(self.successResultOf(storage.locate_blob(hexdigest)))
        self.assertEqual(self.successResultOf(storage.check_blob(hexdigest, len(data), None)), DAMAGED)
        self.commit(storage, data)
        self.assertEqual(path.read_bytes(), data)
        self.assertEqual(self.successResultOf(storage.check_blob(hexdigest, len(data), None)), INTACT)
        os.truncate(path, 0)
        self.assertIsNone(self.successResultOf(storage.locate_blob(hexdigest)))

    def test_a_restored_blob_is_hashed_once_and_trusted(self) -> None:
        """A blob copied back (a new file, as a restore from a backup makes it) is hashed
        once, found sound, and trusted from then on; a blob's removal takes its record."""
        storage = FilesystemStorage(str(self.root), inline)
        data = b"restored " * 500
        hexdigest, path = self.commit(storage, data)
        identity = self.root / "identities" / hexdigest
        before = identity.read_text()
        copy = path.with_name("copy")
        copy.write_bytes(path.read_bytes())
        os.replace(copy, path)
        self.assertEqual(self.successResultOf(storage.check_blob(hexdigest, len(data), None)), INTACT)
        after = identity.read_text()
        self.assertNotEqual(before, after)
        self.assertIsNotNone(self.successResultOf(storage.locate_blob(hexdigest)))
        self.assertEqual(identity.read_text(), after)
        self.successResultOf(storage.delete("layers/" + hexdigest))
        self.assertFalse(identity.exists())

    def test_layout_created(self) -> None:
        """Starting creates the directories of the layout under the root."""
        FilesystemStorage(str(self.root), inline)
        self.assertEqual(sorted(os.listdir(self.root)),
                         ["builds", "identities", "layers", "leases", "manifests", "resolved", "staging", "tags"])

    def test_crash_leftovers_removed_at_start(self) -> None:
        """Staging files left by a crash are removed at the next start; served objects stay."""
        storage = FilesystemStorage(str(self.root), inline)
        kept = key("manifests", "kept")
        self.successResultOf(storage.put(kept, b"record", "application/json"))
        # A crash while a layer was being written, before it was renamed into place.
        partial = storage.staging_path()
        Path(partial).write_bytes(b"half a lay")
        (self.root / "staging" / "leftover-dir").mkdir()
        (self.root / "staging" / "leftover-dir" / "f").write_bytes(b"x")

        again = FilesystemStorage(str(self.root), inline)
        self.assertEqual(self.listing("staging"), [])
        self.assertEqual(self.listing("layers"), [])
        self.assertEqual(self.successResultOf(again.get(kept)), b"record")
        hexdigest = hashlib.sha256(b"half a lay").hexdigest()
        self.assertIsNone(self.successResultOf(again.locate_blob(hexdigest)))

    def test_staging_of_a_running_instance_is_kept(self) -> None:
        """Instances sharing a directory: a start removes what dead processes of its host
        left and any day-old file, never a file another running instance is writing."""
        storage = FilesystemStorage(str(self.root), inline)
        ours = Path(storage.staging_path())
        host = ours.name.split("-")[1]
        token = "0" * 32
        alive = subprocess.Popen(["sleep", "60"])
        self.addCleanup(alive.wait)
        self.addCleanup(alive.kill)
        gone = subprocess.Popen(["true"])
        gone.wait()
        staging = self.root / "staging"
        writing = staging / f"blob-{host}-{alive.pid}-{token}"
        crashed = staging / f"blob-{host}-{gone.pid}-{token}"
        elsewhere_now = staging / f"put-other-host-7-{token}"
        elsewhere_old = staging / f"put-old-host-7-{token}"
        for path in (writing, crashed, elsewhere_now, elsewhere_old):
            path.write_bytes(b"partial")
        day_ago = time.time() - 25 * 3600
        os.utime(elsewhere_old, (day_ago, day_ago))
        FilesystemStorage(str(self.root), inline)
        self.assertEqual(self.listing("staging"), sorted([writing.name, elsewhere_now.name]))

    def test_root_not_creatable(self) -> None:
        """A root that cannot be created is a ValueError naming the path."""
        blocker = self.root.parent / "a-file"
        blocker.write_bytes(b"")
        root = blocker / "store"
        with self.assertRaises(ValueError) as raised:
            FilesystemStorage(str(root), inline)
        self.assertIn(str(root), str(raised.exception))

    def test_offload_failure_is_storage_error(self) -> None:
        """An OSError from the offload becomes a StorageError that says the disk is full."""

        def full(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        storage = FilesystemStorage(str(self.root), full)
        failure = self.failureResultOf(storage.put(key("builds", "full"), b"{}", "application/json"), StorageError)
        self.assertIn("disk is full", str(failure.value))
        self.assertEqual(self.listing("builds"), [])

    def test_write_failure_leaves_nothing_partial(self) -> None:
        """A write that fails half-way gives StorageError and leaves no object and no staging file."""
        storage = FilesystemStorage(str(self.root), inline)
        k = key("layers", "too big")
        with _file_size_limit(4096):
            d = storage.put(k, b"x" * 100_000, "application/octet-stream")
        self.failureResultOf(d, StorageError)
        self.assertIsNone(self.successResultOf(storage.get(k)))
        self.assertEqual(self.listing("layers"), [])
        self.assertEqual(self.listing("staging"), [])

    def test_commit_failure_leaves_nothing_partial(self) -> None:
        """A commit from outside staging that fails while copying leaves nothing under layers/."""
        storage = FilesystemStorage(str(self.root), inline)
        outside = self.root.parent / "outside-blob"
        data = b"y" * 100_000
        outside.write_bytes(data)
        info = blob_info(data)
        with _file_size_limit(4096):
            d = storage.commit_blob(str(outside), info)
        self.failureResultOf(d, StorageError)
        self.assertEqual(self.listing("layers"), [])
        self.assertEqual(self.listing("staging"), [])
        self.assertFalse(outside.exists())

    def test_commit_from_outside_staging(self) -> None:
        """A blob staged elsewhere is copied in, committed, and its staged file removed."""
        storage = FilesystemStorage(str(self.root), inline)
        outside = self.root.parent / "elsewhere"
        outside.write_bytes(b"from elsewhere")
        info = blob_info(b"from elsewhere")
        self.successResultOf(storage.commit_blob(str(outside), info))
        self.assertFalse(outside.exists())
        self.assertEqual(self.listing("staging"), [])
        location = self.successResultOf(storage.locate_blob(info.digest.removeprefix("sha256:")))
        self.assertEqual(Path(location.path).read_bytes(), b"from elsewhere")


class _file_size_limit:
    """Within the block, writing a file past ``limit`` bytes fails with EFBIG (even as root)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def __enter__(self) -> None:
        self.saved = resource.getrlimit(resource.RLIMIT_FSIZE)
        self.handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self.saved[1]))

    def __exit__(self, *exc: object) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, self.saved)
        signal.signal(signal.SIGXFSZ, self.handler)

