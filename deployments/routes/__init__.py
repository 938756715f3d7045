"""The HTTP API, one router per concern. A route is one function in one file, and it declares the
scope it needs (``deployments.guard.needs``) or that it is open (``deployments.guard.OPEN``).

No `from __future__ import annotations` in these modules: FastAPI reads the routes' annotations at
runtime to tell bodies from query parameters.
"""

from deployments.routes import analytics, cohorts, console, devices, ingest, models

ROUTERS = (console.router, ingest.router, models.router, devices.router, cohorts.router, analytics.router)
