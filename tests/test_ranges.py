"""How a Range header on a blob is answered, as Go's ServeContent (and so distribution)
answers it."""
from __future__ import annotations

import http.client
import json

import pytest

from nixeryd.http.ranges import NONE, PARTS, WHOLE, range_answer
from tests.daemon import Daemon, daemon_fixture


@pytest.mark.parametrize(("header", "answer"), [
    (None, WHOLE),
    (b"bytes=0-9", PARTS),
    (b"bytes=-10", PARTS),
    (b"bytes=50-", PARTS),
    (b"bytes=100-200", NONE),
    (b"bytes=0-99", PARTS),
    (b"bytes=0-49,50-99", PARTS),
    (b"bytes=0-99,0-99", WHOLE),  # more than the blob
    (b"bytes=0-10,5-15", WHOLE),  # overlapping
    (b"bytes=90-95,-8", WHOLE),  # a suffix overlapping a range
    (b"bytes=0-10,11-20", PARTS),  # adjacent, not overlapping
    (b"bytes=-5,0-4", PARTS),
    (b"items=0-1", WHOLE),
    (b"bytes=a-b", WHOLE),
    (b"bytes=0-" + b"9" * 5000, WHOLE),  # past what int() reads: never a 500
    (b"bytes=" + b"1" * 19 + b"-", WHOLE),
    (b"bytes=-" + b"9" * 4400, WHOLE),
])
def test_range_answers(header: bytes | None, answer: str) -> None:
    assert range_answer(header, 100) == answer


daemon = daemon_fixture()


def answer(daemon: Daemon, method: str, path: str, range_: str) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60)
    try:
        connection.request(method, path, headers={"Range": range_})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


@pytest.mark.parametrize("range_", ["bytes=0-9", "bytes=0-9,20-29", "bytes=-5", "bytes=100000-", "bytes=0-5,3-8"])
def test_head_answers_as_get_does(daemon: Daemon, range_: str) -> None:
    """HEAD with a Range has GET's status, Content-Range and Content-Length, and no body
    (Twisted answered such a HEAD 200)."""
    status, _, body = daemon.request("/v2/hello/manifests/latest")
    digest = json.loads(body)["layers"][0]["digest"]
    path = f"/v2/hello/blobs/{digest}"
    got = answer(daemon, "GET", path, range_)
    head = answer(daemon, "HEAD", path, range_)
    assert head[0] == got[0], (range_, head[0], got[0])
    for header in ("content-range", "content-length"):
        assert head[1].get(header) == got[1].get(header), (range_, header)
    assert head[2] == b""
    if got[0] == 206 and "," not in range_:
        assert len(got[2]) == int(got[1]["content-length"])
