"""The look every page shares (the index, the image pages, error pages): one layout, one
style sheet, a favicon, and a way home. Everything put into a page goes through ``e``. Pure."""
from __future__ import annotations

import colorsys
import html

FAVICON = (
    "data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16'%3E"
    "%3Crect width='16' height='16' rx='3' fill='%235277c3'/%3E"
    "%3Cpath d='M4 12V4l8 8V4' stroke='white' stroke-width='2' fill='none'/%3E%3C/svg%3E"
)
STYLE = """
body { font-family: system-ui, sans-serif; max-width: 72em; margin: 0 auto; padding: 0 1em 2em;
  color: #1d2430; line-height: 1.45; }
header { display: flex; align-items: baseline; gap: 1em; border-bottom: 2px solid #5277c3;
  padding: 0.8em 0; margin-bottom: 1em; }
header a.home { font-weight: bold; font-size: 1.3em; color: #5277c3; text-decoration: none; }
header nav a { margin-right: 1em; }
h1 { font-size: 1.6em; margin: 0.4em 0; } h2 { font-size: 1.2em; margin-top: 1.6em; }
code, pre { background: #f3f5f8; border-radius: 3px; }
code { padding: 0.1em 0.3em; }
pre { padding: 0.6em 0.8em; white-space: pre-wrap; overflow-wrap: anywhere; }
table { border-collapse: collapse; width: 100%; }
td, th { border-bottom: 1px solid #dde3ea; padding: 0.3em 0.5em; text-align: left; vertical-align: top; }
.reason { color: #a4161a; font-weight: bold; overflow-wrap: anywhere; }
.fix { background: #fff6d6; border-left: 4px solid #e0b000; padding: 0.5em 0.8em; }
.note { color: #5a6472; }
.paths { font-family: monospace; font-size: 0.85em; overflow-wrap: anywhere; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.4em; vertical-align: middle; }
details summary { cursor: pointer; }
"""


def e(value: object) -> str:
    """``value`` as text in HTML, markup escaped."""
    return html.escape(str(value), quote=True)


def layout(title: str, body: str, *, refresh: int | None = None) -> bytes:
    """A whole page: ``title`` is text (escaped here), ``body`` is HTML already escaped."""
    meta = f'<meta http-equiv="refresh" content="{refresh:d}"/>' if refresh else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"/>{meta}
<meta name="viewport" content="width=device-width, initial-scale=1"/>
<title>{e(title)}</title><link rel="icon" href="{FAVICON}"/><style>{STYLE}</style></head>
<body><header><a class="home" href="/">nixeryd</a>
<nav><a href="/">images</a><a href="/docs/index.html">docs</a><a href="/metrics">metrics</a></nav>
</header>
{body}
</body></html>
""".encode()


def error_page(status: int, message: str) -> bytes:
    """A registry error as a page for a browser, with the way back."""
    first, _, rest = message.partition("\n")
    more = f"<pre>{e(rest)}</pre>" if rest.strip() else ""
    return layout(f"{status} - nixeryd", f'<h1>{status}</h1><p class="reason">{e(first)}</p>{more}'
                  '<p><a href="/">Back to the index</a></p>')


def layer_colour(index: int) -> str:
    """A colour of its own for layer ``index`` (``#rrggbb``): hues a golden angle apart,
    in three lightnesses, so that neighbours differ and no two of an image's layers (at
    most 125) share a colour."""
    hue = (index * 137.508) % 360 / 360
    lightness = (0.42, 0.56, 0.68)[index % 3]
    red, green, blue = colorsys.hls_to_rgb(hue, lightness, 0.62)
    return f"#{round(red * 255):02x}{round(green * 255):02x}{round(blue * 255):02x}"


def wants_html(accept: set[str]) -> bool:
    """Whether a client that sent these Accept types is a browser, to be answered with a
    page rather than JSON."""
    return "text/html" in accept and "application/json" not in accept


def pull_commands(host: str, secure: bool, name: str = "shell/git/htop") -> list[str]:
    """Commands that work as printed against this instance: plain HTTP needs podman's and
    skopeo's --tls-verify=false."""
    if secure:
        return [f"docker pull {host}/{name}", f"podman pull {host}/{name}",
                f"skopeo copy docker://{host}/{name} oci:image:latest"]
    return [f"docker pull {host}/{name}", f"podman pull --tls-verify=false {host}/{name}",
            f"skopeo copy --src-tls-verify=false docker://{host}/{name} oci:image:latest"]
