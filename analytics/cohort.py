"""A cohort: the devices whose registered attributes match a filter ("AirPods Pro 2 on 7A305 in
rural QLD"). Every analytics query takes one (``analytics.QUERIES``), and so do the HTTP API
(``?model=&firmware=&state=&urban=...``), the report and the console.

The attributes are the registry's (the ``devices`` table: what each device last reported), so a
device belongs to a cohort for the whole range asked, and every query of a range counts the same
devices. A filter narrows the devices a cell counts; it never lowers the privacy floor: every
cell of a cohort still needs ``k`` devices.

Values are checked against exact patterns before they reach SQL (and then quoted), so a filter
cannot carry SQL; a bad value is a :class:`ConfigError` naming the field.

A cohort can be saved under a name (the ``cohorts`` table of the relational store, beside the
devices: :func:`save`, :func:`saved`), through the API and the console, and asked for by name.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from datetime import date, datetime, timezone

import pyarrow as pa

from podpulse import geo
from podpulse.errors import ConfigError
from podpulse.localtime import REPORT_UTC_OFFSET_H
from storage.config import StorageConfig
from storage.reader import ReaderPool, run_queries
from storage.router import insert_rows, migrate_for

__all__ = ["Cohort", "COHORT_FIELDS", "NAME", "name_of", "named", "save", "saved"]

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._()+-]{0,63}")  # a saved cohort's name: never a quote

# Model names, firmware builds and host kinds as devices send them: letters, digits, spaces and
# a few punctuation marks, never a quote.
_TEXT = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._+()-]{0,63}")
FIRST_DAY, LAST_DAY = date(2000, 1, 1), date(2100, 12, 31)


@dataclass(frozen=True)
class Cohort:
    model: str | None = None
    firmware: str | None = None
    host_device: str | None = None
    state: str | None = None
    urban: bool | None = None
    schema_version: int | None = None
    first_seen_from: date | None = None  # AEST days, both ends included
    first_seen_to: date | None = None

    def __post_init__(self) -> None:
        for name in ("model", "firmware", "host_device"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and _TEXT.fullmatch(value)):
                raise ConfigError(f"{name}: {value!r} is not a {name.replace('_', ' ')} (letters, digits, "
                                  f"spaces and ._+()-, at most 64)")
        if self.state is not None and self.state not in geo.STATE_CODES:
            raise ConfigError(f"state: {self.state!r} is not one of {', '.join(geo.STATE_CODES)}")
        if self.urban is not None and not isinstance(self.urban, bool):
            raise ConfigError(f"urban: {self.urban!r} is not true or false")
        if self.schema_version is not None and (type(self.schema_version) is not int
                                                or not 1 <= self.schema_version <= 99):
            raise ConfigError(f"schema_version: {self.schema_version!r} is not a version from 1 to 99")
        for name in ("first_seen_from", "first_seen_to"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, date) and FIRST_DAY <= value <= LAST_DAY):
                raise ConfigError(f"{name}: {value!r} is not a day from {FIRST_DAY} to {LAST_DAY}")
        if self.first_seen_from and self.first_seen_to and self.first_seen_to < self.first_seen_from:
            raise ConfigError(f"first_seen_to: {self.first_seen_to} is before first_seen_from ({self.first_seen_from})")

    @classmethod
    def parse(cls, values: dict) -> "Cohort":
        """From strings (a URL's query, a CLI's options) or JSON values; unknown keys refused."""
        unknown = set(values) - set(COHORT_FIELDS)
        if unknown:
            raise ConfigError(f"{sorted(unknown)[0]}: not a cohort field (try {', '.join(COHORT_FIELDS)})")
        out = {}
        for name, value in values.items():
            if value is None or value == "":
                continue
            if name == "urban" and isinstance(value, str):
                if value.lower() not in ("true", "false", "urban", "rural"):
                    raise ConfigError(f"urban: {value!r} is not true or false")
                value = value.lower() in ("true", "urban")
            elif name == "schema_version" and isinstance(value, str):
                if not value.isdigit() or len(value) > 2:
                    raise ConfigError(f"schema_version: {value!r} is not a version from 1 to 99")
                value = int(value)
            elif name.startswith("first_seen") and isinstance(value, str):
                try:
                    value = date.fromisoformat(value)
                except ValueError:
                    raise ConfigError(f"{name}: {value!r} is not a day (YYYY-MM-DD)") from None
            elif name == "state" and isinstance(value, str):
                value = value.upper()
            out[name] = value
        return cls(**out)

    def __bool__(self) -> bool:
        return any(v is not None for v in asdict(self).values())

    def as_dict(self) -> dict:
        """The fields set, JSON-ready."""
        return {k: (v.isoformat() if isinstance(v, date) else v) for k, v in asdict(self).items() if v is not None}

    def label(self) -> str:
        """"AirPods Pro 2 on 7A305, rural QLD"; "all devices" when nothing is set."""
        if not self:
            return "all devices"
        parts = [self.model or "", f"on {self.firmware}" if self.firmware else "",
                 f"via {self.host_device}" if self.host_device else "",
                 {True: "urban", False: "rural", None: ""}[self.urban] + (f" {self.state}" if self.state else ""),
                 f"schema v{self.schema_version}" if self.schema_version else "",
                 f"first seen {self.first_seen_from or '…'} to {self.first_seen_to or '…'}"
                 if self.first_seen_from or self.first_seen_to else ""]
        return ", ".join(p.strip() for p in parts if p.strip())

    def sql(self, column: str = "device_id") -> str:
        """`` AND <column> IN (SELECT device_id FROM devices WHERE ...)``, or "" for every device.
        PostgreSQL's dialect (the queries' own, rendered per backend by the reader)."""
        if not self:
            return ""
        where = []
        for name in ("model", "firmware", "host_device", "state"):
            value = getattr(self, name)
            if value is not None:
                where.append(f"{name} = '{value}'")  # checked above: no quote can be in it
        if self.urban is not None:
            where.append("urban" if self.urban else "NOT urban")
        if self.schema_version is not None:
            where.append(f"schema_version = {self.schema_version}")
        # first_seen is UTC; the days are AEST, as every range of the analytics
        if self.first_seen_from:
            where.append(f"first_seen >= TIMESTAMP '{self.first_seen_from.isoformat()} 00:00:00+00' "
                         f"- INTERVAL '{REPORT_UTC_OFFSET_H} hours'")
        if self.first_seen_to:
            where.append(f"first_seen < TIMESTAMP '{self.first_seen_to.isoformat()} 00:00:00+00' "
                         f"+ INTERVAL '{24 - REPORT_UTC_OFFSET_H} hours'")
        return f" AND {column} IN (SELECT device_id FROM devices WHERE {' AND '.join(where)})"


COHORT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Cohort))


def name_of(name) -> str:
    """``name`` if it can be a saved cohort's name, else a ConfigError naming ``name``."""
    if not (isinstance(name, str) and NAME.fullmatch(name)):
        raise ConfigError(f"name: {name!r} is not a cohort name (letters, digits, spaces and ._+()-, at most 64)")
    return name


def saved(source: StorageConfig | ReaderPool, name: str | None = None) -> dict[str, Cohort]:
    """The saved cohorts by name (only ``name``'s, when given: empty if there is none), oldest first."""
    where = f" WHERE name = '{name_of(name)}'" if name is not None else ""  # checked: no quote in it
    rows = run_queries(source, {"c": f"SELECT name, definition FROM cohorts{where} ORDER BY created_at, name"},
                       kind="devices")["c"]
    return {n: Cohort.parse(json.loads(d)) for n, d in rows}


def named(source: StorageConfig | ReaderPool, name: str) -> Cohort:
    """The cohort saved as ``name``; a ConfigError naming ``cohort`` when the name is not a saved one."""
    if not (isinstance(name, str) and NAME.fullmatch(name)):
        raise ConfigError(f"cohort: {name!r} is not a saved cohort's name")
    found = saved(source, name)
    if not found:
        raise ConfigError(f"cohort: no saved cohort is named {name!r} (GET /v1/cohorts lists them)")
    return found[name]


def save(config: StorageConfig, name: str, cohort: Cohort) -> None:
    """Save ``cohort`` as ``name``; a name is saved once (ConfigError if taken: pick another)."""
    name_of(name)
    if not cohort:
        raise ConfigError("cohort: give at least one field to save (every device needs no name)")
    migrate_for(config, "devices")  # a store from before migration 8 gets its cohorts table
    if saved(config, name):
        raise ConfigError(f"name: a cohort named {name!r} is saved already")
    insert_rows(config, "devices", "cohorts", pa.table({
        "name": [name], "definition": [json.dumps(cohort.as_dict())],
        "created_at": pa.array([datetime.now(timezone.utc)], pa.timestamp("us", tz="UTC"))}))
