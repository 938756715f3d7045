"""The privacy ledger: what each token has spent of its daily ε budget, the noisy answers released,
and the exact reads, in the relational store (``storage.schema``: privacy_budget, privacy_answers,
exact_reads; migration 12), so every replica shares it and it outlives them.

A spend is one conditional ``UPDATE`` (``spent + ε <= budget``): the database serialises concurrent
spends of a token's row, so no two replicas can both spend its last ε. ε is kept in millionths, so
sums are exact. The embedded store keeps its ledger in a DuckDB file of its own beside the store's
(``<store>.privacy.duckdb``): the store's file is open read-only to the readers, and DuckDB lets one
process write a file at a time (a spend waits for the file's lock).
"""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from datetime import date, datetime, timezone
from typing import Iterator

from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from storage import backends
from storage.backends.duckdb import open_for_writing
from storage.config import StorageConfig
from storage.schema import create_table_ddl, exact_reads, privacy_answers, privacy_budget

__all__ = ["Ledger", "MICRO"]

MICRO = 1_000_000  # ε is kept in millionths
LOCK_WAIT_S = 10.0  # how long a spend waits for the embedded ledger's file
_LOCAL = threading.Lock()  # one writer of an embedded ledger per process
_MADE: set[str] = set()  # the embedded ledgers whose tables this process made


class Ledger:
    """The ledger of the store that keeps the devices (the relational store)."""

    def __init__(self, config: StorageConfig):
        self.settings = config.settings_for("devices")
        make = backends.of(self.settings).engine
        self._engine = make(self.settings, 2, LOCK_WAIT_S) if make else None
        self._path = None if self._engine else f"{self.settings.path}.privacy.duckdb"

    @contextmanager
    def _begin(self) -> Iterator:
        """One transaction: a SQLAlchemy connection, or the embedded ledger's own DuckDB file."""
        if self._engine is not None:
            with self._engine.begin() as conn:
                yield conn
            return
        with _LOCAL, open_for_writing(self._path, LOCK_WAIT_S) as con:
            if self._path not in _MADE:  # the ledger's tables, once per file and process
                for table in (privacy_budget, privacy_answers, exact_reads):
                    con.execute(create_table_ddl(table, "duckdb").replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS", 1))
                _MADE.add(self._path)
            con.begin()
            yield _Duck(con)
            con.commit()

    @property
    def _oracle(self) -> bool:
        return self._engine is not None and self._engine.dialect.name == "oracle"

    def spend(self, token: str, day: date, epsilon: float, budget: float) -> float | None:
        """Spend ``epsilon`` of ``token``'s budget for ``day`` if it keeps within ``budget``: what is
        left after it, or None (nothing spent) when it would go over."""
        want, limit = round(epsilon * MICRO), round(budget * MICRO)
        keys = {"t": token, "d": day, "e": want, "b": limit}
        with self._begin() as conn:
            if self._oracle:
                conn.execute(text("MERGE INTO privacy_budget p USING (SELECT :t AS token, :d AS day FROM dual) s "
                                  "ON (p.token = s.token AND p.day = s.day) WHEN NOT MATCHED THEN "
                                  "INSERT (token, day, spent_micro) VALUES (s.token, s.day, 0)"), keys)
            else:
                conn.execute(text("INSERT INTO privacy_budget (token, day, spent_micro) VALUES (:t, :d, 0) "
                                  "ON CONFLICT DO NOTHING"), keys)
            done = conn.execute(text("UPDATE privacy_budget SET spent_micro = spent_micro + :e "
                                     "WHERE token = :t AND day = :d AND spent_micro + :e <= :b"), keys).rowcount
            if done != 1:
                return None
            spent = conn.execute(text("SELECT spent_micro FROM privacy_budget WHERE token = :t AND day = :d"),
                                 keys).scalar()
        return (limit - spent) / MICRO

    def spent(self, token: str, day: date) -> float:
        """ε ``token`` has spent on ``day``."""
        with self._begin() as conn:
            found = conn.execute(text("SELECT spent_micro FROM privacy_budget WHERE token = :t AND day = :d"),
                                 {"t": token, "d": day}).scalar()
        return (found or 0) / MICRO

    def answer(self, day: date, question: str) -> dict | None:
        """The answer released for ``question`` on ``day``, if there is one."""
        with self._begin() as conn:
            found = conn.execute(text("SELECT answer FROM privacy_answers WHERE day = :d AND question = :q"),
                                 {"d": day, "q": question}).scalar()
        return None if found is None else json.loads(found if isinstance(found, str) else found.read())

    def release(self, day: date, question: str, answer: dict) -> dict:
        """Keep ``answer`` as the one for ``question`` on ``day`` and return it; when another request
        released one first, that one (the only answer ever given to this question that day)."""
        row = {"d": day, "q": question, "a": json.dumps(answer), "at": datetime.now(timezone.utc)}
        insert = "INSERT INTO privacy_answers (day, question, answer, released_at) VALUES (:d, :q, :a, :at)"
        try:
            with self._begin() as conn:
                conn.execute(text(insert if self._oracle else insert + " ON CONFLICT DO NOTHING"), row)
        except IntegrityError:  # Oracle: released by another replica first
            pass
        return self.answer(day, question)

    def audit(self, who: str, what: str) -> None:
        """Record an exact read."""
        with self._begin() as conn:
            conn.execute(text("INSERT INTO exact_reads (read_at, who, what) VALUES (:at, :w, :x)"),
                         {"at": datetime.now(timezone.utc), "w": who[:64], "x": what[:1000]})

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


class _Duck:
    """A DuckDB connection that takes SQLAlchemy's ``text`` statements and their named parameters."""

    def __init__(self, con):
        self.con = con

    def execute(self, statement, params: dict):
        sql = str(statement)
        for name in sorted(params, key=len, reverse=True):
            sql = sql.replace(f":{name}", f"${name}")
        used = {k: v for k, v in params.items() if f"${k}" in sql}
        return _Result(self.con.execute(sql, used), sql)


class _Result:
    def __init__(self, cursor, sql: str):
        self.cursor, self.sql = cursor, sql

    @property
    def rowcount(self) -> int:
        return int(self.cursor.fetchone()[0]) if self.sql.lstrip().startswith(("UPDATE", "INSERT")) else -1

    def scalar(self):
        row = self.cursor.fetchone()
        return None if row is None else row[0]
