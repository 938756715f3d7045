"""The Serve application's tuning and its ``user_config`` (:class:`UserConfig`), which Serve applies to
the running replicas with ``reconfigure``.

``user_config`` is a mapping; a key that is absent or null takes its default. A refused one is a
ValueError naming every refused key, what it must be and what it got (:func:`parse_user_config`):
``serve status`` shows that message when a deploy fails on it.
"""

from __future__ import annotations

import math
from datetime import date
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from podpulse.privacy import DAILY_EPSILON, MIN_K, QUERY_EPSILON

__all__ = ["UserConfig", "USER_CONFIG_KEYS", "parse_user_config", "MAX_ROWS", "MAX_EVENTS", "MAX_BODY_BYTES",
           "FIRST_DAY", "LAST_DAY", "MAX_K", "MAX_ECHO_CHARS", "DELIVERY_TIMEOUT_S", "DELIVERY_WAIT_S",
           "RETRY_AFTER_S", "DRIFT_INTERVAL_S", "MAX_ONGOING_REQUESTS", "SCORE_BATCH_SIZE", "SCORE_BATCH_WAIT_S",
           "MAX_SCORE_BATCH_WAIT_S", "READ_CONNECTIONS", "READ_WAIT_S", "TIMELINE_DAYS"]

MAX_ROWS = 1000  # rows of one scoring request
MAX_EVENTS = 5000  # messages of one POST /v1/telemetry
# A full batch of MAX_EVENTS events is ~2 MB of JSON (~400 B an event); the default leaves room for
# newer versions' fields. A longer body is refused with 413 before FastAPI parses any of it.
MAX_BODY_BYTES = 4 * 1024 * 1024
# Analytics dates (from, to) outside these days are a 422 naming the parameter: the store holds
# nothing there, and date arithmetic near year 9999 overflows.
FIRST_DAY, LAST_DAY = date(2000, 1, 1), date(2100, 12, 31)
MAX_K = 1000
TIMELINE_DAYS = 30  # a device timeline's span when only its first day is given
MAX_ECHO_CHARS = 200  # a 422 repeats the refused input only when it is short and JSON-safe
# POST /v1/telemetry answers 202 only once Kafka acknowledged every accepted event. librdkafka
# gives up on an event after DELIVERY_TIMEOUT_S (message.timeout.ms), so an event the request
# answered 503 for is not delivered later behind the client's retry; the request itself waits
# a little longer, for those expiry reports (librdkafka scans for expired messages each second).
DELIVERY_TIMEOUT_S = 10.0
DELIVERY_WAIT_S = DELIVERY_TIMEOUT_S + 2.0
RETRY_AFTER_S = 5
DRIFT_INTERVAL_S = 3600.0  # how often a replica computes the served version's feature drift (user_config)
# Requests in flight on one replica at most (see the deployment's options), so also the largest batch.
MAX_ONGOING_REQUESTS = 256
# Scoring batches (user_config score_batch_size, score_batch_wait_s): concurrent scoring requests
# are scored in one model call of at most this many requests, gathered for at most this long
# after the first one arrives. A lone request waits the whole wait: keep it to milliseconds.
# 0: a batch takes the requests already queued and waits for no more. bench.serve.run at 200 req/s,
# alternating runs: p50 4.3 and 4.7 ms against 6.1 and 5.2 ms with 1 ms; batch scoring about the
# same; `podpulse bench serve` once on 0 afterwards: 5.38 ms (README, Performance).
SCORE_BATCH_SIZE = 64
SCORE_BATCH_WAIT_S = 0.0
MAX_SCORE_BATCH_WAIT_S = 1.0
# Read connections a replica holds at most (per backend): a burst of analytics reads queues for
# them, and answers 503 after READ_WAIT_S, instead of taking the connections the writer needs.
READ_CONNECTIONS = 4
READ_WAIT_S = 10.0


# -- the rules of user_config's values: each raises ValueError("must be ...") -------------------------

def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _rule(ok, must: str, convert=lambda value: value) -> BeforeValidator:
    """A value ``ok`` accepts, as ``convert`` makes it, or ValueError saying what it must be."""
    def validate(value):
        try:
            if ok(value):
                return convert(value)
        except (TypeError, ValueError):
            pass
        raise ValueError(must)
    return BeforeValidator(validate)


def _whole(lo: int, hi: int):
    return lambda value: _number(value) and float(value).is_integer() and lo <= value <= hi


def _seconds(lo: float, hi: float, zero: bool = False):
    return lambda value: _number(value) and (zero and value == 0 or lo <= value <= hi)


def _percent(value) -> bool:
    return not isinstance(value, bool) and 0 <= float(value) <= 100  # a numeric string too


VersionDir = Annotated[str | None, _rule(lambda v: isinstance(v, str) and v.strip(),
                                          "must be a version directory (a non-empty string) or null")]


class UserConfig(BaseModel):
    """The ``user_config`` of the Serve deployment, checked; immutable."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_path: VersionDir = None  # the stable battery-anomaly version; None: the registry's latest
    canary_model_path: VersionDir = None  # a second version, answering canary_percent of scoring requests
    canary_percent: Annotated[float, _rule(_percent, "must be within 0..100", float)] = 0.0
    score_batch_size: Annotated[int, _rule(
        _whole(1, MAX_ONGOING_REQUESTS), f"must be a whole number from 1 to {MAX_ONGOING_REQUESTS} (scoring requests "
                                         f"scored in one model call; no more are ever in flight on a replica)", int)
    ] = SCORE_BATCH_SIZE
    score_batch_wait_s: Annotated[float, _rule(
        _seconds(0, MAX_SCORE_BATCH_WAIT_S), f"must be seconds from 0 to {MAX_SCORE_BATCH_WAIT_S:g} (how long a batch "
                                             f"waits for more requests; default {SCORE_BATCH_WAIT_S:g})", float)
    ] = SCORE_BATCH_WAIT_S
    max_body_bytes: Annotated[int, _rule(  # a longer request body: 413
        _whole(1024, 1024**3), f"must be a whole number from 1024 to {1024**3} (bytes a request body may take)", int)
    ] = MAX_BODY_BYTES
    docs: Annotated[bool, _rule(  # serve /docs, /redoc and /openapi.json, without the token
        lambda v: isinstance(v, bool), "must be true or false (serve /docs, /redoc and /openapi.json)")] = False
    min_k: Annotated[int, _rule(  # the privacy floor: analytics refuse a lower k
        _whole(2, MAX_K), f"must be a whole number from 2 to {MAX_K} (the lowest k an analytics request may ask for)",
        int)
    ] = MIN_K
    epsilon_per_answer: Annotated[float, _rule(  # what one private answer spends (podpulse.privacy)
        lambda v: not isinstance(v, bool) and 0.01 <= float(v) <= 10, "must be from 0.01 to 10 (the ε one private "
                                                                       "answer spends)", float)
    ] = QUERY_EPSILON
    daily_epsilon: Annotated[float, _rule(  # a token's budget per UTC day
        lambda v: not isinstance(v, bool) and 0.01 <= float(v) <= 100, "must be from 0.01 to 100 (the ε a token may "
                                                                        "spend per UTC day)", float)
    ] = DAILY_EPSILON
    drift_interval_s: Annotated[float, _rule(  # feature drift of the served version, this often; 0: never
        _seconds(1, 7 * 86_400, zero=True), f"must be 0 (never) or seconds from 1 to {7 * 86_400} (how often a "
                                            f"replica computes the served version's feature drift)", float)
    ] = DRIFT_INTERVAL_S


USER_CONFIG_KEYS = tuple(UserConfig.model_fields)
# The order refused values are named in: the models, the batches, the guards, the schedule.
PROBLEM_ORDER = ("model_path", "canary_model_path", "canary_percent", "score_batch_size", "score_batch_wait_s",
                 "max_body_bytes", "min_k", "docs", "epsilon_per_answer", "daily_epsilon",
                 "drift_interval_s")


def parse_user_config(config: Any) -> UserConfig:
    """``user_config`` (a mapping; null or a missing key: its default) → :class:`UserConfig`, or a
    ValueError naming every refused key, what it must be and what it got."""
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise ValueError(f"refused user_config: it must be a mapping of {', '.join(USER_CONFIG_KEYS)}, "
                         f"got {type(config).__name__}")
    try:
        return UserConfig.model_validate({key: value for key, value in config.items()
                                          if value is not None or key not in USER_CONFIG_KEYS})
    except ValidationError as e:
        raise ValueError("refused user_config: " + "; ".join(_problems(e))) from None


UNKNOWN = ("extra_forbidden", "invalid_key")  # pydantic's errors for a key that is not a field


def _problems(e: ValidationError) -> list[str]:
    """Unknown keys first (one line naming them all), then each refused value in the fields' order."""
    errors = e.errors(include_url=False)
    unknown = sorted((err["loc"][0] for err in errors if err["type"] in UNKNOWN), key=str)
    out = [f"unknown key(s) {', '.join(map(repr, unknown))} (known: {', '.join(USER_CONFIG_KEYS)})"] if unknown else []
    order = {key: i for i, key in enumerate(PROBLEM_ORDER)}
    refused = sorted((err for err in errors if err["type"] not in UNKNOWN), key=lambda err: order[err["loc"][0]])
    for err in refused:
        must = str(err.get("ctx", {}).get("error", err["msg"]))
        out.append(f"{err['loc'][0]} {must}, got {err['input']!r}")
    return out
