"""What an image holds, as SPDX, through the OCI referrers API: end to end with real Nix."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nixeryd.image import sbom
from nixeryd.image.layers import PathInfo
from tests.daemon import Daemon, daemon_fixture
from tests.test_image_signatures import key_pair

daemon = daemon_fixture()
OCI = "application/vnd.oci.image.manifest.v1+json"


def test_names_and_versions_split_as_nix_does() -> None:
    """The version starts at the first '-' followed by a digit."""
    assert sbom.split_name("/nix/store/" + "a" * 32 + "-openssl-3.0.12") == ("openssl", "3.0.12")
    assert sbom.split_name("/nix/store/" + "a" * 32 + "-iana-etc-20230316") == ("iana-etc", "20230316")
    assert sbom.split_name("/nix/store/" + "a" * 32 + "-hello") == ("hello", "")


def test_the_document_is_deterministic() -> None:
    """The same closure gives the same bytes, whatever the order it comes in."""
    a, b = "/nix/store/" + "a" * 32 + "-app-1.0", "/nix/store/" + "b" * 32 + "-lib-2.0"
    closure = {a: PathInfo(a, (b,), 10), b: PathInfo(b, (), 20)}
    one = sbom.document("app", "sha256:" + "0" * 64, [a], closure, {})
    two = sbom.document("app", "sha256:" + "0" * 64, [a], dict(reversed(list(closure.items()))), {})
    assert one == two


def referrers(daemon: Daemon, name: str, digest: str, query: str = "") -> tuple[dict[str, str], dict[str, Any]]:
    status, headers, body = daemon.request(f"/v2/{name}/referrers/{digest}{query}")
    assert status == 200, body
    assert headers["Content-Type"] == "application/vnd.oci.image.index.v1+json"
    return headers, json.loads(body)


def test_an_image_has_an_spdx_document_through_referrers(daemon: Daemon) -> None:
    """The image's referrers list an SPDX artifact whose subject is the image; the document
    lists every store path with its version and NAR size, the licence and homepage of the
    packages named, and what depends on what."""
    status, headers, body = daemon.request("/v2/hello/manifests/latest", headers={"Accept": OCI})
    assert status == 200
    digest = headers["Docker-Content-Digest"]
    _, index = referrers(daemon, "hello", digest)
    (entry,) = index["manifests"]
    assert entry["artifactType"] == "application/spdx+json"
    status, _, artifact = daemon.request(f"/v2/hello/manifests/{entry['digest']}")
    assert status == 200
    manifest = json.loads(artifact)
    assert manifest["subject"]["digest"] == digest and manifest["artifactType"] == "application/spdx+json"
    (layer,) = manifest["layers"]
    document = json.loads(daemon.request(f"/v2/hello/blobs/{layer['digest']}")[2])
    assert document["spdxVersion"] == "SPDX-2.3"
    packages = {p["name"]: p for p in document["packages"]}
    assert {"hello", "busybox", "nss-cacert", "iana-etc"} <= set(packages)
    assert packages["busybox"]["versionInfo"] == "1.35"
    assert packages["hello"]["licenseDeclared"] == "MIT"
    assert packages["hello"]["homepage"] == "https://example.org/hello"
    assert "NAR size" in packages["busybox"]["comment"]
    described = {r["relatedSpdxElement"] for r in document["relationships"] if r["relationshipType"] == "DESCRIBES"}
    assert packages["hello"]["SPDXID"] in described
    assert {"spdxElementId": packages["hello"]["SPDXID"], "relationshipType": "DEPENDS_ON",
            "relatedSpdxElement": packages["busybox"]["SPDXID"]} in document["relationships"]


def test_referrers_filter_and_unknown_digests(daemon: Daemon) -> None:
    """?artifactType= filters (and says so); a digest with nothing attached has an empty list."""
    _, _, body = daemon.request("/v2/alpha/manifests/latest", headers={"Accept": OCI})
    digest = "sha256:" + __import__("hashlib").sha256(body).hexdigest()
    headers, index = referrers(daemon, "alpha", digest, "?artifactType=application/spdx%2Bjson")
    assert len(index["manifests"]) == 1
    assert {k.lower(): v for k, v in headers.items()}["oci-filters-applied"] == "artifactType"
    _, index = referrers(daemon, "alpha", digest, "?artifactType=application/vnd.example")
    assert index["manifests"] == []
    _, index = referrers(daemon, "alpha", "sha256:" + "c" * 64)
    assert index["manifests"] == []
    status, _, body = daemon.request("/v2/alpha/referrers/sha256:nothex")
    assert (status, daemon.error_codes(body)) == (400, ["DIGEST_INVALID"])


def test_signed_images_list_their_signature(tmp_path: Path) -> None:
    """With signing on, an image's referrers hold its signature as well."""
    private, _ = key_pair(tmp_path, "k")
    storage = tmp_path / "storage"
    from tests.daemon import daemon_environment

    signing = Daemon(storage, daemon_environment(storage, NIXERY_SIGNING_KEY=str(private),
                                                 NIXERY_SIGNING_IDENTITY="registry.test")).start()
    _, headers, _ = signing.request("/v2/hello/manifests/latest", headers={"Accept": OCI})
    _, index = referrers(signing, "hello", headers["Docker-Content-Digest"])
    assert sorted(m["artifactType"] for m in index["manifests"]) == [
        "application/spdx+json", "application/vnd.dev.cosign.artifact.sig.v1+json"]


def test_oras_fetches_the_sbom(daemon: Daemon, tmp_path: Path) -> None:
    """oras-py, a client of the OCI artifacts nixeryd did not write, lists the referrers
    and pulls the SBOM artifact to a file it names from the layer's title."""
    import oras.client

    client = oras.client.OrasClient(hostname=daemon.registry, insecure=True)
    _, headers, _ = daemon.request("/v2/hello/manifests/latest", headers={"Accept": OCI})
    response = client.do_request(f"{daemon.url}/v2/hello/referrers/{headers['Docker-Content-Digest']}")
    assert response.status_code == 200
    (entry,) = response.json()["manifests"]
    files = client.pull(target=f"{daemon.registry}/hello@{entry['digest']}", outdir=str(tmp_path / "out"))
    (saved,) = [Path(f) for f in files]
    assert saved.name == "sbom.spdx.json"
    assert json.loads(saved.read_text())["spdxVersion"] == "SPDX-2.3"


def sbom_document(daemon: Daemon, name: str) -> dict[str, Any]:
    status, headers, body = daemon.request(f"/v2/{name}/manifests/latest", headers={"Accept": OCI})
    assert status == 200, body
    _, index = referrers(daemon, name, headers["Docker-Content-Digest"])
    (entry,) = index["manifests"]
    (layer,) = json.loads(daemon.request(f"/v2/{name}/manifests/{entry['digest']}")[2])["layers"]
    document: dict[str, Any] = json.loads(daemon.request(f"/v2/{name}/blobs/{layer['digest']}")[2])
    return document


def test_a_builder_cannot_forge_what_nixeryd_learns(daemon: Daemon) -> None:
    """A package whose builder prints nixeryd's old markers (a licence and homepage, a root
    outside the store, names not found) changes nothing: its SBOM says what its meta says
    (nothing), and its failing twin is a failed build (422), not 404 naming what it chose."""
    packages = {p["name"]: p for p in sbom_document(daemon, "forger")["packages"]}
    assert packages["forger"]["licenseDeclared"] == "NOASSERTION"
    assert "homepage" not in packages["forger"]
    status, _, body = daemon.request("/v2/forger-fails/manifests/latest")
    assert status == 422, body
    error = json.loads(body)["errors"][0]
    assert "nosuchthing" not in json.dumps(error.get("detail"))
    assert error["message"].startswith("cannot build forger-fails-1.0")


def test_referrers_come_from_storage(tmp_path: Path) -> None:
    """Another instance on the same storage, and this one after a restart, list the SBOM of
    an image they never built themselves (they answered an empty index)."""
    from tests.daemon import daemon_environment

    storage = tmp_path / "storage"
    one = Daemon(storage, daemon_environment(storage)).start()
    two = Daemon(storage, daemon_environment(storage)).start()
    try:
        _, headers, _ = one.request("/v2/hello/manifests/latest", headers={"Accept": OCI})
        digest = headers["Docker-Content-Digest"]
        _, index = referrers(two, "hello", digest)
        assert [m["artifactType"] for m in index["manifests"]] == ["application/spdx+json"]
        one.stop()
        one.start()
        _, again = referrers(one, "hello", digest)
        assert again == index
        _, other = referrers(one, "alpha", digest)  # another name does not stand for it
        assert other["manifests"] == []
    finally:
        one.stop()
        two.stop()
