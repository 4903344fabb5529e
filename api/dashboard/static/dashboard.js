/* The tally dashboard: a client of the public HTTP API, nothing more.
 *
 * Every figure comes from /v1/series, /v1/breakdown or /v1/catalog, fetched
 * with the user's token, so the page shows exactly what the API answers (and
 * what a token holder could fetch with curl). API errors are shown as the API
 * words them, never swallowed: a panel that cannot load says why.
 *
 * Each panel writes its totals into the DOM (data-total on the panel, one
 * <tr data-value data-total> per group) so they can be read by a test or a
 * screen reader as well as from the chart. <body data-state> is "loading",
 * "ready" or "error", and data-tenant/from/to/tz name the query it shows.
 *
 * Tag values (agent names, sentiments, buckets) come from producers, often
 * from end users: they are text. Tables set them with textContent; plotly
 * reads its text fields as markup, so every string handed to it goes
 * through plotText (see there).
 */
"use strict";

const ZONES = [
  "UTC", "Europe/London", "Europe/Paris", "Europe/Berlin", "America/New_York",
  "America/Chicago", "America/Los_Angeles", "America/Sao_Paulo", "Asia/Tokyo",
  "Asia/Singapore", "Australia/Sydney",
];
const OTHER_ZONE = "__other";
// the built-in rules' response-time buckets, in their natural order (not by size):
// [tag value, label, short label for the chart's axis, colour]
const BUCKETS = [
  ["lt_30m", "< 30 min", "< 30m", "#16a34a"],
  ["lt_1h", "30 min – 1 h", "30m – 1h", "#65a30d"],
  ["lt_4h", "1 – 4 h", "1 – 4h", "#ca8a04"],
  ["lt_24h", "4 – 24 h", "4 – 24h", "#ea580c"],
  ["gt_24h", "> 24 h", "> 24h", "#dc2626"],
];
// sentiments in a fixed order and colour, so two ranges read alike; others follow by size
const SENTIMENT_COLORS = { positive: "#16a34a", neutral: "#94a3b8", negative: "#dc2626" };
const SENTIMENT_ORDER = Object.keys(SENTIMENT_COLORS);
const PALETTE = ["#4f46e5", "#0ea5e9", "#14b8a6", "#f59e0b", "#ec4899", "#8b5cf6", "#64748b"];
const ACCENT = "#4f46e5";
const PREVIOUS = "#c3c8d6";
const TOKEN_KEY = "tally.dashboard.token";
const AGENT_LIMIT = 12; // agents drawn one by one; the rest are summed as "other"
const ALL = 1000; // the API's largest breakdown limit

// typesetMath off: a tag value between dollar signs is never LaTeX, even were MathJax
// ever on the page (plotText escapes "$" as well)
const PLOT_CONFIG = {
  displaylogo: false, responsive: true, displayModeBar: false, typesetMath: false,
};
// the longest tag value drawn whole on an axis or in a legend; longer ones end in "…" there,
// and the hover label and the table show them whole
const AXIS_CHARS = 20;
const LEGEND_CHARS = 22;
const FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', sans-serif";

const $ = (id) => document.getElementById(id);
const number = new Intl.NumberFormat("en-US");
let generation = 0; // bumps on every load: answers of a superseded load are dropped

/* ---------------------------------------------------------------- the API */

class ApiError extends Error {
  constructor(status, code, message, path) {
    super(message);
    this.status = status;
    this.code = code;
    this.path = path;
  }

  describe() {
    const where = this.status ? `${this.status} ${this.code}` : this.code;
    return `${where}: ${this.message}`;
  }
}

function token() {
  return $("token").value.trim();
}

/* GET an API route; an answer other than 2xx becomes an ApiError carrying the
 * API's own {"error": {"code", "message"}} (or the status text when the body
 * is not that shape, e.g. a proxy's page). */
async function api(path, params) {
  const url = new URL(path, window.location.origin);
  for (const [key, value] of Object.entries(params)) url.searchParams.set(key, value);
  const headers = { Accept: "application/json" };
  if (token()) headers.Authorization = `Bearer ${token()}`;
  let response;
  try {
    response = await fetch(url, { headers, cache: "no-store" });
  } catch (e) {
    throw new ApiError(0, "network", `${path}: ${e.message} (is tally running?)`, path);
  }
  const text = await response.text();
  let body = null;
  try {
    body = JSON.parse(text);
  } catch (e) {
    if (response.ok) throw new ApiError(response.status, "bad_answer", `${path}: ${e}`, path);
  }
  if (!response.ok) {
    const error = body && typeof body.error === "object" ? body.error : {};
    throw new ApiError(
      response.status,
      error.code || "http_error",
      error.message || text.slice(0, 300) || response.statusText,
      path,
    );
  }
  return body;
}

/* ---------------------------------------------------------------- controls */

function browserZone() {
  try {
    return Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
  } catch (e) {
    return "UTC";
  }
}

function currentZone() {
  const select = $("tz-select");
  return select.value === OTHER_ZONE ? $("tz-other").value.trim() : select.value;
}

function showOtherZone(show) {
  $("tz-other-label").hidden = !show;
}

function setZone(tz) {
  const select = $("tz-select");
  if ([...select.options].some((o) => o.value === tz)) {
    select.value = tz;
    showOtherZone(false);
  } else {
    select.value = OTHER_ZONE;
    $("tz-other").value = tz;
    showOtherZone(true);
  }
}

function fillZones() {
  const select = $("tz-select");
  const browser = browserZone();
  for (const zone of [browser, ...ZONES.filter((z) => z !== browser)]) {
    const label = zone === browser ? `${zone} (browser)` : zone;
    select.add(new Option(label, zone));
  }
  select.add(new Option("Other…", OTHER_ZONE));
}

/* Today's date in the chosen zone (the API reads from/to as dates in tz), or
 * in the browser's when the zone is not one this browser knows. */
function today(tz) {
  try {
    const parts = new Intl.DateTimeFormat("en-CA", {
      timeZone: tz || undefined, year: "numeric", month: "2-digit", day: "2-digit",
    }).formatToParts(new Date());
    const part = (type) => parts.find((p) => p.type === type).value;
    return `${part("year")}-${part("month")}-${part("day")}`;
  } catch (e) {
    const d = new Date();
    const pad = (n) => String(n).padStart(2, "0");
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
  }
}

function addDays(date, days) {
  const d = new Date(`${date}T00:00:00Z`);
  d.setUTCDate(d.getUTCDate() + days);
  return d.toISOString().slice(0, 10);
}

function setRange(days) {
  const to = today(currentZone());
  $("to").value = to;
  $("from").value = addDays(to, -(days - 1));
}

function saveToken() {
  try {
    if (token()) window.localStorage.setItem(TOKEN_KEY, token());
    else window.localStorage.removeItem(TOKEN_KEY);
  } catch (e) {
    // storage disabled (a private window): the token works for this page only
  }
}

function loadToken() {
  try {
    return window.localStorage.getItem(TOKEN_KEY) || "";
  } catch (e) {
    return "";
  }
}

/* ---------------------------------------------------------------- formatting */

function changeText(change) {
  if (change === null || change === undefined) return "no data in the previous period";
  const pct = change * 100;
  const sign = pct > 0 ? "+" : "";
  return `${sign}${pct.toFixed(1)}% vs previous period`;
}

function duration(seconds) {
  const s = Math.round(seconds);
  const d = Math.floor(s / 86400);
  const h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60);
  if (d) return `${d} d ${h} h`;
  if (h) return `${h} h ${String(m).padStart(2, "0")} min`;
  if (m) return `${m} min ${String(s % 60).padStart(2, "0")} s`;
  return `${s} s`;
}

function share(part, whole) {
  return whole ? `${((100 * part) / whole).toFixed(1)}%` : "–";
}

function groupName(value, none) {
  return value === null ? none : value;
}

/* Plotly draws the text of tick labels, legends, hover labels and annotations
 * as a subset of HTML: <b>, <i>, <a href> (a live link), <span style>, <br>,
 * entities such as &lt; or &#60;, and $...$ as LaTeX when MathJax is loaded.
 * A producer's string must be drawn as the characters it is, so the ones plotly
 * reads as markup become entities, which plotly turns back into those same
 * characters when it draws (it decodes entities once: "&amp;lt;" shows "&lt;"). */
const PLOT_ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", $: "&#36;" };

function plotText(value) {
  return String(value).replace(/[&<>$]/g, (c) => PLOT_ESCAPES[c]);
}

/* At most `max` characters, a cut marked by "…". Cut before escaping (plotText),
 * so an entity is never cut in half; counted in code points, so an emoji is never
 * split into half a surrogate pair. */
function shorten(value, max) {
  const chars = [...String(value)];
  return chars.length <= max ? String(value) : `${chars.slice(0, max - 1).join("").trimEnd()}…`;
}

/* Shortened labels that stay distinct: a pie adds up slices whose labels are equal,
 * so two long values with the same beginning are told apart by a number. */
function distinctShort(values, max) {
  const seen = new Set();
  return values.map((value) => {
    let label = shorten(value, max);
    for (let n = 2; seen.has(label); n++) label = `${shorten(value, max - 4)} (${n})`;
    seen.add(label);
    return label;
  });
}

/* ---------------------------------------------------------------- panels */

function baseLayout(extra) {
  return {
    margin: { l: 56, r: 16, t: 8, b: 40 },
    paper_bgcolor: "rgba(0,0,0,0)",
    plot_bgcolor: "rgba(0,0,0,0)",
    font: { family: FONT, size: 12, color: "#374151" },
    hoverlabel: { font: { family: FONT } },
    showlegend: false,
    ...extra,
  };
}

/* An axis of counts: whole numbers only (Plotly would tick 0.2, 0.4... on a small range). */
function countAxis(max) {
  const axis = { rangemode: "tozero", gridcolor: "#eef0f5", tickformat: ",d" };
  return max < 5 ? { ...axis, dtick: 1, range: [0, Math.max(max, 1) * 1.08] } : axis;
}

/* Nothing to draw (no data in the range): no empty axes, the panel's note says why. */
function noChart(panel, chart) {
  Plotly.purge(chart);
  panel.classList.add("empty");
  return Promise.resolve();
}

function setStatus(panel, message, kind) {
  const status = panel.querySelector(".status");
  status.hidden = !message;
  status.textContent = message || "";
  status.className = `status ${kind || ""}`;
}

function setTotals(panel, text) {
  panel.querySelector(".totals").textContent = text;
}

function clearPanel(panel) {
  delete panel.dataset.total;
  panel.querySelectorAll(".chart").forEach((div) => window.Plotly && Plotly.purge(div));
  panel.querySelectorAll("tbody").forEach((body) => body.replaceChildren());
  setTotals(panel, "");
}

/* A panel whose data could not be loaded says why, in the API's words. */
function failPanel(panel, error) {
  clearPanel(panel);
  panel.classList.add("failed");
  setStatus(panel, error.describe ? error.describe() : String(error), "error");
}

function emptyNote(metric, total, known, q) {
  if (total) return "";
  if (known && !known.has(metric)) {
    return `Tenant ${q.tenant} has no ${metric} yet: send events to POST /v1/events ` +
      `(or try tally demo --tenant ${q.tenant}).`;
  }
  return `No ${metric} between ${q.from} and ${q.to}.`;
}

function fillTable(table, rows) {
  const body = table.querySelector("tbody");
  body.replaceChildren(
    ...rows.map((row) => {
      const tr = document.createElement("tr");
      tr.dataset.value = row.value;
      tr.dataset.total = row.total;
      if (row.seconds !== undefined) tr.dataset.seconds = row.seconds;
      row.cells.forEach((cell, i) => {
        const td = document.createElement("td");
        td.textContent = cell;
        // the label column cuts a long value short with an ellipsis (CSS): the title
        // keeps it whole on hover, and the text itself stays whole for copying and
        // screen readers
        if (i === 0) td.title = cell;
        tr.append(td);
      });
      return tr;
    }),
  );
}

function renderReceived(series, q, known) {
  const panel = $("panel-received");
  const compare = series.compare;
  panel.dataset.total = series.total;
  panel.dataset.previousTotal = compare.total;
  panel.dataset.change = compare.change === null ? "" : compare.change;
  $("received-total").textContent = number.format(series.total);
  $("received-total").dataset.total = series.total;
  const delta = $("received-change");
  delta.textContent = changeText(compare.change);
  delta.dataset.change = panel.dataset.change;
  delta.className = `delta ${compare.change > 0 ? "up" : compare.change < 0 ? "down" : "flat"}`;
  setTotals(
    panel,
    `${number.format(series.total)} from ${series.from} to ${series.to} · ` +
      `${number.format(compare.total)} from ${compare.from} to ${compare.to}`,
  );
  setStatus(panel, emptyNote("messages.received", series.total + compare.total, known, q));
  if (!series.total && !compare.total) {
    return noChart(panel, "chart-received");
  }
  const labels = series.points.map((p) => p[0]);
  const previous = series.points.map((_, i) => compare.points[i] || [null, null]);
  return Plotly.react(
    "chart-received",
    [
      {
        type: "bar", name: plotText(`${series.from} – ${series.to}`), x: labels,
        y: series.points.map((p) => p[1]), marker: { color: ACCENT },
        hovertemplate: "%{x|%a %b %d}: %{y:,} messages<extra>this period</extra>",
      },
      {
        type: "bar", name: plotText(`previous period, ${compare.from} – ${compare.to}`),
        x: labels,
        y: previous.map((p) => p[1]), customdata: previous.map((p) => p[0]),
        marker: { color: PREVIOUS },
        hovertemplate: "%{customdata}: %{y:,} messages<extra>previous period</extra>",
      },
    ],
    baseLayout({
      barmode: "group", bargap: 0.2, bargroupgap: 0.05, showlegend: true,
      legend: { orientation: "h", x: 0, y: 1.12 },
      margin: { l: 56, r: 16, t: 36, b: 40 },
      xaxis: { type: "date", tickformat: "%b %d", showgrid: false },
      yaxis: countAxis(Math.max(...series.points.map((p) => p[1]),
                                ...previous.map((p) => p[1] || 0))),
    }),
    PLOT_CONFIG,
  );
}

function renderAgents(handled, sums, counts, q, known) {
  const panel = $("panel-agents");
  panel.dataset.total = handled.total;
  panel.dataset.other = handled.other;
  $("handled-total").textContent = number.format(handled.total);
  $("handled-total").dataset.total = handled.total;
  const n = handled.groups.length;
  const agents = handled.other ? `${n}+ agents` : `${n} agent${n === 1 ? "" : "s"}`;
  $("handled-note").textContent = handled.total ? `by ${agents}` : "";
  // average response per agent: the agent's response_seconds.sum / response_seconds.count
  const perAgent = new Map();
  if (sums && counts) {
    const sumOf = new Map(sums.groups.map((g) => [g.value, g.total]));
    for (const g of counts.groups) {
      if (g.total && sumOf.has(g.value)) perAgent.set(g.value, sumOf.get(g.value) / g.total);
    }
  }
  const rows = handled.groups.map((g) => ({
    value: groupName(g.value, "(no agent)"),
    total: g.total,
    seconds: perAgent.get(g.value),
    cells: [
      groupName(g.value, "(no agent)"),
      number.format(g.total),
      perAgent.has(g.value) ? duration(perAgent.get(g.value)) : "–",
    ],
  }));
  if (handled.other) {
    rows.push({ value: "(other)", total: handled.other,
                cells: ["other agents", number.format(handled.other), ""] });
  }
  fillTable($("table-agents"), rows);
  setTotals(panel, `${number.format(handled.total)} handled`);
  setStatus(panel, emptyNote("messages.handled", handled.total, known, q));
  if (!rows.length) {
    return noChart(panel, "chart-agents");
  }
  // one category per agent, named by its whole (escaped) value; the axis labels it with
  // a shortened one, so a long name does not squeeze the bars, and the hover shows it
  // whole from customdata (%{y} would be the axis's shortened label)
  const agentNames = rows.map((r) => plotText(r.value));
  return Plotly.react(
    "chart-agents",
    [{
      type: "bar", orientation: "h", y: agentNames, x: rows.map((r) => r.total),
      customdata: agentNames,
      marker: { color: ACCENT }, text: rows.map((r) => number.format(r.total)),
      textposition: "auto", hovertemplate: "%{customdata}: %{x:,} handled<extra></extra>",
    }],
    baseLayout({
      margin: { l: 90, r: 16, t: 8, b: 32 },
      yaxis: {
        autorange: "reversed", automargin: true, type: "category", tickmode: "array",
        tickvals: agentNames, ticktext: rows.map((r) => plotText(shorten(r.value, AXIS_CHARS))),
      },
      xaxis: countAxis(Math.max(...rows.map((r) => r.total))),
    }),
    PLOT_CONFIG,
  );
}

/* Every headline figure back to "–" before a load's answers are drawn, so a figure
 * whose call failed is never left showing the previous query's number. */
function resetKpis() {
  for (const id of ["received-total", "handled-total", "avg-response", "fast-share"]) {
    const value = $(id);
    value.textContent = "–";
    for (const key of Object.keys(value.dataset)) delete value.dataset[key];
  }
  for (const id of ["received-change", "handled-note", "avg-response-note", "fast-note"]) {
    $(id).textContent = "";
    $(id).className = $(id).className.split(" ")[0];
  }
}

function renderAverage(sums, counts) {
  const value = $("avg-response");
  const note = $("avg-response-note");
  value.dataset.sum = sums.total;
  value.dataset.count = counts.total;
  if (!counts.total) {
    value.textContent = "–";
    value.dataset.seconds = "";
    note.textContent = "no replies in this range";
    return;
  }
  const seconds = sums.total / counts.total;
  value.dataset.seconds = seconds;
  value.textContent = duration(seconds);
  note.textContent = `over ${number.format(counts.total)} replies`;
}

function renderResponse(buckets, q, known) {
  const panel = $("panel-response");
  panel.dataset.total = buckets.total;
  const totals = new Map(buckets.groups.map((g) => [g.value, g.total]));
  const order = [...BUCKETS];
  // buckets of a custom rules file: after the built-in ones, largest first
  for (const g of buckets.groups) {
    if (!order.some(([key]) => key === g.value)) {
      const label = groupName(g.value, "(no bucket)");
      order.push([g.value, label, shorten(label, AXIS_CHARS), "#64748b"]);
    }
  }
  const rows = order.map(([key, label, short, color]) => ({
    value: key, label, short, color, total: totals.get(key) || 0,
  }));
  const fast = (totals.get("lt_30m") || 0) + (totals.get("lt_1h") || 0);
  const fastShare = $("fast-share");
  fastShare.textContent = share(fast, buckets.total);
  fastShare.dataset.fast = fast;
  fastShare.dataset.total = buckets.total;
  $("fast-note").textContent = buckets.total
    ? `${number.format(fast)} of ${number.format(buckets.total)} replies` : "";
  if (!buckets.total) {
    fillTable($("table-response"), []);
    setTotals(panel, "0 replies");
    setStatus(panel, emptyNote("response_time", 0, known, q));
    return noChart(panel, "chart-response");
  }
  fillTable($("table-response"), rows.map((r) => ({
    ...r, cells: [r.label, number.format(r.total), share(r.total, buckets.total)],
  })));
  setTotals(panel, `${number.format(buckets.total)} replies`);
  setStatus(panel, emptyNote("response_time", buckets.total, known, q));
  // one category per bucket, named by its label; the axis shows the short label
  const bucketNames = rows.map((r) => plotText(r.label));
  return Plotly.react(
    "chart-response",
    [{
      type: "bar", x: bucketNames, y: rows.map((r) => r.total),
      customdata: bucketNames,
      marker: { color: rows.map((r) => r.color) },
      text: rows.map((r) => (r.total ? share(r.total, buckets.total) : "")),
      textposition: "auto", hovertemplate: "%{customdata}: %{y:,} replies<extra></extra>",
    }],
    baseLayout({
      xaxis: {
        type: "category", showgrid: false, tickmode: "array", tickvals: bucketNames,
        ticktext: rows.map((r) => plotText(r.short)),
      },
      yaxis: countAxis(Math.max(...rows.map((r) => r.total))),
    }),
    PLOT_CONFIG,
  );
}

function renderSentiment(sentiment, q, known) {
  const panel = $("panel-sentiment");
  panel.dataset.total = sentiment.total;
  const rank = (value) => {
    const known = SENTIMENT_ORDER.indexOf(value);
    return known < 0 ? SENTIMENT_ORDER.length : known;
  };
  // a stable sort: the API's largest-first order is kept among the other values
  const groups = [...sentiment.groups].sort((a, b) => rank(a.value) - rank(b.value));
  const rows = groups.map((g, i) => ({
    value: groupName(g.value, "(none)"),
    total: g.total,
    color: SENTIMENT_COLORS[g.value] || PALETTE[i % PALETTE.length],
  }));
  if (sentiment.other) {
    rows.push({ value: "(other)", total: sentiment.other, color: "#cbd5e1" });
  }
  fillTable($("table-sentiment"), rows.map((r) => ({
    ...r, cells: [r.value, number.format(r.total), share(r.total, sentiment.total)],
  })));
  setTotals(panel, `${number.format(sentiment.total)} messages`);
  setStatus(panel, emptyNote("messages.received", sentiment.total, known, q));
  if (!rows.length) {
    return noChart(panel, "chart-sentiment");
  }
  return Plotly.react(
    "chart-sentiment",
    [{
      // the legend shows the labels (shortened, kept distinct); the hover the whole value
      type: "pie", hole: 0.55, sort: false,
      labels: distinctShort(rows.map((r) => r.value), LEGEND_CHARS).map(plotText),
      customdata: rows.map((r) => plotText(r.value)),
      values: rows.map((r) => r.total), marker: { colors: rows.map((r) => r.color) },
      textinfo: "percent",
      hovertemplate: "%{customdata}: %{value:,} (%{percent})<extra></extra>",
    }],
    baseLayout({ showlegend: true, margin: { l: 8, r: 8, t: 8, b: 8 } }),
    PLOT_CONFIG,
  );
}

/* ---------------------------------------------------------------- loading */

function showErrors(errors) {
  const box = $("error");
  // the same refusal (a missing token, a bad tenant) comes back from every call: once each
  const lines = [...new Set(errors.map((e) => (e.describe ? e.describe() : String(e))))];
  box.hidden = !lines.length;
  box.replaceChildren(...lines.map((line) => Object.assign(document.createElement("div"),
                                                           { textContent: line })));
  if (errors.length) {
    box.dataset.status = errors[0].status ?? "";
    box.dataset.code = errors[0].code ?? "";
  }
}

function query() {
  return {
    tenant: $("tenant").value.trim(),
    from: $("from").value,
    to: $("to").value,
    tz: currentZone(),
  };
}

async function load() {
  const mine = ++generation;
  const q = query();
  document.body.dataset.state = "loading";
  window.history.replaceState(null, "", `?${new URLSearchParams(q)}`);
  $("subtitle").textContent = `Tenant ${q.tenant} · ${q.from} to ${q.to} · ${q.tz}`;
  const window_ = { tenant: q.tenant, from: q.from, to: q.to, tz: q.tz };
  const breakdown = (metric, by, limit) => api("/v1/breakdown", { ...window_, metric, by, limit });
  const calls = {
    catalog: api("/v1/catalog", { tenant: q.tenant }),
    received: api("/v1/series", {
      ...window_, metric: "messages.received", granularity: "day", compare: "previous_period",
    }),
    handled: breakdown("messages.handled", "agent", AGENT_LIMIT),
    sums: breakdown("response_seconds.sum", "agent", ALL),
    counts: breakdown("response_seconds.count", "agent", ALL),
    buckets: breakdown("response_time", "bucket", ALL),
    sentiment: breakdown("messages.received", "sentiment", ALL),
  };
  const names = Object.keys(calls);
  const settled = await Promise.allSettled(Object.values(calls));
  if (mine !== generation) return; // a newer load is on its way
  const data = {};
  const failed = {};
  names.forEach((name, i) => {
    if (settled[i].status === "fulfilled") data[name] = settled[i].value;
    else failed[name] = settled[i].reason;
  });
  const errors = Object.values(failed);
  const known = data.catalog ? new Set(data.catalog.metrics.map((m) => m.metric)) : null;
  resetKpis();

  const drawn = [];
  const draw = (panel, needs, render) => {
    const missing = needs.find((name) => failed[name]);
    if (missing) {
      failPanel($(panel), failed[missing]);
      return;
    }
    $(panel).classList.remove("failed", "empty");
    try {
      drawn.push(Promise.resolve(render()).catch((e) => failPanel($(panel), e)));
    } catch (e) {
      errors.push(e);
      failPanel($(panel), e);
    }
  };
  if (!window.Plotly) {
    errors.push(new ApiError(0, "no_chart_library", "/assets/plotly.min.js did not load"));
  } else {
    draw("panel-received", ["received"], () => renderReceived(data.received, q, known));
    draw("panel-agents", ["handled"], () =>
      renderAgents(data.handled, data.sums, data.counts, q, known));
    draw("panel-response", ["buckets"], () => renderResponse(data.buckets, q, known));
    draw("panel-sentiment", ["sentiment"], () => renderSentiment(data.sentiment, q, known));
  }
  if (data.sums && data.counts) renderAverage(data.sums, data.counts);
  await Promise.all(drawn);
  if (mine !== generation) return;
  showErrors(errors);
  Object.assign(document.body.dataset, window_);
  document.body.dataset.state = errors.length ? "error" : "ready";
}

/* ---------------------------------------------------------------- start */

function start() {
  fillZones();
  const params = new URLSearchParams(window.location.search);
  $("tenant").value = params.get("tenant") || $("tenant").value || "demo";
  setZone(params.get("tz") || browserZone());
  setRange(30);
  if (params.get("from")) $("from").value = params.get("from");
  if (params.get("to")) $("to").value = params.get("to");
  $("token").value = loadToken();

  $("controls").addEventListener("submit", (event) => {
    event.preventDefault();
    saveToken();
    load();
  });
  $("token").addEventListener("change", saveToken);
  $("tz-select").addEventListener("change", () => {
    const other = $("tz-select").value === OTHER_ZONE;
    showOtherZone(other);
    if (other) $("tz-other").focus();
    else load();
  });
  for (const id of ["from", "to"]) $(id).addEventListener("change", load);
  document.querySelectorAll(".presets button").forEach((button) => {
    button.addEventListener("click", () => {
      setRange(Number(button.dataset.days));
      load();
    });
  });
  load();
}

document.addEventListener("DOMContentLoaded", start);
