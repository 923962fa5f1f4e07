"""What an image holds, as an SPDX 2.3 document, and the OCI artifact that attaches it
to the image (found through the referrers API). Pure and deterministic: the same image
gives the same document, byte for byte.

Every store path of the closure is a package: its name and version (split as Nix splits
them: the version starts at the first ``-`` followed by a digit), its store path and NAR
size, and for the packages named in the image the licence and homepage ``meta`` gives.
Relationships: the document describes the image's packages; each path depends on the
paths it references.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Mapping, Sequence

from nixeryd.image.layers import PathInfo, package_name
from nixeryd.image.manifest import OCI_MANIFEST

SPDX_TYPE = "application/spdx+json"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY = b"{}"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
CREATED = "1970-01-01T00:00:01Z"
SBOM_FILE = "sbom.spdx.json"
_VERSION = re.compile(r"-(?=[0-9])")


def split_name(store_path: str) -> tuple[str, str]:
    """``/nix/store/<hash>-openssl-3.0.12`` -> ``("openssl", "3.0.12")``."""
    name = package_name(store_path)
    parts = _VERSION.split(name, maxsplit=1)
    return (parts[0], parts[1]) if len(parts) == 2 else (name, "")


def _spdx_id(store_path: str) -> str:
    return "SPDXRef-" + re.sub(r"[^A-Za-z0-9.-]", "-", store_path.rstrip("/").rsplit("/", 1)[-1])


def document(image_name: str, manifest_digest: str, roots: Sequence[str],
             closure: Mapping[str, PathInfo], meta: Mapping[str, Mapping[str, Any]]) -> bytes:
    """The SPDX document of an image; ``meta`` is store path -> {"license", "homepage"}."""
    packages = []
    for path in sorted(closure):
        name, version = split_name(path)
        info = meta.get(path, {})
        license_id = info.get("license") if isinstance(info.get("license"), str) else None
        package: dict[str, Any] = {
            "SPDXID": _spdx_id(path),
            "name": name,
            "versionInfo": version or "NOASSERTION",
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": False,
            "licenseConcluded": "NOASSERTION",
            "licenseDeclared": license_id or "NOASSERTION",
            "copyrightText": "NOASSERTION",
            "comment": f"store path {path}; NAR size {closure[path].nar_size} bytes",
            "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                              "referenceLocator": f"pkg:nix/{name}@{version or 'unknown'}"}],
        }
        if isinstance(info.get("homepage"), str):
            package["homepage"] = info["homepage"]
        packages.append(package)
    relationships = [{"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
                      "relatedSpdxElement": _spdx_id(root)} for root in sorted(set(roots))]
    for path in sorted(closure):
        for reference in closure[path].references:
            if reference != path and reference in closure:
                relationships.append({"spdxElementId": _spdx_id(path), "relationshipType": "DEPENDS_ON",
                                      "relatedSpdxElement": _spdx_id(reference)})
    doc = {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": image_name,
        "documentNamespace": f"urn:nixeryd:sbom:{manifest_digest}",
        "creationInfo": {"created": CREATED, "creators": ["Tool: nixeryd"]},
        "packages": packages,
        "relationships": relationships,
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _descriptor(media_type: str, data: bytes) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": "sha256:" + hashlib.sha256(data).hexdigest(), "size": len(data)}


def artifact_manifest(sbom: bytes, subject: bytes) -> bytes:
    """The OCI artifact manifest attaching ``sbom`` to the image manifest ``subject``."""
    return json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": SPDX_TYPE,
        "config": _descriptor(EMPTY_TYPE, EMPTY),
        # The title is the file name ORAS clients save the document as.
        "layers": [{**_descriptor(SPDX_TYPE, sbom), "annotations": {"org.opencontainers.image.title": SBOM_FILE}}],
        "subject": _descriptor(OCI_MANIFEST, subject),
    }, sort_keys=True, separators=(",", ":")).encode()


def referrers_index(entries: Sequence[tuple[bytes, str]]) -> bytes:
    """The referrers API's answer: an index of (manifest bytes, artifact type)."""
    return json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{**_descriptor(OCI_MANIFEST, body), "artifactType": kind} for body, kind in entries],
    }, sort_keys=True, separators=(",", ":")).encode()
