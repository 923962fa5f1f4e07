"""End to end: the real daemon, real Nix on the test package set, real skopeo."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import TWISTD, Daemon, daemon_environment, daemon_fixture

daemon = daemon_fixture()


def skopeo_copy(daemon: Daemon, name: str, dest: Path) -> Path:
    """Pull ``name`` with skopeo into an OCI layout at ``dest``."""
    result = subprocess.run(
        ["skopeo", "copy", "--src-tls-verify=false", "--retry-times=0",
         f"docker://{daemon.registry}/{name}", f"oci:{dest}:pulled"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr + daemon.log[-4000:]
    return dest


def unpack(layout: Path, rootfs: Path) -> dict[str, object]:
    """Apply an OCI layout's layers in order into ``rootfs``; returns the image config."""
    index = json.loads((layout / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((layout / "blobs" / "sha256" / manifest_digest).read_text())
    rootfs.mkdir()
    for layer in manifest["layers"]:
        blob = layout / "blobs" / "sha256" / layer["digest"].split(":")[1]
        subprocess.run(["tar", "-xzf", str(blob), "-C", str(rootfs)], check=True)
    config_blob = layout / "blobs" / "sha256" / manifest["config"]["digest"].split(":")[1]
    config: dict[str, object] = json.loads(config_blob.read_text())
    return config


def pull_and_run_bash(daemon: Daemon, where: Path) -> dict[str, Any]:
    """skopeo pulls ``shell/hello`` (its blobs wherever the daemon redirects), its bash runs
    in a chroot; the image manifest the daemon serves."""
    layout = skopeo_copy(daemon, "shell/hello:latest", where / "oci")
    rootfs = where / "rootfs"
    unpack(layout, rootfs)
    run = subprocess.run(["chroot", str(rootfs), "/bin/bash", "-c", "echo from bash"],
                         capture_output=True, text=True)
    assert run.stdout.strip() == "from bash", run.stderr
    _, _, body = daemon.request("/v2/shell/hello/manifests/latest")
    manifest: dict[str, Any] = json.loads(body)
    return manifest


def test_skopeo_pulls_an_image_that_runs(daemon: Daemon, tmp_path: Path) -> None:
    """An image pulled with skopeo unpacks into a root where its program and shell run."""
    layout = skopeo_copy(daemon, "shell/hello/hello:latest", tmp_path / "oci")
    rootfs = tmp_path / "rootfs"
    config = unpack(layout, rootfs)
    run = subprocess.run(["chroot", str(rootfs), "/bin/hello"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "Hello from nixeryd" in run.stdout
    shell = subprocess.run(
        ["chroot", str(rootfs), "/bin/bash", "-c", "ls /etc/ssl/certs/ca-bundle.crt && echo ok"],
        capture_output=True, text=True,
    )
    assert shell.stdout.strip().endswith("ok"), shell.stderr
    assert (rootfs / "usr" / "bin" / "env").is_symlink()
    assert stat.S_IMODE((rootfs / "tmp").stat().st_mode) == 0o1777
    image_config = config["config"]
    assert isinstance(image_config, dict)
    assert image_config["Cmd"] == ["bash"]
    assert "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" in image_config["Env"]
    assert config["created"] == "1970-01-01T00:00:01Z"
    assert config["architecture"] == "amd64" and config["os"] == "linux"


def store_paths_of(daemon: Daemon, name: str, digest: str) -> set[str]:
    """The store paths a layer holds (the symlink layer holds none)."""
    status, _, data = daemon.request(f"/v2/{name}/blobs/{digest}")
    assert status == 200
    listing = subprocess.run(["tar", "-tzf", "-"], input=data, capture_output=True, check=True).stdout.decode()
    return {line.split("/")[2] for line in listing.splitlines()
            if line.startswith("nix/store/") and line.count("/") >= 2 and line.split("/")[2]}


def libshared_layer(daemon: Daemon, name: str) -> str:
    """The digest of the one layer of ``name`` holding libshared, which must hold it alone."""
    status, _, body = daemon.request(f"/v2/{name}/manifests/latest")
    assert status == 200, body
    holding = [(layer["digest"], paths) for layer in json.loads(body)["layers"]
               for paths in [store_paths_of(daemon, name, layer["digest"])]
               if any(p.endswith("-libshared-1.0") for p in paths)]
    assert len(holding) == 1, holding
    digest, paths = holding[0]
    assert len(paths) == 1, paths  # libshared alone
    return digest


def test_shared_dependencies_become_shared_layers(daemon: Daemon, tmp_path: Path) -> None:
    """A dependency two packages of an image share is a layer of its own, the same blob in
    every image that has both; with popularity data saying it is popular, it is its own
    layer even in images holding only one of them (the base packages' layers are shared
    too, but prove nothing about dependencies)."""
    assert libshared_layer(daemon, "alpha/beta") == libshared_layer(daemon, "alpha/beta/hello")
    popularity = tmp_path / "popularity.json"
    popularity.write_text(json.dumps({"libshared-1.0": 10_000}))
    storage = tmp_path / "storage"
    popular = Daemon(storage, daemon_environment(storage, NIX_POPULARITY_URL=str(popularity))).start()
    assert libshared_layer(popular, "alpha") == libshared_layer(popular, "beta")


def test_head_digest_is_sha256_of_get_body(daemon: Daemon) -> None:
    """HEAD on a tag gives the digest of the body GET returns, which GET by digest returns too."""
    status, head_headers, head_body = daemon.request("/v2/hello/manifests/latest", "HEAD")
    assert status == 200 and head_body == b""
    status, headers, body = daemon.request("/v2/hello/manifests/latest")
    assert status == 200
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    assert head_headers["Docker-Content-Digest"] == digest == headers["Docker-Content-Digest"]
    assert int(head_headers["Content-Length"]) == len(body)
    assert headers["Content-Type"] == json.loads(body)["mediaType"]
    status, _, by_digest = daemon.request(f"/v2/hello/manifests/{digest}")
    assert status == 200 and by_digest == body


def test_blobs_are_served_by_digest_with_ranges(daemon: Daemon) -> None:
    """Every blob of a manifest is served by digest, whole and by byte range."""
    _, _, body = daemon.request("/v2/hello/manifests/latest")
    manifest = json.loads(body)
    for descriptor in [manifest["config"], *manifest["layers"]]:
        status, headers, blob = daemon.request(f"/v2/hello/blobs/{descriptor['digest']}")
        assert status == 200
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == descriptor["digest"]
        assert len(blob) == descriptor["size"] == int(headers["Content-Length"])
        assert headers["Docker-Content-Digest"] == descriptor["digest"]
    layer = manifest["layers"][0]
    status, headers, part = daemon.request(
        f"/v2/hello/blobs/{layer['digest']}", headers={"Range": "bytes=0-9"}
    )
    _, _, whole = daemon.request(f"/v2/hello/blobs/{layer['digest']}")
    assert status == 206 and part == whole[:10]
    assert headers["Content-Range"] == f"bytes 0-9/{len(whole)}"
    status, headers, _ = daemon.request(
        f"/v2/hello/blobs/{layer['digest']}", headers={"Range": f"bytes={len(whole) + 10}-"}
    )
    assert status == 416
    status, headers, body = daemon.request(f"/v2/hello/blobs/{layer['digest']}", "HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) == len(whole)
    assert headers["Docker-Content-Digest"] == layer["digest"]


def test_unknown_packages_are_404_naming_every_one(daemon: Daemon) -> None:
    """Packages missing from the package set give MANIFEST_UNKNOWN naming each of them."""
    status, headers, body = daemon.request("/v2/hello/nosuchthing/norsuchother/manifests/latest")
    assert status == 404
    assert headers["Content-Type"] == "application/json"
    error = json.loads(body)["errors"][0]
    assert error["code"] == "MANIFEST_UNKNOWN"
    assert "nosuchthing" in error["message"] and "norsuchother" in error["message"]
    assert "hello" not in error["detail"]["packages"]


def test_a_failing_build_is_422_with_nix_output(daemon: Daemon) -> None:
    """A package whose builder fails gives 422 UNKNOWN carrying the end of Nix's log."""
    status, _, body = daemon.request("/v2/broken/manifests/latest")
    assert status == 422
    error = json.loads(body)["errors"][0]
    assert error["code"] == "UNKNOWN"
    assert "broken" in error["message"]
    assert "Traceback" not in body.decode()


def test_an_endless_build_log_gives_a_short_error(daemon: Daemon) -> None:
    """A builder printing 8 MB without a newline gives a 422 of a few KB, twice (the failure
    is remembered), and the index page stays small."""
    for _ in range(2):
        status, _, body = daemon.request("/v2/loud/manifests/latest")
        assert status == 422
        assert len(body) < 8192, len(body)
        assert "more bytes]" in json.loads(body)["errors"][0]["message"]
    status, _, page = daemon.request("/")
    assert status == 200 and len(page) < 64 * 1024, len(page)


def test_bad_names_and_references_get_registry_errors(daemon: Daemon) -> None:
    """Malformed names, tags and digests are answered with the spec's codes before Nix runs."""
    cases = {
        "/v2/Hello/manifests/latest": (400, "NAME_INVALID"),
        "/v2/hello/manifests/bad%20tag": (404, "MANIFEST_UNKNOWN"),
        "/v2/hello/blobs/sha256:abc": (400, "DIGEST_INVALID"),
        "/v2/hello/blobs/sha256:" + "0" * 64: (404, "BLOB_UNKNOWN"),
    }
    for path, (status, code) in cases.items():
        got, _, body = daemon.request(path)
        assert (got, daemon.error_codes(body)) == (status, [code]), path


def test_push_is_refused(daemon: Daemon) -> None:
    """Uploads are refused with 405 UNSUPPORTED."""
    status, _, body = daemon.request("/v2/hello/blobs/uploads/", "POST")
    assert status == 405 and daemon.error_codes(body) == ["UNSUPPORTED"]


def test_two_fresh_instances_give_the_same_digest(daemon: Daemon, tmp_path: Path) -> None:
    """The same image built by a second instance with its own storage has the same digest."""
    _, first, _ = daemon.request("/v2/shell/alpha/manifests/latest")
    other = Daemon(tmp_path / "other", daemon_environment(tmp_path / "other")).start()
    try:
        status, second, _ = other.request("/v2/shell/alpha/manifests/latest")
    finally:
        other.stop()
    assert status == 200
    assert first["Docker-Content-Digest"] == second["Docker-Content-Digest"]


def test_a_port_in_use_stops_start_up_with_one_line(tmp_path: Path) -> None:
    """A listening address that is taken ends start-up at once with one line, no traceback."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [str(TWISTD), "--nodaemon", "--pidfile=", "nixeryd", "--listen", f"tcp:{port}:interface=127.0.0.1"],
            env=daemon_environment(tmp_path / "s"), capture_output=True, text=True, timeout=60,
        )
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert f"nixeryd: --listen/PORT: cannot listen on 127.0.0.1:{port}" in output
    assert "Traceback" not in output and "CannotListenError" not in output


def test_twistd_lists_the_plugin() -> None:
    """``twistd --help`` lists nixeryd among its commands."""
    out = subprocess.run([str(TWISTD), "--help"], capture_output=True, text=True)
    assert "nixeryd" in out.stdout


@pytest.mark.parametrize(
    "variable, value",
    [("NIX_TIMEOUT", "soon"), ("PORT", "99999"), ("NIXERY_STORAGE_BACKEND", "tape")],
)
def test_a_bad_setting_stops_start_up_with_one_line(tmp_path: Path, variable: str, value: str) -> None:
    """A bad setting ends start-up with one line naming it, and no traceback."""
    env = daemon_environment(tmp_path / "s", **{variable: value})
    result = subprocess.run(
        [str(TWISTD), "--nodaemon", "--pidfile=", "nixeryd"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and variable in lines[0], result.stderr


def test_odd_names_and_big_files_survive_the_pull(daemon: Daemon, tmp_path: Path) -> None:
    """Spaces, unicode, long and deep names, links and a file over 100 MB arrive intact,
    and the big package, sharing busybox with hello, is a layer of its own."""
    layout = skopeo_copy(daemon, "oddnames/big/hello:latest", tmp_path / "oci")
    rootfs = tmp_path / "rootfs"
    unpack(layout, rootfs)
    (odd,) = rootfs.glob("nix/store/*-oddnames-1.0/share/odd")
    assert (odd / "with space" / "file name.txt").read_text() == "spaced\n"
    assert (odd / "ünïcødé" / "日本語.txt").read_text() == "unicode\n"
    assert (odd / ("n" * 150)).read_text() == "long\n"
    deep = odd / "aaaaaaaaaaaaaaaaaaaaaaaaa" / ("b" * 30) / ("c" * 30) / ("d" * 30) / "file.txt"
    assert deep.read_text() == "deep\n"
    assert os.readlink(odd / "link to spaced") == "with space/file name.txt"
    assert (odd / "empty dir").is_dir() and not any((odd / "empty dir").iterdir())
    assert os.access(odd / "run.sh", os.X_OK)
    (blob,) = rootfs.glob("nix/store/*-big-1.0/share/big/blob")
    assert blob.stat().st_size == 110_000_000

    _, _, body = daemon.request("/v2/oddnames/big/hello/manifests/latest")
    for layer in json.loads(body)["layers"]:
        _, _, data = daemon.request(f"/v2/oddnames/big/hello/blobs/{layer['digest']}")
        listing = subprocess.run(["tar", "-tzf", "-"], input=data, capture_output=True, check=True)
        names = listing.stdout.decode()
        if "-big-1.0/share/big/blob" in names:
            stores = {line.split("/")[2] for line in names.splitlines() if line.count("/") >= 2 and line.split("/")[2]}
            assert len(stores) == 1, stores
            break
    else:
        raise AssertionError("no layer holds the big package")


def test_tls_handshake_on_plain_port_gets_http_400_at_once(daemon: Daemon) -> None:
    """A TLS ClientHello on the plain-HTTP port is answered at once with an HTTP 400 and a
    close, as Go's server does, so clients that try HTTPS first fall back to HTTP."""
    import socket

    with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as s:
        s.sendall(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 32)
        answer = b""
        while chunk := s.recv(1024):  # a wait would raise socket.timeout
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"\r\nConnection: close\r\n" in answer
    status, _, _ = daemon.request("/v2/")
    assert status == 200


def raw_exchange(daemon: Daemon, request: bytes) -> bytes:
    """Send raw bytes on a fresh connection; everything the daemon answers until it closes."""
    import socket

    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as s:
        s.sendall(request)
        answer = b""
        while chunk := s.recv(65536):  # a wait would raise socket.timeout
            answer += chunk
    return answer


@pytest.mark.parametrize("request_bytes", [
    b"GET /v2/" + b"a" * 20000 + b"/manifests/latest HTTP/1.1\r\nHost: r\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: r\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: r\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, b"c" * 900) for i in range(30))
    + b"\r\n",
], ids=["request-line", "one-header", "many-headers"])
def test_over_long_request_lines_and_headers_get_431(daemon: Daemon, request_bytes: bytes) -> None:
    """A request line, a header, or a header block past 16 KiB is answered 431 and closed,
    as Go's server answers it, instead of a silent close."""
    answer = raw_exchange(daemon, request_bytes)
    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), answer[:200]
    assert raw_exchange(daemon, b"GET /v2/ HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n").startswith(
        b"HTTP/1.1 200 OK\r\n")


def test_overlapping_ranges_get_the_whole_blob(daemon: Daemon) -> None:
    """`Range: bytes=0-,0-,...` x 1,000 is answered as distribution answers it: 200 with the
    blob once, never a 206 a thousand times its size; a few sane ranges still get 206."""
    status, _, body = daemon.request("/v2/noise/manifests/latest")
    assert status == 200, body
    layer = max(json.loads(body)["layers"], key=lambda layer: layer["size"])
    path = f"/v2/noise/blobs/{layer['digest']}"
    status, headers, data = daemon.request(path, headers={"Range": "bytes=" + ",".join(["0-"] * 1000)})
    assert status == 200 and len(data) == layer["size"] == int(headers["Content-Length"])
    assert "sha256:" + hashlib.sha256(data).hexdigest() == layer["digest"]
    status, headers, data = daemon.request(path, headers={"Range": "bytes=0-9,100-109"})
    assert status == 206 and headers["Content-Type"].startswith("multipart/byteranges")
    status, headers, data = daemon.request(path, headers={"Range": "bytes=" + ",".join(["0-0"] * 100)})
    assert status == 200 and len(data) == layer["size"]


def test_zstd_layers_pull_and_run(tmp_path: Path) -> None:
    """With NIXERY_LAYER_COMPRESSION=zstd, skopeo pulls tar+zstd layers that unpack into a
    root where the program runs."""
    storage = tmp_path / "storage"
    zstd_daemon = Daemon(storage, daemon_environment(storage, NIXERY_LAYER_COMPRESSION="zstd")).start()
    try:
        layout = skopeo_copy(zstd_daemon, "shell/hello:latest", tmp_path / "oci")
    finally:
        zstd_daemon.stop()
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((layout / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]).read_text())
    assert {layer["mediaType"] for layer in manifest["layers"]} == {"application/vnd.oci.image.layer.v1.tar+zstd"}
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    for layer in manifest["layers"]:
        blob = layout / "blobs" / "sha256" / layer["digest"][7:]
        subprocess.run(["tar", "--zstd", "-xf", str(blob), "-C", str(rootfs)], check=True)
    run = subprocess.run(["chroot", str(rootfs), "/bin/hello"], capture_output=True, text=True)
    assert run.stdout.strip() == "Hello from nixeryd", run.stderr


def read_response(stream: Any) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length from a buffered socket file."""
    status = int(stream.readline().split()[1])
    headers = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, stream.read(int(headers["content-length"]))


def test_pipelined_large_blob_and_manifest_arrive_whole_and_in_order(daemon: Daemon) -> None:
    """A multi-megabyte blob (sent with sendfile) followed by a manifest on one keep-alive
    connection arrive byte for byte, each after the other."""
    import socket

    status, _, body = daemon.request("/v2/noise/manifests/latest")
    assert status == 200
    manifest = json.loads(body)
    layer = max(manifest["layers"], key=lambda layer: layer["size"])
    assert layer["size"] > 10_000_000
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=60) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.sendall(
            f"GET /v2/noise/blobs/{layer['digest']} HTTP/1.1\r\nHost: x\r\n\r\n"
            f"GET /v2/noise/manifests/latest HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        stream = s.makefile("rb")
        blob_status, blob_headers, blob = read_response(stream)
        second_status, _, second = read_response(stream)
    assert blob_status == 200 and len(blob) == layer["size"]
    assert "sha256:" + hashlib.sha256(blob).hexdigest() == layer["digest"]
    assert blob_headers["docker-content-digest"] == layer["digest"]
    assert second_status == 200 and second == body


def test_a_client_leaving_mid_blob_leaves_no_traceback(daemon: Daemon) -> None:
    """A client that reads the headers of a large blob and hangs up costs nothing but a log
    line: no unhandled error, and the daemon serves on; a whole blob sent with sendfile is
    logged with its full size."""
    import socket

    status, _, body = daemon.request("/v2/noise/manifests/latest")
    assert status == 200, body
    layer = max(json.loads(body)["layers"], key=lambda layer: layer["size"])
    assert layer["size"] > 10_000_000
    start = len(daemon.output)
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(f"GET /v2/noise/blobs/{layer['digest']} HTTP/1.1\r\nHost: r\r\n\r\n".encode())
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
    status, _, data = daemon.request(f"/v2/noise/blobs/{layer['digest']}")
    assert status == 200 and len(data) == layer["size"]
    status, _, _ = daemon.request("/v2/")
    assert status == 200
    log = "".join(daemon.output[start:])
    assert "Unhandled Error" not in log and "Traceback" not in log, log[-3000:]
    (whole,) = [line for line in daemon.output[start:]
                if f'"GET /v2/noise/blobs/{layer["digest"]} HTTP/1.1" 200' in line and "Python-urllib" in line]
    assert f'" 200 {layer["size"]} ' in whole, whole
