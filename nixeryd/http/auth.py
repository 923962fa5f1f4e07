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
from typing import Iterable, Mapping

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from nixeryd.core.cache import TTLCache
from nixeryd.core.offload import Offload

REALM = "nixeryd"
REMEMBER_SECONDS = 300
MAX_PENDING = 32
"""Password checks waiting or running at once; more are answered 429 at once, so that a
flood of wrong passwords cannot queue a valid login behind it."""


class AuthBusy(Exception):
    """Too many password checks are under way: ask again shortly."""


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
                 clock: IReactorTime) -> None:
        self._users = dict(users)
        self._tokens = frozenset(t.encode() for t in tokens)
        self._offload = offload
        self._granted: TTLCache[bool] = TTLCache(clock, max_entries=10_000)
        self._pending = 0
        # An unknown user's password is checked against this, at the cost of the users'
        # own hashes: how long a refusal takes says nothing of who exists.
        self._decoy = _decoy_hash(self._users.values())

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

    def granted_now(self, authorization: bytes | None) -> bool:
        """Whether ``authorization`` is let in without waiting: access control off, a valid
        token, or a password that passed its check lately. False says nothing: ``check``."""
        if not self.enabled:
            return True
        if not authorization:
            return False
        scheme, _, credentials = authorization.decode("latin-1").partition(" ")
        if scheme.lower() == "bearer":
            offered = credentials.strip().encode("latin-1")  # the header's bytes, whatever they are
            return any(hmac.compare_digest(offered, t) for t in self._tokens)
        return scheme.lower() == "basic" and bool(self._granted.get(hashlib.sha256(authorization).hexdigest()))

    def check(self, authorization: bytes | None) -> Deferred[bool]:
        if self.granted_now(authorization):
            return succeed(True)
        if not authorization:
            return succeed(False)
        scheme, _, credentials = authorization.decode("latin-1").partition(" ")
        if scheme.lower() != "basic" or not self._users:
            return succeed(False)  # a token that did not match, or an unknown scheme
        try:
            user, sep, password = base64.b64decode(credentials.strip(), validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return succeed(False)
        if not sep:
            return succeed(False)
        hashed = self._users.get(user)
        remembered = hashlib.sha256(authorization).hexdigest()
        if self._pending >= MAX_PENDING:
            raise AuthBusy()
        self._pending += 1

        def remember(ok: bool) -> bool:
            self._pending -= 1
            if ok and hashed is not None:
                self._granted.put(remembered, True, REMEMBER_SECONDS)
            return ok and hashed is not None

        def failed(failure: Failure) -> Failure:
            self._pending -= 1
            return failure

        checked = self._offload(_password_matches, password, hashed if hashed is not None else self._decoy)
        return checked.addCallbacks(remember, failed)


def _decoy_hash(hashes: Iterable[str]) -> str:
    """A hash no password matches, as costly to check as the users' bcrypt hashes (or an
    {SHA} one where they have none)."""
    import bcrypt

    costs = [int(h[4:6]) for h in hashes if h.startswith("$2") and h[4:6].isdigit()]
    if not costs:
        return "{SHA}" + base64.b64encode(hashlib.sha1(b"no user").digest()).decode()
    return bcrypt.hashpw(b"\0decoy", bcrypt.gensalt(rounds=max(4, min(max(costs), 31)))).decode()
