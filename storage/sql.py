"""SQL text the relational backends share: merging upserts per dialect.

Each rollup and registry column has a merge rule (``storage.rollups``); these
functions turn the rules into one statement:

- PostgreSQL and DuckDB: ``INSERT ... SELECT ... ON CONFLICT (key) DO UPDATE``;
- Oracle: ``MERGE INTO ... USING (SELECT :bind AS col ... FROM dual)``, run with
  ``executemany``. Oracle's GREATEST/LEAST return NULL when either side is
  NULL, so each side is NVL'd with the other first.
"""

from __future__ import annotations

__all__ = ["upsert_sql", "oracle_merge_sql", "OFFSETS_MERGE", "OFFSETS_KEY"]

OFFSETS_KEY = ("topic", "kafka_partition")
OFFSETS_MERGE = {"next_offset": "max", "updated_at": "newer"}

_ON_CONFLICT_RULES = {
    "sum": "coalesce({t}.{c}, 0) + excluded.{c}",  # columns added by a migration start as NULL
    "max": "greatest({t}.{c}, excluded.{c})",
    "min": "least({t}.{c}, excluded.{c})",
    "newer": "excluded.{c}",
    "latest": "CASE WHEN excluded.last_seen >= {t}.last_seen THEN excluded.{c} ELSE {t}.{c} END",
}

_MERGE_RULES = {
    "sum": "NVL(t.{c}, 0) + s.{c}",
    "max": "GREATEST(NVL(t.{c}, s.{c}), NVL(s.{c}, t.{c}))",
    "min": "LEAST(NVL(t.{c}, s.{c}), NVL(s.{c}, t.{c}))",
    "newer": "s.{c}",
    "latest": "CASE WHEN s.last_seen >= t.last_seen THEN s.{c} ELSE t.{c} END",
}


def upsert_sql(table: str, key: tuple[str, ...], merge: dict[str, str], source: str) -> str:
    """PostgreSQL/DuckDB: insert the rows of ``source``, merging into existing keys by rule.

    An empty ``merge`` (or only "keep" rules) gives ``DO NOTHING``: an idempotent insert.
    """
    columns = ", ".join([*key, *merge])
    sets = [f"{c} = " + _ON_CONFLICT_RULES[how].format(t=table, c=c)
            for c, how in merge.items() if how in _ON_CONFLICT_RULES]
    action = f"DO UPDATE SET {', '.join(sets)}" if sets else "DO NOTHING"
    return (f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {source} "
            f"ON CONFLICT ({', '.join(key)}) {action}")


def oracle_merge_sql(table: str, key: tuple[str, ...], merge: dict[str, str]) -> str:
    """Oracle: MERGE one bound row (run with executemany), merging by rule."""
    columns = [*key, *merge]
    source = ", ".join(f":{c} AS {c}" for c in columns)
    on = " AND ".join(f"t.{c} = s.{c}" for c in key)
    sets = [f"t.{c} = " + _MERGE_RULES[how].format(c=c)
            for c, how in merge.items() if how in _MERGE_RULES]
    matched = f" WHEN MATCHED THEN UPDATE SET {', '.join(sets)}" if sets else ""
    return (f"MERGE INTO {table} t USING (SELECT {source} FROM dual) s ON ({on}){matched}"
            f" WHEN NOT MATCHED THEN INSERT ({', '.join(columns)})"
            f" VALUES ({', '.join('s.' + c for c in columns)})")
