"""Who may call which route: each route declares its scope, and :class:`Guard` checks it from the
headers before any of the body is read.

A route states what it needs as a dependency, ``dependencies=[needs(Scope.read_aggregates)]``, or
that it is open, ``dependencies=[OPEN]`` (the health check, the console's page and script). A route
that declares neither is refused (403, even to ``admin``): fail closed. :func:`declared_scopes` lists
every route with its scope, and refuses an application with an undeclared one before it serves.

Tokens come from ``deployments.tokens`` (``$PODPULSE_API_TOKENS_FILE``, re-read when it changes, and
``$PODPULSE_API_TOKEN``, every scope).
"""

from __future__ import annotations

from typing import Callable

from fastapi import Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute, iter_route_contexts
from ray import serve
from ray.serve.exceptions import RayServeException
from starlette.middleware.body_limit import RequestBodyLimitResponder
from starlette.routing import Match

from deployments.settings import UserConfig
from deployments.tokens import Scope, Token, Tokens, allows

__all__ = ["needs", "OPEN", "Needs", "Guard", "declared_scopes", "scope_of", "routes_of", "replica_config", "DOCS_PATHS"]

DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
TOKENS = Tokens()  # this replica's: the environment's token and the tokens file


class Needs:
    """A route's declared scope (None: open to anyone). As a dependency it checks again what the
    Guard checked before the body was read: a route reached another way is still guarded."""

    def __init__(self, scope: Scope | None):
        self.scope = scope

    async def __call__(self, request: Request) -> None:  # async: no thread hop per request
        if self.scope is not None and not allows(getattr(request.state, "scopes", frozenset()), self.scope.value):
            raise HTTPException(status_code=403, detail=f"this token lacks the scope {self.scope.value!r}")

    def __repr__(self) -> str:
        return f"needs({self.scope.value if self.scope else 'nothing'})"


def needs(scope: Scope) -> Depends:
    """The dependency that declares a route's scope."""
    return Depends(Needs(scope))


OPEN = Depends(Needs(None))  # declared open: no token needed


def routes_of(routes) -> list:
    """Every route of an application, its included routers' too (FastAPI keeps an included router
    whole, as one entry of ``app.routes``)."""
    return list(iter_route_contexts(routes))


def _declared(route) -> list[Needs]:
    return [d.dependency for d in getattr(route, "dependencies", None) or () if isinstance(d.dependency, Needs)]


def declared_scopes(routes) -> dict[tuple[str, str], str | None]:
    """(method, path) → the scope each API route declares (None: open); ValueError naming the routes
    that declare none, or more than one."""
    table, undeclared = {}, []
    for route in routes_of(routes):
        if not isinstance(route.original_route, APIRoute):
            continue  # the docs' own routes: DOCS_PATHS
        found = _declared(route)
        if len(found) != 1:
            undeclared.append(f"{'/'.join(sorted(route.methods))} {route.path}")
            continue
        for method in route.methods:
            table[(method, route.path)] = found[0].scope.value if found[0].scope else None
    if undeclared:
        raise ValueError(f"routes without one declared scope (deployments.guard.needs or OPEN): "
                         f"{', '.join(undeclared)}")
    return table


def scope_of(routes, scope: dict) -> tuple[bool, Needs | None]:
    """Whether a route answers this request (its path and method), and the scope declared by the
    route of its path: that route's, else one of the same path with another method (the request then
    gets 405, past the same scope); None when the route declares none, or when no route has the path."""
    other = None
    for route in routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            found = _declared(route)
            return True, found[0] if len(found) == 1 else None
        if match == Match.PARTIAL and other is None:
            other = route
    found = _declared(other) if other is not None else []
    return False, found[0] if len(found) == 1 else None


def replica_config() -> UserConfig:
    """The checked user_config of the replica serving this request; the defaults outside Serve."""
    try:
        servable = serve.get_replica_context().servable_object
    except RayServeException:
        return UserConfig()
    return getattr(servable, "config", None) or UserConfig()


def caller(headers: list[tuple[bytes, bytes]]) -> Token | None:
    """The token of the one ``Authorization`` header; None without exactly one known token."""
    given = [value for name, value in headers if name.lower() == b"authorization"]
    return TOKENS.find(given[0]) if len(given) == 1 else None


def route_path(scope: dict) -> str:
    """The path the app routes on: without the application's route prefix (``root_path``)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The declared body length; -1 when it is not one non-negative whole number; None when absent."""
    given = [value for name, value in headers if name.lower() == b"content-length"]
    if not given:
        return None
    return int(given[0]) if len(set(given)) == 1 and given[0].isdigit() else -1


def refused(body: dict, status: int, headers: dict | None = None) -> JSONResponse:
    """A refusal before the body is read, which closes the connection (``Connection: close``): kept
    open, the server would read whatever body was sent, to its end, to reach the next request."""
    return JSONResponse(body, status_code=status, headers={**(headers or {}), "Connection": "close"})


class Guard:
    """Pure ASGI middleware: what the headers can settle is settled before any of the body is read.

    A route declared open is served to anyone; the docs paths openly when ``docs`` is set, else
    404; every other path needs the bearer token (401) with the route's declared scope (403, naming
    it), and a route that declares none is refused (403). Another method on a route's path is held
    to that route's scope before its 405; a path no route has needs a token, then gets 404. A declared ``Content-Length`` over ``max_body_bytes`` gets 413 at once, and a body
    that grows past it while being read gets 413 before it is parsed (Starlette's
    ``RequestBodyLimitResponder``). ``settings`` gives the replica's current user_config.
    """

    def __init__(self, app, settings: Callable[[], UserConfig] = replica_config):
        self.app, self.settings = app, settings
        self._routes = None  # the application's routes, read at the first request

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        config = self.settings()
        if self._routes is None:
            self._routes = routes_of(scope["app"].router.routes)
        refusal = self.refusal(scope, config, self._routes)
        if refusal is not None:
            return await refusal(scope, receive, send)
        await RequestBodyLimitResponder(self.app, config.max_body_bytes)(scope, receive, send)

    @staticmethod
    def refusal(scope: dict, config: UserConfig, routes: list) -> JSONResponse | None:
        path, headers = route_path(scope), scope["headers"]
        if path in DOCS_PATHS:
            if not config.docs:
                return JSONResponse({"detail": "Not Found"}, status_code=404)
        else:
            routed, declared = scope_of(routes, scope)
            if declared is None or declared.scope is not None:
                token = caller(headers)
                if token is None:
                    return refused({"detail": "missing or wrong bearer token"}, 401, {"WWW-Authenticate": "Bearer"})
                if routed and declared is None:
                    return refused({"detail": "this route declares no scope, so it is refused"}, 403)
                if declared is not None and not allows(token.scopes, declared.scope.value):
                    need = declared.scope.value
                    return refused({"detail": f"this token lacks the scope {need!r}"}, 403,
                                   {"WWW-Authenticate": f'Bearer scope="{need}"'})
                scope.setdefault("state", {}).update(scopes=token.scopes, token=token.name)
        length = content_length(headers)
        if length == -1:
            return refused({"detail": "Content-Length must be one whole number of bytes"}, 400)
        if length is not None and length > config.max_body_bytes:
            return refused({"detail": f"the body takes {length} bytes, over the limit of "
                                      f"{config.max_body_bytes} (max_body_bytes)"}, 413)
        return None
