"""Fleet analytics: every query of ``analytics.queries`` over a range of days and a cohort.

An ``admin`` token reads exact figures (cells under the privacy floor suppressed), and each exact
read is recorded: who, what, when (the ``exact_reads`` table and a metric). Any other token reads the
differentially private release of the queries that have one (``analytics.private``), paid from its
daily ε budget (``storage.ledger``): the ε is spent before the answer is computed, and the answer is
kept, so the same question on the same UTC day gets the same answer and spends nothing.
"""

import hashlib
import json
from datetime import date, datetime, time, timedelta, timezone
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError

from analytics import cohort as cohorts
from analytics import private, queries
from analytics.cohort import Cohort
from deployments.errors import refused_as
from deployments.guard import needs
from deployments.schemas import CohortText, Day
from deployments.service import Api
from deployments.settings import MAX_K
from deployments.tokens import Scope, allows
from podpulse import metrics
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


def budget_day() -> tuple[date, datetime]:
    """Today's budget day (UTC) and when the next one starts."""
    now = datetime.now(timezone.utc)
    return now.date(), datetime.combine(now.date() + timedelta(days=1), time(), timezone.utc)


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
    store covers). ``k`` defaults to the privacy floor ``min_k`` (user_config) and may raise it,
    never lower it: a lower ``k`` is a 422 naming ``k``. The cohort fields (``model`` ...
    ``first_seen_to``, ``analytics.cohort``) narrow the devices counted, by what each device last
    reported. An admin token gets exact figures; any other, the private release (each value with its
    95% interval, the ε spent; 429 once the token's daily budget is spent). Device ids
    (battery_health's outliers) only for a token with ``read:devices``."""
    k = privacy_floor(api, k)
    if query not in queries.QUERIES:
        raise HTTPException(status_code=404, detail=f"no query {query!r}; try {', '.join(queries.QUERIES)}")
    exact = allows(request.state.scopes, Scope.admin.value)
    if not exact and query not in private.RELEASES:
        raise HTTPException(status_code=403, detail=f"{query} has no private release yet: its exact figures need "
                                                    f"an admin token (private: {', '.join(private.RELEASES)})")
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
    if stop <= first:
        raise HTTPException(status_code=422, detail=f"the range ends ({stop - timedelta(days=1)}) before it "
                                                    f"starts ({first})")
    if exact:
        with api.readers.reader() as r:
            result = queries.QUERIES[query](r, first, stop, k, cohort).as_dict()
        who = request.state.token
        api.ledger.audit(who, f"{query} {first}..{stop - timedelta(days=1)} k={k} cohort={cohort.label()}")
        metrics.exact_read(who, query)
    else:
        result = private_answer(api, request.state.token, query, first, stop, k, cohort)
    result["range"] = {"from": first.isoformat(), "to": (stop - timedelta(days=1)).isoformat()}
    result["cohort"] = cohort.as_dict() | {"label": cohort.label()}
    if "outliers" in result["extra"] and not allows(request.state.scopes, Scope.read_devices.value):
        result["extra"]["outliers"] = []
        result["notes"].append("device ids (outliers) need a token with the read:devices scope")
    return result


def private_answer(api: Api, token: str, query: str, first: date, stop: date, k: int, cohort: Cohort) -> dict:
    """The private answer to this question today: the one released already, or a new one paid from
    ``token``'s budget (429 when that is spent)."""
    epsilon, budget = api.config.epsilon_per_answer, api.config.daily_epsilon
    question = json.dumps({"query": query, "from": first.isoformat(), "to": stop.isoformat(), "k": k,
                           "cohort": cohort.as_dict(), "epsilon": epsilon}, sort_keys=True)
    key = hashlib.sha256(question.encode()).hexdigest()
    day, refresh = budget_day()
    answer = api.ledger.answer(day, key)
    if answer is not None:
        answer["privacy"]["spent_now"] = 0.0
        return answer
    left = api.ledger.spend(token, day, epsilon, budget)
    if left is None:
        metrics.budget_refused(token)
        wait = int((refresh - datetime.now(timezone.utc)).total_seconds()) + 1
        raise HTTPException(status_code=429, headers={"Retry-After": str(wait)},
                            detail=f"this token's privacy budget for {day} ({budget:g} ε) is spent: a new answer "
                                   f"costs {epsilon:g}; it refreshes at {refresh.isoformat()} "
                                   f"(answers released today are still free: GET /v1/privacy/budget)")
    metrics.epsilon_spent(token, epsilon)
    with api.readers.reader() as r:
        fresh = private.release(r, query, first, stop, k, cohort, epsilon)
    answer = api.ledger.release(day, key, fresh)
    answer["privacy"]["spent_now"] = epsilon
    return answer


@router.get("/v1/privacy/budget", dependencies=[needs(Scope.read_aggregates)])
def privacy_budget(api: Api, request: Request) -> dict:
    """This token's privacy budget today: what a new private answer costs, what is spent and left, and
    when it refreshes. An admin token reads exact figures and spends none."""
    day, refresh = budget_day()
    spent = api.ledger.spent(request.state.token, day)
    budget = api.config.daily_epsilon
    return {"token": request.state.token, "day": day.isoformat(), "daily_epsilon": budget,
            "epsilon_per_answer": api.config.epsilon_per_answer, "spent": spent,
            "left": max(round(budget - spent, 6), 0.0), "refreshes_at": refresh.isoformat(),
            "exact": allows(request.state.scopes, Scope.admin.value)}
