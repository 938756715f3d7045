"""Failures that say why: the root cause of an error, logged once per distinct cause and counted.

A consumer that rewinds after every failed write would otherwise log the same
line every half second, or only the wrapper's type (``RayTaskError``). Here
each failure is reduced to its root cause in the failing system's own words
(Kafka's error name, the database's message), logged the first time that cause
is seen (and every :data:`LOG_EVERY` th time after), counted in
``podpulse_failures_total{component, cause}`` (the cause's type, to keep the
label set small) and kept as ``{"what: cause": count}`` for the run's summary.
"""

from __future__ import annotations

import logging

from podpulse import metrics
from podpulse.kafka import kafka_reason

__all__ = ["FailureLog", "root_cause"]

LOG_EVERY = 100
MAX_CAUSES = 50  # distinct causes kept for the summary; later ones are counted as "other"
MAX_CHARS = 300


def root_cause(error: BaseException) -> BaseException:
    """The error inside Ray's wrappers (a task's exception travels as ``RayTaskError.cause``)."""
    seen = 0
    while getattr(error, "cause", None) is not None and seen < 10:
        error, seen = error.cause, seen + 1
    return error


def describe(error: BaseException) -> str:
    """``Type: first line of the message``, at most :data:`MAX_CHARS` characters."""
    error = root_cause(error)
    text = kafka_reason(error)
    return (text.strip().splitlines() or [type(error).__name__])[0][:MAX_CHARS]


class FailureLog:
    def __init__(self, component: str, logger: logging.Logger):
        self.component = component
        self.log = logger
        self.counts: dict[str, int] = {}

    def record(self, what: str, error: BaseException, context: str = "") -> str:
        """Count one failure of ``what`` (e.g. "write", "dead-letter"); returns its summary key."""
        key = f"{what}: {describe(error)}"
        if key not in self.counts and len(self.counts) >= MAX_CAUSES:
            key = f"{what}: other"
        n = self.counts.get(key, 0) + 1
        self.counts[key] = n
        if n == 1 or n % LOG_EVERY == 0:
            self.log.warning("%s%s: %s%s", what, f" ({context})" if context else "",
                             key.split(": ", 1)[1], f" [{n} times so far]" if n > 1 else "")
        metrics.failure(self.component, type(root_cause(error)).__name__)
        return key
