"""The index page: how to pull from this instance, what it builds from, what it
is building now (with the tail of each build's log) and what failed lately."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from twisted.web.iweb import IRequest
from twisted.web.template import Element, Tag, XMLString, flattenString, renderer, tags

from nixeryd.activity import BuildFailure

TEMPLATE = XMLString(
    """<html xmlns:t="http://twistedmatrix.com/ns/twisted.web.template/0.1">
<head>
  <meta charset="utf-8"/>
  <meta http-equiv="refresh" content="5"/>
  <title>nixeryd on <t:transparent t:render="host"/></title>
  <style>
    body { font-family: sans-serif; max-width: 60em; margin: 2em auto; padding: 0 1em; }
    pre, code { background: #f4f4f4; padding: 0.2em 0.4em; }
    pre { padding: 0.6em; overflow-x: auto; }
    .failure { color: #a00; }
  </style>
</head>
<body>
  <h1>nixeryd on <t:transparent t:render="host"/></h1>
  <p>Images are built on demand with Nix: every component of an image's name is
  a package. At the front of the name, in any order:</p>
  <ul>
    <li><code>shell</code> adds bash, coreutils, moreutils and nano, and runs bash;</li>
    <li><code>arm64</code> builds for 64-bit ARM;</li>
    <li><code>nonroot</code> runs as user and group <code>nonroot</code> (65532:65532), with a home of its own;</li>
    <li><code>run</code> runs the first package's main program (its <code>meta.mainProgram</code>).</li>
  </ul>
  <pre t:render="examples"/>
  <h2>Package source</h2>
  <p t:render="source"/>
  <h2>Building now</h2>
  <t:transparent t:render="active"/>
  <h2>Recent build failures</h2>
  <t:transparent t:render="failures"/>
</body>
</html>"""
)


@dataclass(frozen=True)
class Status:
    """What the index page shows, read when the page is rendered."""

    source: str
    active: Callable[[], Mapping[str, float]]
    failures: Callable[[], Sequence[BuildFailure]]
    tail: Callable[[str], list[str]]
    now: Callable[[], float]


class IndexPage(Element):
    loader = TEMPLATE

    def __init__(self, status: Status, host: str) -> None:
        super().__init__()
        self._status = status
        self._host = host

    @renderer
    def host(self, request: Any, tag: Tag) -> str:
        return self._host

    @renderer
    def examples(self, request: Any, tag: Tag) -> Tag:
        return tag(
            f"docker pull {self._host}/shell/git/htop\n"
            f"podman pull {self._host}/shell/git/htop\n"
            f"skopeo copy docker://{self._host}/shell/git/htop oci:git-htop"
        )

    @renderer
    def source(self, request: Any, tag: Tag) -> Tag:
        return tag(self._status.source)

    @renderer
    def active(self, request: Any, tag: Tag) -> Tag:
        builds = sorted(self._status.active().items(), key=lambda item: item[1])
        if not builds:
            return tags.p("Nothing.")
        now = self._status.now()
        items = []
        for label, started in builds:
            lines = self._status.tail(label)
            items.append(tags.li(
                tags.code(label), f" for {now - started:.0f} s",
                tags.pre("\n".join(lines)) if lines else "",
            ))
        return tags.ul(*items)

    @renderer
    def failures(self, request: Any, tag: Tag) -> Tag:
        failures = list(reversed(self._status.failures()))
        if not failures:
            return tags.p("None.")
        return tags.ul(*[
            tags.li(
                tags.code(f.image), f" at {f.tag}, ",
                time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(f.when)),
                tags.pre(f.message, class_="failure"),
            )
            for f in failures
        ])


async def render_index(status: Status, request: IRequest) -> bytes:
    """The page for this request; the host is the one the client used."""
    host = (request.getHeader(b"host") or b"localhost").decode("latin-1")
    html = await flattenString(request, IndexPage(status, host))
    return b"<!DOCTYPE html>\n" + html
