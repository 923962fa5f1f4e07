"""MkDocs hooks for nixeryd's book: the settings table made from nixeryd/settings.py (the
list nixeryd.config reads settings by), and the look of nixeryd's own pages (its style
sheet and favicon, from nixeryd/http/look.py), so the book and the pages are one site."""
from __future__ import annotations

from typing import Any

from nixeryd.http.look import FAVICON, STYLE
from nixeryd.settings import reference

SETTINGS_MARKER = "<!-- the settings table: made when the book is built, from nixeryd/settings.py -->"


def on_config(config: Any) -> Any:
    config.extra["favicon"] = FAVICON
    config.extra["style"] = STYLE
    return config


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if SETTINGS_MARKER in markdown:
        return markdown.replace(SETTINGS_MARKER, reference())
    return markdown
