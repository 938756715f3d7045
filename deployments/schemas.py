"""What the routes take: request bodies, and the path and query values with their rules. A value a
rule refuses is a 422 naming its field (``deployments.errors``)."""

# No `from __future__ import annotations`: FastAPI and pydantic read these annotations at runtime.
import re
from datetime import date
from typing import Annotated

from fastapi import Path as PathParam
from fastapi import Query
from pydantic import AfterValidator, BaseModel, Field

from analytics import cohort as cohorts
from deployments.settings import FIRST_DAY, LAST_DAY, MAX_EVENTS, MAX_ROWS
from podpulse.contract import DEVICE_ID

__all__ = ["DeviceId", "Label", "Day", "CohortText", "Region", "ScoreRow", "ScoreRequest", "CohortRequest",
           "TelemetryRequest"]

REGION = re.compile(r"[A-Z]{2,3}-(urban|rural)")
LABEL = re.compile(r"[^\x00-\x1f\x7f-\x9f\ud800-\udfff]{1,64}")  # as the contract's: no controls, lone surrogates


def _matching(pattern: re.Pattern, what: str) -> AfterValidator:
    """A validator refusing a value ``pattern`` does not match whole (``fullmatch``: no trailing newline)."""
    def check(value: str) -> str:
        if not pattern.fullmatch(value):
            raise ValueError(f"must be {what}")
        return value
    return AfterValidator(check)


DeviceId = Annotated[str, PathParam(), _matching(DEVICE_ID, "1 to 64 of A-Z a-z 0-9 . _ : -")]
Label = Annotated[str, _matching(LABEL, "1 to 64 printable characters")]
Day = Annotated[date, Field(ge=FIRST_DAY, le=LAST_DAY)]
CohortText = Annotated[str | None, Query(description="as devices send it, e.g. AirPods Pro 2 or 7A305")]
Region = Annotated[str, Query(description="STATE-urban or STATE-rural, e.g. NSW-urban"),
                   _matching(REGION, "STATE-urban or STATE-rural, e.g. NSW-urban")]


class ScoreRow(BaseModel):
    """One device-hour: its context and the drain observed over its paired samples."""

    model: Label
    firmware: Label
    playback_h: float = Field(ge=0, le=1)
    anc: float = Field(ge=0, le=1)
    adaptive: float = Field(ge=0, le=1)
    transparency: float = Field(ge=0, le=1)
    output_dba: float = Field(ge=0, le=140)
    drain_left_pct: float = Field(ge=0, le=100)
    drain_right_pct: float = Field(ge=0, le=100)


class ScoreRequest(BaseModel):
    rows: list[ScoreRow] = Field(min_length=1, max_length=MAX_ROWS)


class CohortRequest(BaseModel):
    """A cohort to save: its name and its fields (``analytics.cohort.Cohort``)."""

    name: Annotated[str, _matching(cohorts.NAME, "1 to 64 of letters, digits, spaces and ._+()-")]
    cohort: dict[str, str | int | bool | None] = Field(max_length=len(cohorts.COHORT_FIELDS))


class TelemetryRequest(BaseModel):
    """Messages as the topic takes them: events, device uploads (``{..., "samples": [...]}``) or both."""

    events: list[dict] = Field(min_length=1, max_length=MAX_EVENTS)
