"""Oracle: the DDL and DML PodPulse generates, compiled and checked without a server;
and a real round trip when PODPULSE_ORACLE_DSN points at one."""

import os
import re
from datetime import datetime, timezone

import pytest
import sqlglot
from sqlglot import exp

from storage.backends.oracle import (
    DAILY_MERGE_SQL,
    DDL_LOCK_WAIT,
    DEVICES_MERGE_SQL,
    ERASED_MERGE_SQL,
    ERASED_SQL,
    ERASURE_LOCK,
    EVENTS_MERGE,
    FIRMWARE_MERGE_SQL,
    HOURLY_MERGE_SQL,
    OFFSETS_MERGE_SQL,
    PARTITIONS_SQL,
    SPANS_SQL,
    delete_before_sql,
    delete_devices_sql,
    drop_partition_sql,
    in_list_sql,
    partition_high_value,
    partitions_before,
)
from storage.base import StorageError
from storage.config import OracleOptions
from storage.migrations import MIGRATIONS, statements
from storage.schema import ERASED_FROM

SUFFIX = re.compile(r"\) PARTITION BY RANGE \((\w+)\) INTERVAL \(NUMTODSINTERVAL\((\d+), 'DAY'\)\) "
                    r"\(PARTITION p_first VALUES LESS THAN \(TIMESTAMP '2019-10-01 00:00:00'\)\)"
                    r"(?: (INMEMORY .*|NO INMEMORY))?$")


def oracle_ddl(opts=None):
    return [s for m in MIGRATIONS for s in statements(m, "oracle", opts)]


def test_time_tables_are_interval_partitioned_and_in_memory():
    ddl = {re.match(r"(CREATE|ALTER) TABLE (\w+)", s).group(2): s for s in oracle_ddl() if s.startswith("CREATE")}
    for table, key in (("events", "event_time"), ("device_hourly", "hour")):
        m = SUFFIX.search(ddl[table])
        assert m and m.group(1) == key and m.group(2) == "1", ddl[table][-300:]
        assert m.group(3) == "INMEMORY MEMCOMPRESS FOR QUERY LOW PRIORITY HIGH"
        assert f"{key} TIMESTAMP NOT NULL" in ddl[table]  # no time zone: interval partitioning needs it
    for table in ("devices", "kafka_offsets", "anomalies"):
        assert "PARTITION" not in ddl[table] and "INMEMORY" not in ddl[table]


def ddl_tables() -> list[str]:
    return [m.group(1) for s in oracle_ddl() if (m := re.match(r"CREATE TABLE (\w+)", s))]


def test_in_memory_options_follow_the_configuration():
    ddl = " ".join(oracle_ddl(OracleOptions(interval_days=7, memcompress="FOR CAPACITY HIGH",
                                            priority="CRITICAL")))
    assert "NUMTODSINTERVAL(7, 'DAY')" in ddl
    assert ddl.count("INMEMORY MEMCOMPRESS FOR CAPACITY HIGH PRIORITY CRITICAL") == 2
    assert "INMEMORY" not in " ".join(oracle_ddl(OracleOptions(inmemory=False)))
    with pytest.raises(Exception, match="MEMCOMPRESS"):
        OracleOptions(memcompress="SQUEEZE")


def test_table_bodies_parse_as_oracle_sql():
    for sql in oracle_ddl():
        body = SUFFIX.sub(")", sql)
        tree = sqlglot.parse_one(body, read="oracle")
        assert isinstance(tree, (exp.Create, exp.Alter, exp.Insert)), body[:80]
        if isinstance(tree, exp.Insert):  # a backfill reads only tables the migrations create
            assert {t.name for t in tree.find_all(exp.Table)} <= set(ddl_tables()), body


@pytest.mark.parametrize("sql, table, key", [
    (HOURLY_MERGE_SQL, "device_hourly", {"device_id", "hour"}),
    (FIRMWARE_MERGE_SQL, "device_firmware_daily", {"device_id", "day", "firmware"}),
    (DAILY_MERGE_SQL, "device_daily", {"device_id", "day", "state", "urban"}),
    (DEVICES_MERGE_SQL, "devices", {"device_id"}),
    (OFFSETS_MERGE_SQL, "kafka_offsets", {"topic", "kafka_partition"}),
    (EVENTS_MERGE, "events", {"device_id", "seq", "event_time"}),
    (ERASED_MERGE_SQL, "erased_devices", {"device_id"}),
])
def test_merges_parse_and_join_on_the_primary_key(sql, table, key):
    tree = sqlglot.parse_one(sql, read="oracle")
    assert isinstance(tree, exp.Merge) and tree.this.name == table
    on = {c.name for c in tree.args["on"].find_all(exp.Column)}
    assert on == key


def test_merge_rules_are_null_safe_and_additive():
    assert "t.events = NVL(t.events, 0) + s.events" in HOURLY_MERGE_SQL
    assert "t.output_dba_max = GREATEST(NVL(t.output_dba_max, s.output_dba_max), " \
           "NVL(s.output_dba_max, t.output_dba_max))" in HOURLY_MERGE_SQL
    assert "t.battery_left_min = LEAST(" in HOURLY_MERGE_SQL
    assert "CASE WHEN s.last_seen >= t.last_seen THEN s.firmware ELSE t.firmware END" in DEVICES_MERGE_SQL
    # Oracle has no OR on numbers: a | b = a + b - (a AND b)
    assert "t.local_hours = NVL(t.local_hours, 0) + s.local_hours - BITAND(NVL(t.local_hours, 0), s.local_hours)" \
        in DAILY_MERGE_SQL
    assert "WHEN MATCHED" not in EVENTS_MERGE  # raw events: insert-only, idempotent by key
    assert "WHEN MATCHED" not in ERASED_MERGE_SQL  # a tombstone keeps the first erasure's time


def test_erasure_statements_parse_and_bind_one_id_each():
    for sql, kind in [(ERASED_SQL, exp.Select), (SPANS_SQL, exp.Select),
                      *((delete_devices_sql(t), exp.Delete) for t in ERASED_FROM)]:
        bound = in_list_sql(sql, 3)
        assert bound.endswith("device_id IN (:1, :2, :3)"), bound
        tree = sqlglot.parse_one(re.sub(r":(\d)", r":b\1", bound), read="oracle")  # sqlglot reads named binds only
        assert isinstance(tree, kind), bound
        (values,) = list(tree.find_all(exp.In))
        assert values.this.name == "device_id" and [p.name for p in values.expressions] == ["b1", "b2", "b3"]
    # sqlglot has no LOCK TABLE: the statement that holds commits off is held by a pattern
    assert re.fullmatch(r"LOCK TABLE kafka_offsets IN EXCLUSIVE MODE", ERASURE_LOCK)


@pytest.mark.skipif(not os.environ.get("PODPULSE_ORACLE_DSN"),
                    reason="PODPULSE_ORACLE_DSN is not set: no Oracle to test against")
def test_oracle_round_trip(tmp_path):
    """Migrate, commit a batch twice, read it back (PODPULSE_ORACLE_DSN=oracle://user@host:port/?service_name=X,
    password in PODPULSE_ORACLE_PASSWORD)."""
    import numpy as np
    import pyarrow as pa

    from podpulse.contract import decode_batch
    from podpulse.simulator import FleetSpec, simulate
    from storage.backends.oracle import OracleStore

    store = OracleStore(os.environ["PODPULSE_ORACLE_DSN"], os.environ.get("PODPULSE_ORACLE_PASSWORD"))
    store.setup()
    store.setup()
    values = [v for c in simulate(FleetSpec(devices=50, hours=6, seed=9)) for v in c.values]
    t = decode_batch(values).table
    t = t.append_column("kafka_partition", pa.array(np.zeros(t.num_rows, np.int32))).append_column(
        "kafka_offset", pa.array(np.arange(t.num_rows), pa.int64()))
    topic = f"test-{os.getpid()}"
    first = store.commit(topic, t, {0: t.num_rows}, with_raw_events=True)
    again = store.commit(topic, t, {0: t.num_rows}, with_raw_events=True)
    assert (first.applied, again.applied, again.replayed) == (t.num_rows, 0, t.num_rows)
    assert store.committed_offsets(topic) == {0: t.num_rows}
    victim = t["device_id"][0].as_py()
    mine = sum(1 for d in t["device_id"].to_pylist() if d == victim)
    removed = store.erase([victim])
    assert (removed["events"], removed["devices"]) == (mine, 1)
    backfill = store.commit(f"{topic}-backfill", t, {0: t.num_rows}, with_raw_events=True)
    assert (backfill.erased, backfill.applied) == (mine, 0)
    store.close()


# --- retention: drop whole interval partitions, DELETE the rest ---------------------------------------

def test_retention_reads_the_interval_partitions_from_the_dictionary():
    tree = sqlglot.parse_one(PARTITIONS_SQL, read="oracle")
    assert isinstance(tree, exp.Select) and tree.find(exp.From).this.name == "user_tab_partitions"
    assert [c.name for c in tree.expressions] == ["partition_name", "high_value"]
    assert "interval = 'YES'" in PARTITIONS_SQL  # p_first, the range section's partition, stays


@pytest.mark.parametrize("high_value", [
    "TIMESTAMP' 2026-11-02 00:00:00'",  # how Oracle shows a TIMESTAMP bound
    "TO_DATE(' 2026-11-02 00:00:00', 'SYYYY-MM-DD HH24:MI:SS', 'NLS_CALENDAR=GREGORIAN')",  # a DATE bound
])
def test_a_partition_bound_is_read_as_utc(high_value):
    assert partition_high_value(high_value) == datetime(2026, 11, 2, tzinfo=timezone.utc)


def test_only_partitions_that_end_by_the_cutoff_are_dropped():
    rows = [("SYS_P101", "TIMESTAMP' 2026-10-31 00:00:00'"), ("SYS_P102", "TIMESTAMP' 2026-11-01 00:00:00'"),
            ("SYS_P103", "TIMESTAMP' 2026-11-02 00:00:00'")]
    cutoff = datetime(2026, 11, 1, 14, tzinfo=timezone.utc)  # inside SYS_P103: it stays whole
    assert partitions_before(rows, cutoff) == ["SYS_P101", "SYS_P102"]
    with pytest.raises(StorageError, match="unexpected Oracle partition bound"):
        partitions_before([("SYS_P1", "MAXVALUE")], cutoff)


DROP = re.compile(r'ALTER TABLE (\w+) DROP PARTITION "(\w+)" UPDATE GLOBAL INDEXES')


def test_the_partition_drop_keeps_the_global_key_usable_and_deletes_parse():
    # sqlglot cannot parse Oracle's partition clauses: the grammar is held by a pattern instead
    m = DROP.fullmatch(drop_partition_sql("events", "SYS_P101"))
    assert m and m.groups() == ("events", "SYS_P101")
    assert sqlglot.parse_one(DDL_LOCK_WAIT, read="oracle").sql("oracle") == DDL_LOCK_WAIT
    for table, column in (("device_firmware_daily", "day"), ("anomalies", "day")):
        tree = sqlglot.parse_one(delete_before_sql(table, column), read="oracle")
        assert isinstance(tree, exp.Delete) and tree.this.name == table
        assert tree.find(exp.LT).this.name == column and tree.find(exp.Placeholder).name == "bound"


@pytest.mark.skipif(not os.environ.get("PODPULSE_ORACLE_DSN"),
                    reason="PODPULSE_ORACLE_DSN is not set: no Oracle to test against")
def test_oracle_retention_drops_whole_partitions():
    """Commit three days, expire with a cutoff inside the last: its partition stays, older ones go."""
    from datetime import timedelta

    import numpy as np
    import pyarrow as pa

    from podpulse.contract import decode_batch
    from podpulse.simulator import FleetSpec, simulate
    from storage.backends.oracle import OracleStore

    store = OracleStore(os.environ["PODPULSE_ORACLE_DSN"], os.environ.get("PODPULSE_ORACLE_PASSWORD"))
    store.setup()
    start = datetime(2026, 10, 30, tzinfo=timezone.utc)
    values = [v for c in simulate(FleetSpec(devices=20, hours=72, seed=9, start=start)) for v in c.values]
    t = decode_batch(values, window=None).table
    t = t.append_column("kafka_partition", pa.array(np.zeros(t.num_rows, np.int32))).append_column(
        "kafka_offset", pa.array(np.arange(t.num_rows), pa.int64()))
    store.commit(f"test-retention-{os.getpid()}", t, {0: t.num_rows}, with_raw_events=True)
    cutoff = start + timedelta(days=2, hours=6)
    removed = store.expire({"events": cutoff, "device_hourly": cutoff, "anomalies": cutoff})
    assert len(removed["events"]["partitions"]) >= 2 and "rows" in removed["anomalies"]
    with store.engine.connect() as conn:
        oldest = conn.exec_driver_sql("SELECT min(event_time) FROM events").scalar()
    assert start + timedelta(days=2) <= oldest.replace(tzinfo=timezone.utc) < cutoff  # a day's granularity
    assert store.expire({"events": cutoff})["events"]["partitions"] == []  # idempotent
    store.close()
