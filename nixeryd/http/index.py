"""The index page: how to pull from this instance (commands that work as printed), what it
builds from and stores in, the images built, what is building now (with the tail of each
build's log) and what failed lately, once per image with its reason first.

Without credentials where access control is on, it shows how to pull and nothing about
images, package sets or build logs."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Mapping, Sequence
from urllib.parse import quote

from nixeryd.http.look import e, layout, pull_commands
from nixeryd.ops.activity import BuildFailure
from nixeryd.storage.interface import StorageError

MAX_LISTED = 200
"""Most images listed by name; the catalogue API pages through the rest."""
NOISE = re.compile(
    r"^(trace: nixeryd-|warning: (error: )?unable to download|warning: ignoring substitute|"
    r"copying path '.*' from '|querying info about|don't know how to build these paths)"
)
"""Lines of a build's log that are not the build: nixeryd's own markers, and Nix asking
binary caches that do not answer."""
SOURCE_FIX = (
    "Choose a package set this host can fetch: NIXERY_CHANNEL (a channel or a nixpkgs commit, fetched "
    "from NIXERY_CHANNEL_URL, which can name an internal mirror), NIXERY_PKGS_REPO (a git repository), "
    "NIXERY_PKGS_FLAKE (a flake) or NIXERY_PKGS_PATH (a directory on this host), then restart nixeryd."
)


@dataclass(frozen=True)
class Status:
    """What the index page shows, read when the page is rendered."""

    source: str
    active: Callable[[], Mapping[str, float]]
    failures: Callable[[], Sequence[BuildFailure]]
    tail: Callable[[str], list[str]]
    now: Callable[[], float]
    storage: str = ""
    listen: str = ""
    catalogue: Callable[[], Awaitable[list[str]]] | None = None


def _docker_note(host: str, secure: bool) -> str:
    if secure:
        return ""
    return ('<p class="note">This instance speaks plain HTTP. Docker pulls from loopback addresses as it is; '
            'for any other address, list it in <code>/etc/docker/daemon.json</code> and restart dockerd: '
            f'<code>{{ "insecure-registries": ["{e(host)}"] }}</code>. containerd\'s <code>ctr</code> takes '
            '<code>--plain-http</code>.</p>')


def _clean(lines: Sequence[str]) -> list[str]:
    return [line for line in lines if not NOISE.match(line)]


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def _failures(failures: Sequence[BuildFailure]) -> str:
    """Each image once, its latest failure, the reason first and the log folded away."""
    latest: dict[str, BuildFailure] = {}
    for failure in failures:
        latest[failure.image] = failure
    if not latest:
        return "<p>None.</p>"
    items = []
    for failure in sorted(latest.values(), key=lambda f: f.when, reverse=True):
        summary = failure.summary or failure.message.split("\n", 1)[0]
        details = _clean(failure.message.split("\n"))
        rest = "\n".join(line for line in details if line.strip() != summary.strip())
        more = f"<details><summary>more</summary><pre>{e(rest)}</pre></details>" if rest.strip() else ""
        items.append(f'<li><code>{e(failure.image)}</code> at {e(failure.tag)}, {e(_when(failure.when))}'
                     f'<div class="reason">{e(summary)}</div>{more}</li>')
    return "<ul>" + "".join(items) + "</ul>"


def _source_problem(failures: Sequence[BuildFailure]) -> str:
    """What the page says first when the latest build could not load the package set."""
    for failure in reversed(failures):
        if failure.kind == "source":
            return (f'<div class="fix"><p class="reason">{e(failure.summary)}</p>'
                    f"<p>{e(SOURCE_FIX)}</p></div>")
        if failure.kind != "not_found":
            return ""
    return ""


async def render_index(status: Status, host: str, *, secure: bool, full: bool) -> bytes:
    """The page for a client that named ``host``; ``full`` when it may see what is built."""
    commands = "\n".join(e(c) for c in pull_commands(host, secure))
    parts = [
        f"<h1>nixeryd on {e(host)}</h1>",
        "<p>Images are built on demand with Nix: every component of an image's name is a package. "
        "At the front of the name, in any order:</p><ul>"
        "<li><code>shell</code> adds bash, coreutils, moreutils and nano, and runs bash;</li>"
        "<li><code>arm64</code> builds for 64-bit ARM;</li>"
        "<li><code>nonroot</code> runs as user and group <code>nonroot</code> (65532:65532), with a home "
        "of its own;</li><li><code>run</code> runs the first package's main program "
        "(its <code>meta.mainProgram</code>).</li></ul>",
        f"<pre>{commands}</pre>",
        _docker_note(host, secure),
    ]
    active = sorted(status.active().items(), key=lambda item: item[1]) if full else []
    if not full:
        parts.append('<p class="note">This registry asks for credentials: images, package sets and build '
                     "logs are shown to clients that give them.</p>")
        return layout(f"nixeryd on {host}", "\n".join(parts))
    failures = list(status.failures())
    parts.insert(1, _source_problem(failures))
    parts.append("<h2>Package set and storage</h2>"
                 f"<p>Package set: {e(status.source)}<br/>Storage: {e(status.storage)}<br/>"
                 f"Listening on: {e(status.listen)}<br/><a href=\"/metrics\">Metrics</a> (Prometheus)</p>")
    try:
        names = await status.catalogue() if status.catalogue is not None else []
    except StorageError:
        names = []
        parts.append('<p class="reason">Storage cannot be reached: the images built are not listed.</p>')
    listed = "".join(f'<li><a href="/image/{quote(n, safe="/")}">{e(n)}</a></li>' for n in names[:MAX_LISTED])
    more = f'<p class="note">and {len(names) - MAX_LISTED} more (<code>/v2/_catalog</code>).</p>' \
        if len(names) > MAX_LISTED else ""
    parts.append(f"<h2>Images built</h2>{'<ul>' + listed + '</ul>' if names else '<p>None yet.</p>'}{more}")
    parts.append("<h2>Building now</h2>")
    if not active:
        parts.append("<p>Nothing.</p>")
    else:
        now = status.now()
        items = []
        for label, started in active:
            lines = _clean(status.tail(label))
            log = f"<pre>{e(chr(10).join(lines))}</pre>" if lines else ""
            items.append(f"<li><code>{e(label)}</code> for {now - started:.0f} s{log}</li>")
        parts.append("<ul>" + "".join(items) + "</ul>")
    parts.append("<h2>Recent build failures</h2>" + _failures(failures))
    # Reloaded while something is building, to follow its log; left alone otherwise.
    return layout(f"nixeryd on {host}", "\n".join(parts), refresh=5 if active else None)
