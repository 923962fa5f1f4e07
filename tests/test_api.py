"""The registry API over StubTreq, with memory storage and a fake Nix edge."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import provider

from nixeryd.build.builder import ImageBuilder
from nixeryd.build.pkgsource import GitSource, PathSource
from nixeryd.core.offload import inline
from nixeryd.http.registry import RegistryAPI
from nixeryd.image.names import AMD64, ARM64, Arch, parse_name
from nixeryd.registry.images import Images
from tests.fakes import FakeNix, make_store
from tests.memory import MemoryStorage

DEPENDENCIES = {
    "cacert": [],
    "iana-etc": [],
    "libshared": [],
    "alpha": ["libshared"],
    "beta": ["libshared"],
    **{f"p{i}": [] for i in range(1, 8)},
}


class APITestCase(SynchronousTestCase):
    platforms: tuple[Arch, ...] = ()
    max_builds = 2
    queue = 64

    def setUp(self) -> None:
        store = make_store(Path(self.mktemp()).absolute(), DEPENDENCIES)
        self.nix = FakeNix(store, DEPENDENCIES)
        self.storage = MemoryStorage()
        self.clock = Clock()
        source = PathSource("/srv/pkgs")
        builder = ImageBuilder(
            nix=self.nix,
            storage=self.storage,
            offload=inline,
            source=source,
            clock=self.clock,
            popularity={},
            max_builds=self.max_builds,
            queue=self.queue,
        )
        self.images = Images(builder, self.storage, source, self.clock, platforms=self.platforms)
        api = RegistryAPI(self.images, self.storage, ("cacert", "iana-etc"))
        self.treq = StubTreq(api.resource())

    def get(self, path: str, method: str = "GET", **kwargs: Any) -> tuple[Any, bytes]:
        return self.fetch(self.treq, path, method, **kwargs)

    def fetch(self, treq: StubTreq, path: str, method: str = "GET", **kwargs: Any) -> tuple[Any, bytes]:
        """One request through ``treq``: the response and its whole body."""
        d = treq.request(method, "http://registry" + path, **kwargs)
        treq.flush()
        response = self.successResultOf(d)
        body: Deferred[bytes] = response.content()
        treq.flush()
        return response, self.successResultOf(body)

    def header(self, response: Any, name: str) -> str:
        values = response.headers.getRawHeaders(name)
        assert values is not None, name
        return str(values[0], "ascii") if isinstance(values[0], bytes) else values[0]

    def errors(self, body: bytes) -> list[str]:
        return [e["code"] for e in json.loads(body)["errors"]]


class APITests(APITestCase):

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


OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"


class NegotiationTests(APITestCase):
    def test_oci_by_default(self) -> None:
        """Without Accept, or accepting everything, the answer is the OCI manifest."""
        for headers in [{}, {"Accept": ["*/*"]}, {"Accept": [OCI_MANIFEST + ", " + DOCKER_MANIFEST]}]:
            response, body = self.get("/v2/alpha/manifests/latest", headers=headers)
            self.assertEqual(json.loads(body)["mediaType"], OCI_MANIFEST)
            self.assertEqual(self.header(response, "Content-Type"), OCI_MANIFEST)

    def test_docker_only_client_gets_schema_2(self) -> None:
        """A client taking only Docker schema 2 gets it, with Docker media types throughout."""
        response, body = self.get("/v2/alpha/manifests/latest", headers={"Accept": [DOCKER_MANIFEST]})
        doc = json.loads(body)
        self.assertEqual(doc["mediaType"], DOCKER_MANIFEST)
        self.assertEqual(self.header(response, "Content-Type"), DOCKER_MANIFEST)
        self.assertEqual(doc["config"]["mediaType"], "application/vnd.docker.container.image.v1+json")
        self.assertEqual({layer["mediaType"] for layer in doc["layers"]},
                         {"application/vnd.docker.image.rootfs.diff.tar.gzip"})
        _, oci = self.get("/v2/alpha/manifests/latest")
        self.assertEqual(json.loads(oci)["config"]["digest"], doc["config"]["digest"])
        digest = self.header(response, "Docker-Content-Digest")
        again, by_digest = self.get(f"/v2/alpha/manifests/{digest}")
        self.assertEqual((by_digest, self.header(again, "Content-Type")), (body, DOCKER_MANIFEST))

    def test_every_accept_line_is_read(self) -> None:
        """Accept types on separate header lines all count, not only the first."""
        response, body = self.get(
            "/v2/alpha/manifests/latest",
            headers={"Accept": ["application/vnd.docker.distribution.manifest.v1+prettyjws",
                                DOCKER_MANIFEST + ";q=0.9"]},
        )
        self.assertEqual(json.loads(body)["mediaType"], DOCKER_MANIFEST)

    def test_nothing_acceptable(self) -> None:
        """A client taking neither OCI nor Docker schema 2 gets MANIFEST_UNKNOWN."""
        response, body = self.get(
            "/v2/alpha/manifests/latest",
            headers={"Accept": ["application/vnd.docker.distribution.manifest.v1+prettyjws"]},
        )
        self.assertEqual((response.code, self.errors(body)), (404, ["MANIFEST_UNKNOWN"]))

    def test_if_none_match(self) -> None:
        """A manifest or blob whose digest the client names in If-None-Match is a 304."""
        response, body = self.get("/v2/alpha/manifests/latest")
        digest = self.header(response, "Docker-Content-Digest")
        self.assertEqual(self.header(response, "ETag"), f'"{digest}"')
        again, empty = self.get("/v2/alpha/manifests/latest", headers={"If-None-Match": [f'"{digest}"']})
        self.assertEqual((again.code, empty), (304, b""))
        other, full = self.get("/v2/alpha/manifests/latest", headers={"If-None-Match": ['"sha256:00"']})
        self.assertEqual((other.code, full), (200, body))
        layer = json.loads(body)["layers"][0]["digest"]
        blob, nothing = self.get(f"/v2/alpha/blobs/{layer}", headers={"If-None-Match": [layer]})
        self.assertEqual((blob.code, nothing), (304, b""))

    def test_tags_and_catalog(self) -> None:
        """tags/list names latest and the tags asked for; the catalog lists built names."""
        response, body = self.get("/v2/beta/tags/list")
        self.assertEqual(json.loads(body), {"name": "beta", "tags": ["latest"]})
        for tag in ("v2", "v1"):
            self.get(f"/v2/beta/manifests/{tag}")
        self.get("/v2/alpha/manifests/latest")
        _, body = self.get("/v2/beta/tags/list")
        self.assertEqual(json.loads(body)["tags"], ["latest", "v1", "v2"])
        response, body = self.get("/v2/beta/tags/list?n=1&last=latest")
        self.assertEqual(json.loads(body)["tags"], ["v1"])
        self.assertIn("last=v1", self.header(response, "Link"))
        _, body = self.get("/v2/_catalog")
        self.assertEqual(json.loads(body), {"repositories": ["alpha", "beta"]})
        response, body = self.get("/v2/Bad/tags/list")
        self.assertEqual((response.code, self.errors(body)), (400, ["NAME_INVALID"]))

    def test_a_page_size_that_is_not_a_plain_number_is_refused(self) -> None:
        """`n` as a Unicode digit, with 5,000 nines, negative, past 1000 or not a number is
        400 PAGINATION_NUMBER_INVALID, as distribution answers; an empty one is no `n`."""
        for tag in ("v2", "v1"):
            self.get(f"/v2/beta/manifests/{tag}")
        for n in ("%C2%B2", "9" * 5000, "-1", "1e3", "%EF%BC%91", "1001", "9" * 9):
            for path in (f"/v2/beta/tags/list?n={n}", f"/v2/_catalog?n={n}"):
                response, body = self.get(path)
                self.assertEqual((response.code, self.errors(body)), (400, ["PAGINATION_NUMBER_INVALID"]), path[:40])
        _, body = self.get("/v2/beta/tags/list?n=")
        self.assertEqual(json.loads(body)["tags"], ["latest", "v1", "v2"])
        _, body = self.get("/v2/beta/tags/list?n=1000")
        self.assertEqual(json.loads(body)["tags"], ["latest", "v1", "v2"])

    def test_respellings_of_a_name_are_one_repository(self) -> None:
        """`beta/alpha`, `alpha/beta/alpha` and `alpha/beta` ask for one image: the catalogue
        lists it once, in its canonical spelling, and each spelling lists every tag any of
        them was pulled at; the storage holds one tag record."""
        for name, tag in (("beta/alpha", "v1"), ("alpha/beta/alpha", "v2"), ("alpha/beta", "v3"),
                          ("nonroot/beta/alpha/beta", "v1")):
            self.assertEqual(self.get(f"/v2/{name}/manifests/{tag}")[0].code, 200)
        _, body = self.get("/v2/_catalog")
        self.assertEqual(json.loads(body)["repositories"], ["alpha/beta", "nonroot/alpha/beta"])
        for name in ("beta/alpha", "alpha/alpha/beta"):
            _, body = self.get(f"/v2/{name}/tags/list")
            self.assertEqual(json.loads(body), {"name": name, "tags": ["latest", "v1", "v2", "v3"]})
        self.assertEqual(len(self.successResultOf(self.storage.list("tags"))), 2)

    def test_the_catalog_answers_a_page_at_a_time(self) -> None:
        """Without `n`, the catalogue answers 100 names and a Link to the next page."""
        import itertools

        names = ["/".join(c) for k in (1, 2, 3) for c in itertools.combinations([f"p{i}" for i in range(1, 8)], k)]
        names += ["p1/p2/p3/p4/p5", "p1/p2/p3/p4/p6"] + [f"nonroot/{name}" for name in names[:40]]
        for name in names:  # 105 images, one a second (the pace new tags are recorded at)
            self.assertEqual(self.get(f"/v2/{name}/manifests/latest")[0].code, 200)
            self.clock.advance(1)
        response, body = self.get("/v2/_catalog")
        names = json.loads(body)["repositories"]
        self.assertEqual(len(names), 100)
        self.assertIn(f"last={names[-1]}>", self.header(response, "Link"))
        _, body = self.get(f"/v2/_catalog?last={names[-1]}")
        self.assertEqual(len(json.loads(body)["repositories"]), 5)


class MultiPlatformTests(APITestCase):
    platforms = (AMD64, ARM64)

    def test_index_of_platforms(self) -> None:
        """A tag is an index whose entries are per-platform manifests, each retrievable."""
        response, body = self.get("/v2/alpha/manifests/latest")
        index = json.loads(body)
        self.assertEqual((index["mediaType"], self.header(response, "Content-Type")), (OCI_INDEX, OCI_INDEX))
        self.assertEqual([m["platform"]["architecture"] for m in index["manifests"]], ["amd64", "arm64"])
        for entry in index["manifests"]:
            got, manifest_body = self.get(f"/v2/alpha/manifests/{entry['digest']}")
            self.assertEqual(len(manifest_body), entry["size"])
            self.assertEqual(json.loads(manifest_body)["mediaType"], entry["mediaType"])
        self.assertEqual(len(self.nix.calls), 2)

    def test_docker_clients_get_a_manifest_list(self) -> None:
        """Docker clients taking lists get a Docker manifest list of Docker manifests."""
        _, body = self.get("/v2/alpha/manifests/latest", headers={"Accept": [DOCKER_MANIFEST, DOCKER_LIST]})
        doc = json.loads(body)
        self.assertEqual(doc["mediaType"], DOCKER_LIST)
        self.assertEqual({m["mediaType"] for m in doc["manifests"]}, {DOCKER_MANIFEST})

    def test_an_index_only_with_entries_the_client_reads(self) -> None:
        """Docker's CLI (20.10, `docker manifest inspect`) takes an OCI index but no OCI
        manifest: it gets the Docker list, whose entries it can read; a client taking the OCI
        index and OCI manifests, but no Docker list, still gets the OCI index."""
        docker_cli = [DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX]
        response, body = self.get("/v2/alpha/manifests/latest", headers={"Accept": docker_cli})
        self.assertEqual((json.loads(body)["mediaType"], self.header(response, "Content-Type")),
                         (DOCKER_LIST, DOCKER_LIST))
        _, body = self.get("/v2/alpha/manifests/latest", headers={"Accept": [OCI_INDEX, OCI_MANIFEST]})
        self.assertEqual(json.loads(body)["mediaType"], OCI_INDEX)
        _, body = self.get("/v2/alpha/manifests/latest", headers={"Accept": [OCI_INDEX, DOCKER_MANIFEST]})
        self.assertEqual(json.loads(body)["mediaType"], DOCKER_MANIFEST)

    def test_clients_without_index_support_get_the_first_platform(self) -> None:
        """A client that takes no index gets the first platform's image."""
        _, body = self.get("/v2/alpha/manifests/latest", headers={"Accept": [OCI_MANIFEST]})
        doc = json.loads(body)
        self.assertEqual(doc["mediaType"], OCI_MANIFEST)
        _, config = self.get(f"/v2/alpha/blobs/{doc['config']['digest']}")
        self.assertEqual(json.loads(config)["architecture"], "amd64")

    def test_arm64_name_stays_single(self) -> None:
        """An arm64/ name is one arm64 image, not an index."""
        _, body = self.get("/v2/arm64/alpha/manifests/latest")
        doc = json.loads(body)
        self.assertEqual(doc["mediaType"], OCI_MANIFEST)
        _, config = self.get(f"/v2/alpha/blobs/{doc['config']['digest']}")
        self.assertEqual(json.loads(config)["architecture"], "arm64")


class QueueTests(APITestCase):
    max_builds = 1
    queue = 0

    def test_full_queue_is_429(self) -> None:
        """With every build slot busy and no queue, another image is 429 with Retry-After."""
        self.nix.hold = True
        first = self.treq.get("http://registry/v2/alpha/manifests/latest")
        self.treq.flush()
        response, body = self.get("/v2/beta/manifests/latest")
        self.assertEqual((response.code, self.errors(body)), (429, ["TOOMANYREQUESTS"]))
        # The reason phrase says why: containerd's ctr prints nothing else.
        self.assertEqual(response.phrase, b"too many images are being built; try again shortly")
        self.assertEqual(self.header(response, "Retry-After"), "10")
        self.nix.hold = False
        self.nix.release()
        self.treq.flush()
        self.assertEqual(self.successResultOf(first).code, 200)
        response, _ = self.get("/v2/beta/manifests/latest")
        self.assertEqual(response.code, 200)


class FailureMemoryTests(APITestCase):
    def setUp(self) -> None:
        super().setUp()
        self.nix.broken = ("beta",)

    def test_head_then_get_of_a_failing_image_builds_once(self) -> None:
        """docker pull's HEAD then GET of an image that fails to build run Nix once; after
        NIXERY_FAILURE_TTL (60 s) the next request builds again."""
        head, _ = self.get("/v2/beta/manifests/latest", "HEAD")
        response, body = self.get("/v2/beta/manifests/latest")
        self.assertEqual((head.code, response.code), (422, 422))
        self.assertIn("builder for beta failed", json.loads(body)["errors"][0]["message"])
        self.assertIn(b"builder for beta failed", head.phrase)
        self.assertEqual(len(self.nix.calls), 1)
        self.clock.advance(59)
        self.get("/v2/beta/manifests/latest")
        self.assertEqual(len(self.nix.calls), 1)
        self.clock.advance(2)
        self.get("/v2/beta/manifests/latest")
        self.assertEqual(len(self.nix.calls), 2)

    def test_unknown_names_are_remembered_too(self) -> None:
        """An unknown name is a 404 each time, from one Nix evaluation within the TTL."""
        for _ in range(3):
            response, body = self.get("/v2/nosuch/manifests/latest")
            self.assertEqual((response.code, self.errors(body)), (404, ["MANIFEST_UNKNOWN"]))
        self.assertEqual(len(self.nix.calls), 1)

    def test_other_images_and_tags_are_not_affected(self) -> None:
        """A failure is remembered under its own cache key: other images build."""
        self.get("/v2/beta/manifests/latest")
        response, _ = self.get("/v2/alpha/manifests/latest")
        self.assertEqual(response.code, 200)
        self.assertEqual(len(self.nix.calls), 2)

    def test_a_zero_ttl_remembers_nothing(self) -> None:
        """NIXERY_FAILURE_TTL=0 turns the memory off."""
        source = PathSource("/srv/pkgs")
        builder = ImageBuilder(nix=self.nix, storage=self.storage, offload=inline, source=source,
                               clock=self.clock, popularity={})
        images = Images(builder, self.storage, source, self.clock, failure_ttl=0)
        treq = StubTreq(RegistryAPI(images, self.storage, ("cacert", "iana-etc")).resource())
        for _ in range(2):
            self.fetch(treq, "/v2/beta/manifests/latest")
        self.assertEqual(len(self.nix.calls), 2)


class DamagedStorageTests(APITestCase):
    """A blob truncated or replaced in storage is never served under its digest nor reused:
    it is treated as missing and packed again."""

    def damage(self, digest: str) -> bytes:
        key = "layers/" + digest.removeprefix("sha256:")
        good = self.successResultOf(self.storage.get(key))
        self.successResultOf(self.storage.put(key, good[: len(good) // 2], "application/octet-stream"))
        return good

    def test_a_damaged_blob_is_not_served_and_the_next_pull_repairs_it(self) -> None:
        """A warm image whose layer was truncated: the blob GET is 404 BLOB_UNKNOWN, the next
        manifest GET finds the damage and rebuilds, and the blob is whole again."""
        _, body = self.get("/v2/alpha/manifests/latest")
        layer = json.loads(body)["layers"][0]
        good = self.damage(layer["digest"])
        response, body = self.get(f"/v2/alpha/blobs/{layer['digest']}")
        self.assertEqual((response.code, self.errors(body)), (404, ["BLOB_UNKNOWN"]))
        self.assertEqual(len(self.nix.calls), 1)
        _, again = self.get("/v2/alpha/manifests/latest")
        self.assertEqual(json.loads(again)["layers"][0], layer)
        self.assertEqual(len(self.nix.calls), 2)
        response, blob = self.get(f"/v2/alpha/blobs/{layer['digest']}")
        self.assertEqual((response.code, blob), (200, good))

    def test_a_damaged_layer_is_not_reused_by_a_new_image(self) -> None:
        """A layer recorded as built but damaged in storage is packed again for the next
        image that needs it, not referenced as it is."""
        _, body = self.get("/v2/alpha/manifests/latest")
        digests = [layer["digest"] for layer in json.loads(body)["layers"]]
        good = {d: self.damage(d) for d in digests}
        _, body = self.get("/v2/alpha/beta/manifests/latest")
        for layer in json.loads(body)["layers"]:
            if layer["digest"] in good:
                stored = self.successResultOf(self.storage.get("layers/" + layer["digest"][7:]))
                self.assertEqual(stored, good[layer["digest"]])

    def test_a_new_instance_checks_what_it_loads(self) -> None:
        """An instance loading a cached image from storage checks its blobs first and rebuilds
        one found damaged, rather than serving a manifest whose layer is broken."""
        _, body = self.get("/v2/alpha/manifests/latest")
        layer = json.loads(body)["layers"][-1]
        good = self.damage(layer["digest"])
        source = PathSource("/srv/pkgs")
        builder = ImageBuilder(nix=self.nix, storage=self.storage, offload=inline, source=source,
                               clock=self.clock, popularity={})
        treq = StubTreq(RegistryAPI(Images(builder, self.storage, source, self.clock),
                                    self.storage, ("cacert", "iana-etc")).resource())
        _, again = self.fetch(treq, "/v2/alpha/manifests/latest")
        self.assertEqual(again, body)
        self.assertEqual(len(self.nix.calls), 2)
        self.assertEqual(self.fetch(treq, f"/v2/alpha/blobs/{layer['digest']}")[1], good)


class BudgetAndOrderTests(APITestCase):
    def build_with(self, storage: Any, budget: int) -> ImageBuilder:
        return ImageBuilder(nix=self.nix, storage=storage, offload=inline, source=PathSource("/srv/pkgs"),
                            clock=self.clock, popularity={}, layer_budget=budget)

    def test_the_symlink_layer_counts_in_the_budget(self) -> None:
        """With a budget of N layers an image has exactly N, its symlink layer included."""
        for budget in (2, 3):
            source, storage = PathSource("/srv/pkgs"), MemoryStorage()
            images = Images(self.build_with(storage, budget), storage, source, self.clock)
            treq = StubTreq(RegistryAPI(images, storage, ("cacert", "iana-etc")).resource())
            _, body = self.fetch(treq, "/v2/alpha/beta/manifests/latest")
            self.assertEqual(len(json.loads(body)["layers"]), budget)

    def test_no_layer_record_before_its_blob_is_stored(self) -> None:
        """When storing a layer fails, no builds/ record names it: a record always points at
        a blob that is there. (The failure is real: a directory stands where the blob goes.)"""
        from nixeryd.storage.filesystem import FilesystemStorage

        first = FilesystemStorage(str(Path(self.mktemp()).absolute()), inline)
        images = Images(self.build_with(first, 94), first, PathSource("/srv/pkgs"), self.clock)
        treq = StubTreq(RegistryAPI(images, first, ()).resource())
        _, body = self.fetch(treq, "/v2/alpha/manifests/latest")
        digests = {layer["digest"] for layer in json.loads(body)["layers"]}
        root = Path(self.mktemp()).absolute()
        second = FilesystemStorage(str(root), inline)
        for digest in digests:
            (root / "layers" / digest.removeprefix("sha256:")).mkdir()
        images = Images(self.build_with(second, 94), second, PathSource("/srv/pkgs"), self.clock)
        treq = StubTreq(RegistryAPI(images, second, ()).resource())
        response, _ = self.fetch(treq, "/v2/alpha/manifests/latest")
        self.assertEqual(response.code, 503)
        named = {json.loads(p.read_text())["digest"] for p in (root / "builds").iterdir()}
        self.assertEqual(named & digests, set())


class CacheTests(APITestCase):
    def test_pinned_git_revisions_are_kept_for_good(self) -> None:
        """An image at a 40-hex git revision is never rebuilt; a branch is, after the TTL."""
        source = GitSource("https://git.internal/pkgs.git")
        images = Images(self.builder_for(source), self.storage, source, self.clock)
        treq = StubTreq(RegistryAPI(images, self.storage, ()).resource())
        rev = "a" * 40
        for _ in range(2):
            for tag in (rev, "main"):
                self.successResultOf(treq.get(f"http://registry/v2/alpha/manifests/{tag}"))
            self.clock.advance(7 * 3600)
        self.assertEqual(len(self.nix.calls), 3)

    def test_two_tags_of_one_cold_image_at_once(self) -> None:
        """Two git refs of the same image build side by side; both answer 200, and both show
        on the index page while they run."""
        source = GitSource("https://git.internal/pkgs.git")
        builder = self.builder_for(source)
        images = Images(builder, self.storage, source, self.clock)
        treq = StubTreq(RegistryAPI(images, self.storage, ()).resource())
        self.nix.hold = True
        pending = [treq.get(f"http://registry/v2/alpha/manifests/{tag}") for tag in ("main", "release")]
        treq.flush()
        self.assertEqual(sorted(builder.activity.active), ["alpha:main (amd64)", "alpha:release (amd64)"])
        self.nix.release()
        treq.flush()
        self.assertEqual([self.successResultOf(d).code for d in pending], [200, 200])
        self.assertEqual(builder.activity.active, {})

    def builder_for(self, source: Any) -> ImageBuilder:
        return ImageBuilder(nix=self.nix, storage=self.storage, offload=inline, source=source,
                            clock=self.clock, popularity={})

    def test_a_new_instance_serves_from_storage(self) -> None:
        """Another instance on the same storage serves a built image without Nix."""
        _, body = self.get("/v2/alpha/manifests/latest")
        source = PathSource("/srv/pkgs")
        images = Images(self.builder_for(source), self.storage, source, self.clock)
        treq = StubTreq(RegistryAPI(images, self.storage, ("cacert", "iana-etc")).resource())
        response = self.successResultOf(treq.get("http://registry/v2/alpha/manifests/latest"))
        self.assertEqual(self.successResultOf(response.content()), body)
        self.assertEqual(len(self.nix.calls), 1)

    def test_a_shared_layer_is_packed_once(self) -> None:
        """Two images built at the same time pack their common layers once."""
        packed: list[str] = []

        @provider(ILogObserver)
        def observe(event: LogEvent) -> None:
            if "layer" in event and event.get("log_format", "").startswith("packed layer"):
                packed.append(event["layer"])

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        self.nix.hold = True
        first = self.treq.get("http://registry/v2/alpha/manifests/latest")
        second = self.treq.get("http://registry/v2/beta/manifests/latest")
        self.treq.flush()
        self.nix.release()
        self.treq.flush()
        self.assertEqual((self.successResultOf(first).code, self.successResultOf(second).code), (200, 200))
        self.assertEqual(len(packed), len(set(packed)))
        # cacert and iana-etc (shared), alpha+libshared, beta+libshared (libshared is
        # dominated by the one package that uses it in each image), two symlink layers.
        self.assertEqual(len(packed), 6)


class OperatorEndpointTests(APITestCase):
    def make_api(self) -> StubTreq:
        from nixeryd.http.index import Status
        from nixeryd.ops.buildlog import BuildLogs
        from nixeryd.ops.metrics import Metrics

        self.metrics = Metrics()
        self.logs = BuildLogs()
        source = PathSource("/srv/pkgs")
        builder = ImageBuilder(nix=self.nix, storage=self.storage, offload=inline, source=source,
                               clock=self.clock, popularity={}, metrics=self.metrics)
        self.op_builder = builder
        images = Images(builder, self.storage, source, self.clock, metrics=self.metrics)
        status = Status(source=source.describe(), active=lambda: builder.activity.active,
                        failures=lambda: list(builder.activity.failures), tail=self.logs.tail, now=self.clock.seconds)
        return StubTreq(RegistryAPI(images, self.storage, (), metrics=self.metrics, status=status).resource())

    def test_healthz(self) -> None:
        """/healthz answers 200 ok for load balancers."""
        response, body = self.fetch(self.make_api(), "/healthz")
        self.assertEqual((response.code, body), (200, b"ok\n"))

    def test_metrics_count_builds_cache_and_bytes(self) -> None:
        """/metrics reports builds by outcome, cache results, bytes packed and served."""
        treq = self.make_api()
        self.fetch(treq, "/v2/alpha/manifests/latest")
        self.fetch(treq, "/v2/alpha/manifests/latest")
        self.fetch(treq, "/v2/nope/manifests/latest")
        response, text = self.fetch(treq, "/metrics")
        metrics = text.decode()
        self.assertIn('nixeryd_builds_total{outcome="built"} 1.0', metrics)
        self.assertIn('nixeryd_builds_total{outcome="not_found"} 1.0', metrics)
        self.assertIn('nixeryd_manifest_cache_total{result="memory"} 1.0', metrics)
        self.assertIn('nixeryd_manifest_cache_total{result="miss"} 2.0', metrics)
        self.assertIn("nixeryd_nix_builds_running 0.0", metrics)
        self.assertIn("nixeryd_build_queue_length 0.0", metrics)
        packed = [line for line in metrics.splitlines() if line.startswith("nixeryd_packed_bytes_total")]
        self.assertGreater(float(packed[0].split()[1]), 0)
        served = [line for line in metrics.splitlines() if line.startswith("nixeryd_served_bytes_total")]
        self.assertGreater(float(served[0].split()[1]), 0)

    def test_index_shows_host_source_builds_and_failures(self) -> None:
        """The index page names the host, the source, running builds with their log, and failures."""
        treq = self.make_api()
        self.fetch(treq, "/v2/nope/manifests/latest")
        self.nix.hold = True
        pending = treq.get("http://registry.internal/v2/beta/manifests/latest")
        treq.flush()
        self.logs({"build_log": True, "image": "beta:latest (amd64)", "line": "building '/nix/store/x-beta.drv'..."})
        self.clock.advance(12)
        response, page = self.fetch(treq, "/", headers={"Host": ["registry.internal:8080"]})
        html = page.decode()
        self.assertEqual(response.code, 200)
        self.assertIn("docker pull registry.internal:8080/shell/git/htop", html)
        self.assertIn("local package set /srv/pkgs", html)
        self.assertIn("beta:latest (amd64)</code> for 12 s", html)
        self.assertIn("x-beta.drv", html)
        self.assertIn("packages not found: nope", html)
        self.nix.release()
        treq.flush()
        self.assertEqual(self.successResultOf(pending).code, 200)

    def test_index_escapes_what_it_shows(self) -> None:
        """A hostile Host header is escaped, not rendered as markup."""
        _, page = self.fetch(self.make_api(), "/", headers={"Host": ["<script>x</script>"]})
        self.assertNotIn(b"<script>", page)
        self.assertIn(b"&lt;script&gt;", page)


class ZstdTests(APITestCase):
    def test_the_image_page_reads_zstd_layers(self) -> None:
        """The image page of an image with zstd layers lists each layer's store paths (it
        answered 500), and a stored SBOM of another shape shows no packages, never a 500."""
        from nixeryd.http.imagepage import ImagePages

        source = PathSource("/srv/pkgs")
        builder = ImageBuilder(nix=self.nix, storage=self.storage, offload=inline, source=source,
                               clock=self.clock, popularity={}, compression="zstd")
        images = Images(builder, self.storage, source, self.clock)
        treq = StubTreq(RegistryAPI(images, self.storage, ("cacert",),
                                    pages=ImagePages(images, self.storage, inline)).resource())
        response, body = self.fetch(treq, "/image/alpha", headers={"Accept": ["application/json"]})
        self.assertEqual(response.code, 200, body)
        data = json.loads(body)
        # Read, not refused (None): the fake store lives outside /nix/store, so no paths.
        self.assertTrue(all(layer["store_paths"] == [] for layer in data["layers"]), data["layers"])
        served = self.successResultOf(images.manifests(parse_name("alpha", ("cacert",)), "latest"))
        assert served.sbom is not None
        sbom_layer = json.loads(served.sbom.body)
        digest = sbom_layer["layers"][0]["digest"].removeprefix("sha256:")
        self.successResultOf(self.storage.put("layers/" + digest, b'{"packages": "not a list"}', "application/json"))
        pages = ImagePages(images, self.storage, inline)
        treq = StubTreq(RegistryAPI(images, self.storage, ("cacert",), pages=pages).resource())
        response, body = self.fetch(treq, "/image/alpha", headers={"Accept": ["application/json"]})
        self.assertEqual((response.code, json.loads(body)["packages"]), (200, []))

    def test_zstd_layers_for_oci_clients_only(self) -> None:
        """With zstd layers, OCI clients get tar+zstd layers that decompress to the diff_ids,
        and a client taking only Docker schema 2 gets MANIFEST_UNKNOWN."""
        import zstandard

        source = PathSource("/srv/pkgs")
        builder = ImageBuilder(nix=self.nix, storage=self.storage, offload=inline, source=source,
                               clock=self.clock, popularity={}, compression="zstd")
        images = Images(builder, self.storage, source, self.clock)
        treq = StubTreq(RegistryAPI(images, self.storage, ("cacert",)).resource())

        def fetch(path: str, **kwargs: Any) -> tuple[Any, bytes]:
            return self.fetch(treq, path, **kwargs)

        _, zstd_body = fetch("/v2/alpha/manifests/latest")
        doc = json.loads(zstd_body)
        self.assertEqual({layer["mediaType"] for layer in doc["layers"]},
                         {"application/vnd.oci.image.layer.v1.tar+zstd"})
        _, config = fetch(f"/v2/alpha/blobs/{doc['config']['digest']}")
        diff_ids = json.loads(config)["rootfs"]["diff_ids"]
        for layer, diff_id in zip(doc["layers"], diff_ids, strict=True):
            _, blob = fetch(f"/v2/alpha/blobs/{layer['digest']}")
            tar = zstandard.ZstdDecompressor().decompressobj().decompress(blob)
            self.assertEqual("sha256:" + hashlib.sha256(tar).hexdigest(), diff_id)
        response, body = fetch("/v2/alpha/manifests/latest", headers={"Accept": [DOCKER_MANIFEST]})
        self.assertEqual((response.code, self.errors(body)), (404, ["MANIFEST_UNKNOWN"]))
        # The gzip image of the same packages is another image, built on its own.
        _, gzip_body = self.get("/v2/alpha/manifests/latest")
        self.assertNotEqual(json.loads(gzip_body)["layers"], doc["layers"])
        self.assertEqual(len(self.nix.calls), 2)


class FleetTagTests(APITestCase):
    def test_tags_and_names_live_in_storage(self) -> None:
        """Tags served by one instance are listed by another on the same storage, and by
        a new one after a restart; so are the names in the catalogue."""
        for tag in ("v1", "v2"):
            self.get(f"/v2/beta/manifests/{tag}")
        self.get("/v2/alpha/manifests/latest")
        source = PathSource("/srv/pkgs")
        other = ImageBuilder(nix=self.nix, storage=self.storage, offload=inline, source=source,
                             clock=self.clock, popularity={})
        treq = StubTreq(RegistryAPI(Images(other, self.storage, source, self.clock), self.storage,
                                    ("cacert", "iana-etc")).resource())
        _, body = self.fetch(treq, "/v2/beta/tags/list")
        self.assertEqual(json.loads(body)["tags"], ["latest", "v1", "v2"])
        _, body = self.fetch(treq, "/v2/_catalog")
        self.assertEqual(json.loads(body)["repositories"], ["alpha", "beta"])
        stored = self.successResultOf(self.storage.list("tags"))
        self.assertEqual(len(stored), 2)

    def test_a_tag_is_written_once(self) -> None:
        """Serving a tag again writes nothing more."""
        self.get("/v2/beta/manifests/v1")
        written = self.successResultOf(self.storage.list("tags"))[0].modified
        self.clock.advance(60)
        for _ in range(3):
            self.get("/v2/beta/manifests/v1")
        self.assertEqual(self.successResultOf(self.storage.list("tags"))[0].modified, written)
