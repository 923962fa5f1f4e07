"""The documentation book (docs/, MkDocs): it builds without a warning, every link and
anchor in it leads somewhere, every setting the code reads is in it, and every instance
serves it under /docs/, read by headless Chromium as a reader would."""
from __future__ import annotations

import posixpath
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlsplit

import pytest
from PIL import Image

from nixeryd.settings import READABLE
from tests.daemon import ROOT, Daemon, daemon_environment
from tests.test_pages import chromium
from tests.test_settings import read_in_code


class Anchors(HTMLParser):
    """The ids and the links of one page."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if found.get("id"):
            self.ids.add(str(found["id"]))
        if tag == "a" and found.get("href"):
            self.links.append(str(found["href"]))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The book, built as `make install` builds it (strict: a warning fails it)."""
    out = tmp_path_factory.mktemp("site")
    built = subprocess.run([str(ROOT / ".venv" / "bin" / "mkdocs"), "build", "--strict", "--site-dir", str(out)],
                           cwd=ROOT, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    return out


def pages(site: Path) -> dict[str, Anchors]:
    found = {}
    for path in site.rglob("*.html"):
        parsed = Anchors()
        parsed.feed(path.read_text())
        found[path.relative_to(site).as_posix()] = parsed
    return found


def test_every_page_the_book_promises_is_there(site: Path) -> None:
    for name in ("index", "getting-started", "images", "caching", "package-sources", "clients", "running",
                 "storage", "security", "operations", "settings"):
        assert (site / f"{name}.html").is_file(), name


def test_every_link_and_anchor_leads_somewhere(site: Path) -> None:
    book = pages(site)
    checked = 0
    for name, page in book.items():
        for link in page.links:
            parts = urlsplit(link)
            if parts.scheme or parts.netloc:
                continue  # another site
            path = unquote(parts.path)
            if path.startswith("/"):
                # The instance's own pages (/, /metrics) and the book as an instance serves it.
                assert path in ("/", "/metrics") or path.startswith("/docs/"), (name, link)
                if not path.startswith("/docs/"):
                    continue
                target = path.removeprefix("/docs/") or "index.html"
            else:
                target = posixpath.normpath(posixpath.join(posixpath.dirname(name), path)) if path else name
            assert target in book, (name, link)
            if parts.fragment:
                assert parts.fragment in book[target].ids, (name, link)
            checked += 1
    assert checked > 100


def test_every_setting_the_code_reads_is_in_the_book(site: Path) -> None:
    text = (site / "settings.html").read_text()
    for name in (READABLE | read_in_code()) - {"LISTEN_FDS"}:
        assert f"<code>{name}</code>" in text, name


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    storage = tmp_path_factory.mktemp("storage")
    started = Daemon(storage, daemon_environment(storage)).start()
    yield started
    started.stop()


def test_every_instance_serves_the_book(daemon: Daemon) -> None:
    status, headers, body = daemon.request("/docs/")
    assert status == 200 and headers["Content-Type"].startswith("text/html"), body[:200]
    assert b"What nixeryd is" in body
    status, _, body = daemon.request("/docs/settings.html")
    assert status == 200 and b"<code>NIXERY_CHANNEL</code>" in body
    assert daemon.request("/docs/settings.html", method="HEAD")[0] == 200
    # Linked from every page of the instance.
    assert b'href="/docs/index.html"' in daemon.request("/", headers={"Accept": "text/html"})[2]
    for outside in ("/docs/../../../../etc/passwd", "/docs/%2e%2e/%2e%2e/etc/passwd", "/docs/nothing.html"):
        status, _, body = daemon.request(outside)
        assert status == 404 and b"root:" not in body, outside


def test_a_reader_sees_the_navigation_the_title_and_the_code(daemon: Daemon, tmp_path: Path) -> None:
    """Headless Chromium on a page an instance serves: the book's navigation, the page's
    title, a code block, and a screenshot that shows a page (not a blank)."""
    url = f"{daemon.url}/docs/getting-started.html"
    dom = chromium(url, tmp_path, "--dump-dom").stdout
    assert "<title>Getting started - nixeryd</title>" in dom
    assert 'aria-label="the book"' in dom and ">How an image is made</a>" in dom and ">Settings</a>" in dom
    assert 'class="current" aria-current="page">Getting started</a>' in dom
    assert "<pre><code>" in dom and "make serve" in dom
    shot = tmp_path / "book.png"
    chromium(url, tmp_path, f"--screenshot={shot}", "--window-size=1100,800")
    with Image.open(shot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 20  # text, code blocks, the header's blue


def test_a_directory_of_the_book_is_never_listed(tmp_path: Path) -> None:
    """A directory without an index (at any depth) is not found, not a listing of files."""
    from treq.testing import StubTreq

    from nixeryd.http.book import Book

    (tmp_path / "index.html").write_text("<title>book</title>")
    (tmp_path / "assets" / "deeper").mkdir(parents=True)
    (tmp_path / "assets" / "deeper" / "secret-name.txt").write_text("x")
    treq = StubTreq(Book(str(tmp_path)))
    for path in ("/assets/", "/assets/deeper/"):
        response = treq.get("http://book" + path)
        answered: list[object] = []
        response.addCallback(answered.append)
        treq.flush()
        (got,) = answered
        assert got.code == 404, path  # type: ignore[attr-defined]
        body: list[bytes] = []
        got.content().addCallback(body.append)  # type: ignore[attr-defined]
        treq.flush()
        assert b"secret-name" not in body[0]
