"""Image configs and manifests: their shape, media types and determinism."""
from __future__ import annotations

import json

import pytest

from nixeryd.image import manifest
from nixeryd.image.manifest import Descriptor, Flavour
from nixeryd.image.names import AMD64, ARM64

DIFF_IDS = ["sha256:" + "b" * 64, "sha256:" + "a" * 64, "sha256:" + "c" * 64]
CONFIG = Descriptor("sha256:" + "1" * 64, 321)
LAYERS = [Descriptor("sha256:" + "2" * 64, 1000), Descriptor("sha256:" + "3" * 64, 20)]


def config_doc(**kwargs: object) -> dict[str, object]:
    env = kwargs.pop("env", ["PATH=/bin"])
    cmd = kwargs.pop("cmd", None)
    arch = kwargs.pop("arch", AMD64)
    labels = kwargs.pop("labels", None)
    body = manifest.image_config(arch, DIFF_IDS, env=env, cmd=cmd, labels=labels)  # type: ignore[arg-type]
    result: dict[str, object] = json.loads(body)
    return result


def test_media_type_constants() -> None:
    """The media type constants are the spellings of the OCI and Docker specifications."""
    assert manifest.OCI_MANIFEST == "application/vnd.oci.image.manifest.v1+json"
    assert manifest.OCI_INDEX == "application/vnd.oci.image.index.v1+json"
    assert manifest.OCI_CONFIG == "application/vnd.oci.image.config.v1+json"
    assert manifest.OCI_LAYER == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert manifest.DOCKER_MANIFEST == "application/vnd.docker.distribution.manifest.v2+json"
    assert manifest.DOCKER_MANIFEST_LIST == "application/vnd.docker.distribution.manifest.list.v2+json"
    assert manifest.DOCKER_CONFIG == "application/vnd.docker.container.image.v1+json"
    assert manifest.DOCKER_LAYER == "application/vnd.docker.image.rootfs.diff.tar.gzip"


def test_flavour_types() -> None:
    """Each flavour names its own manifest, config and layer media types."""
    assert (Flavour.OCI.manifest_type, Flavour.OCI.config_type, Flavour.OCI.layer_type) == (
        manifest.OCI_MANIFEST,
        manifest.OCI_CONFIG,
        manifest.OCI_LAYER,
    )
    assert (Flavour.DOCKER.manifest_type, Flavour.DOCKER.config_type, Flavour.DOCKER.layer_type) == (
        manifest.DOCKER_MANIFEST,
        manifest.DOCKER_CONFIG,
        manifest.DOCKER_LAYER,
    )


def test_config_shape() -> None:
    """The config names the platform, keeps the diffIDs in order and carries Env, Cmd,
    labels and the fixed creation time."""
    labels = {"org.opencontainers.image.source": "https://example.org/pkgs.git"}
    doc = config_doc(env=["PATH=/bin", "SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt"], cmd=["bash"],
                     labels=labels)
    assert doc == {
        "architecture": "amd64",
        "created": "1970-01-01T00:00:01Z",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": DIFF_IDS},
        "config": {"Env": ["PATH=/bin", "SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt"], "Cmd": ["bash"],
                   "Labels": labels},
    }


def test_default_path_holds_the_usual_directories() -> None:
    """PATH keeps the directories derived images install into, /bin among them."""
    assert manifest.DEFAULT_PATH.split(":") == [
        "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]


def test_config_without_cmd() -> None:
    """Without a command the config has no Cmd at all, not an empty or null one."""
    doc = config_doc(cmd=None)
    assert doc["config"] == {"Env": ["PATH=/bin"]}


def test_config_architecture() -> None:
    """The architecture is the OCI name of the target platform."""
    assert config_doc(arch=ARM64)["architecture"] == "arm64"


def test_config_is_deterministic_and_compact() -> None:
    """The same inputs give the same bytes: sorted keys, compact separators, one fixed time."""
    first = manifest.image_config(AMD64, DIFF_IDS, env=["PATH=/bin"], cmd=["bash"])
    second = manifest.image_config(AMD64, list(DIFF_IDS), env=("PATH=/bin",), cmd=("bash",))
    assert first == second
    doc = json.loads(first)
    assert first == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    assert doc["created"] == manifest.CREATED and "history" not in doc


@pytest.mark.parametrize("flavour", list(Flavour))
def test_manifest_shape(flavour: Flavour) -> None:
    """A manifest has schemaVersion 2, its mediaType, and descriptors with the flavour's types."""
    doc = json.loads(manifest.image_manifest(flavour, CONFIG, LAYERS))
    assert doc == {
        "schemaVersion": 2,
        "mediaType": flavour.manifest_type,
        "config": {"mediaType": flavour.config_type, "digest": CONFIG.digest, "size": 321},
        "layers": [
            {"mediaType": flavour.layer_type, "digest": LAYERS[0].digest, "size": 1000},
            {"mediaType": flavour.layer_type, "digest": LAYERS[1].digest, "size": 20},
        ],
    }


@pytest.mark.parametrize("flavour", list(Flavour))
def test_manifest_media_type_reads_body(flavour: Flavour) -> None:
    """manifest_media_type reads back the mediaType a manifest was written with."""
    body = manifest.image_manifest(flavour, CONFIG, LAYERS)
    assert manifest.manifest_media_type(body) == flavour.manifest_type


def test_flavours_differ_only_in_media_types() -> None:
    """The OCI and Docker manifests of one image differ in media types only."""
    oci = manifest.image_manifest(Flavour.OCI, CONFIG, LAYERS).decode()
    docker = manifest.image_manifest(Flavour.DOCKER, CONFIG, LAYERS).decode()
    assert oci != docker
    for a, b in [
        (manifest.OCI_MANIFEST, manifest.DOCKER_MANIFEST),
        (manifest.OCI_CONFIG, manifest.DOCKER_CONFIG),
        (manifest.OCI_LAYER, manifest.DOCKER_LAYER),
    ]:
        oci = oci.replace(a, b)
    assert oci == docker


def test_manifest_is_deterministic() -> None:
    """The same descriptors give the same manifest bytes, compactly encoded."""
    first = manifest.image_manifest(Flavour.OCI, CONFIG, LAYERS)
    assert first == manifest.image_manifest(Flavour.OCI, CONFIG, tuple(LAYERS))
    assert first == json.dumps(json.loads(first), sort_keys=True, separators=(",", ":")).encode()


def test_manifest_without_layers() -> None:
    """A manifest without layers still has an (empty) layers list."""
    doc = json.loads(manifest.image_manifest(Flavour.OCI, CONFIG, []))
    assert doc["layers"] == []


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1, 2]", b'{"schemaVersion": 2}', b'{"mediaType": 3}', b"\xff\xfe"],
)
def test_manifest_media_type_rejects(body: bytes) -> None:
    """A body that is not a JSON object with a string mediaType raises ValueError."""
    with pytest.raises(ValueError):
        manifest.manifest_media_type(body)
