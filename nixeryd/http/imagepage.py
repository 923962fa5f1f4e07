"""The image page, ``/image/<name>``: what an image holds, for people who would rather
look than read. HTML with an SVG bar of layer sizes (no JavaScript), or the same data
as JSON for ``Accept: application/json``.

Everything shown is read from what nixeryd stores: the manifest, the SBOM (packages,
versions, NAR sizes), each layer's entries (listed once, in a thread, and remembered),
and which other images built here share a layer.
"""
from __future__ import annotations

import io
import json
import tarfile
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import quote

from nixeryd.core.offload import Offload
from nixeryd.http.look import e, layer_colour, layout, pull_commands
from nixeryd.image.manifest import ImageManifests
from nixeryd.image.names import ImageSpec
from nixeryd.registry.images import Images
from nixeryd.storage.interface import InMemory, IStorage, LocalFile
from nixeryd.storage.records import blob_key

MAX_LISTINGS = 2000
SOURCE_LABEL = "org.opencontainers.image.source"
REVISION_LABEL = "org.opencontainers.image.revision"


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _store_paths(data: bytes | None, path: str | None) -> list[str] | None:
    """Blocking: the store paths a layer archive holds (none for the symlink layer), gzip
    or zstd; None for what cannot be read as one."""
    import zstandard

    found: set[str] = set()
    with (open(path, "rb") if path else io.BytesIO(data or b"")) as raw:
        zstd = raw.read(4) == ZSTD_MAGIC
        raw.seek(0)
        stream: Any = zstandard.ZstdDecompressor().stream_reader(raw) if zstd else raw
        try:
            with tarfile.open(fileobj=stream, mode="r|" if zstd else "r:*") as tar:
                for member in tar:
                    parts = member.name.split("/")
                    if len(parts) >= 3 and parts[0] == "nix" and parts[1] == "store" and parts[2]:
                        found.add("/nix/store/" + parts[2])
        except (tarfile.TarError, zstandard.ZstdError, OSError, EOFError):
            return None
    return sorted(found)


class ImagePages:
    def __init__(self, images: Images, storage: IStorage, offload: Offload, *, signing: bool = False) -> None:
        self._images = images
        self._storage = storage
        self._offload = offload
        self._signing = signing
        self._listings: OrderedDict[str, list[str] | None] = OrderedDict()

    async def data(self, image: ImageSpec, manifests: ImageManifests, registry: str,
                   secure: bool = False) -> dict[str, Any]:
        manifest = json.loads(manifests.oci.body)
        layers = []
        for descriptor in manifest["layers"]:
            digest = descriptor["digest"]
            layers.append({
                "digest": digest,
                "size": descriptor["size"],
                "store_paths": await self._paths(digest),
                "shared_with": sorted(set(self._images.served.layer_users(digest)) - {image.spelling}),
            })
        packages, closure_size = await self._packages(manifests)
        labels = await self._labels(manifest)
        return {
            "name": image.name,
            "digest": manifests.oci.digest,
            "docker_digest": manifests.docker.digest if manifests.docker else None,
            "sbom": manifests.sbom.digest if manifests.sbom else None,
            "signature_tag": manifests.oci.digest.replace(":", "-") + ".sig" if self._signing else None,
            "built": self._images.served.built_at(manifests.oci.digest),
            "source": labels.get(SOURCE_LABEL),
            "revision": labels.get(REVISION_LABEL),
            "packages": packages,
            "closure_size": closure_size,
            "layers": layers,
            "pull": pull_commands(registry, secure, image.name),
        }

    async def _labels(self, manifest: dict[str, Any]) -> dict[str, str]:
        config = manifest.get("config") or {}
        data = await self._storage.get(blob_key(str(config.get("digest", ""))))
        try:
            labels = json.loads(data or b"{}").get("config", {}).get("Labels") or {}
        except ValueError:
            return {}
        return {str(k): str(v) for k, v in labels.items()}

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
        try:
            (layer,) = json.loads(manifests.sbom.body)["layers"]
            data = await self._storage.get(blob_key(str(layer["digest"])))
        except (ValueError, KeyError, TypeError):
            return [], 0
        if data is None:
            return [], 0
        try:
            document = await self._offload(json.loads, data)  # thousands of packages: not on the reactor
            named = {r["relatedSpdxElement"] for r in document.get("relationships", [])
                     if r.get("relationshipType") == "DESCRIBES"}
            packages, total = [], 0
            for package in document["packages"]:
                comment = str(package.get("comment", ""))
                size = int(comment.rsplit("NAR size ", 1)[1].split()[0]) if "NAR size " in comment else 0
                total += size
                packages.append({"name": str(package["name"]), "version": str(package["versionInfo"]),
                                 "nar_size": size, "store_path": comment.split(";")[0].removeprefix("store path "),
                                 "named": package.get("SPDXID") in named})
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            return [], 0  # not the document nixeryd writes: shown as no packages, never a 500
        return sorted(packages, key=lambda p: (not p["named"], p["name"], p["version"])), total


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
    # Each layer gets its share of the bar, but never less than 1%: a tiny layer stays visible.
    floor = 10.0
    room = 1000 - floor * len(data["layers"])
    total = sum(layer["size"] for layer in data["layers"]) or 1
    x = 0.0
    bars = []
    for i, layer in enumerate(data["layers"]):
        width = floor + room * layer["size"] / total
        bars.append(f'<rect class="layer" x="{x:.2f}" y="0" width="{max(width, 1):.2f}" height="40" '
                    f'fill="{layer_colour(i)}"><title>layer {i + 1}: {e(_size(layer["size"]))}</title></rect>')
        x += width
    rows = []
    for i, layer in enumerate(data["layers"]):
        paths = layer["store_paths"]
        held = ("the symlinks that make /bin and the rest" if paths == [] else
                "not listed (in the bucket)" if paths is None else "<br/>".join(e(p) for p in paths))
        shared = ", ".join(f'<a href="/image/{quote(n, safe="/")}">{e(n)}</a>' for n in layer["shared_with"]) \
            or "no other image built here"
        rows.append(f'<tr><td><span class="swatch" style="background:{layer_colour(i)}"></span>'
                    f'{i + 1}</td><td>{e(_size(layer["size"]))}</td><td><code>{e(layer["digest"][:19])}…'
                    f'</code></td><td class="paths">{held}</td><td>{shared}</td></tr>')
    packages = "".join(
        f'<tr><td>{e(p["name"])}</td><td>{e(p["version"])}</td><td>{e(_size(p["nar_size"]))}</td>'
        f'<td>{"asked for" if p["named"] else "dependency"}</td></tr>' for p in data["packages"])
    named = sum(1 for p in data["packages"] if p["named"])
    pull = "\n".join(e(c) for c in data["pull"])
    built = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(data["built"])) if data["built"] else "unknown"
    origin = e(data["source"] or "a package set on the build host")
    if data["revision"]:
        origin += f" at revision <code>{e(data['revision'])}</code>"
    signature = (f"<br/>signature tag <code>{e(data['signature_tag'])}</code>" if data["signature_tag"] else "")
    body = f"""<h1>{e(data["name"])}</h1>
<p>Built {e(built)} from {origin}.<br/>
{named} packages asked for and {len(data["packages"]) - named} dependencies, {e(_size(data["closure_size"]))}
unpacked, in {len(data["layers"])} layers ({e(_size(sum(layer["size"] for layer in data["layers"])))} compressed).</p>
<pre>{pull}</pre>
<h2>Layers</h2>
<svg id="layers" viewBox="0 0 1000 40" preserveAspectRatio="none" width="100%" height="40" role="img"
 aria-label="layer sizes">{"".join(bars)}</svg>
<table><tr><th>layer</th><th>size</th><th>digest</th><th>store paths</th><th>shared with</th></tr>
{"".join(rows)}</table>
<h2>Packages</h2>
<p class="note">"Asked for": the packages the name names, with those its meta-packages and the base packages
add; the rest are what they depend on.</p>
<table><tr><th>name</th><th>version</th><th>NAR size</th><th></th></tr>{packages}</table>
<h2>Digests</h2>
<p>manifest <code>{e(data["digest"])}</code><br/>SBOM (SPDX, through the referrers API)
<code>{e(data["sbom"] or "none")}</code>{signature}</p>
"""
    return layout(f"{data['name']} - nixeryd", body)
