"""Builds a container image of nixeryd with Nix inside, from this repository and Debian's
packages alone (no base image from a registry): ``make image``.

    python3 deploy/image/build.py [--output build/nixeryd-image.tar] [--tag nixeryd:latest]

1. nixeryd and its dependencies as wheels (``pip wheel``, with this host's pip settings);
2. a Debian root file system of this host's release from this host's apt sources
   (``mmdebstrap``): Python, Nix (``nix-bin``), git and ssh (package sets in private git
   repositories), the tools Nix's builtins and fetchers call by name, certificates;
   nixeryd installed into ``/opt/nixeryd`` from the wheels alone; a user ``nixeryd``
   (uid 10001) owning ``/nix`` (single-user Nix) and ``/var/lib/nixeryd``; Nix settings
   for a container (``/etc/nix/nix.conf``: no sandbox, no build users);
3. one layer of it, in the archive ``docker save`` writes (``docker load``,
   ``podman load`` and ``skopeo copy docker-archive:`` read it), configured only through
   the environment: it runs ``twistd nixeryd`` with no arguments, as ``nixeryd``, storage
   in the volume ``/var/lib/nixeryd``, ``/healthz`` for probes.
Loaded into Docker when a Docker daemon answers.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
UID = 10001
HOME = "/var/lib/nixeryd"
PACKAGES = [
    "python3", "python3-venv", "nix-bin", "git", "openssh-client", "ca-certificates",
    "xz-utils", "bzip2", "gzip", "tar", "unzip", "curl", "util-linux", "procps", "passwd",
]
"""What the image holds beyond Debian's minimal base: ``util-linux`` gives the ``setsid``
and ``setpriv`` nixeryd starts Nix with, ``curl``, ``xz-utils``, ``bzip2``, ``unzip``
and ``tar`` the tools fetchers call, git and ssh fetch private package sets."""
NIX_CONF = """\
# Nix in nixeryd's container: builds run as the user running Nix (no nixbld group, no
# build users) and without a sandbox (containers seldom allow the namespaces it needs).
build-users-group =
sandbox = false
experimental-features = nix-command
log-lines = 40
"""
EXCLUDES = ["/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*",
            "/usr/share/lintian/*"]


def run(*argv: str, **kwargs: object) -> None:
    print("+", " ".join(argv), flush=True)
    subprocess.run(argv, check=True, **kwargs)  # type: ignore[call-overload]


def host_release() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip('"')
    raise SystemExit("cannot tell this host's Debian release (/etc/os-release has no VERSION_CODENAME)")


def apt_sources() -> list[str]:
    """This host's apt sources, so the image comes from the mirror the host uses."""
    found = [str(p) for p in sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))]
    found += [str(p) for p in sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]
    if Path("/etc/apt/sources.list").is_file() and Path("/etc/apt/sources.list").read_text().strip():
        found.append("/etc/apt/sources.list")
    if not found:
        raise SystemExit("this host has no apt sources to build the image from")
    return found


def revision() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], check=True, capture_output=True,
                              text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def wheels(where: Path) -> None:
    run(sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(where), str(ROOT))


def root_file_system(wheel_dir: Path, out: Path) -> None:
    hooks = [
        f'mkdir -p "$1/opt/wheels" && cp {wheel_dir}/*.whl "$1/opt/wheels/"',
        'chroot "$1" python3 -m venv /opt/nixeryd',
        'chroot "$1" /opt/nixeryd/bin/pip install -q --no-index --find-links /opt/wheels nixeryd',
        'rm -rf "$1/opt/wheels" "$1/root/.cache"',
        # The book, which the instance serves under /docs/ (make install built it).
        f'mkdir -p "$1/opt/nixeryd/share/nixeryd" && cp -r {ROOT / "build" / "docs"} '
        '"$1/opt/nixeryd/share/nixeryd/docs"',
        f'chroot "$1" groupadd --system --gid {UID} nixeryd',
        f'chroot "$1" useradd --system --uid {UID} --gid {UID} --home-dir {HOME} --create-home '
        '--shell /usr/sbin/nologin nixeryd',
        f'mkdir -p "$1/nix/store" "$1/nix/var/nix/gcroots" "$1/nix/var/nix/profiles" "$1{HOME}/storage" '
        '"$1/etc/nix"',
        f'chown -R {UID}:{UID} "$1/nix" "$1{HOME}"',
        f"printf '%s' {_quoted(NIX_CONF)} > \"$1/etc/nix/nix.conf\"",
        'rm -rf "$1/var/lib/apt/lists"/* "$1/var/cache/apt"/*',
    ]
    argv = ["mmdebstrap", "--variant=minbase", "--include=" + ",".join(PACKAGES),
            *[f"--dpkgopt=path-exclude={p}" for p in EXCLUDES],
            *[f"--customize-hook={hook}" for hook in hooks],
            host_release(), str(out), *apt_sources()]
    run(*argv, stdin=subprocess.DEVNULL)


def _quoted(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def image_config(diff_id: str, rev: str) -> dict[str, object]:
    port_check = ("python3 -c 'import os, urllib.request; urllib.request.urlopen("
                  "\"http://127.0.0.1:%s/healthz\" % os.environ.get(\"PORT\", \"8080\"), timeout=5)'")
    return {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:01Z",
        "config": {
            "User": "nixeryd",
            "WorkingDir": HOME,
            "Env": [
                "PATH=/opt/nixeryd/bin:/usr/local/bin:/usr/bin:/bin",
                f"HOME={HOME}",
                "LANG=C.UTF-8",
                "PORT=8080",
                "NIXERY_STORAGE_BACKEND=filesystem",
                f"STORAGE_PATH={HOME}/storage",
            ],
            "Cmd": ["twistd", "--nodaemon", "--pidfile=", "--logger", "nixeryd.ops.logs.json_lines", "nixeryd"],
            "ExposedPorts": {"8080/tcp": {}},
            "Volumes": {HOME: {}},
            "Healthcheck": {"Test": ["CMD-SHELL", port_check], "Interval": 30_000_000_000,
                            "Timeout": 10_000_000_000, "Retries": 3},
            "Labels": {"org.opencontainers.image.source": "nixeryd",
                       "org.opencontainers.image.revision": rev,
                       "org.opencontainers.image.title": "nixeryd"},
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "1970-01-01T00:00:01Z", "created_by": "deploy/image/build.py"}],
    }


def docker_archive(rootfs: Path, out: Path, tag: str, rev: str) -> None:
    """``rootfs`` as one gzip layer in a ``docker save`` archive at ``out``."""
    layer = out.with_suffix(".layer.gz")
    tar_sha = hashlib.sha256()
    with open(rootfs, "rb") as source, open(layer, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as packed:
            while chunk := source.read(1 << 20):
                tar_sha.update(chunk)
                packed.write(chunk)
    config = json.dumps(image_config("sha256:" + tar_sha.hexdigest(), rev), sort_keys=True).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    layer_name = tar_sha.hexdigest() + "/layer.tar"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [tag], "Layers": [layer_name]}]).encode()
    with tarfile.open(out, "w") as archive:
        for name, data in ((config_name, config), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1
            archive.addfile(info, io.BytesIO(data))
        archive.add(layer, arcname=layer_name)
    layer.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(ROOT / "build" / "nixeryd-image.tar"))
    parser.add_argument("--tag", default="nixeryd:latest")
    args = parser.parse_args()
    for tool in ("mmdebstrap",):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: `make image` installs it")
    if not (ROOT / "build" / "docs" / "index.html").is_file():
        raise SystemExit("the book is not built: `make install` builds it")
    out = Path(args.output).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nixeryd-image-", dir=out.parent) as tmp:
        work = Path(tmp)
        wheels(work / "wheels")
        root_file_system(work / "wheels", work / "rootfs.tar")
        docker_archive(work / "rootfs.tar", work / "image.tar", args.tag, revision())
        os.replace(work / "image.tar", out)
    print(f"{out}: {out.stat().st_size / 1e6:.0f} MB; load it with `docker load -i {out}` "
          f"(or `podman load`, or `skopeo copy docker-archive:{out} …`)")


if __name__ == "__main__":
    main()
