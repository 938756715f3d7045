"""Fleet analytics: every query of ``analytics.queries`` over a range of days and a cohort, cells under
the privacy floor suppressed."""

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError

from analytics import cohort as cohorts
from analytics import queries
from analytics.cohort import Cohort
from deployments.errors import refused_as
from deployments.guard import needs
from deployments.schemas import CohortText, Day
from deployments.service import Api
from deployments.settings import MAX_K
from deployments.tokens import Scope, allows
from podpulse.errors import ConfigError

router = APIRouter()


def privacy_floor(api: Api, k: int | None) -> int:
    """The k an analytics request runs with: its own, never below ``min_k`` (422 naming ``k``)."""
    floor = api.config.min_k
    if k is not None and k < floor:
        raise RequestValidationError([{
            "type": "greater_than_equal", "loc": ("query", "k"), "input": k, "ctx": {"ge": floor},
            "msg": f"Input should be greater than or equal to {floor} (the privacy floor, min_k)"}])
    return floor if k is None else k


@router.get("/v1/analytics/{query}", dependencies=[needs(Scope.read_aggregates)])
def analytics(api: Api, request: Request, query: str, start: Annotated[Day | None, Query(alias="from")] = None,
              end: Annotated[Day | None, Query(alias="to")] = None,
              k: Annotated[int | None, Query(ge=1, le=MAX_K)] = None,
              model: CohortText = None, firmware: CohortText = None, host_device: CohortText = None,
              state: Annotated[str | None, Query(description="a state's code, e.g. QLD")] = None,
              urban: Annotated[bool | None, Query(description="true: urban devices, false: rural")] = None,
              schema_version: Annotated[int | None, Query(ge=1, le=99)] = None,
              first_seen_from: Day | None = None, first_seen_to: Day | None = None,
              saved_name: Annotated[str | None, Query(alias="cohort", description="a saved cohort's name "
                                                      "(GET /v1/cohorts), instead of the fields")] = None) -> dict:
    """Days from ``from`` to ``to`` (both included, 2000-01-01..2100-12-31; default: what the
    store covers); cells under ``k`` devices suppressed. ``k`` defaults to the privacy floor
    ``min_k`` (user_config) and may raise it, never lower it: a lower ``k`` is a 422 naming ``k``.
    The cohort fields (``model`` ... ``first_seen_to``, ``analytics.cohort``) narrow the devices
    counted, by what each device last reported; every cell still needs ``k`` devices.
    Device ids (battery_health's outliers) only for a token with ``read:devices``."""
    k = privacy_floor(api, k)
    if query not in queries.QUERIES:
        raise HTTPException(status_code=404, detail=f"no query {query!r}; try {', '.join(queries.QUERIES)}")
    with refused_as("query"):
        cohort = Cohort(model=model, firmware=firmware, host_device=host_device, state=state, urban=urban,
                        schema_version=schema_version, first_seen_from=first_seen_from, first_seen_to=first_seen_to)
        if saved_name is not None:
            if cohort:
                raise ConfigError("cohort: give a saved cohort's name or the cohort's fields, not both")
            cohort = cohorts.named(api.readers, saved_name)
    with api.readers.reader() as r:
        covered = queries.data_range(r)
        if covered is None:
            raise HTTPException(status_code=404, detail="the store holds no rollups yet")
        first = start or covered[0]
        stop = end + timedelta(days=1) if end else covered[1]
        result = queries.QUERIES[query](r, first, stop, k, cohort).as_dict()
    result["range"] = {"from": first.isoformat(), "to": (stop - timedelta(days=1)).isoformat()}
    result["cohort"] = cohort.as_dict() | {"label": cohort.label()}
    if "outliers" in result["extra"] and not allows(request.state.scopes, Scope.read_devices.value):
        result["extra"]["outliers"] = []
        result["notes"].append("device ids (outliers) need a token with the read:devices scope")
    return result
