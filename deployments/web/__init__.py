"""The fleet console: one page (``index.html``) and its script, served by the Serve application at
``/`` and ``/console/...`` (``deployments.routes.console``). The page holds no data: everything it shows comes
from the API with the token the user signs in with, so it is served without one. Its charts are
Plotly's, from the installed ``plotly`` package (never copied into the repository); the page loads
nothing from outside the application (its Content-Security-Policy says so to the browser too).
"""

from __future__ import annotations

from functools import cache
from importlib import resources

__all__ = ["ASSETS", "asset", "CONTENT_SECURITY_POLICY"]

# name under /console/ -> (package, file, media type)
ASSETS = {
    "console.js": ("deployments.web", "console.js", "text/javascript; charset=utf-8"),
    "console.css": ("deployments.web", "console.css", "text/css; charset=utf-8"),
    "plotly.min.js": ("plotly", "package_data/plotly.min.js", "text/javascript; charset=utf-8"),
}
PAGE = ("deployments.web", "index.html", "text/html; charset=utf-8")
# Plotly sets inline styles on its SVG; nothing else is inline, and nothing comes from elsewhere.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; connect-src 'self'; img-src 'self' data:; "
                           "style-src 'self' 'unsafe-inline'; font-src 'self'; base-uri 'none'; "
                           "form-action 'self'; frame-ancestors 'none'")


@cache
def asset(name: str | None) -> tuple[bytes, str]:
    """The bytes and media type of ``/console/<name>`` (None: the page itself); KeyError if unknown."""
    package, path, media = PAGE if name is None else ASSETS[name]
    return resources.files(package).joinpath(path).read_bytes(), media
