"""The registry API over StubTreq, with memory storage and a fake Nix edge."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from nixeryd.api import RegistryAPI
from nixeryd.builder import ImageBuilder
from nixeryd.offload import inline
from nixeryd.pkgsource import PathSource
from nixeryd.popularity import Popularity
from nixeryd.storage.memory import MemoryStorage
from tests.fakes import FakeNix, make_store

DEPENDENCIES = {
    "cacert": [],
    "iana-etc": [],
    "libshared": [],
    "alpha": ["libshared"],
    "beta": ["libshared"],
}


class APITests(SynchronousTestCase):
    def setUp(self) -> None:
        store = make_store(Path(self.mktemp()).absolute(), DEPENDENCIES)
        self.nix = FakeNix(store, DEPENDENCIES)
        self.storage = MemoryStorage()
        self.clock = Clock()
        self.builder = ImageBuilder(
            nix=self.nix,
            storage=self.storage,
            offload=inline,
            source=PathSource("/srv/pkgs"),
            clock=self.clock,
            popularity=Popularity({}),
        )
        api = RegistryAPI(self.builder, self.storage, ("cacert", "iana-etc"))
        self.treq = StubTreq(api.app.resource())

    def get(self, path: str, method: str = "GET", **kwargs: Any) -> tuple[Any, bytes]:
        d = self.treq.request(method, "http://registry" + path, **kwargs)
        self.treq.flush()
        response = self.successResultOf(d)
        body: Deferred[bytes] = response.content()
        self.treq.flush()
        return response, self.successResultOf(body)

    def header(self, response: Any, name: str) -> str:
        values = response.headers.getRawHeaders(name)
        assert values is not None, name
        return str(values[0], "ascii") if isinstance(values[0], bytes) else values[0]

    def errors(self, body: bytes) -> list[str]:
        return [e["code"] for e in json.loads(body)["errors"]]

    def test_base_endpoint(self) -> None:
        """GET /v2/ answers 200 with the API version header."""
        response, body = self.get("/v2/")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.header(response, "Docker-Distribution-API-Version"), "registry/2.0")
        self.assertEqual(json.loads(body), {})

    def test_manifest_by_tag_then_by_digest(self) -> None:
        """A built manifest is served by tag and then by its digest, with matching headers."""
        response, body = self.get("/v2/alpha/manifests/latest")
        self.assertEqual(response.code, 200)
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        self.assertEqual(self.header(response, "Docker-Content-Digest"), digest)
        self.assertEqual(self.header(response, "Content-Type"), json.loads(body)["mediaType"])
        self.assertEqual(response.length, len(body))
        again, by_digest = self.get(f"/v2/alpha/manifests/{digest}")
        self.assertEqual((again.code, by_digest), (200, body))

    def test_head_has_headers_and_no_body(self) -> None:
        """HEAD on a manifest gives the GET headers and an empty body."""
        _, body = self.get("/v2/alpha/manifests/latest")
        response, head_body = self.get("/v2/alpha/manifests/latest", "HEAD")
        self.assertEqual(response.code, 200)
        self.assertEqual(head_body, b"")
        self.assertEqual(self.header(response, "Docker-Content-Digest"),
                         "sha256:" + hashlib.sha256(body).hexdigest())

    def test_every_blob_is_served(self) -> None:
        """The config and every layer of a manifest can be fetched by digest."""
        _, body = self.get("/v2/alpha/manifests/latest")
        manifest = json.loads(body)
        for descriptor in [manifest["config"], *manifest["layers"]]:
            response, blob = self.get(f"/v2/alpha/blobs/{descriptor['digest']}")
            self.assertEqual(response.code, 200)
            self.assertEqual("sha256:" + hashlib.sha256(blob).hexdigest(), descriptor["digest"])

    def test_same_image_whatever_the_order(self) -> None:
        """alpha/beta and beta/alpha are one image, built once."""
        _, first = self.get("/v2/alpha/beta/manifests/latest")
        _, second = self.get("/v2/beta/alpha/manifests/latest")
        self.assertEqual(first, second)
        self.assertEqual(len(self.nix.calls), 1)

    def test_concurrent_requests_share_one_build(self) -> None:
        """Requests arriving while an image builds wait for that one build."""
        self.nix.hold = True
        requests = [self.treq.get("http://registry/v2/beta/manifests/latest") for _ in range(5)]
        self.treq.flush()
        for d in requests:
            self.assertNoResult(d)
        self.assertEqual(len(self.nix.calls), 1)
        self.nix.release()
        self.treq.flush()
        digests = {self.successResultOf(d).headers.getRawHeaders("Docker-Content-Digest")[0] for d in requests}
        self.assertEqual(len(digests), 1)

    def test_unknown_packages(self) -> None:
        """Unknown packages are a 404 MANIFEST_UNKNOWN naming each of them."""
        response, body = self.get("/v2/alpha/nope/nada/manifests/latest")
        self.assertEqual(response.code, 404)
        self.assertEqual(self.header(response, "Content-Type"), "application/json")
        error = json.loads(body)["errors"][0]
        self.assertEqual(error["code"], "MANIFEST_UNKNOWN")
        self.assertEqual(sorted(error["detail"]["packages"]), ["nada", "nope"])

    def test_bad_requests(self) -> None:
        """Bad names, tags, digests and unknown endpoints get the spec's error codes."""
        cases = {
            "/v2/UPPER/manifests/latest": (400, "NAME_INVALID"),
            "/v2/a//b/manifests/latest": (400, "NAME_INVALID"),
            "/v2/alpha/manifests/-tag": (404, "MANIFEST_UNKNOWN"),
            "/v2/alpha/manifests/sha256:1234": (400, "DIGEST_INVALID"),
            "/v2/alpha/blobs/sha256:zz": (400, "DIGEST_INVALID"),
            "/v2/alpha/blobs/md5:" + "0" * 32: (400, "DIGEST_INVALID"),
            "/v2/alpha/blobs/sha256:" + "a" * 64: (404, "BLOB_UNKNOWN"),
            "/v2/alpha/manifests/sha256:" + "a" * 64: (404, "MANIFEST_UNKNOWN"),
            "/v2/alpha/unknown/thing": (404, "NAME_UNKNOWN"),
            "/elsewhere": (404, "NAME_UNKNOWN"),
            "/v2": (404, "NAME_UNKNOWN"),
        }
        for path, expected in cases.items():
            response, body = self.get(path)
            self.assertEqual((response.code, self.errors(body)), (expected[0], [expected[1]]), path)
        self.assertEqual(self.nix.calls, [])

    def test_writes_are_unsupported(self) -> None:
        """Push and delete methods answer 405 UNSUPPORTED."""
        for method, path in [
            ("POST", "/v2/alpha/blobs/uploads/"),
            ("PUT", "/v2/alpha/manifests/latest"),
            ("PATCH", "/v2/alpha/blobs/uploads/x"),
            ("DELETE", "/v2/alpha/manifests/latest"),
            ("OPTIONS", "/v2/alpha/manifests/latest"),
        ]:
            response, body = self.get(path, method)
            self.assertEqual((response.code, self.errors(body)), (405, ["UNSUPPORTED"]), method)

    def test_cached_manifest_expires_for_moving_sources(self) -> None:
        """An image from a moving package set is rebuilt after the cache TTL."""
        self.get("/v2/alpha/manifests/latest")
        self.get("/v2/alpha/manifests/latest")
        self.assertEqual(len(self.nix.calls), 1)
        self.clock.advance(6 * 3600 + 1)
        self.get("/v2/alpha/manifests/latest")
        self.assertEqual(len(self.nix.calls), 2)
