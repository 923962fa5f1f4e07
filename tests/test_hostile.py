"""Hostile input: whatever a client sends, the answer is a registry error or a
success, never a 500 from our code, never a traceback, never a file outside storage."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.task import Clock

from nixeryd.api import RegistryAPI
from nixeryd.builder import ImageBuilder
from nixeryd.images import Images
from nixeryd.names import (
    DigestInvalid,
    NameInvalid,
    ReferenceInvalid,
    parse_digest,
    parse_name,
    parse_reference,
)
from nixeryd.offload import inline
from nixeryd.pkgsource import PathSource
from nixeryd.storage.filesystem import FilesystemStorage
from nixeryd.storage.interface import check_key
from nixeryd.storage.memory import MemoryStorage
from tests.fakes import FakeNix, make_store
from tests.test_api import DEPENDENCIES

SPEC_CODES = {
    "BLOB_UNKNOWN", "DIGEST_INVALID", "MANIFEST_UNKNOWN", "NAME_INVALID", "NAME_UNKNOWN",
    "UNSUPPORTED", "TOOMANYREQUESTS", "UNAUTHORIZED", "UNKNOWN",
}
ALLOWED = {200, 206, 304, 307, 400, 401, 404, 405, 416, 429, 503}
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))

fragments = st.sampled_from([
    "alpha", "beta", "shell", "arm64", "..", ".", "", "%2e%2e", "%2f", "%00", "\x00", "${pkgs}",
    "a" * 300, "Ünï", "manifests", "blobs", "tags", "list", "_catalog", "latest", "sha256:" + "a" * 64,
    "sha256:", "sha512:00", "//", "%", "?n=1", "#x", "~", "*", "nope",
])
names = st.lists(st.one_of(fragments, st.text(max_size=12)), max_size=6).map("/".join)
paths = st.one_of(
    names,
    st.builds(lambda n, kind, ref: f"{n}/{kind}/{ref}", names,
              st.sampled_from(["manifests", "blobs", "tags"]), st.one_of(fragments, st.text(max_size=70))),
)
# Values HTTP allows in a field: requests with control characters in headers are
# refused by Twisted's HTTP layer before they reach the application.
header_values = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"),
            max_size=60).map(str.strip),
    st.sampled_from([
        "application/vnd.oci.image.manifest.v1+json", "*/*", "", "application/json;q=0",
        "bytes=0-", "bytes=-5", "bytes=5-1", "bytes=0-1,3-4", "bytes=abc", "bytes=99999999999999999999-",
    ]),
)


def make_api(root: str) -> StubTreq:
    clock = Clock()
    store = make_store(Path(root) / "store", DEPENDENCIES)
    storage = MemoryStorage()
    source = PathSource("/srv/pkgs")
    builder = ImageBuilder(nix=FakeNix(store, DEPENDENCIES), storage=storage, offload=inline,
                           source=source, clock=clock, popularity={})
    images = Images(builder, storage, source, clock)
    return StubTreq(RegistryAPI(images, storage, ("cacert",)).app.resource())


_api: dict[str, StubTreq] = {}


def api(tmp_root: str) -> StubTreq:
    if "api" not in _api:
        _api["api"] = make_api(tmp_root)
    return _api["api"]


def check_response(treq: StubTreq, method: str, url: str, headers: dict[str, list[str]]) -> None:
    d = treq.request(method, url, headers=headers)
    treq.flush()
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, f"no answer to {method} {url!r}"
    response = results[0]
    # A failure here is the client refusing to send the request (the server answers
    # everything it receives with a response): not an example of anything.
    assume(not hasattr(response, "getTraceback"))
    assert response.code in ALLOWED, (method, url, response.code)
    body_d = response.content()
    treq.flush()
    bodies: list[Any] = []
    body_d.addBoth(bodies.append)
    body = bodies[0]
    assert isinstance(body, bytes)
    assert b"Traceback" not in body
    if response.code >= 400 and method != "HEAD" and url.split("?")[0].rstrip("/").startswith("http://r/v2"):
        errors = json.loads(body)["errors"]
        assert errors and all(e["code"] in SPEC_CODES for e in errors), body
        assert response.headers.getRawHeaders("Content-Type") == ["application/json"]


@SETTINGS
@given(path=paths, method=st.sampled_from(["GET", "HEAD", "PUT", "POST", "DELETE", "PATCH", "OPTIONS"]),
       accept=st.lists(header_values, max_size=3), range_=header_values)
def test_any_request_gets_a_registry_answer(tmp_path_factory: Any, path: str, method: str,
                                            accept: list[str], range_: str) -> None:
    """Random paths, methods, Accept and Range headers get a spec answer, never a 500 or traceback."""
    treq = api(str(tmp_path_factory.mktemp("hostile")))
    headers = {"Accept": accept, "Range": [range_]} if range_ else {"Accept": accept}
    headers = {k: [v.encode("latin-1", "replace").decode("latin-1") for v in vs] for k, vs in headers.items()}
    # Characters a client cannot put in a URL as they are (controls, '#', spaces, non-ASCII)
    # are percent-encoded, as a client would; '%' stays, so raw encodings reach the server.
    quoted = quote(path.encode("utf-8", "surrogatepass"), safe="/%:@&=+$,;!~*'()")
    check_response(treq, method, "http://r/v2/" + quoted, headers)


@SETTINGS
@given(name=st.text(max_size=80), ref=st.text(max_size=80))
def test_parsers_accept_or_refuse_cleanly(name: str, ref: str) -> None:
    """The name and reference parsers either accept or raise their own errors, nothing else."""
    try:
        image = parse_name(name)
        assert all(p and "\x00" not in p and "/" not in p for p in image.packages)
    except NameInvalid:
        pass
    try:
        parse_reference(ref)
    except ReferenceInvalid:
        pass
    try:
        parse_digest(ref)
    except DigestInvalid:
        pass


@SETTINGS
@given(key=st.text(max_size=90))
def test_no_key_escapes_the_store(tmp_path_factory: Any, key: str) -> None:
    """Every key the filesystem backend accepts names a file inside its root."""
    root = str(tmp_path_factory.getbasetemp() / "fsroot")
    if "fs" not in _api:
        _api["fs"] = FilesystemStorage(root, inline)  # type: ignore[assignment]
    try:
        check_key(key)
    except ValueError:
        return
    resolved = os.path.realpath(os.path.join(root, key))
    assert resolved.startswith(os.path.realpath(root) + os.sep)
