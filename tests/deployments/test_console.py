"""The fleet console in a real browser: Playwright driving Debian's Chromium (/usr/bin/chromium,
installed by `make test`) against the Serve application. Every number a table shows is checked
against the API's JSON for the same view; nothing is fetched from outside the application;
screenshots go to the test's temporary directory."""

import math
from datetime import date, timedelta
from urllib.parse import urlencode, urlsplit

import pytest
import requests

from analytics.registry import flagged_devices_by_region
from storage.config import StorageConfig
from testbed.api import AGGREGATES, AUTH, TOKEN, token_env
from testbed.stores import build_store

CHROMIUM = "/usr/bin/chromium"
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


class Console:
    """A browser tab on the console, recording every URL it asks for."""

    def __init__(self, browser, base: str, shots):
        self.base, self.shots = base.rstrip("/") + "/", shots
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.page = self.context.new_page()
        self.requested: list[str] = []
        self.page.on("request", lambda r: self.requested.append(r.url))
        self.errors: list[str] = []  # the page's uncaught errors and console.error lines
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.set_default_timeout(TIMEOUT_MS)

    def open(self, query: dict | None = None):
        self.page.goto(self.base + (f"?{urlencode(query)}" if query else ""))

    def sign_in(self, token: str):
        self.page.fill("#token", token)
        self.page.click("#sign-in button[type=submit]")

    def loaded(self, page: str, refused: bool = False):
        """Wait for ``page`` drawn; unless ``refused`` (a request the API answers 4xx), with no error."""
        self.page.wait_for_selector(f"body[data-loaded='{page}']")
        if not refused:
            failed = self.page.locator("section.side .error").all_inner_texts()
            assert not failed and not self.errors, (failed, self.errors)

    def table(self, query: str, side: str = "a") -> dict[str, list[list[str]]]:
        rows = self.page.eval_on_selector_all(  # one round trip for the whole table
            f"table[data-query='{query}'][data-side='{side}'] tbody tr",
            "rows => rows.map(r => [r.dataset.kind, [...r.cells].map(c => c.innerText)])")
        out = {"cell": [], "suppressed": []}
        for kind, cells in rows:
            out[kind].append(cells)
        return out

    def shot(self, name: str):
        self.page.screenshot(path=str(self.shots / f"{name}.png"), full_page=True)

    def outside(self) -> list[str]:
        """What the tab asked of any origin but the application's."""
        origin = urlsplit(self.base)[:2]
        return [u for u in self.requested if urlsplit(u)[:2] != origin]


@pytest.fixture
def console(browser, served, tmp_path):
    tab = Console(browser, served[0], tmp_path)
    yield tab
    tab.context.close()


def shown(value, column) -> str:
    """What the console prints for a value of the API (console.js, fmt)."""
    if value is None:
        return "—"
    if column == "urban":
        return "urban" if value else "rural"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.3f}" if not value.is_integer() else str(int(value))
    return str(value)


def same(table_rows: list[list[str]], result: dict) -> None:
    """The table's cells are the API's rows, in order, each value as the console prints it (the last
    decimal may differ: JavaScript and Python round a tie of the binary value differently)."""
    assert len(table_rows) == len(result["rows"]), (table_rows, result["rows"])
    for got, row in zip(table_rows, result["rows"]):
        for text, value, column in zip(got, row, result["columns"]):
            want = shown(value, column)
            if isinstance(value, float) and not value.is_integer():
                assert math.isclose(float(text), value, abs_tol=0.0011), (column, text, value)
            else:
                assert text == want, (column, text, value)


def api(url: str, query: str, token: str = TOKEN, **params) -> dict:
    response = requests.get(f"{url}/v1/analytics/{query}", params=params, timeout=60,
                            headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    return response.json()


def test_the_page_needs_a_token_and_a_refused_one_signs_out(console, served):
    url = served[0]
    page = requests.get(f"{url}/", timeout=30)
    assert page.status_code == 200 and "default-src 'none'" in page.headers["Content-Security-Policy"]
    assert requests.get(f"{url}/console/plotly.min.js", timeout=30).status_code == 200
    assert requests.get(f"{url}/console/secrets.txt", timeout=30).status_code == 401  # not a console file
    console.open()
    assert console.page.is_visible("#sign-in") and not console.page.is_visible("#console")
    console.sign_in("not-a-token")
    console.page.wait_for_selector("#sign-in-error:has-text('401')")
    assert console.page.is_visible("#sign-in")
    console.errors.clear()  # Chromium logs the 401 it was answered
    console.sign_in(AGGREGATES[0])
    console.loaded("overview")
    # a reader's private answer: the one the API gives this token today, noisy, "about" in the page
    private = api(url, "state_overview", AGGREGATES[0])
    assert "privacy" in private
    same(console.table("state_overview")["cell"], private)
    assert console.page.is_visible("text=about")
    assert console.outside() == []


def test_each_page_shows_the_apis_numbers_for_the_filters_in_its_url(console, served):
    url = served[0]
    console.open()
    console.sign_in(TOKEN)
    console.loaded("overview")
    tables = {"overview": ["state_overview", "usage_trend"], "listening": ["listening_by_hour"],
              "noise": ["noise_habits", "mode_shares"], "exposure": ["exposure"],
              "battery": ["battery_health"], "firmware": ["firmware_adoption", "battery_health"]}
    for name, queries in tables.items():
        console.page.click(f"nav a[data-page='{name}']")
        console.loaded(name)
        for query in queries:
            same(console.table(query)["cell"], api(url, query))
        if name == "battery":  # the flagged shares: the API's, which count what the metric counts
            flagged = requests.get(f"{url}/v1/anomalies/regions", headers=AUTH, timeout=30).json()
            regions = flagged["regions"]
            assert flagged["model_version"] and regions and all(r["devices"] >= flagged["k"] for r in regions)
            same(console.table("flagged_by_region")["cell"], {
                "columns": ["region", "devices", "flagged_devices", "share"],
                "rows": [[r["region"], r["devices"], r["flagged_devices"], r["share"]] for r in regions]})
            assert {r["region"]: r["flagged_devices"] for r in regions if r["flagged_devices"]} == \
                flagged_devices_by_region(served[2], flagged["model_version"], flagged["k"])
            console.shot("battery")
    console.shot("firmware")

    # filters through the form land in the URL, and the tables follow them
    console.page.click("nav a[data-page='overview']")
    console.loaded("overview")
    console.page.select_option("select[name='urban']", "true")
    console.page.fill("input[name='from']", "2026-01-01")  # before the data: the store's first day is used
    console.page.click("#filters button[type=submit]")
    console.loaded("overview")
    assert "urban=true" in console.page.url
    urban = api(url, "usage_trend", urban="true", **{"from": "2026-01-01"})
    assert urban["rows"] and all(row[2] is True for row in urban["rows"])
    same(console.table("usage_trend")["cell"], urban)
    # the shared URL opens the same view in a new tab (signed in there too)
    shared = console.page.url
    other = Console(console.context.browser, url, console.shots)
    try:
        other.page.goto(shared)
        other.sign_in(TOKEN)
        other.loaded("overview")
        assert other.table("usage_trend") == console.table("usage_trend")
    finally:
        other.context.close()
    assert console.outside() == []


def test_suppressed_cells_say_so_and_an_empty_cohort_says_no_devices(console, served):
    url = served[0]
    console.open({"page": "overview"})
    console.sign_in(TOKEN)
    console.loaded("overview")
    result = api(url, "usage_trend")
    table = console.table("usage_trend")
    assert len(table["suppressed"]) == len(result["suppressed_cells"]) > 0  # the small rural cells
    for row, cell in zip(table["suppressed"], result["suppressed_cells"]):
        assert row[:len(cell)] == [shown(v, c) for v, c in zip(cell, result["columns"])]
        assert row[-1] == f"suppressed (< {result['k']} devices)"
    console.open({"page": "battery", "model": "AirPods Max"})
    console.loaded("battery")
    assert console.table("battery_health") == {"cell": [], "suppressed": []}
    assert console.page.is_visible("[data-empty='battery_health']")
    # a bad filter value: the API's 422 names the field, shown where the page would be
    console.open({"page": "battery", "state": "XX"})
    console.loaded("battery", refused=True)
    assert "state" in console.page.inner_text("section.side .error")


def test_forecast_and_a_device_timeline(console, served):
    url = served[0]
    console.open({"page": "forecast", "state": "NSW", "urban": "true"})
    console.sign_in(TOKEN)
    console.loaded("forecast")
    week = requests.get(f"{url}/v1/forecast/usage", params={"region": "NSW-urban"}, headers=AUTH, timeout=60).json()
    same(console.table("forecast")["cell"], {"columns": ["day", "listening_hours"],
                                             "rows": [[d["day"], d["listening_hours"]] for d in week["days"]]})
    evaluation = week["evaluation"]
    assert evaluation["mape"] > 0 and evaluation["baseline_mape"] > 0 and "seasonal naive" in evaluation["baseline"]
    said = console.page.inner_text("[data-evaluation]")
    assert f"{evaluation['mape']:.1f}%" in said and f"{evaluation['baseline_mape']:.1f}%" in said, said
    outliers = api(url, "battery_health")["extra"]["outliers"]
    device = outliers[0]["device_id"]
    console.open({"page": "device", "device": device})
    console.loaded("device")
    timeline = requests.get(f"{url}/v1/devices/{device}/timeline", headers=AUTH, timeout=60).json()
    assert console.table("firmware_changes")["cell"] == [[f["day"], f["firmware"]] for f in timeline["firmware"]]
    assert console.page.locator("section.side .chart.js-plotly-plot").count() == 4  # Plotly drew every chart
    console.shot("device")
    assert console.outside() == []


@pytest.fixture(scope="module")
def fleet(served, tmp_path_factory):
    """A second application on the same Serve instance, under a route prefix: a store of 1,500
    devices over the last 8 days, deployed with a privacy floor of 5 (the floor is configuration),
    whose mid-window firmware (7A305) drains 25% faster, and podpulse detect's findings on it."""
    from ray import serve

    from analytics import regressions
    from deployments.app import build

    root = tmp_path_factory.mktemp("fleet")
    build_store(root / "f.duckdb", 1500, 8, seed=17, regressed_firmware="7A305", regression=1.25)
    storage = StorageConfig.embedded(root / "f.duckdb")
    regressions.record(storage, regressions.detect(storage, min_k=5))  # what podpulse detect keeps
    serve.run(build(storage.as_dict(), registry=str(root / "models"), env=token_env(root), min_k=5),
              name="fleet", route_prefix="/fleet")
    yield f"{served[0]}/fleet"
    serve.delete("fleet")


def test_drain_of_two_firmware_versions_in_rural_queensland_last_week(browser, fleet, tmp_path):
    """The question of issue 17: how did drain per hour change between 7A294 and 7A305 on AirPods
    Pro 2 in rural Queensland last week? Sign in, Battery, the cohort and the week, Apply."""
    console = Console(browser, fleet, tmp_path)
    try:
        console.open()
        console.sign_in(TOKEN)
        console.loaded("overview")
        console.page.click("nav a[data-page='battery']")
        console.loaded("battery")
        whole = api(fleet, "battery_health")
        last = date.fromisoformat(whole["range"]["to"])
        week = {"from": (last - timedelta(days=6)).isoformat(), "to": last.isoformat()}
        console.page.fill("input[name='model']", "AirPods Pro 2")
        console.page.select_option("select[name='state']", "QLD")
        console.page.select_option("select[name='urban']", "false")
        console.page.fill("input[name='from']", week["from"])
        console.page.fill("input[name='to']", week["to"])
        console.page.click("#filters button[type=submit]")
        console.loaded("battery")
        console.shot("rural-qld-pro2-drain")
        answer = api(fleet, "battery_health", model="AirPods Pro 2", state="QLD", urban="false", **week)
        assert answer["k"] == 5 and answer["cohort"]["label"] == "AirPods Pro 2, rural QLD"
        versions = {row[1] for row in answer["rows"]}
        assert {"7A294", "7A305"} <= versions, answer  # both versions have enough devices to be shown
        same(console.table("battery_health")["cell"], answer)
        # and side by side, one cohort per version
        console.page.check("input[name='compare']")
        console.page.fill("input[name='firmware']", "7A294")
        for field, value in (("model", "AirPods Pro 2"), ("firmware", "7A305")):
            console.page.fill(f"input[name='b.{field}']", value)
        console.page.select_option("select[name='b.state']", "QLD")
        console.page.select_option("select[name='b.urban']", "false")
        console.page.click("#filters button[type=submit]")
        console.loaded("battery")
        console.shot("7A294-vs-7A305")
        for side, version in (("a", "7A294"), ("b", "7A305")):
            cells = console.table("battery_health", side)["cell"]
            assert [row[1] for row in cells] == [version]
            only = api(fleet, "battery_health", model="AirPods Pro 2", firmware=version, state="QLD", urban="false",
                       **week)
            same(cells, only)
        # why: the firmware page shows podpulse detect's findings, as the API gives them
        console.page.uncheck("input[name='compare']")
        console.page.click("nav a[data-page='firmware']")
        console.loaded("firmware")
        found = requests.get(f"{fleet}/v1/firmware/regressions", headers=AUTH, timeout=30).json()
        columns = ["model", "firmware", "baseline_firmware", "devices", "drain_change", "ci_low", "ci_high",
                   "p_value", "regression"]
        same(console.table("firmware_regressions")["cell"],
             {"columns": columns, "rows": [[f[c] for c in columns] for f in found["findings"]]})
        pro2 = [f for f in found["findings"] if f["model"] == "AirPods Pro 2" and f["firmware"] == "7A305"]
        assert pro2 and pro2[0]["regression"] and pro2[0]["ci_low"] < 0.25 < pro2[0]["ci_high"] + 0.02, pro2
        console.shot("firmware-regressions")
        assert console.outside() == []
    finally:
        console.context.close()


def test_a_cohort_saved_in_the_console_is_listed_and_answers_by_name(console, served):
    """Saved through the console's form, listed by the API, chosen by name on a page: its numbers
    are the fields' numbers. Over HTTP: a taken name is 409, a bad field or name 422 naming it."""
    url = served[0]
    console.open({"page": "battery"})
    console.sign_in(TOKEN)
    console.loaded("battery")
    console.page.fill("input[name='model']", "AirPods Pro 2")
    console.page.select_option("select[name='urban']", "true")
    console.page.fill("input[name='save-as']", "urban Pro 2")
    console.page.click("#save-cohort")
    console.page.wait_for_selector("#save-status:has-text('saved: urban Pro 2')")
    console.loaded("battery")
    assert "cohort=urban+Pro+2" in console.page.url and "model=" not in console.page.url
    listed = requests.get(f"{url}/v1/cohorts", headers=AUTH, timeout=30).json()["cohorts"]
    assert {"name": "urban Pro 2", "cohort": {"model": "AirPods Pro 2", "urban": True},
            "label": "AirPods Pro 2, urban"} in listed
    by_name = api(url, "battery_health", cohort="urban Pro 2")
    assert by_name["rows"] == api(url, "battery_health", model="AirPods Pro 2", urban="true")["rows"]
    same(console.table("battery_health")["cell"], by_name)
    assert console.page.input_value("select[name='cohort']") == "urban Pro 2"

    def post(body: dict) -> requests.Response:
        return requests.post(f"{url}/v1/cohorts", json=body, headers=AUTH, timeout=30)
    taken = post({"name": "urban Pro 2", "cohort": {"model": "AirPods Pro"}})
    assert taken.status_code == 409 and "saved already" in taken.json()["detail"]
    for body, field in [({"name": "x", "cohort": {"state": "XX"}}, "state"),
                        ({"name": "x'--", "cohort": {"model": "AirPods Pro"}}, "name"),
                        ({"name": "x", "cohort": {"colour": "white"}}, "colour")]:
        refused = post(body)
        assert refused.status_code == 422 and field in str(refused.json()["detail"]), refused.text
    for params, words in [({"cohort": "nobody"}, "no saved cohort"), ({"cohort": "urban Pro 2", "state": "NSW"}, "not both")]:
        refused = requests.get(f"{url}/v1/analytics/usage_trend", params=params, headers=AUTH, timeout=30)
        assert refused.status_code == 422 and words in str(refused.json()["detail"]), refused.text
    assert console.outside() == []
