"""The image page, ``/image/<name>``: what an image holds, for people who would rather
look than read. HTML with an SVG bar of layer sizes (no JavaScript), or the same data
as JSON for ``Accept: application/json``.

Everything shown is read from what nixeryd stores: the manifest, the SBOM (packages,
versions, NAR sizes), each layer's entries (listed once, in a thread, and remembered),
and which other images built here share a layer.
"""
from __future__ import annotations

import html
import io
import json
import tarfile
from collections import OrderedDict
from typing import Any

from nixeryd.images import Images
from nixeryd.manifest import ImageManifests
from nixeryd.names import Image
from nixeryd.offload import Offload
from nixeryd.storage.interface import InMemory, IStorage, LocalFile

MAX_LISTINGS = 2000
COLOURS = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7")


def _store_paths(data: bytes | None, path: str | None) -> list[str]:
    """Blocking: the store paths a layer archive holds (none for the symlink layer)."""
    found: set[str] = set()
    source = tarfile.open(path, mode="r:*") if path else tarfile.open(fileobj=io.BytesIO(data or b""), mode="r:*")
    with source as tar:
        for member in tar:
            parts = member.name.split("/")
            if len(parts) >= 3 and parts[0] == "nix" and parts[1] == "store" and parts[2]:
                found.add("/nix/store/" + parts[2])
    return sorted(found)


class ImagePages:
    def __init__(self, images: Images, storage: IStorage, offload: Offload) -> None:
        self._images = images
        self._storage = storage
        self._offload = offload
        self._listings: OrderedDict[str, list[str] | None] = OrderedDict()

    async def data(self, image: Image, manifests: ImageManifests, registry: str) -> dict[str, Any]:
        manifest = json.loads(manifests.oci.body)
        layers = []
        for descriptor in manifest["layers"]:
            digest = descriptor["digest"]
            layers.append({
                "digest": digest,
                "size": descriptor["size"],
                "store_paths": await self._paths(digest),
                "shared_with": sorted(set(self._images.layer_users(digest)) - {image.name}),
            })
        packages, closure_size = await self._packages(manifests)
        return {
            "name": image.name,
            "digest": manifests.oci.digest,
            "docker_digest": manifests.docker.digest if manifests.docker else None,
            "sbom": manifests.sbom.digest if manifests.sbom else None,
            "signature_tag": manifests.oci.digest.replace(":", "-") + ".sig",
            "packages": packages,
            "closure_size": closure_size,
            "layers": layers,
            "pull": [f"docker pull {registry}/{image.name}", f"podman pull {registry}/{image.name}",
                     f"skopeo copy docker://{registry}/{image.name} oci:image"],
        }

    async def _paths(self, digest: str) -> list[str] | None:
        if digest in self._listings:
            return self._listings[digest]
        location = await self._storage.locate_blob(digest.removeprefix("sha256:"))
        paths: list[str] | None = None
        if isinstance(location, LocalFile):
            paths = await self._offload(_store_paths, None, location.path)
        elif isinstance(location, InMemory):
            paths = await self._offload(_store_paths, location.data, None)
        self._listings[digest] = paths  # a bucket's layers are not downloaded to list them
        while len(self._listings) > MAX_LISTINGS:
            self._listings.popitem(last=False)
        return paths

    async def _packages(self, manifests: ImageManifests) -> tuple[list[dict[str, Any]], int]:
        if manifests.sbom is None:
            return [], 0
        (layer,) = json.loads(manifests.sbom.body)["layers"]
        data = await self._storage.get("layers/" + layer["digest"].removeprefix("sha256:"))
        if data is None:
            return [], 0
        document = json.loads(data)
        packages, total = [], 0
        for package in document["packages"]:
            comment = package.get("comment", "")
            size = int(comment.rsplit("NAR size ", 1)[1].split()[0]) if "NAR size " in comment else 0
            total += size
            packages.append({"name": package["name"], "version": package["versionInfo"], "nar_size": size,
                             "store_path": comment.split(";")[0].removeprefix("store path ")})
        return sorted(packages, key=lambda p: (p["name"], p["version"])), total


def _size(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    value = float(n)
    for unit in ("KB", "MB", "GB"):
        value /= 1000
        if value < 1000 or unit == "GB":
            break
    return f"{value:.1f} {unit}"


def render(data: dict[str, Any]) -> bytes:
    """The page, every value escaped."""
    e = html.escape
    # Each layer gets its share of the bar, but never less than 1%: a tiny layer stays visible.
    floor = 10.0
    room = 1000 - floor * len(data["layers"])
    total = sum(layer["size"] for layer in data["layers"]) or 1
    x = 0.0
    bars = []
    for i, layer in enumerate(data["layers"]):
        width = floor + room * layer["size"] / total
        bars.append(f'<rect class="layer" x="{x:.2f}" y="0" width="{max(width, 1):.2f}" height="40" '
                    f'fill="{COLOURS[i % len(COLOURS)]}"><title>layer {i + 1}: {e(_size(layer["size"]))}'
                    f'</title></rect>')
        x += width
    rows = []
    for i, layer in enumerate(data["layers"]):
        paths = layer["store_paths"]
        held = ("the symlinks that make /bin and the rest" if paths == [] else
                "not listed (in the bucket)" if paths is None else "<br/>".join(e(p) for p in paths))
        shared = ", ".join(e(n) for n in layer["shared_with"]) or "no other image built here"
        rows.append(f'<tr><td><span class="swatch" style="background:{COLOURS[i % len(COLOURS)]}"></span>'
                    f'{i + 1}</td><td>{e(_size(layer["size"]))}</td><td><code>{e(layer["digest"][:19])}…'
                    f'</code></td><td class="paths">{held}</td><td>{shared}</td></tr>')
    packages = "".join(f'<tr><td>{e(p["name"])}</td><td>{e(p["version"])}</td><td>{e(_size(p["nar_size"]))}</td></tr>'
                       for p in data["packages"])
    pull = "\n".join(e(c) for c in data["pull"])
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"/><title>{e(data["name"])} - nixeryd</title>
<style>
body {{ font-family: sans-serif; max-width: 70em; margin: 2em auto; padding: 0 1em; }}
code, pre {{ background: #f4f4f4; padding: 0.2em 0.4em; }} pre {{ padding: 0.6em; }}
table {{ border-collapse: collapse; width: 100%; }} td, th {{ border-bottom: 1px solid #ddd; padding: 0.3em;
 text-align: left; vertical-align: top; }} .paths {{ font-family: monospace; font-size: 0.85em; }}
.swatch {{ display: inline-block; width: 0.8em; height: 0.8em; margin-right: 0.4em; }}
</style></head>
<body>
<h1>{e(data["name"])}</h1>
<p>{len(data["packages"])} store paths, {e(_size(data["closure_size"]))} unpacked, in {len(data["layers"])} layers
({e(_size(sum(layer["size"] for layer in data["layers"])))} compressed).</p>
<pre>{pull}</pre>
<h2>Layers</h2>
<svg id="layers" viewBox="0 0 1000 40" preserveAspectRatio="none" width="100%" height="40" role="img"
 aria-label="layer sizes">{"".join(bars)}</svg>
<table><tr><th>layer</th><th>size</th><th>digest</th><th>store paths</th><th>shared with</th></tr>
{"".join(rows)}</table>
<h2>Packages</h2>
<table><tr><th>name</th><th>version</th><th>NAR size</th></tr>{packages}</table>
<h2>Digests</h2>
<p>manifest <code>{e(data["digest"])}</code><br/>SBOM (SPDX, through the referrers API)
<code>{e(data["sbom"] or "none")}</code><br/>signature tag <code>{e(data["signature_tag"])}</code></p>
</body></html>
"""
    return page.encode()
