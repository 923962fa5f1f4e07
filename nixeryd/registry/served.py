"""What this instance served lately: names and tags, the size of every blob a served
manifest names, when each served image was built, and which images have each layer. All
bounded, least recently used first out; none of it is needed for correctness after a
restart (storage holds what must survive)."""
from __future__ import annotations

import json
from collections import OrderedDict

from nixeryd.image.manifest import ImageManifests
from nixeryd.storage.records import ImageRecord

MAX_KNOWN_SIZES = 200_000
"""Most blobs, manifests and layers each table remembers."""


class KnownImages:
    """Names recently served, newest last, each with the tags it was asked at."""

    def __init__(self, max_names: int = 1000, max_tags: int = 100) -> None:
        self._names: OrderedDict[str, OrderedDict[str, None]] = OrderedDict()
        self._max_names = max_names
        self._max_tags = max_tags

    def add(self, name: str, tag: str) -> None:
        tags = self._names.pop(name, None) or OrderedDict()
        tags.pop(tag, None)
        tags[tag] = None
        while len(tags) > self._max_tags:
            tags.popitem(last=False)
        self._names[name] = tags
        while len(self._names) > self._max_names:
            self._names.popitem(last=False)

    def names(self) -> list[str]:
        return sorted(self._names)

    def tags(self, name: str) -> list[str]:
        return sorted(self._names.get(name, ()))


class Served:
    """Facts about the images this instance served, for checking blobs and for pages."""

    def __init__(self) -> None:
        # The size every blob of a served image must have: a blob found otherwise in
        # storage is damaged, and is not served.
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self._built: OrderedDict[str, float] = OrderedDict()  # manifest digest -> when it was built
        self._users: OrderedDict[str, OrderedDict[str, None]] = OrderedDict()  # layer -> image names
        self._noted: OrderedDict[tuple[str, str], None] = OrderedDict()  # (name, manifest) in _users

    def expected_size(self, digest: str) -> int | None:
        """The size a served manifest gives the blob ``digest``, where one is known."""
        return self._sizes.get(digest)

    def forget_size(self, digest: str) -> None:
        self._sizes.pop(digest, None)

    def built_at(self, digest: str) -> float | None:
        """When the image (or index) with manifest ``digest`` was built, where known."""
        return self._built.get(digest)

    def note_built(self, digests: ImageRecord) -> None:
        self._built[digests.oci] = digests.built
        self._built.move_to_end(digests.oci)
        while len(self._built) > MAX_KNOWN_SIZES:
            self._built.popitem(last=False)

    def layer_users(self, digest: str) -> list[str]:
        """The names of images served here (lately) that have layer ``digest``."""
        return list(self._users.get(digest, ()))

    def note_users(self, name: str, result: ImageManifests) -> None:
        """Which layers ``name`` has, read once per name and manifest: a warm pull, which
        lands here every time, costs a lookup, not a parse."""
        seen = (name, result.oci.digest)
        if seen in self._noted:
            self._noted.move_to_end(seen)
            return
        self._noted[seen] = None
        while len(self._noted) > MAX_KNOWN_SIZES:
            self._noted.popitem(last=False)
        try:
            layers = json.loads(result.oci.body).get("layers") or []
        except ValueError:
            return
        for layer in layers:
            users = self._users.setdefault(str(layer.get("digest")), OrderedDict())
            users[name] = None
            while len(users) > 50:
                users.popitem(last=False)
            self._users.move_to_end(str(layer.get("digest")))
        while len(self._users) > MAX_KNOWN_SIZES:
            self._users.popitem(last=False)

    def note_sizes(self, result: ImageManifests) -> None:
        try:
            doc = json.loads(result.oci.body)
            descriptors = [doc["config"], *doc["layers"]] if "config" in doc else []
            for descriptor in descriptors:
                self._sizes[str(descriptor["digest"])] = int(descriptor["size"])
                self._sizes.move_to_end(str(descriptor["digest"]))
        except (ValueError, KeyError, TypeError):
            return
        while len(self._sizes) > MAX_KNOWN_SIZES:
            self._sizes.popitem(last=False)
