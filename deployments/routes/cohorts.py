"""Saved cohorts: a name for a set of cohort fields, then ``?cohort=NAME`` on every analytics query."""

from fastapi import APIRouter, HTTPException

from analytics import cohort as cohorts
from analytics.cohort import Cohort
from deployments.errors import refused_as
from deployments.guard import needs
from deployments.schemas import CohortRequest
from deployments.service import Api
from deployments.tokens import Scope
from podpulse.errors import ConfigError

router = APIRouter()


@router.get("/v1/cohorts", dependencies=[needs(Scope.read_aggregates)])
def list_cohorts(api: Api) -> dict:
    """The saved cohorts, oldest first: each name, its fields and its label."""
    found = cohorts.saved(api.readers)
    return {"cohorts": [{"name": n, "cohort": c.as_dict(), "label": c.label()} for n, c in found.items()]}


@router.post("/v1/cohorts", status_code=201, dependencies=[needs(Scope.admin)])
def save_cohort(api: Api, body: CohortRequest) -> dict:
    """Save a cohort under a new name (409 when the name is taken); then ``?cohort=NAME`` on every
    analytics query. A write: ``admin``. The replica opens the store for this one write."""
    with refused_as("body"):
        cohort = Cohort.parse(body.cohort)
        try:
            with api.readers.writing():  # the embedded store: after the reads in flight
                cohorts.save(api.storage, body.name, cohort)
        except ConfigError as e:
            if "saved already" in str(e):
                raise HTTPException(status_code=409, detail=str(e)) from None
            raise
    return {"name": body.name, "cohort": cohort.as_dict(), "label": cohort.label()}
