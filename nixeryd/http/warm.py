"""The warm pull's short way: a manifest already in memory, for a client access control
lets in without waiting, answered before Klein's routing runs.

Most of a busy registry's requests are warm manifest GETs, and Klein's per-request
machinery (routing, request wrapping, its response writing) costs more than everything
nixeryd does for one. ``WarmFirst`` answers such a request itself only when every step of
the ``read`` route would answer it the same way without waiting: access control lets the
request in at once (off, a token, or a password checked lately), the name and tag are
well formed and not a signature's, the image's manifests are in memory with nothing due
(``Images.warm``), and the client takes one of them; the answer, 304 included, is then
the route's own (``negotiation.send_manifest``). Anything else (every error included)
goes through the route, which is declared ``authorized``, so what a client sees never
depends on which way its request took (``tests/test_warm.py``).
"""
from __future__ import annotations

from typing import Sequence

from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

from nixeryd.http.auth import AuthBusy, Authenticator
from nixeryd.http.negotiation import API_VERSION_HEADER, accepted_types, choose, send_manifest
from nixeryd.image.cosign import SIGNATURE_TAG
from nixeryd.image.names import NameInvalid, ReferenceInvalid, Tag, parse_name, parse_reference
from nixeryd.ops.metrics import Metrics
from nixeryd.registry.images import Images

MANIFESTS = "/manifests/"


class WarmManifests:
    def __init__(self, images: Images, auth: Authenticator | None, base_packages: Sequence[str],
                 metrics: Metrics) -> None:
        self._images = images
        self._auth = auth
        self._base = tuple(base_packages)
        self._metrics = metrics

    def answer(self, request: IRequest) -> bytes | None:
        """The response body, headers set, or None for the route to answer."""
        path = request.path
        if request.args or not path.startswith(b"/v2/") or b"%" in path:
            return None
        name, found, ref = path[4:].decode("ascii", "replace").rpartition(MANIFESTS)
        if not found or not name or "/" in ref:
            return None
        if self._auth is not None:
            try:
                if not self._auth.granted_now(request.getHeader(b"authorization")):
                    return None
            except AuthBusy:
                return None
        try:
            image, reference = parse_name(name, self._base), parse_reference(ref)
        except (NameInvalid, ReferenceInvalid):
            return None
        if not isinstance(reference, Tag) or SIGNATURE_TAG.fullmatch(reference.value):
            return None
        manifests = self._images.warm(image, reference.value)
        if manifests is None:
            return None
        chosen = choose(manifests, accepted_types(request))
        if chosen is None:
            return None
        request.setHeader(*API_VERSION_HEADER)
        return send_manifest(request, chosen, self._metrics)


class WarmFirst(Resource):
    """The API's resource: the short way for warm manifests, Klein's routes for the rest."""

    isLeaf = True

    def __init__(self, routes: IResource, warm: WarmManifests) -> None:
        super().__init__()
        self._routes = routes
        self._warm = warm

    def render(self, request: IRequest) -> bytes | int:
        if request.method in (b"GET", b"HEAD"):
            body = self._warm.answer(request)
            if body is not None:
                return body
        rendered: bytes | int = self._routes.render(request)
        return rendered
