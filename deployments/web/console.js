// The PodPulse fleet console: every number comes from the API (/v1/...), asked with the signed-in
// token; the view (page, range, cohorts) lives in the URL, so a view can be shared. Text from the
// API is only ever set as textContent. A cell under the privacy floor says "suppressed (< k)",
// never a number; a cell with no devices is absent and the page says so.
"use strict";

const STATES = ["NSW", "VIC", "QLD", "WA", "SA", "TAS", "ACT", "NT"]; // podpulse.geo.STATE_CODES
const COHORT = [ // analytics.cohort.Cohort's fields: [name, label, kind]
  ["model", "Model", "text"], ["firmware", "Firmware", "text"], ["host_device", "Host", "text"],
  ["state", "State", "state"], ["urban", "Area", "urban"], ["schema_version", "Schema", "number"],
  ["first_seen_from", "First seen from", "date"], ["first_seen_to", "to", "date"],
];
const MODES = ["anc", "adaptive", "transparency", "off"];

const PAGES = {
  overview: { title: "Fleet overview", queries: ["state_overview", "usage_trend"], render: overview },
  listening: { title: "Listening", queries: ["listening_by_hour"], render: listening },
  noise: { title: "Noise control", queries: ["noise_habits", "mode_shares"], render: noise },
  exposure: { title: "Sound exposure", queries: ["exposure"], render: exposure },
  battery: { title: "Battery", queries: ["battery_health"], render: battery },
  firmware: { title: "Firmware", queries: ["firmware_adoption", "battery_health"], render: firmware },
  forecast: { title: "Forecast", queries: [], render: forecast },
  device: { title: "Device", queries: [], render: device },
};

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, attrs = {}, text) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
};

// ---- the token: this tab only --------------------------------------------------------------
const token = () => sessionStorage.getItem("podpulse-token");

class ApiError extends Error {
  constructor(status, detail) { super(detail); this.status = status; }
}

async function api(path, params) {
  const query = params && params.toString() ? `?${params}` : "";
  const response = await fetch(`${path}${query}`, { headers: { Authorization: `Bearer ${token()}` } });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    let detail = body.detail;
    if (Array.isArray(detail)) detail = detail.map((d) => `${(d.loc || []).slice(-1)[0]}: ${d.msg}`).join("; ");
    throw new ApiError(response.status, detail || response.statusText);
  }
  return body;
}

// ---- the view in the URL ----------------------------------------------------------------------
function view() {
  const url = new URLSearchParams(location.search);
  const page = PAGES[url.get("page")] ? url.get("page") : "overview";
  return { page, url };
}

function cohortParams(url, side) {
  const prefix = side === "a" ? "" : "b.";
  const out = new URLSearchParams();
  for (const key of ["from", "to"]) if (url.get(key)) out.set(key, url.get(key));
  if (url.get(`${prefix}cohort`)) { // a saved cohort: by its name alone
    out.set("cohort", url.get(`${prefix}cohort`));
    return out;
  }
  for (const [name] of COHORT) {
    const value = url.get(prefix + name);
    if (value) out.set(name, value);
  }
  return out;
}

function buildFilters() {
  for (const side of ["a", "b"]) {
    const host = $(`[data-cohort="${side}"]`);
    for (const [name, label, kind] of COHORT) {
      const field = (side === "a" ? "" : "b.") + name;
      let input;
      if (kind === "state") {
        input = el("select", { name: field });
        input.append(el("option", { value: "" }, "all"), ...STATES.map((s) => el("option", { value: s }, s)));
      } else if (kind === "urban") {
        input = el("select", { name: field });
        input.append(el("option", { value: "" }, "urban and rural"), el("option", { value: "true" }, "urban"),
                     el("option", { value: "false" }, "rural"));
      } else {
        input = el("input", { name: field, type: kind, size: kind === "text" ? 12 : 4 });
      }
      const wrap = el("label", {}, `${label} `);
      wrap.append(input);
      host.append(wrap);
    }
  }
  const nav = $("#pages");
  for (const [name, page] of Object.entries(PAGES)) nav.append(el("a", { href: `?page=${name}`, "data-page": name }, page.title));
  nav.addEventListener("click", (event) => {
    const link = event.target.closest("a");
    if (!link) return;
    event.preventDefault();
    const url = new URLSearchParams(location.search);
    url.set("page", link.dataset.page);
    go(url);
  });
  $("#filters").addEventListener("submit", (event) => {
    event.preventDefault();
    const url = new URLSearchParams();
    url.set("page", view().page);
    for (const [key, value] of new FormData($("#filters"))) if (value && key !== "save-as") url.set(key, value);
    if (!url.get("compare")) for (const key of [...url.keys()]) if (key.startsWith("b.")) url.delete(key);
    go(url);
  });
  $("#filters").compare.addEventListener("change", (event) => { $("#cohort-b").hidden = !event.target.checked; });
  for (const select of document.querySelectorAll("select[data-saved]")) {
    select.addEventListener("change", () => { // a saved cohort replaces the fields of its side
      const prefix = select.dataset.saved === "a" ? "" : "b.";
      for (const [name] of COHORT) $("#filters").elements[prefix + name].value = "";
    });
  }
  $("#save-cohort").addEventListener("click", saveCohort);
}

async function savedCohorts() {
  const { cohorts } = await api("v1/cohorts");
  for (const select of document.querySelectorAll("select[data-saved]")) {
    const chosen = select.value;
    select.replaceChildren(el("option", { value: "" }, "none (the fields)"),
                           ...cohorts.map((c) => el("option", { value: c.name, title: c.label }, c.name)));
    select.value = chosen;
  }
}

async function saveCohort() {
  const form = $("#filters");
  const name = form.elements["save-as"].value.trim();
  const cohort = {};
  for (const [field] of COHORT) if (form.elements[field].value) cohort[field] = form.elements[field].value;
  try {
    const response = await fetch("v1/cohorts", {
      method: "POST", body: JSON.stringify({ name, cohort }),
      headers: { Authorization: `Bearer ${token()}`, "Content-Type": "application/json" } });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      const detail = Array.isArray(body.detail) ? body.detail.map((d) => d.msg).join("; ") : body.detail;
      throw new Error(`${response.status} ${detail || response.statusText}`);
    }
    $("#save-status").textContent = `saved: ${body.name} (${body.label})`;
    const url = new URLSearchParams(location.search);
    for (const [field] of COHORT) url.delete(field);
    url.set("cohort", body.name);
    go(url);
  } catch (error) {
    $("#save-status").textContent = `not saved: ${error.message}`;
  }
}

function fillFilters(url) {
  const form = $("#filters");
  for (const input of form.elements) {
    if (!input.name) continue;
    if (input.type === "checkbox") input.checked = url.get(input.name) === "1";
    else input.value = url.get(input.name) || "";
  }
  $("#cohort-b").hidden = url.get("compare") !== "1";
}

function go(url) {
  history.pushState(null, "", `?${url}`);
  show();
}

// ---- drawing ----------------------------------------------------------------------------------
function fmt(value, column) {
  if (value === null || value === undefined) return "—";
  if (column === "urban") return value ? "urban" : "rural";
  if (typeof value === "number" && !Number.isInteger(value)) return value.toFixed(3);
  return String(value);
}

function table(result, side) {
  const wrap = el("div");
  const t = el("table", { "data-query": result.name, "data-side": side });
  const head = el("tr");
  for (const c of result.columns) head.append(el("th", {}, c));
  const body = el("tbody");
  t.append(el("thead"), body);
  t.tHead.append(head);
  result.rows.forEach((row, n) => {
    const tr = el("tr", { "data-kind": "cell" });
    row.forEach((v, i) => {
      const column = result.columns[i];
      const td = tr.appendChild(el("td", {}, fmt(v, column)));
      const interval = result.intervals && result.intervals[n][column];
      if (interval) td.title = `about ${fmt(v, column)} (95%: ${fmt(interval[0], column)} to ${fmt(interval[1], column)})`;
    });
    body.append(tr);
  });
  for (const keys of result.suppressed_cells || []) {
    const tr = el("tr", { "data-kind": "suppressed" });
    keys.forEach((v, i) => tr.append(el("td", {}, fmt(v, result.columns[i]))));
    tr.append(el("td", { class: "suppressed", colspan: result.columns.length - keys.length },
                 `suppressed (< ${result.k} devices)`));
    body.append(tr);
  }
  wrap.append(t);
  if (!result.rows.length && !(result.suppressed_cells || []).length) {
    wrap.append(el("p", { class: "note", "data-empty": result.name }, "no devices in this range and cohort"));
  }
  if (result.privacy) {
    wrap.append(el("p", { class: "note about" }, `about: every figure here is noisy (differential privacy: ` +
      `ε ${result.privacy.epsilon} for this answer, ${result.privacy.bounds}); hover a figure for its 95% interval`));
  }
  for (const note of result.notes || []) if (!note.startsWith("distribution:")) wrap.append(el("p", { class: "note" }, note));
  return wrap;
}

function chart(host, title, traces, layout = {}) {
  host.append(el("h3", {}, title));
  const div = host.appendChild(el("div", { class: "chart" }));
  if (!traces.length || traces.every((t) => !(t.x || t.values || []).length)) {
    div.append(el("p", { class: "note" }, "nothing to draw: every cell is suppressed or empty"));
    return;
  }
  Plotly.newPlot(div, traces, { margin: { t: 10, r: 10, l: 50, b: 60 }, height: 300, ...layout },
                 { displayModeBar: false, responsive: true });
}

const records = (result) => result.rows.map((r) => Object.fromEntries(result.columns.map((c, i) => [c, r[i]])));
const groupBy = (items, key) => items.reduce((m, x) => m.set(key(x), [...(m.get(key(x)) || []), x]), new Map());

function overview(host, data) {
  const states = records(data.state_overview);
  const bars = { type: "bar", x: states.map((r) => r.state), y: states.map((r) => r.listening_h_per_day) };
  if (data.state_overview.intervals) {  // a private answer: its 95% intervals as error bars
    const iv = data.state_overview.intervals.map((i) => i.listening_h_per_day);
    bars.error_y = { type: "data", symmetric: false, array: iv.map((x, n) => (x[1] ?? bars.y[n]) - bars.y[n]),
                     arrayminus: iv.map((x, n) => bars.y[n] - x[0]) };
  }
  chart(host, data.state_overview.privacy ? "Listening per device per day (h, about: 95% intervals)"
                                          : "Listening per device per day (h)", [bars]);
  host.append(table(data.state_overview, host.dataset.side));
  const trend = groupBy(records(data.usage_trend), (r) => `${r.state} ${r.urban ? "urban" : "rural"}`);
  chart(host, "Listening per device by day (h)", [...trend].map(([name, rows]) => ({
    type: "scatter", mode: "lines", name, x: rows.map((r) => r.day), y: rows.map((r) => r.hours_per_device) })));
  host.append(table(data.usage_trend, host.dataset.side));
}

function listening(host, data) {
  const byArea = groupBy(records(data.listening_by_hour), (r) => (r.urban ? "urban" : "rural"));
  chart(host, "Minutes per active device by local hour", [...byArea].map(([name, rows]) => ({
    type: "scatter", mode: "lines+markers", name, x: rows.map((r) => r.local_hour), y: rows.map((r) => r.minutes_per_device) })),
    { xaxis: { title: { text: "local hour" }, dtick: 3 } });
  host.append(table(data.listening_by_hour, host.dataset.side));
}

function noise(host, data) {
  const rows = records(data.noise_habits);
  const x = rows.map((r) => `${r.ambient_band} dBA ${r.urban ? "urban" : "rural"}`);
  chart(host, "Noise-control share of in-ear time by ambient level", MODES.map((m) => ({
    type: "bar", name: m, x, y: rows.map((r) => r[m]) })), { barmode: "stack", yaxis: { tickformat: ".0%" } });
  host.append(table(data.noise_habits, host.dataset.side));
  host.append(el("h3", {}, "Mode shares by state"));
  host.append(table(data.mode_shares, host.dataset.side));
}

function exposure(host, data) {
  const rows = records(data.exposure);
  chart(host, "Share of device-weeks over the WHO guide (80 dBA, 40 h)", [{ type: "bar",
    x: rows.map((r) => `${r.state} ${r.urban ? "urban" : "rural"}`), y: rows.map((r) => r.share_over_guide) }],
    { yaxis: { tickformat: ".0%" } });
  host.append(table(data.exposure, host.dataset.side));
  const d = data.exposure.extra.distribution;
  chart(host, "Device-weeks by weekly dose (% of the allowance)", [{ type: "bar",
    x: d.edges_pct.slice(0, -1).map((lo) => `${lo}-${lo + 10}`), y: d.device_weeks }]);
}

function drainChart(host, result) {
  const rows = records(result);
  chart(host, "Drain per hour of playback (%/h): p10, median, p90", [{ type: "bar",
    x: rows.map((r) => `${r.model} ${r.firmware}`), y: rows.map((r) => r.p50_pct_per_h),
    error_y: { type: "data", symmetric: false, array: rows.map((r) => r.p90_pct_per_h - r.p50_pct_per_h),
               arrayminus: rows.map((r) => r.p50_pct_per_h - r.p10_pct_per_h) } }]);
}

async function battery(host, data) {
  drainChart(host, data.battery_health);
  host.append(table(data.battery_health, host.dataset.side));
  const flagged = await api("v1/anomalies/regions");
  if (!flagged.model_version) {
    host.append(el("p", { class: "note" }, flagged.note));
    return;
  }
  chart(host, `Share of devices flagged by battery-anomaly ${flagged.model_version} (whole fleet, by region)`,
        [{ type: "bar", x: flagged.regions.map((r) => r.region), y: flagged.regions.map((r) => r.share) }],
        { yaxis: { tickformat: ".1%" } });
  host.append(table({ name: "flagged_by_region", columns: ["region", "devices", "flagged_devices", "share"],
                      rows: flagged.regions.map((r) => [r.region, r.devices, r.flagged_devices, r.share]),
                      suppressed_cells: [], k: flagged.k,
                      notes: [`regions with fewer than ${flagged.k} devices are left out; not narrowed by the cohort`] },
                    host.dataset.side));
  const outliers = data.battery_health.extra.outliers || [];
  if (outliers.length) {
    host.append(el("h3", {}, "Devices furthest from their model and firmware"));
    host.append(table({ name: "outliers", columns: Object.keys(outliers[0]), rows: outliers.map(Object.values),
                        suppressed_cells: [], notes: [] }, host.dataset.side));
  }
}

async function firmware(host, data) {
  const byVersion = groupBy(records(data.firmware_adoption), (r) => r.firmware);
  chart(host, "Share of each day's devices per firmware", [...byVersion].map(([name, rows]) => ({
    type: "scatter", mode: "lines", name, x: rows.map((r) => r.day), y: rows.map((r) => r.share) })),
    { yaxis: { tickformat: ".0%" } });
  host.append(table(data.firmware_adoption, host.dataset.side));
  drainChart(host, data.battery_health);
  host.append(table(data.battery_health, host.dataset.side));
  const found = await api("v1/firmware/regressions");
  host.append(el("h3", {}, "Each version against the one before it, on the same devices (podpulse detect)"));
  if (!found.findings.length) {
    host.append(el("p", { class: "note" }, found.note));
    return;
  }
  const columns = ["model", "firmware", "baseline_firmware", "devices", "drain_change", "ci_low", "ci_high",
                   "p_value", "regression"];
  host.append(table({ name: "firmware_regressions", columns, rows: found.findings.map((f) => columns.map((c) => f[c])),
                      suppressed_cells: [],
                      notes: [`detected ${found.detected_at}; drain change per hour of the same use, usage mix ` +
                              "controlled for; the whole fleet, not narrowed by the cohort"] },
                    host.dataset.side));
}

async function forecast(host, _data, params) {
  const state = params.get("state") || "NSW";
  const area = params.get("urban") === "false" ? "rural" : "urban";
  host.append(el("p", { class: "note" }, `region ${state}-${area} (the cohort's state and area; NSW urban by default)`));
  const week = await api("v1/forecast/usage", new URLSearchParams({ region: `${state}-${area}` }));
  const e = week.evaluation || {};
  if (e.mape !== undefined && e.mape !== null) {
    host.append(el("p", { "data-evaluation": "" }, `On its held-out week (${e.held_out ? `${e.held_out.from} to ${e.held_out.to}` : "the last"}), ` +
      `this version's error (MAPE) was ${e.mape.toFixed(1)}% against ${e.baseline_mape.toFixed(1)}% for ${e.baseline}.`));
  }
  chart(host, `Listening hours forecast, model ${week.model_version}`, [{ type: "scatter", mode: "lines+markers",
    x: week.days.map((d) => d.day), y: week.days.map((d) => d.listening_hours) }]);
  host.append(table({ name: "forecast", columns: ["day", "listening_hours"],
                      rows: week.days.map((d) => [d.day, d.listening_hours]), suppressed_cells: [], notes: [] },
                    host.dataset.side));
}

async function device(host, _data, params, url) {
  const id = url.get("device");
  if (!id) {
    host.append(el("p", { class: "note" }, "enter a device's pseudonym above (`podpulse pseudonym ID` prints it)"));
    return;
  }
  const query = new URLSearchParams();
  for (const key of ["from", "to"]) if (params.get(key)) query.set(key, params.get(key));
  const t = await api(`v1/devices/${encodeURIComponent(id)}/timeline`, query);
  const x = t.hours.map((h) => h.hour);
  chart(host, `Listening minutes per hour, ${t.from} to ${t.to}`, [{ type: "bar", x, y: t.hours.map((h) => h.listening_s / 60) }]);
  chart(host, "Noise-control mode, minutes in ear per hour", MODES.map((m) => ({
    type: "bar", name: m, x, y: t.hours.map((h) => h[`${m}_s`] / 60) })), { barmode: "stack" });
  chart(host, "Output and ambient level (mean of the hour, dBA)", [["output_dba", "output"], ["ambient_dba", "ambient"]].map(([c, name]) => ({
    type: "scatter", mode: "lines", name, x, y: t.hours.map((h) => h[c]) })));
  chart(host, "Battery (lowest of the hour, %)", ["battery_left_min", "battery_right_min", "battery_case_min"].map((c) => ({
    type: "scatter", mode: "lines", name: c.replace("battery_", "").replace("_min", ""), x, y: t.hours.map((h) => h[c]) })));
  host.append(el("h3", {}, "Firmware changes"));
  host.append(table({ name: "firmware_changes", columns: ["day", "firmware"], rows: t.firmware.map((f) => [f.day, f.firmware]),
                      suppressed_cells: [], notes: [] }, host.dataset.side));
  host.append(el("h3", {}, "Anomaly scores"));
  host.append(table({ name: "anomalies", columns: ["day", "model_version", "score", "flagged", "reason"],
                      rows: t.anomalies.map((a) => [a.day, a.model_version, a.score, a.flagged, a.reason]),
                      suppressed_cells: [], notes: [] }, host.dataset.side));
}

// ---- a page ------------------------------------------------------------------------------------
async function drawSide(host, page, params, url) {
  const data = {};
  await Promise.all(PAGES[page].queries.map(async (q) => { data[q] = await api(`v1/analytics/${q}`, params); }));
  const first = data[PAGES[page].queries[0]];
  if (first) {
    host.append(el("p", { class: "note", "data-range": "" },
                   `${first.range.from} to ${first.range.to} (AEST) · ${first.cohort.label} · cells under ${first.k} devices suppressed`));
  }
  await PAGES[page].render(host, data, params, url);
}

async function show() {
  delete document.body.dataset.loaded;
  if (!token()) {
    $("#console").hidden = true;
    $("#sign-out").hidden = true;
    $("#sign-in").hidden = false;
    return;
  }
  $("#sign-in").hidden = true;
  $("#console").hidden = false;
  $("#sign-out").hidden = false;
  const { page, url } = view();
  await savedCohorts().catch(() => {}); // the list is a convenience: a page still draws without it
  fillFilters(url);
  $("#device-field").hidden = page !== "device";
  for (const link of $("#pages").children) {
    if (link.dataset.page === page) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const sides = $("#sides");
  sides.replaceChildren();
  document.title = `${PAGES[page].title} · PodPulse`;
  $("#status").textContent = "loading…";
  const wanted = url.get("compare") === "1" ? ["a", "b"] : ["a"];
  try {
    await Promise.all(wanted.map(async (side) => {
      const host = sides.appendChild(el("section", { class: "side", "data-side": side }));
      host.dataset.side = side;
      host.append(el("h2", {}, wanted.length > 1 ? `${PAGES[page].title}: cohort ${side.toUpperCase()}` : PAGES[page].title));
      try {
        await drawSide(host, page, cohortParams(url, side), url);
      } catch (error) {
        if (error.status === 401) throw error;
        host.append(el("p", { class: "error", role: "alert" }, `${error.status || ""} ${error.message}`));
      }
    }));
    $("#status").textContent = "";
    document.body.dataset.loaded = page;
  } catch (error) {
    sessionStorage.removeItem("podpulse-token");
    $("#sign-in-error").textContent = "the token was refused (401): sign in again";
    show();
  }
}

document.addEventListener("DOMContentLoaded", () => {
  buildFilters();
  $("#sign-in").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem("podpulse-token", $("#token").value.trim());
    $("#token").value = "";
    $("#sign-in-error").textContent = "";
    show();
  });
  $("#sign-out").addEventListener("click", () => { sessionStorage.removeItem("podpulse-token"); show(); });
  window.addEventListener("popstate", show);
  show();
});
