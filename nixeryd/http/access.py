"""Who may call a route, declared with the route itself (as tahoe-lafs's HTTP server does):
a route is either ``authorized`` (access control checked before its handler runs) or
``public``, so a new route cannot be added without saying which, and cannot forget the
check. ``tests/test_auth.py`` fails for a route declared any other way."""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Protocol, Sequence, TypeVar, cast

from klein import Klein
from twisted.web.iweb import IRequest

H = TypeVar("H", bound=Callable[..., Any])

AUTHORIZED = "authorized"
PUBLIC = "public"


class Guarded(Protocol):
    async def authorize(self, request: IRequest) -> None:
        """Return when access control lets ``request`` in; raise its error otherwise."""


def authorized(app: Klein, path: str, methods: Sequence[str]) -> Callable[[H], H]:
    """Route ``path`` to the handler once ``authorize`` let the request in."""

    def declare(handler: H) -> H:
        @functools.wraps(handler)
        async def guarded(self: Guarded, request: IRequest, *args: Any, **kwargs: Any) -> Any:
            await self.authorize(request)
            result = handler(self, request, *args, **kwargs)
            return await result if inspect.isawaitable(result) else result

        guarded.access = AUTHORIZED  # type: ignore[attr-defined]
        return cast(H, app.route(path, methods=list(methods))(guarded))

    return declare


def public(app: Klein, path: str, methods: Sequence[str], *, branch: bool = False) -> Callable[[H], H]:
    """Route ``path`` (and what is below it, for a ``branch``) to the handler for anyone
    (probes, metrics, the book, refusals of writes)."""

    def declare(handler: H) -> H:
        handler.access = PUBLIC  # type: ignore[attr-defined]
        return app.route(path, methods=list(methods), branch=branch)(handler)

    return declare
