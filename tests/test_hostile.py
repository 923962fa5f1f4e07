"""Hostile input: whatever a client sends, the answer is a registry error or a
success, never a 500 from our code, never a traceback, never a file outside storage."""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.task import Clock

from nixeryd.build.builder import ImageBuilder
from nixeryd.build.pkgsource import PathSource
from nixeryd.core.offload import inline
from nixeryd.http.registry import RegistryAPI
from nixeryd.image.names import (
    DigestInvalid,
    NameInvalid,
    ReferenceInvalid,
    parse_digest,
    parse_name,
    parse_reference,
)
from nixeryd.registry.images import Images
from nixeryd.storage.filesystem import FilesystemStorage
from nixeryd.storage.interface import check_key
from tests.cooperator import clocked_cooperator
from tests.fakes import FakeNix, make_store
from tests.memory import MemoryStorage
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
    return StubTreq(RegistryAPI(images, storage, ("cacert",)).resource())


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


VALID_KEYS = st.builds(lambda prefix, hexdigest: f"{prefix}/{hexdigest}",
                       st.sampled_from(["layers", "manifests", "builds", "tags"]),
                       st.text("0123456789abcdef", min_size=64, max_size=64))


@st.composite
def near_valid_keys(draw: Any) -> str:
    """A valid key, sometimes with characters a path could abuse put in anywhere."""
    key = draw(VALID_KEYS)
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(key)))
        key = key[:at] + draw(st.sampled_from(["/", "..", "../", ".", "\x00", "\n", "%2e", "~", " "])) + key[at:]
    return key


@SETTINGS
@given(key=st.one_of(near_valid_keys(), st.text(max_size=90)))
def test_no_key_escapes_the_store(tmp_path_factory: Any, key: str) -> None:
    """Every key the filesystem backend accepts names a file directly inside its prefix
    directory under the root; valid keys are accepted, anything else refused."""
    root = os.path.realpath(str(tmp_path_factory.getbasetemp() / "fsroot"))
    try:
        check_key(key)
    except ValueError:
        assert not VALID_KEY_PATTERN.fullmatch(key)
        return
    resolved = os.path.realpath(os.path.join(root, key))
    prefix, name = key.split("/")
    assert resolved == os.path.join(root, prefix, name)
    assert len(name) == 64


VALID_KEY_PATTERN = re.compile(r"(layers|manifests|builds|tags)/[0-9a-f]{64}")


_files: dict[str, Any] = {}


def file_api(tmp_root: str) -> tuple[StubTreq, list[bytes]]:
    """An API on filesystem storage (the backend that honours Range) with one image built;
    its blobs' bytes."""
    if "api" not in _files:
        clock = Clock()
        store = make_store(Path(tmp_root) / "store", DEPENDENCIES)
        storage = FilesystemStorage(str(Path(tmp_root) / "storage"), inline)
        source = PathSource("/srv/pkgs")
        builder = ImageBuilder(nix=FakeNix(store, DEPENDENCIES), storage=storage, offload=inline,
                               source=source, clock=clock, popularity={})
        treq = StubTreq(RegistryAPI(Images(builder, storage, source, clock), storage, ("cacert",)).resource())
        d = treq.get("http://r/v2/alpha/beta/manifests/latest")
        treq.flush()
        manifest = json.loads(bodies_of(treq, d))
        digests = [manifest["config"]["digest"]] + [layer["digest"] for layer in manifest["layers"]]
        blobs = [(Path(tmp_root) / "storage" / "layers" / d.removeprefix("sha256:")).read_bytes() for d in digests]
        _files["api"] = (treq, blobs)
    return _files["api"]  # type: ignore[no-any-return]


def bodies_of(treq: StubTreq, d: Any) -> bytes:
    results: list[Any] = []
    d.addBoth(results.append)
    body_d = results[0].content()
    treq.flush()
    out: list[Any] = []
    body_d.addBoth(out.append)
    assert isinstance(out[0], bytes), out
    return out[0]


positions = st.one_of(st.integers(0, 3000), st.sampled_from([10**20, 2**63]))
one_range = st.one_of(
    st.builds(lambda a, b: f"{a}-{b}", positions, positions),
    st.builds(lambda a: f"{a}-", positions),
    st.builds(lambda n: f"-{n}", positions),
    st.sampled_from(["0-", "-0", "", "-", "a-b", " 0 - 1 ", "0-0"]),
)
range_headers = st.one_of(
    st.lists(one_range, min_size=1, max_size=5).map(lambda rs: "bytes=" + ",".join(rs)),
    st.builds(lambda r, n: "bytes=" + ",".join([r] * n), one_range, st.integers(50, 2000)),
    st.sampled_from(["bytes=", "items=0-1", "bytes 0-1", "bytes=0-1;x"]),
)


@SETTINGS
@given(which=st.integers(0, 10), range_=range_headers, method=st.sampled_from(["GET", "HEAD"]))
def test_ranges_on_stored_blobs(tmp_path_factory: Any, which: int, range_: str, method: str) -> None:
    """Any Range on a real blob on disk: 200 with the blob, a 206 whose parts are the blob's
    bytes and never add up to more than it, or 416; never a 500."""
    assume(len(range_) < 16000)  # longer headers are refused by the HTTP layer (431 in the daemon)
    treq, blobs = file_api(str(tmp_path_factory.mktemp("ranges")))
    blob = blobs[which % len(blobs)]
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    with clocked_cooperator(treq) as pump:
        d = treq.request(method, f"http://r/v2/alpha/blobs/{digest}", headers={"Range": [range_]})
        pump()
        results: list[Any] = []
        d.addBoth(results.append)
        response = results[0]
        # A request past the header size limit is refused before it is a request.
        assume(not hasattr(response, "getTraceback"))
        body_d = response.content()
        pump()
        bodies: list[Any] = []
        body_d.addBoth(bodies.append)
    body = bodies[0]
    assert isinstance(body, bytes), body
    assert response.code in (200, 206, 416), (range_, response.code)
    length = int(response.headers.getRawHeaders("Content-Length", ["-1"])[0])
    if method == "HEAD":
        assert body == b""
    else:
        assert length in (-1, len(body))
    if response.code == 200 and method == "GET":
        assert body == blob
    if response.code == 206:
        assert length <= len(blob) + 64 * 200, (range_, length, len(blob))
        content_range = response.headers.getRawHeaders("Content-Range")
        if content_range and method == "GET":
            start, end = map(int, content_range[0].split(" ")[1].split("/")[0].split("-"))
            assert body == blob[start:end + 1]
