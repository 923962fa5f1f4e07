"""GCS's generation preconditions, in front of gcp-storage-emulator.

Real GCS refuses a write or delete whose ``ifGenerationMatch`` does not hold
(412, reason ``conditionNotMet``); the emulator ignores the parameter and always
writes. Build leases depend on that refusal, and real GCS cannot run here, so
this proxy is a fake of that one behaviour at the edge: every request goes on to
the emulator unchanged, except that an upload or delete carrying
``ifGenerationMatch`` is first checked against the object's current generation,
atomically with forwarding it (one lock for all writes). Everything else, the
object's bytes, metadata and errors, is the emulator's own.
"""
from __future__ import annotations

import http.client
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
              "proxy-authorization", "proxy-authenticate"}
CONDITION_NOT_MET = {
    "error": {
        "code": 412,
        "message": "At least one of the pre-conditions you specified did not hold.",
        "errors": [{"message": "At least one of the pre-conditions you specified did not hold.",
                    "domain": "global", "reason": "conditionNotMet",
                    "locationType": "header", "location": "If-Match"}],
    }
}


def object_named(path: str, query: dict[str, list[str]], body: bytes, content_type: str) -> tuple[str, str] | None:
    """(bucket, object) that an upload or delete request names, or None."""
    parts = path.split("/")
    # DELETE /storage/v1/b/<bucket>/o/<object>
    if len(parts) >= 7 and parts[1:4] == ["storage", "v1", "b"] and parts[5] == "o":
        return unquote(parts[4]), unquote("/".join(parts[6:]))
    # POST /upload/storage/v1/b/<bucket>/o?uploadType=...: the name is in the query
    # (media uploads) or in the JSON metadata (resumable: the body; multipart: its first part).
    if len(parts) >= 6 and parts[1:5] == ["upload", "storage", "v1", "b"]:
        bucket = unquote(parts[5])
        if "name" in query:
            return bucket, query["name"][0]
        metadata = body
        if "multipart/" in content_type:
            boundary = content_type.split("boundary=", 1)[1].strip('"').encode()
            first = body.split(b"--" + boundary)[1]
            metadata = first.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n", 1)[0]
        try:
            return bucket, str(json.loads(metadata)["name"])
        except (ValueError, KeyError):
            return None
    return None


class PreconditionProxy:
    """A loopback HTTP server forwarding to ``upstream`` (host, port)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.lock = threading.Lock()
        self.refused = 0
        self.lookups = 0  # requests of its own to the emulator, to tell apart from clients'
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy.forward(self)

            do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def generation(self, bucket: str, name: str) -> int:
        """The object's current generation at the emulator; 0 when there is none."""
        self.lookups += 1
        connection = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=30)
        try:
            connection.request("GET", f"/storage/v1/b/{quote(bucket, safe='')}/o/{quote(name, safe='')}")
            response = connection.getresponse()
            body = response.read()
            if response.status == 404:
                return 0
            return int(json.loads(body)["generation"])
        finally:
            connection.close()

    def forward(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        split = urlsplit(handler.path)
        query = parse_qs(split.query)
        condition = query.get("ifGenerationMatch")
        if condition is not None and handler.command in ("POST", "PUT", "DELETE", "PATCH"):
            named = object_named(split.path, query, body, handler.headers.get("Content-Type", ""))
            if named is not None:
                with self.lock:
                    if self.generation(*named) != int(condition[0]):
                        self.refused += 1
                        self.answer(handler, 412, {"Content-Type": "application/json"},
                                    json.dumps(CONDITION_NOT_MET).encode())
                        return
                    self.relay(handler, body)
                    return
        if handler.command in ("POST", "PUT", "DELETE", "PATCH"):
            with self.lock:
                self.relay(handler, body)
        else:
            self.relay(handler, body)

    def relay(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=60)
        try:
            headers = {k: v for k, v in handler.headers.items() if k.lower() not in HOP_BY_HOP}
            connection.request(handler.command, handler.path, body=body or None, headers=headers)
            response = connection.getresponse()
            data = response.read()
            self.answer(handler, response.status,
                        {k: v for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP}, data,
                        head=handler.command == "HEAD")
        finally:
            connection.close()

    @staticmethod
    def answer(handler: BaseHTTPRequestHandler, status: int, headers: dict[str, str], data: bytes,
               head: bool = False) -> None:
        handler.send_response(status)
        length = str(len(data))
        for name, value in headers.items():
            if name.lower() == "content-length":
                length = value if head else length
            else:
                handler.send_header(name, value)
        handler.send_header("Content-Length", length)
        handler.end_headers()
        if not head:
            handler.wfile.write(data)
