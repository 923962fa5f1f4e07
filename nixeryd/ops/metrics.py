"""Prometheus metrics of one nixeryd instance, in a registry of its own."""
from __future__ import annotations

from typing import Callable

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
)

from nixeryd import __version__

ROUTES = ("base", "manifest", "blob", "tags", "catalog", "referrers", "index", "image_page", "docs",
          "healthz", "metrics", "other")
"""Route labels: a fixed set, so that no request can add a series (or an image name)."""


def route_of(path: bytes) -> str:
    """The route a request path is counted under."""
    if path == b"/v2/" or path == b"/v2":
        return "base"
    if path.startswith(b"/v2/"):
        if path == b"/v2/_catalog":
            return "catalog"
        if path.endswith(b"/tags/list"):
            return "tags"
        for kind, route in ((b"/manifests/", "manifest"), (b"/blobs/", "blob"), (b"/referrers/", "referrers")):
            if kind in path:
                return route
        return "other"
    if path == b"/":
        return "index"
    if path.startswith(b"/image/"):
        return "image_page"
    if path.startswith(b"/docs"):
        return "docs"
    if path in (b"/healthz", b"/metrics"):
        return path[1:].decode()
    return "other"

BUILD_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)


class Metrics:
    """Counters and gauges the builder, the caches and the API report into."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.builds = Counter(
            "nixeryd_builds", "Image builds, by outcome.", ["outcome"], registry=r
        )
        self.build_seconds = Histogram(
            "nixeryd_build_seconds", "Time to build an image, Nix and packing included.",
            buckets=BUILD_BUCKETS, registry=r,
        )
        self.cache = Counter(
            "nixeryd_manifest_cache", "Manifest lookups, by where the answer came from.",
            ["result"], registry=r,
        )
        self.packed_bytes = Counter(
            "nixeryd_packed_bytes", "Compressed bytes of layers packed.", registry=r
        )
        self.served_bytes = Counter(
            "nixeryd_served_bytes", "Bytes of manifests and blobs served from this instance.",
            registry=r,
        )
        self.requests = Counter(
            "nixeryd_http_requests", "HTTP requests answered, by route, method and status.",
            ["route", "method", "status"], registry=r,
        )
        self.storage_bytes = Gauge(
            "nixeryd_storage_bytes", "Bytes of the filesystem backend: stored blobs and records, and free.",
            ["kind"], registry=r,
        )
        Info("nixeryd_build", "The running nixeryd.", registry=r).info({"version": __version__})
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(collector)
        self._answered: dict[tuple[str, str, int], Counter] = {}
        self._cache_results: dict[str, Counter] = {}
        self._running = Gauge("nixeryd_nix_builds_running", "Nix builds running now.", registry=r)
        self._queued = Gauge("nixeryd_build_queue_length", "Builds waiting for a slot.", registry=r)

    def answered(self, path: bytes, method: bytes, status: int) -> None:
        """Count one answered request."""
        verb = "GET" if method == b"GET" else "HEAD" if method == b"HEAD" else "other"
        labels = (route_of(path), verb, status)
        counter = self._answered.get(labels)
        if counter is None:
            # A labelled child looked up once (a few dozen combinations), not per request.
            counter = self._answered[labels] = self.requests.labels(route=labels[0], method=verb, status=str(status))
        counter.inc()

    def cache_result(self, result: str) -> None:
        """Count where a manifest lookup was answered from."""
        counter = self._cache_results.get(result)
        if counter is None:
            counter = self._cache_results[result] = self.cache.labels(result=result)
        counter.inc()

    def watch(self, running: Callable[[], float], queued: Callable[[], float]) -> None:
        """Read the running and queued build counts when scraped."""
        self._running.set_function(running)
        self._queued.set_function(queued)
