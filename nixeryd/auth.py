"""Optional access control for private instances: htpasswd basic auth and
static bearer tokens. Off unless one of them is configured.

Password hashes: bcrypt (``htpasswd -B``, the kind to use) and ``{SHA}``.
Checking a bcrypt hash is slow on purpose, so it runs through the offload and
a successful check is remembered (by a hash of the credentials) for a while.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any, Mapping

from twisted.internet.defer import Deferred, succeed

from nixeryd.cache import TTLCache
from nixeryd.offload import Offload

REALM = "nixeryd"
REMEMBER_SECONDS = 300


def parse_htpasswd(text: str, where: str) -> dict[str, str]:
    """user -> hash; ``ValueError`` naming the line for a kind of hash not supported."""
    users = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user:
            raise ValueError(f"{where}:{number}: expected user:hash")
        if not hashed.startswith(("$2y$", "$2b$", "$2a$", "{SHA}")):
            raise ValueError(f"{where}:{number}: only bcrypt (htpasswd -B) and {{SHA}} hashes are supported")
        users[user] = hashed
    return users


def parse_tokens(text: str) -> frozenset[str]:
    """One token per line; blank lines and comments skipped."""
    return frozenset(
        line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")
    )


BCRYPT_MAX_PASSWORD = 72
"""bcrypt reads at most 72 bytes of a password."""


def _password_matches(password: str, hashed: str) -> bool:
    """Blocking: bcrypt is slow by design."""
    if hashed.startswith("{SHA}"):
        digest = base64.b64encode(hashlib.sha1(password.encode()).digest()).decode()
        return hmac.compare_digest(digest, hashed[5:])
    import bcrypt

    secret = password.encode()
    if len(secret) > BCRYPT_MAX_PASSWORD:
        return False  # bcrypt 5 refuses these; older versions compared only the first 72 bytes
    try:
        return bool(bcrypt.checkpw(secret, hashed.replace("$2y$", "$2b$", 1).encode()))
    except ValueError:
        return False  # a malformed hash in the file: no password matches it


class Authenticator:
    """Decides whether a request's Authorization header lets it in."""

    def __init__(self, users: Mapping[str, str], tokens: frozenset[str], offload: Offload,
                 clock: Any) -> None:
        self._users = dict(users)
        self._tokens = frozenset(t.encode() for t in tokens)
        self._offload = offload
        self._granted: TTLCache[bool] = TTLCache(clock, max_entries=10_000)

    @property
    def enabled(self) -> bool:
        return bool(self._users or self._tokens)

    def challenges(self) -> list[str]:
        """The WWW-Authenticate values a 401 carries."""
        found = []
        if self._users:
            found.append(f'Basic realm="{REALM}", charset="UTF-8"')
        if self._tokens:
            found.append(f'Bearer realm="{REALM}"')
        return found

    def check(self, authorization: bytes | None) -> Deferred[bool]:
        if not self.enabled:
            return succeed(True)
        if not authorization:
            return succeed(False)
        scheme, _, credentials = authorization.decode("latin-1").partition(" ")
        credentials = credentials.strip()
        if scheme.lower() == "bearer":
            offered = credentials.encode("latin-1")  # the header's bytes, whatever they are
            return succeed(any(hmac.compare_digest(offered, t) for t in self._tokens))
        if scheme.lower() != "basic" or not self._users:
            return succeed(False)
        try:
            user, sep, password = base64.b64decode(credentials, validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return succeed(False)
        hashed = self._users.get(user)
        if not sep or hashed is None:
            return succeed(False)
        remembered = hashlib.sha256(authorization).hexdigest()
        if self._granted.get(remembered):
            return succeed(True)

        def remember(ok: bool) -> bool:
            if ok:
                self._granted.put(remembered, True, REMEMBER_SECONDS)
            return ok

        return self._offload(_password_matches, password, hashed).addCallback(remember)
