import html
import re
from html.parser import HTMLParser

from analytics.report_html import CHART_TITLES, render_html

SVG_NS = "http://www.w3.org/2000/svg"
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
NOTE = 'firmware "<script>alert(1)</script>" & friends'


def _q(name, columns, rows, suppressed=0, notes=(), extra=None, k=10):
    return {"name": name, "columns": columns, "rows": rows, "k": k, "suppressed": suppressed,
            "notes": list(notes), "extra": extra or {}}


def _report(empty: bool = False) -> dict:
    def rows(r):
        return [] if empty else r

    edges = list(range(0, 210, 10))
    counts = [] if empty else [50, 30, 10, 5, 2, 1, 0, 0, 0, 0, 1] + [0] * 8 + [1]
    outliers = [] if empty else [{"device_id": "ap-1<b>", "model": "AirPods Pro 2", "firmware": "7A305",
                                  "left_pct_per_h": 59.2, "right_pct_per_h": 59.4, "z": 9.5}]
    return {
        "range": {"from": "2026-11-02", "to": "2026-11-08", "days": "AEST (UTC+10), both ends included"}, "k": 10,
        "usage_trend": _q("usage_trend", ["day", "state", "urban", "devices", "listening_h", "hours_per_device"],
                          [], suppressed=7),  # the empty query, with suppressed cells
        "noise_habits": _q("noise_habits", ["ambient_band", "urban", "devices", "in_ear_h", "anc", "adaptive",
                                            "transparency", "off"],
                           rows([["0-45", True, 300, 30.0, 0.05, 0.03, 0.12, 0.80],
                                 ["0-45", False, 200, 80.0, 0.07, 0.03, 0.12, 0.78],
                                 ["75+", True, 40, 4.0, 0.67, 0.27, 0.05, 0.01]]), suppressed=1),
        "mode_shares": _q("mode_shares", ["state", "urban", "devices", "in_ear_h", "anc", "adaptive",
                                          "transparency", "off"],
                          rows([["NSW", True, 690, 300.0, 0.30, 0.10, 0.12, 0.48],
                                ["NSW", False, 240, 80.0, 0.10, 0.03, 0.12, 0.75]]), suppressed=2),
        "exposure": _q("exposure", ["state", "urban", "devices", "device_weeks", "share_over_guide",
                                    "median_dose_pct"], rows([["NSW", True, 690, 690, 0.003, 1.0]]),
                       suppressed=3, notes=["a week starts on Monday, AEST"],
                       extra={"distribution": {"edges_pct": edges, "device_weeks": counts,
                                               "over_guide": 0 if empty else 2, "total": sum(counts)}}),
        "battery_health": _q("battery_health", ["model", "firmware", "devices", "p10_pct_per_h", "p50_pct_per_h",
                                                "p90_pct_per_h"],
                             rows([["AirPods Pro", "6F29", 464, 19.1, 23.9, 30.8],
                                   ["AirPods Pro 2", "7A<script>", 821, 19.1, 24.0, 29.8]]),
                             extra={"outliers": outliers}),
        "firmware_adoption": _q("firmware_adoption", ["day", "firmware", "devices", "share"],
                                rows([["2026-11-02", "7A294", 2536, 0.85], ["2026-11-02", "7A305", 400, 0.15],
                                      ["2026-11-03", "7A294", 2000, 0.60], ["2026-11-03", "7A305", 1300, 0.40]]),
                                notes=[NOTE]),
        "listening_by_hour": _q("listening_by_hour", ["local_hour", "urban", "devices", "minutes_per_device"],
                                rows([[h, u, 100, 10.0 + h + u] for h in range(24) for u in (True, False)])),
        "state_overview": _q("state_overview", ["state", "devices", "listening_h_per_day", "cancelling_share",
                                                "drain_pct_per_h", "urban_share"],
                             rows([["NSW", 932, 1.6, 0.38, 24.3, 0.75], ["VIC", 772, 1.58, 0.38, 24.4, 0.79]])),
        "events_covered": 0 if empty else 730158,
    }


class _Checker(HTMLParser):
    """Balanced tags, plus every tag, reference attribute and CSS block, for the assertions."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.tags, self.refs, self.css = [], [], [], [], []
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        self._attrs(tag, attrs)
        if tag not in VOID:
            self.stack.append(tag)
        self._in_style = tag == "style"

    def handle_startendtag(self, tag, attrs):
        self._attrs(tag, attrs)

    def handle_endtag(self, tag):
        self._in_style = False
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        if self._in_style:
            self.css.append(data)

    def _attrs(self, tag, attrs):
        self.tags.append(tag)
        for key, value in attrs:
            if key in ("href", "src", "xlink:href") or "url(" in (value or ""):
                self.refs.append(value)
            if key == "style":
                self.css.append(value or "")


def _parse(page: str) -> _Checker:
    checker = _Checker()
    checker.feed(page)
    checker.close()
    assert not checker.errors, checker.errors[:5]
    assert not checker.stack, f"unclosed: {checker.stack}"
    return checker


def _assert_self_contained(page: str, checker: _Checker) -> None:
    assert not {"script", "link", "img", "iframe", "object", "embed"} & set(checker.tags)
    for ref in checker.refs:  # only same-document references: href="#id", url(#id)
        assert re.fullmatch(r"#[\w-]+|url\(#[\w-]+\)", ref), ref
    for url in re.findall(r"url\(([^)]*)\)", " ".join(checker.css)):
        assert url.startswith("#"), url
    assert set(re.findall(r"https?://[^\s\"'<>)]+", page)) <= {SVG_NS}
    assert page.count(SVG_NS) == page.count(f'xmlns="{SVG_NS}"')


def test_full_report_page():
    page = render_html(_report())
    checker = _parse(page)
    assert checker.tags.count("svg") == 5
    _assert_self_contained(page, checker)
    for title in CHART_TITLES.values():
        assert html.escape(title) in page
    assert "k = 10" in page
    assert "2026-11-02 to 2026-11-08: AEST (UTC+10), both ends included" in page
    for n in (7, 3):
        assert f"{n} cells with fewer than 10 devices suppressed" in page
    assert "1 cell with fewer than 10 devices suppressed" in page
    assert "no data" in page  # usage_trend has no rows
    ids = re.findall(r' id="([^"]+)"', page)
    assert len(ids) == len(set(ids))  # several SVGs on one page, no clashing ids
    assert all(re.sub(r"^url\(#|^#|\)$", "", ref) in ids for ref in checker.refs)
    assert "<script" not in page.lower()
    assert html.escape(NOTE) in page
    assert "7A&lt;script&gt;" in page  # a data value inside a chart, escaped by the SVG writer
    assert "ap-1&lt;b&gt;" in page and "730,158" in page


def test_all_queries_empty():
    page = render_html(_report(empty=True))
    checker = _parse(page)
    assert checker.tags.count("svg") == 0
    _assert_self_contained(page, checker)
    assert page.count("no data") >= 5 + 3  # five charts, state and usage tables, outliers
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")


def test_missing_queries_render_no_data():
    page = render_html({"range": {}, "k": 10})
    _parse(page)
    assert "no data" in page


def _rows_of_table_after(page: str, heading: str) -> list[list[str]]:
    table = page[page.index(heading):].split("</table>")[0]
    return [[html.unescape(re.sub("<[^>]+>", "", c)) for c in re.findall(r"<td[^>]*>(.*?)</td>", tr)]
            for tr in re.findall(r"<tr>(.*?)</tr>", table) if "<td" in tr]


def test_a_suppressed_cell_is_never_a_number_and_never_confused_with_no_devices():
    report = _report()
    report["usage_trend"] = {**_q("usage_trend", ["day", "state", "urban", "devices", "listening_h", "hours_per_device"],
                                  [["2026-11-02", "NSW", True, 40, 80.0, 2.0], ["2026-11-03", "NSW", True, 41, 82.0, 2.0]],
                                  suppressed=3),
                             "suppressed_cells": [["2026-11-02", "NSW", False], ["2026-11-02", "TAS", True],
                                                  ["2026-11-03", "TAS", True]]}
    report["mode_shares"]["suppressed_cells"] = [["NSW", False]]
    report["mode_shares"]["rows"] = report["mode_shares"]["rows"][:1]  # NSW rural suppressed
    report["state_overview"]["suppressed_cells"] = [["TAS"]]
    page = render_html(report)
    totals = {r[0]: r[1:] for r in _rows_of_table_after(page, "Total listening per state")}
    assert totals == {"NSW": ["162", "suppressed (< k)", "162"],  # the rural days were under k
                      "TAS": ["suppressed (< k)", "no devices", "suppressed (< k)"]}  # no rural device at all
    assert ["TAS", "suppressed (< k)", "", "", "", ""] in _rows_of_table_after(page, "<h2>States</h2>")
    chart = page[page.index('aria-label="' + CHART_TITLES["mode_shares"]):].split("</svg>")[0]
    assert "suppressed (&lt; k)" in chart and "no devices" not in chart  # only NSW: its rural cell is under k
    report["mode_shares"]["suppressed_cells"] = []  # now NSW rural had nobody
    chart = render_html(report)
    chart = chart[chart.index('aria-label="' + CHART_TITLES["mode_shares"]):].split("</svg>")[0]
    assert "no devices" in chart and "suppressed" not in chart
