"""The documentation book (``docs/``, built by ``make install`` with MkDocs), served under
``/docs/`` by every instance as static files: no directory listings, nothing outside the
book's directory (Twisted's ``File`` refuses ``..``)."""
from __future__ import annotations

import sys
from pathlib import Path

from twisted.web import resource, static


def book_directory() -> str | None:
    """Where the built book is: ``build/docs`` of the checkout nixeryd runs from, else
    ``share/nixeryd/docs`` of the environment it is installed into (the container image's);
    None when it was not built."""
    for candidate in (Path(__file__).resolve().parent.parent.parent / "build" / "docs",
                      Path(sys.prefix) / "share" / "nixeryd" / "docs"):
        if (candidate / "index.html").is_file():
            return str(candidate)
    return None


class Book(static.File):
    """The book's files; a directory without an index is not found, never listed (what
    is below it is a ``Book`` too: ``File`` makes its children of its own class)."""

    def directoryListing(self) -> resource.Resource:
        return resource.NoResource()


def not_built() -> resource.Resource:
    return resource.ErrorPage(404, "Not Found", "The documentation book was not built here: make install builds it.")


def book(directory: str | None) -> resource.Resource:
    """The book in ``directory`` (``book_directory()``'s), or a page saying it was not built."""
    return Book(directory, defaultType="application/octet-stream") if directory else not_built()
