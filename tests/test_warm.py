"""The warm pull's short way answers exactly as the route does, and only when it can."""
from __future__ import annotations

from typing import Any

from treq.testing import StubTreq

from nixeryd.http.registry import RegistryAPI
from nixeryd.image.manifest import DOCKER_MANIFEST, OCI_MANIFEST
from tests.test_api import APITestCase

IGNORED = {"date", "server"}


class WarmWayTests(APITestCase):
    def routed(self) -> StubTreq:
        """The same API through Klein's routes alone."""
        api = RegistryAPI(self.images, self.storage, ("cacert", "iana-etc"))
        return StubTreq(api.app.resource())

    def headers(self, response: Any) -> dict[str, list[bytes]]:
        return {name.decode().lower(): values for name, values in response.headers.getAllRawHeaders()
                if name.decode().lower() not in IGNORED}

    def test_a_warm_pull_is_answered_as_the_route_answers_it(self) -> None:
        """GET and HEAD, OCI and Docker clients, a second tag and a respelling: status,
        headers and bytes are the route's, and no build runs."""
        self.assertEqual(self.get("/v2/alpha/beta/manifests/latest")[0].code, 200)
        self.get("/v2/beta/alpha/manifests/v1")
        routed = self.routed()
        for path in ("/v2/alpha/beta/manifests/latest", "/v2/beta/alpha/manifests/v1"):
            for method in ("GET", "HEAD"):
                for accept in ([OCI_MANIFEST], [DOCKER_MANIFEST], [OCI_MANIFEST, DOCKER_MANIFEST]):
                    warm, warm_body = self.get(path, method, headers={"Accept": accept})
                    route, route_body = self.fetch(routed, path, method, headers={"Accept": accept})
                    self.assertEqual((warm.code, warm_body), (route.code, route_body), (path, method, accept))
                    self.assertEqual(self.headers(warm), self.headers(route), (path, method, accept))
        self.assertEqual(len(self.nix.calls), 1)

    def test_what_the_short_way_leaves_to_the_route(self) -> None:
        """Errors, conditional requests, signature tags, digests and unknown images are the
        route's answers, whichever way: the same statuses and bodies."""
        self.get("/v2/alpha/manifests/latest")
        routed = self.routed()
        digest = self.header(self.get("/v2/alpha/manifests/latest")[0], "Docker-Content-Digest")
        cases: list[tuple[str, dict[str, list[str]]]] = [
            ("/v2/alpha/manifests/latest", {"If-None-Match": [f'"{digest}"']}),
            ("/v2/alpha/manifests/latest", {"Accept": ["application/x-nothing"]}),
            (f"/v2/alpha/manifests/{digest}", {}),
            (f"/v2/alpha/manifests/sha256-{digest[7:]}.sig", {}),
            ("/v2/Alpha/manifests/latest", {}),
            ("/v2/alpha/manifests/-bad", {}),
            ("/v2/nosuch/manifests/latest", {}),
            ("/v2/alpha/manifests/latest?n=1", {}),
        ]
        for path, headers in cases:
            warm, warm_body = self.get(path, headers=headers)
            route, route_body = self.fetch(routed, path, headers=headers)
            self.assertEqual((warm.code, warm_body), (route.code, route_body), path)

    def test_warm_pulls_take_the_short_way(self) -> None:
        """Once warm, a pull is answered without the routes (a resource standing for them
        fails the test if asked); a first pull is not."""
        from twisted.web.resource import Resource

        from nixeryd.http.warm import WarmFirst, WarmManifests
        from nixeryd.ops.metrics import Metrics

        asked: list[bytes] = []

        class Routes(Resource):
            isLeaf = True

            def render(self, request: Any) -> bytes:
                asked.append(request.path)
                return b"routed"

        short = StubTreq(WarmFirst(Routes(), WarmManifests(self.images, None, ("cacert", "iana-etc"), Metrics())))
        self.assertEqual(self.fetch(short, "/v2/alpha/manifests/latest")[1], b"routed")
        _, body = self.get("/v2/alpha/manifests/latest")
        response, short_body = self.fetch(short, "/v2/alpha/manifests/latest")
        self.assertEqual((response.code, short_body), (200, body))
        self.assertEqual(asked, [b"/v2/alpha/manifests/latest"])
