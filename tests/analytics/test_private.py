"""The private answers (analytics.private) against the attacks of an analyst with a read:aggregates
token, and the privacy ledger (storage.ledger) on DuckDB and PostgreSQL."""

import multiprocessing
import statistics
from datetime import date, timedelta

import pytest

from analytics import private, queries
from analytics.cohort import Cohort
from podpulse.privacy import half_width
from storage.config import StorageConfig
from storage.ledger import Ledger
from storage.reader import open_reader
from testbed.stores import build_store

K = 10


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    path = tmp_path_factory.mktemp("private") / "p.duckdb"
    build_store(path, 600, 14, seed=29)
    with open_reader(StorageConfig.embedded(path)) as r:
        yield r


@pytest.fixture(scope="module")
def covered(reader):
    return queries.data_range(reader)


def rare_cohort(reader) -> tuple[str, str, str]:
    """The model and firmware of fewest devices, and a firmware of the same model with more."""
    counts = reader.rows("SELECT model, firmware, count(*) FROM devices GROUP BY 1, 2 ORDER BY 3, 1, 2")
    model, rare, _ = counts[0]
    other = max((c for c in counts if c[0] == model and c[1] != rare), key=lambda c: c[2])[1]
    return model, rare, other


def test_one_request_names_no_cell_it_withheld(reader, covered):
    model, rare, _ = rare_cohort(reader)
    cohort = Cohort(model=model, firmware=rare)
    exact = queries.usage_trend(reader, *covered, K, cohort)
    assert exact.suppressed_cells  # what the exact answer gave away: the days and region of a few devices
    for name in private.RELEASES:
        answer = private.release(reader, name, *covered, K, cohort, 1.0)
        assert "suppressed_cells" not in answer
        assert all(row[answer["columns"].index("devices")] >= K for row in answer["rows"])
        assert answer["privacy"]["epsilon"] == pytest.approx(1.0)
        assert len(answer["intervals"]) == len(answer["rows"])


def test_two_request_differencing_misses_by_the_noise(reader, covered):
    """Model M minus (model M, its common firmware) would be the rare firmware's devices exactly."""
    model, rare, other = rare_cohort(reader)
    whole = private.release(reader, "usage_trend", *covered, K, Cohort(model=model), 1.0)
    common = private.release(reader, "usage_trend", *covered, K, Cohort(model=model, firmware=other), 1.0)
    truth = {tuple(r[:3]): r[4] for r in queries.usage_trend(reader, *covered, 1, Cohort(model=model)).rows}
    for r in queries.usage_trend(reader, *covered, 1, Cohort(model=model, firmware=other)).rows:
        truth[tuple(r[:3])] -= r[4]
    a, b = ({tuple(r[:3]): r[4] for r in x["rows"]} for x in (whole, common))
    both = [key for key in a if key in b]
    assert len(both) >= 10
    errors = [abs(a[key] - b[key] - truth.get(key, 0.0)) for key in both]
    scale = whole["privacy"]["noise"][1]["scale"]
    # each answer's noise is Laplace(scale); their difference is off by 1.5 scale on average
    assert statistics.mean(errors) > scale / 2, (errors, scale)


def test_the_complement_of_the_versions_shown_is_noisy(reader, covered):
    """A day's devices less the devices on the versions shown would count the hidden versions."""
    adoption = private.release(reader, "firmware_adoption", *covered, K, Cohort(), 1.0)
    assert adoption["suppressed"] is None  # not even how many version-days were left out
    trend = private.release(reader, "usage_trend", *covered, K, Cohort(), 1.0)
    shown, total = {}, {}
    for day, _, n, _ in adoption["rows"]:
        shown[day] = shown.get(day, 0) + n
    for day, _, _, n, *_ in trend["rows"]:
        total[day] = total.get(day, 0) + n
    exact = queries.firmware_adoption(reader, *covered, 1, Cohort())
    hidden_truth = {}
    for day, fw, n, _ in exact.rows:
        if not any(r[0] == day and r[1] == fw for r in adoption["rows"]):
            hidden_truth[day] = hidden_truth.get(day, 0) + n
    days = sorted(set(shown) & set(total))
    errors = [abs(total[d] - shown[d] - hidden_truth.get(d, 0)) for d in days]
    assert statistics.mean(errors) > 1  # an exact answer would be off by 0 on every day


def test_a_ratios_interval_holds_the_exact_figure_mostly(reader, covered):
    answer = private.release(reader, "state_overview", *covered, K, Cohort(), 1.0)
    exact = {r[0]: r for r in queries.state_overview(reader, *covered, 1, Cohort()).rows}
    held = [low <= exact[row[0]][2] <= (high if high is not None else float("inf"))
            for row, iv in zip(answer["rows"], answer["intervals"])
            for low, high in [iv["listening_h_per_day"]]]
    assert held and sum(held) >= len(held) - 1


def test_a_device_adds_at_most_its_bound(reader, covered):
    """The noise is sized for the bound, and the bound holds: a cell's listening is at most 12 h a
    device-day before noise."""
    answer = private.release(reader, "usage_trend", *covered, K, Cohort(), 1.0)
    days = (covered[1] - covered[0]).days
    devices, hours = answer["privacy"]["noise"]
    assert devices["sensitivity"] == days and hours["sensitivity"] == days * private.LISTENING_CLAMP_H
    assert hours["scale"] == pytest.approx(hours["sensitivity"] / 0.5)
    assert hours["half_width_95"] == pytest.approx(half_width(hours["scale"]))


# -- the ledger ---------------------------------------------------------------------------------------

def ledger_of(store_config):
    if store_config.type_of("devices") == "postgresql":
        from storage.admin import migrate
        migrate(store_config.settings_for("devices").url)
    return Ledger(store_config)


def test_the_ledger_spends_up_to_the_budget_and_keeps_one_answer_a_day(store_config):
    ledger = ledger_of(store_config)
    day = date(2026, 12, 7)
    assert [ledger.spend("analyst", day, 1.5, 4.0) for _ in range(3)] == [2.5, 1.0, None]
    assert ledger.spent("analyst", day) == 3.0 and ledger.spent("analyst", day + timedelta(days=1)) == 0
    assert ledger.spend("analyst", day + timedelta(days=1), 1.5, 4.0) == 2.5  # the next day's budget
    assert ledger.answer(day, "q") is None
    assert ledger.release(day, "q", {"x": 1}) == {"x": 1}
    assert ledger.release(day, "q", {"x": 2}) == {"x": 1}  # the first answer stands
    ledger.audit("admin", "usage_trend")
    ledger.close()


def _spend_many(args) -> int:
    config, n = args
    ledger = Ledger(StorageConfig(**config))
    got = sum(ledger.spend("analyst", date(2026, 12, 7), 1.0, 10.0) is not None for _ in range(n))
    ledger.close()
    return got


@pytest.mark.integration
def test_two_replicas_never_spend_past_the_budget_together(pg_url):
    config = StorageConfig(backends={"pg": {"type": "postgresql", "url": pg_url}})
    ledger_of(config).close()
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        spent = pool.map(_spend_many, [(config.as_dict(), 12)] * 2)
    assert sum(spent) == 10, spent  # 24 tries at 1.0 against a budget of 10
    assert Ledger(config).spent("analyst", date(2026, 12, 7)) == 10.0
