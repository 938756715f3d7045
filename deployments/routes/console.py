"""The health check and the fleet console's page and files: open, they hold no data."""

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

from deployments import web
from deployments.guard import OPEN

router = APIRouter()


@router.get("/healthz", dependencies=[OPEN])
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/", include_in_schema=False, dependencies=[OPEN])
def page() -> Response:
    """The fleet console (``deployments.web``): sign in with a token; the views live in the URL."""
    body, media = web.asset(None)
    return Response(body, media_type=media, headers={"Content-Security-Policy": web.CONTENT_SECURITY_POLICY,
                                                      "Cache-Control": "no-cache"})


@router.get("/console/{name}", include_in_schema=False, dependencies=[OPEN])
def asset(name: str) -> Response:
    if name not in web.ASSETS:
        raise HTTPException(status_code=404, detail=f"no console file {name!r}")
    body, media = web.asset(name)
    return Response(body, media_type=media, headers={"Cache-Control": "max-age=3600",
                                                      "X-Content-Type-Options": "nosniff"})
