"""Who is calling, and may they: authentication and scopes for every route, in one place.

Every route is declared with the scope it needs (``route`` / ``mount`` below; the app
refuses to start with a route that names none), and its endpoint is wrapped so that the
check runs before the endpoint does, whichever way the request arrives: through
Starlette's router or straight through the front door (``corral.gateway.routing``),
which calls the same wrapped endpoint. A new route therefore cannot forget the check.

Keys are looked up by their SHA-256 digest: the bootstrap keys of ``CORRAL_API_KEYS``
in memory, the keys ``corral keys`` stored in Redis through a per-process cache of
``auth_cache_ttl`` seconds (so a request costs no Redis call for a key seen recently,
and a revoked key stops working within that time). Looking up a digest reveals, through
timing, at most something about the digest of a guess, never about a key.

When no key exists at all (none in the environment, none stored) the gateway is open, as
it always was: every caller is ``ANONYMOUS``, with every scope and no limits.
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from corral import keys
from corral.errors import Forbidden, RateLimited, RequestError, Unauthorized
from corral.gateway.audit import Tapped, fields_of
from corral.gateway.state import state_of
from corral.settings import GatewaySettings
from corral.tenants import (
    ANONYMOUS,
    KEY_SCOPES,
    OPEN_CLASS,
    ApiKey,
    KeyClass,
    digest,
)
from corral.tenants import Scope as Need

log = logging.getLogger(__name__)

Endpoint = Callable[[Request], Awaitable[Response]]

CACHE_MAX = 10_000
"""Most keys (and unknown digests) a gateway process remembers; beyond, it starts over."""

FAIL_WINDOW = 60.0
CHALLENGE = 'Bearer realm="corral"'
BROWSER_CHALLENGE = 'Basic realm="corral", charset="UTF-8"'
BROWSER_PAGES = frozenset({"/status"})
"""Pages a person opens in a browser, which cannot send a bearer token: their 401 asks for
Basic credentials (any user name, the API key as the password), which the browser then
sends with the page's own requests for its figures too."""


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of one request: its key (``ANONYMOUS`` when Corral is open) and class."""

    key: ApiKey
    klass: KeyClass

    @property
    def admin(self) -> bool:
        return Need.ADMIN in self.key.scopes

    def owns(self, owner: str) -> bool:
        """Whether a job whose record names ``owner`` is this caller's to see or cancel."""
        return self.admin or owner == self.key.id


OPEN = Principal(ANONYMOUS, OPEN_CLASS)


class Authenticator:
    """One per gateway process; ``principal`` is the one check every route goes through."""

    def __init__(
        self,
        settings: GatewaySettings,
        redis: Redis,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.clock = clock
        self.ttl = settings.auth_cache_ttl
        self.fail_limit = settings.auth_fail_limit
        self.bootstrap: dict[str, ApiKey] = {}
        for token, priority in settings.key_priorities().items():
            hashed = digest(token)
            self.bootstrap[hashed] = ApiKey(
                id=f"env-{hashed[:8]}", scopes=frozenset(KEY_SCOPES), priority=priority
            )
        self._keys: dict[str, tuple[float, ApiKey | None]] = {}
        self._classes: dict[str, tuple[float, KeyClass | None]] = {}
        self._stored: tuple[float, bool] = (-1.0, False)
        self._failures: dict[str, tuple[float, int]] = {}

    async def configured(self) -> bool:
        """Whether any key exists (bootstrap or stored; the latter re-read every ``ttl``)."""
        if self.bootstrap:
            return True
        until, stored = self._stored
        now = self.clock()
        if now >= until:
            stored = bool(await self.redis.exists(keys.API_KEYS))
            self._stored = (now + self.ttl, stored)
        return stored

    async def principal(self, request: Request, need: Need) -> Principal:
        """The caller, if it may use a route that needs ``need``; a 401, 403 or 429 otherwise."""
        if not await self.configured():
            return OPEN
        address = request.client.host if request.client else ""
        self._throttle(address)
        token = _credential(request.headers.get("authorization", ""))
        browser = request.url.path in BROWSER_PAGES
        if not token:
            self._failed(address)
            raise Unauthorized(
                "unauthorized: a valid API key is required (Authorization: Bearer ...)",
                headers={"www-authenticate": BROWSER_CHALLENGE if browser else CHALLENGE},
            )
        key = await self._key(token)
        if key is None:
            self._failed(address)
            challenge = BROWSER_CHALLENGE if browser else f'{CHALLENGE}, error="invalid_token"'
            raise Unauthorized(
                "unauthorized: invalid API key", headers={"www-authenticate": challenge}
            )
        if not key.allows(need):
            raise Forbidden(
                f"forbidden: this API key lacks the {need.value!r} scope",
                headers={"www-authenticate": f'{CHALLENGE}, error="insufficient_scope"'},
            )
        klass = await self._class(key.key_class) if key.key_class else OPEN_CLASS
        if klass is None:
            raise Forbidden(f"forbidden: this API key's class {key.key_class!r} is not defined")
        return Principal(key, klass)

    async def _key(self, token: str) -> ApiKey | None:
        hashed = digest(token)
        found = self.bootstrap.get(hashed)
        if found is not None:
            return found
        now = self.clock()
        cached = self._keys.get(hashed)
        if cached is not None and cached[0] > now:
            return cached[1]
        raw = await self.redis.hget(keys.API_KEYS, hashed)
        key = ApiKey.from_json(raw) if raw else None
        _remember(self._keys, hashed, (now + self.ttl, key))
        return key

    async def _class(self, name: str) -> KeyClass | None:
        now = self.clock()
        cached = self._classes.get(name)
        if cached is not None and cached[0] > now:
            return cached[1]
        raw = await self.redis.hget(keys.KEY_CLASSES, name)
        klass = KeyClass.from_json(raw) if raw else None
        _remember(self._classes, name, (now + self.ttl, klass))
        return klass

    def _throttle(self, address: str) -> None:
        if not self.fail_limit:
            return
        since, count = self._failures.get(address, (0.0, 0))
        left = since + FAIL_WINDOW - self.clock()
        if count >= self.fail_limit and left > 0:
            raise RateLimited(
                "too many failed authentications from this address, try again later",
                headers={"retry-after": str(max(1, int(left + 0.999)))},
            )

    def _failed(self, address: str) -> None:
        if not self.fail_limit:
            return
        now = self.clock()
        since, count = self._failures.get(address, (now, 0))
        if now - since >= FAIL_WINDOW:
            since, count = now, 0
        _remember(self._failures, address, (since, count + 1))


def _remember(table: dict[str, Any], name: str, value: Any) -> None:
    if len(table) >= CACHE_MAX and name not in table:
        table.clear()  # a flood of random keys must not grow the process
    table[name] = value


# --- the one place routes are declared with their scope ---


def principal_of(request: Request) -> Principal:
    """The caller of a request that passed its route's check (``OPEN`` on public routes)."""
    found: Principal = getattr(request.state, "principal", OPEN)
    return found


async def require(request: Request, need: Need) -> Principal:
    """Check the caller for ``need`` and remember it on the request: what every declared
    route runs before its endpoint, and what anything mounted outside the route table (a
    dashboard) must call too (``ScopeGate`` does, for an ASGI app)."""
    principal = await state_of(request).auth.principal(request, need)
    request.state.principal = principal
    return principal


def guarded(endpoint: Endpoint, need: Need) -> Endpoint:
    if need is Need.PUBLIC:
        return endpoint

    @functools.wraps(endpoint)
    async def guard(request: Request) -> Response:
        audit = state_of(request).audit
        try:
            await require(request, need)
            response = await endpoint(request)
        except RequestError as exc:
            if audit is not None:
                audit.write({**fields_of(request, exc.status), "error": exc.message})
            raise
        extra: list[tuple[bytes, bytes]] | None = getattr(request.state, "rate_headers", None)
        if audit is not None and not (
            need is Need.ADMIN or request.method == "DELETE" or hasattr(request.state, "job")
        ):
            audit = None  # reads of one's own models and jobs are not decisions
        if extra or audit is not None:
            return Tapped(response, request, audit, extra or [])
        return response

    return guard


class ScopedRoute(Route):
    """A route and the scope it needs; its endpoint runs only after the check."""

    def __init__(self, path: str, endpoint: Endpoint, *, methods: list[str], scope: Need) -> None:
        super().__init__(path, guarded(endpoint, scope), methods=methods)
        self.scope = scope


def route(path: str, endpoint: Endpoint, *, methods: list[str], scope: Need) -> ScopedRoute:
    return ScopedRoute(path, endpoint, methods=methods, scope=scope)


class ScopeGate:
    """An ASGI app (a dashboard, say) behind the same check, for ``Mount``."""

    def __init__(self, app: ASGIApp, need: Need) -> None:
        self.app = app
        self.need = need

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            request = Request(scope, receive, send)
            try:
                await require(request, self.need)
            except RequestError as exc:
                from corral.gateway.app import error_response

                response = error_response(request.url.path, exc.message, exc.status)
                response.headers.update(exc.headers)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ScopedMount(Mount):
    def __init__(self, path: str, app: ASGIApp, *, scope: Need) -> None:
        super().__init__(path, app=ScopeGate(app, scope))
        self.scope = scope


def unscoped(routes: list[BaseRoute]) -> list[str]:
    """The paths of routes declared without a scope (the app refuses to start with any)."""
    return [
        getattr(r, "path", repr(r)) for r in routes if not isinstance(r, ScopedRoute | ScopedMount)
    ]


def _credential(header: str) -> str:
    """The API key in an ``Authorization`` header: a bearer token, or the password of Basic
    credentials (what a browser sends for the dashboard); "" when there is none."""
    scheme, _, value = header.partition(" ")
    value = value.strip()
    match scheme.lower():
        case "bearer":
            return value
        case "basic":
            try:
                decoded = base64.b64decode(value, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                return ""
            return decoded.partition(":")[2]
        case _:
            return ""
