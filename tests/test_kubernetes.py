"""deploy/kubernetes: every object valid against Kubernetes' schemas (offline, with
kubernetes-validate), and consistent with nixeryd and its image: the settings are ones
nixeryd reads and accepts, probes reach /healthz on the port nixeryd listens on, the pod
runs as the image's user, and what nixeryd writes is on a volume."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from nixeryd.config import Config
from tests.daemon import ROOT

DEPLOY = ROOT / "deploy" / "kubernetes"
VERSIONS = ["1.28.0", "1.33.0"]
IMAGE_USER = 10001  # deploy/image/build.py's UID
IMAGE_STORAGE_PATH = "/var/lib/nixeryd/storage"  # the image's STORAGE_PATH


def objects(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


SETS = sorted(DEPLOY.glob("*/*.yaml"))


def test_there_are_a_single_replica_and_a_fleet() -> None:
    assert {p.parent.name for p in SETS} == {"one-replica", "fleet"}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", SETS, ids=lambda p: p.parent.name)
def test_every_object_is_valid(path: Path, version: str) -> None:
    for obj in objects(path):
        kubernetes_validate.validate(obj, version, strict=True)


def settings_nixeryd_reads() -> set[str]:
    code = "".join(p.read_text() for p in (ROOT / "nixeryd").rglob("*.py"))
    return set(re.findall(r'(?:get|parsed)\(\s*"([A-Z][A-Z0-9_]+)"', code)) | {"NIX_CONFIG"}


@pytest.mark.parametrize("path", SETS, ids=lambda p: p.parent.name)
def test_the_deployment_fits_nixeryd_and_its_image(path: Path) -> None:
    found = {obj["kind"]: obj for obj in objects(path)}
    settings = found["ConfigMap"]["data"]
    assert set(settings) <= settings_nixeryd_reads(), set(settings) - settings_nixeryd_reads()
    config = Config.from_env({"STORAGE_PATH": IMAGE_STORAGE_PATH, **settings}, cwd="/")  # the image's, then these
    port = int(settings.get("PORT", "8080"))

    pod = found["Deployment"]["spec"]["template"]["spec"]
    assert found["Deployment"]["spec"]["selector"]["matchLabels"].items() <= \
        found["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    assert pod["securityContext"]["runAsUser"] == IMAGE_USER and pod["securityContext"]["runAsNonRoot"]
    (container,) = pod["containers"]
    assert [p["containerPort"] for p in container["ports"] if p["name"] == "http"] == [port]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert found["Service"]["spec"]["ports"][0]["targetPort"] == "http"
    assert {"configMapRef": {"name": found["ConfigMap"]["metadata"]["name"]}} in container["envFrom"]

    # With a read-only root, everything nixeryd and Nix write is on a volume.
    assert container["securityContext"]["readOnlyRootFilesystem"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(mounts.values()) <= set(volumes)
    for written in (config.storage_path, "/nix/store", "/tmp"):
        assert any(written == m or written.startswith(m.rstrip("/") + "/") for m in mounts), written
    if config.storage_backend == "filesystem":
        storage = next(volumes[n] for m, n in mounts.items() if config.storage_path.startswith(m))
        assert "persistentVolumeClaim" in storage  # images outlive the pod
        assert found["Deployment"]["spec"]["replicas"] == 1
    else:
        assert found["Deployment"]["spec"]["replicas"] > 1
        credentials = settings.get("GOOGLE_APPLICATION_CREDENTIALS")
        assert credentials is None or any(credentials.startswith(m) for m in mounts)
