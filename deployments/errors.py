"""How refusals and failures are answered: 422 naming the field (never a 500 for what a request held),
503 with ``Retry-After`` for a store that cannot be read now. :func:`install` puts the handlers on an app."""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from typing import Iterator

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from deployments.settings import MAX_ECHO_CHARS, RETRY_AFTER_S
from podpulse.errors import ConfigError
from storage.base import StorageError

__all__ = ["install", "refused_detail", "refusal", "refused_as", "text", "log"]

log = logging.getLogger("ray.serve")  # Serve's logger: lines land in the replica's log


def _echo(value):
    """``value`` made JSON (as FastAPI would) when it is short and strict JSON (finite numbers,
    text UTF-8 can write), else None: a 422 never fails on, or floods with, what it refused."""
    try:
        value = jsonable_encoder(value)
        encoded = json.dumps(value, allow_nan=False, ensure_ascii=False)
        encoded.encode()
    except (TypeError, ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
        return None
    return value if len(encoded) <= MAX_ECHO_CHARS else None


def text(value) -> str:
    """``value`` as text UTF-8 can write (a lone surrogate becomes its escape)."""
    return str(value).encode("utf-8", "backslashreplace").decode()


def refused_detail(errors) -> list[dict]:
    """FastAPI's 422 detail, made safe to send: ``loc`` and ``msg`` as writable text, ``input`` and
    ``ctx`` only where :func:`_echo` keeps them."""
    out = []
    for error in errors:
        item = {"type": text(error.get("type")),
                "loc": [x if isinstance(x, int) else text(x) for x in error.get("loc", ())],
                "msg": text(error.get("msg"))}
        for key in ("input", "ctx"):
            kept = _echo(error.get(key)) if key in error else None
            if kept is not None:
                item[key] = kept
        out.append(item)
    return out


def refusal(where: str, e: ConfigError) -> RequestValidationError:
    """A 422 for a :class:`ConfigError` whose message starts with the field it is about."""
    field = str(e).split(":", 1)[0]
    return RequestValidationError([{"loc": (where, field), "msg": str(e), "type": "value_error"}])


async def store_unavailable(request: Request, exc: StorageError) -> JSONResponse:
    """A store that cannot be read now (down, or every read connection busy): 503, try again later."""
    log.warning("%s %s: %s", request.method, request.url.path, exc)  # the why, with paths: for the log only
    return JSONResponse({"detail": "the store cannot be reached now: try again later"}, status_code=503,
                        headers={"Retry-After": str(RETRY_AFTER_S)})


async def refused(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming the field, as FastAPI's own handler, but never a 500 for what the request held."""
    return JSONResponse({"detail": refused_detail(exc.errors())}, status_code=422)


@contextmanager
def refused_as(where: str) -> Iterator[None]:
    """Around the parsing of what a request sent (``"query"`` or ``"body"``): a :class:`ConfigError`
    there is the caller's, a 422 naming the field. Elsewhere a ConfigError is the server's (a 500)."""
    try:
        yield
    except ConfigError as e:
        raise refusal(where, e) from None


def install(app: FastAPI) -> None:
    app.add_exception_handler(StorageError, store_unavailable)
    app.add_exception_handler(RequestValidationError, refused)
