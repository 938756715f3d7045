"""The health check and the fleet console's page and files: open, they hold no data. Each console file
is a route of its own, so a name that is not one of them is an unknown path (a token, then 404)."""

from fastapi import APIRouter
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


def _file(name: str):
    def console_file() -> Response:
        body, media = web.asset(name)
        return Response(body, media_type=media, headers={"Cache-Control": "max-age=3600",
                                                          "X-Content-Type-Options": "nosniff"})
    return console_file


for _name in web.ASSETS:
    router.add_api_route(f"/console/{_name}", _file(_name), methods=["GET"], include_in_schema=False,
                         dependencies=[OPEN])
