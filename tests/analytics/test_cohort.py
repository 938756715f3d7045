"""Cohort filters: parsed from strings with errors naming the field, and never able to carry SQL."""

from datetime import date

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analytics.cohort import COHORT_FIELDS, Cohort
from podpulse.errors import ConfigError


def test_parsed_from_a_query_string_and_labelled():
    cohort = Cohort.parse({"model": "AirPods Pro 2", "firmware": "7A305", "state": "qld", "urban": "rural",
                           "schema_version": "3", "first_seen_from": "2026-11-01", "host_device": ""})
    assert cohort == Cohort(model="AirPods Pro 2", firmware="7A305", state="QLD", urban=False, schema_version=3,
                            first_seen_from=date(2026, 11, 1))
    assert cohort.label() == "AirPods Pro 2, on 7A305, rural QLD, schema v3, first seen 2026-11-01 to …"
    assert Cohort.parse(cohort.as_dict()) == cohort
    assert not Cohort() and Cohort().label() == "all devices" and Cohort().sql() == ""


@pytest.mark.parametrize("values, field", [
    ({"state": "XYZ"}, "state"),
    ({"urban": "maybe"}, "urban"),
    ({"schema_version": "0"}, "schema_version"),
    ({"schema_version": "1e3"}, "schema_version"),
    ({"first_seen_from": "yesterday"}, "first_seen_from"),
    ({"first_seen_from": "2026-11-02", "first_seen_to": "2026-11-01"}, "first_seen_to"),
    ({"model": "Pro' OR 1=1 --"}, "model"),
    ({"firmware": "7A305\n"}, "firmware"),
    ({"colour": "white"}, "colour"),
])
def test_a_bad_value_is_refused_naming_its_field(values, field):
    with pytest.raises(ConfigError) as refused:
        Cohort.parse(values)
    assert str(refused.value).startswith(f"{field}:")


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(COHORT_FIELDS), st.text(max_size=70), max_size=4))
def test_whatever_is_given_is_refused_or_runs_as_a_filter(values):
    """Any text in any field: a ConfigError, or SQL that DuckDB runs as one filter of the devices."""
    try:
        cohort = Cohort.parse(values)
    except ConfigError:
        return
    db = duckdb.connect()
    db.execute("CREATE TABLE devices (device_id TEXT, model TEXT, firmware TEXT, host_device TEXT, state TEXT, "
               "urban BOOLEAN, schema_version SMALLINT, first_seen TIMESTAMPTZ)")
    db.execute("INSERT INTO devices VALUES ('d1', 'AirPods Pro 2', '7A305', 'iphone', 'QLD', false, 3, "
               "TIMESTAMPTZ '2026-11-01 00:00:00+00')")
    (count,) = db.execute(f"SELECT count(*) FROM devices WHERE true{cohort.sql()}").fetchone()
    assert count in (0, 1)
    assert db.execute("SELECT count(*) FROM devices").fetchone() == (1,)  # nothing else ran


def test_a_cohort_is_saved_once_by_name_and_read_back(store_config):
    """On the embedded DuckDB and on PostgreSQL: saved (the store migrated first), listed oldest first,
    found by name; a taken name, a bad name and an empty cohort are refused naming the field."""
    from analytics.cohort import save, saved

    rural = Cohort(model="AirPods Pro 2", state="QLD", urban=False)
    save(store_config, "Pro 2 rural QLD", rural)
    save(store_config, "new on 7A305", Cohort(firmware="7A305", first_seen_from=date(2026, 11, 1)))
    assert list(saved(store_config)) == ["Pro 2 rural QLD", "new on 7A305"]
    assert saved(store_config, "Pro 2 rural QLD") == {"Pro 2 rural QLD": rural}
    assert saved(store_config, "nobody") == {}
    for name, cohort, field in [("Pro 2 rural QLD", Cohort(model="x"), "name"), ("x'; DROP TABLE devices", rural, "name"),
                                ("empty", Cohort(), "cohort")]:
        with pytest.raises(ConfigError) as refused:
            save(store_config, name, cohort)
        assert str(refused.value).startswith(f"{field}:")
    assert len(saved(store_config)) == 2
