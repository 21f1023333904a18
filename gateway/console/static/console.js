// turnout console: plain JS, no build step. It reads the gateway's /admin/console/ API with
// the admin key (kept in this tab's sessionStorage) and refreshes every second; the
// playground talks to /v1/chat/completions as any client would. Everything the API returns is
// written with textContent, never parsed as HTML.
"use strict";

const ADMIN_KEY = "turnout.adminKey";
const API_KEY = "turnout.apiKey";
// ?refresh=MS: the poll period (default 1 s), between 250 ms and 10 s.
const REFRESH_MS = Math.min(10000, Math.max(250, Number(new URLSearchParams(location.search).get("refresh")) || 1000));

const $ = (selector) => document.querySelector(selector);
let access = null; // "admin" | "read_only" once logged in
let currentTab = "backends";
let pollTimer = null;
let keysTick = 0;
let reportName = null;

// -- small helpers ------------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else if (name.startsWith("data-")) node.setAttribute(name, value);
    else node[name] = value;
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function fillTable(table, rows) {
  const body = table.querySelector("tbody");
  body.replaceChildren(...rows);
}

const pct = (x) => (x === null || x === undefined ? "-" : `${(x * 100).toFixed(1)}%`);
const num = (x, digits = 0) => (x === null || x === undefined ? "-" : Number(x).toFixed(digits));
const mib = (bytes) => `${Math.round(bytes / 1048576)} MiB`;
const when = (epoch) => (epoch ? new Date(epoch * 1000).toLocaleString() : "-");

function meter(fraction, label) {
  const bar = el("span", { class: "meter" }, el("span"));
  bar.firstChild.style.width = `${Math.round(Math.max(0, Math.min(1, fraction)) * 100)}%`;
  return el("span", { class: "metered" }, bar, label);
}

// fetch with the admin key; an error answer becomes an Error carrying the gateway's message.
async function api(path, options = {}) {
  const key = sessionStorage.getItem(ADMIN_KEY);
  const headers = { ...(options.headers || {}) };
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      message = (await response.json()).error.message || message;
    } catch (_) { /* not JSON: keep the status line */ }
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return response;
}

// -- session ------------------------------------------------------------------------------------

async function checkSession() {
  const session = await (await api("/admin/console/session")).json();
  access = session.access;
  $("#access").textContent = access === "admin" ? "admin" : "read-only (no admin key configured)";
  document.body.classList.toggle("read-only", access !== "admin");
}

function showLogin(message) {
  stopPolling();
  access = null;
  $("#login").hidden = false;
  $("#tabs").hidden = $("#session").hidden = true;
  document.querySelectorAll(".view").forEach((v) => (v.hidden = true));
  $("#login-error").textContent = message || "";
  $("#admin-key").focus();
}

function showConsole() {
  $("#login").hidden = true;
  $("#tabs").hidden = $("#session").hidden = false;
  showTab(currentTab);
  startPolling();
}

async function login(event) {
  event.preventDefault();
  sessionStorage.setItem(ADMIN_KEY, $("#admin-key").value.trim());
  try {
    await checkSession();
  } catch (error) {
    sessionStorage.removeItem(ADMIN_KEY); // a refused key is not kept
    showLogin(error.message);
    return;
  }
  $("#admin-key").value = "";
  showConsole();
}

function logout() {
  sessionStorage.removeItem(ADMIN_KEY);
  showLogin("");
}

// -- tabs and polling ---------------------------------------------------------------------------

function showTab(name) {
  currentTab = name;
  document.querySelectorAll("#tabs button").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
  document.querySelectorAll(".view").forEach((v) => (v.hidden = v.id !== `view-${name}`));
  if (name === "keys") refreshKeys();
  if (name === "playground" && !$("#model").options.length) loadModels();
}

// Each start begins a new run; a poll of an older run (in flight at a logout) stops there.
let pollRun = 0;

function startPolling() {
  stopPolling();
  poll(pollRun);
}

function stopPolling() {
  pollRun += 1;
  clearTimeout(pollTimer);
}

async function poll(run) {
  try {
    const data = await (await api("/admin/console/overview")).json();
    if (run !== pollRun) return;
    renderBackends(data.backends);
    renderPolicy(data.policy);
    renderRoutes(data.routes);
    renderExperiments(data.experiments);
    // Keys cost a store round trip each: every other poll, and only while their tab is open.
    if (currentTab === "keys" && keysTick++ % 2 === 1) await refreshKeys();
    $("#status-line").textContent = `updated ${new Date().toLocaleTimeString()} · policy ${data.policy.version}`;
    $("#status-line").classList.remove("stale");
  } catch (error) {
    if (run !== pollRun) return;
    if (error.status === 401 || error.status === 403) {
      sessionStorage.removeItem(ADMIN_KEY);
      showLogin(error.message);
      return;
    }
    $("#status-line").textContent = `cannot reach the gateway: ${error.message}`;
    $("#status-line").classList.add("stale");
  }
  if (run === pollRun) pollTimer = setTimeout(() => poll(run), REFRESH_MS);
}

// -- backends -----------------------------------------------------------------------------------

function renderBackends(backends) {
  fillTable($("#backends-table"), backends.map((b) => {
    const w = b.worker;
    const kv = b.block_size || b.kv_usage ? meter(b.kv_usage, pct(b.kv_usage)) : el("span", { class: "muted" }, "no paged cache");
    return el("tr", { "data-backend": b.name, "data-status": b.status },
      el("td", {}, el("strong", {}, b.name), el("div", { class: "muted" }, `${b.kind} · ${b.model}`)),
      el("td", {}, el("span", { class: `badge ${b.status}` }, b.status), b.fresh ? null : el("div", { class: "muted" }, "no fresh report")),
      el("td", {}, kv),
      el("td", {}, `${b.running} / ${b.max_running}`),
      el("td", {}, b.waiting),
      el("td", {}, pct(b.prefix_cache_hit_rate)),
      el("td", {}, b.in_flight),
      el("td", {}, b.circuit),
      el("td", { class: "worker" }, w ? `${w.state}${w.pid ? ` · pid ${w.pid} · ${mib(w.memory_bytes)}` : ""}` : "remote"),
      el("td", { class: "restarts" }, w ? w.restarts : "-"),
      el("td", {}, w ? w.last_exit || w.load_error || "-" : "-"));
  }));
}

// -- policy and routes --------------------------------------------------------------------------

function renderPolicy(policy) {
  const last = policy.last_reload;
  const lastText = last ? `${when(last.at)} (${last.reason}): ${last.applied ? "applied" : "rejected"}` : "none since start";
  const items = [
    ["version", policy.version],
    ["policies applied", policy.generation],
    ["serving since", when(policy.applied_at)],
    ["file", policy.path || "the embedded default (no reloads)"],
    ["reloads on file change", policy.watch_config ? "yes" : "no"],
    ["last reload", lastText],
    ["API keys", policy.auth === "none" ? "none (auth: none)" : `${policy.auth} store`],
    ["sample log", policy.sample_log],
  ];
  $("#policy").replaceChildren(...items.flatMap(([k, v]) => [el("dt", {}, k), el("dd", { "data-field": k }, v)]));
  const box = $("#reload-error");
  box.hidden = !last || last.applied;
  box.querySelector("pre").textContent = last && !last.applied ? last.message : "";
}

function renderRoutes(routes) {
  fillTable($("#routes-table"), routes.map((r) => {
    const params = Object.keys(r.strategy_params).length ? ` ${JSON.stringify(r.strategy_params)}` : "";
    const admission = r.admission ? `${r.admission.in_use} in use · ${r.admission.queued} queued${r.admission.limit ? ` · limit ${r.admission.limit}` : ""}` : "-";
    return el("tr", { "data-route": r.model },
      el("td", {}, el("strong", {}, r.model), r.explicit ? null : el("div", { class: "muted" }, "a backend's own model")),
      el("td", {}, r.backends.join(", ")),
      el("td", {}, r.strategy + params),
      el("td", {}, r.fallbacks.join(" → ") || "-"),
      el("td", {}, r.max_retries),
      el("td", {}, admission),
      el("td", {}, r.experiment || "-"));
  }));
}

// -- experiments --------------------------------------------------------------------------------

function renderExperiments(experiments) {
  $("#no-experiments").hidden = experiments.length > 0;
  $("#experiments").replaceChildren(...experiments.map((x) => {
    const rows = x.variants.map((v) => el("tr", { "data-variant": v.name },
      el("td", {}, v.name, v.shadow ? el("span", { class: "muted" }, " (shadow)") : null),
      el("td", {}, v.backends.join(", ")),
      el("td", {}, v.shadow ? "-" : v.weight),
      el("td", { class: "samples" }, v.samples),
      el("td", {}, v.errors)));
    const button = el("button", { type: "button", onclick: () => loadReport(x.name) }, "Report");
    return el("div", { class: "card", "data-experiment": x.name },
      el("h3", {}, x.name, " ", el("span", { class: "muted" }, `splits ${x.model} · sticky by ${x.sticky_by}${x.enabled ? "" : " · disabled"}`), " ", button),
      el("table", {},
        el("thead", {}, el("tr", {}, ...["variant", "backends", "weight", "samples", "errors"].map((h) => el("th", {}, h)))),
        el("tbody", {}, ...rows)));
  }));
}

async function loadReport(name) {
  reportName = name;
  $("#report").hidden = false;
  $("#report-name").textContent = name;
  $("#report-error").textContent = "";
  const base = `/admin/console/experiments/${encodeURIComponent(name)}`;
  let report;
  try {
    report = await (await api(`${base}/report`)).json();
  } catch (error) {
    $("#report-body").replaceChildren();
    $("#report-error").textContent = error.message;
    return;
  }
  const metrics = el("div", { class: "metrics" }, ...report.metrics.map((m) => metricCard(report, m)));
  const parts = [reportSummary(report), legend(report), metrics];
  for (const c of report.comparisons) parts.push(comparisonTable(c));
  parts.push(el("pre", { class: "decision" }, report.decision.join("\n")));
  const plot = el("div", { class: "plot" });
  parts.push(plot);
  $("#report-body").replaceChildren(...parts);
  if (report.plot) {
    // An <img> cannot send the admin key: fetch the PNG and show it from a blob URL.
    try {
      const blob = await (await api(`${base}/plot.png`)).blob();
      plot.replaceChildren(el("img", { src: URL.createObjectURL(blob), alt: `distributions of ${name}` }));
    } catch (error) {
      plot.replaceChildren(el("p", { class: "error" }, error.message));
    }
  } else {
    plot.replaceChildren(el("p", { class: "note" }, "The distributions' PNG needs matplotlib: pip install 'turnout[plots]'."));
  }
}

function estimate(e) {
  return e.value === null ? "-" : `${e.value.toFixed(4)} [${e.low.toFixed(4)}, ${e.high.toFixed(4)}]`;
}

function reportSummary(report) {
  const head = ["variant", "n", "ok", "errors", "error rate", "4xx", "tok/s"];
  const rows = report.variants.map((v) => el("tr", { "data-variant": v.name },
    ...[v.name, v.n, v.ok, v.errors, pct(v.error_rate), v.client_errors, num(v.tokens_per_s, 1)].map((c) => el("td", {}, c))));
  return el("div", {},
    el("table", { class: "report-table" }, el("thead", {}, el("tr", {}, ...head.map((h) => el("th", {}, h)))), el("tbody", {}, ...rows)),
    el("p", { class: "note" }, `${report.samples} samples; percentiles of successful requests in seconds, ` +
      `[${Math.round(report.confidence * 100)}% bootstrap CI, ${report.bootstrap} resamples]; baseline ${report.baseline}`));
}

// One metric: a bar chart of each variant's percentiles, and the numbers with their intervals.
function metricCard(report, metric) {
  const rows = report.variants.map((v) => {
    const m = v.metrics[metric.name];
    return el("tr", {}, el("td", {}, v.name), el("td", {}, m.n), ...report.quantiles.map((q) => el("td", {}, estimate(m[`p${q}`]))));
  });
  const hasData = report.variants.some((v) => v.metrics[metric.name].n > 0);
  return el("div", { class: "card metric" },
    el("h3", {}, metric.title),
    hasData ? barChart(report, metric) : el("p", { class: "note" }, "no data (answers not streamed, and no backend timings)"),
    el("table", {}, el("thead", {}, el("tr", {}, ...["variant", "n", ...report.quantiles.map((q) => `p${q} [CI]`)].map((h) => el("th", {}, h)))),
      el("tbody", {}, ...rows)));
}

function comparisonTable(c) {
  const rows = Object.entries(c.median_diff).map(([metric, d]) => el("tr", {},
    el("td", {}, `median ${metric}`),
    el("td", {}, d.value === null ? "no data" : `${d.value >= 0 ? "+" : ""}${d.value.toFixed(4)} s`),
    el("td", {}, d.low === null ? "-" : `[${d.low.toFixed(4)}, ${d.high.toFixed(4)}]`),
    el("td", { class: d.significant ? "significant" : "" }, d.significant ? "significant" : "not significant")));
  rows.push(el("tr", {},
    el("td", {}, "error rate"),
    el("td", {}, c.error_rate_diff === null ? "no data" : `${(c.error_rate_diff * 100).toFixed(2)} pp`),
    el("td", {}, c.p_value === null ? "-" : `p = ${c.p_value.toFixed(4)}`),
    el("td", { class: c.error_rate_significant ? "significant" : "" }, c.error_rate_significant ? "significant" : "not significant")));
  return el("table", { class: "comparison" },
    el("caption", {}, `${c.variant} against ${c.baseline}`), el("tbody", {}, ...rows));
}

// One SVG bar chart per metric: each variant's p50/p95/p99 with its confidence interval.
const SVG = "http://www.w3.org/2000/svg";
const PALETTE = ["#2f6fb0", "#d9822b", "#3a9a5b", "#9b59b6", "#c0392b"];

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function barChart(report, metric) {
  const width = 360, height = 160, left = 48, bottom = 20, top = 8;
  const plotH = height - top - bottom;
  const highs = report.variants.flatMap((v) => report.quantiles.map((q) => v.metrics[metric.name][`p${q}`].high || 0));
  const max = Math.max(...highs) || 1;
  const y = (value) => top + plotH - (value / max) * plotH;
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", "aria-label": metric.title, class: "chart" });
  chart.append(svg("line", { x1: left, y1: y(0), x2: width, y2: y(0), class: "axis-line" }));
  chart.append(svg("line", { x1: left, y1: y(max), x2: width, y2: y(max), class: "grid" }));
  chart.append(svg("text", { x: left - 4, y: y(max) + 4, class: "axis", "text-anchor": "end" }, `${max.toPrecision(2)} s`));
  chart.append(svg("text", { x: left - 4, y: y(0), class: "axis", "text-anchor": "end" }, "0"));
  const groupW = (width - left) / report.quantiles.length;
  const barW = (groupW - 16) / report.variants.length;
  report.quantiles.forEach((q, qi) => {
    const x0 = left + qi * groupW + 8;
    chart.append(svg("text", { x: x0 + (groupW - 16) / 2, y: height - 5, class: "axis", "text-anchor": "middle" }, `p${q}`));
    report.variants.forEach((v, vi) => {
      const e = v.metrics[metric.name][`p${q}`];
      if (e.value === null) return;
      const x = x0 + vi * barW;
      const bar = svg("rect", { x, y: y(e.value), width: barW - 2, height: y(0) - y(e.value), fill: PALETTE[vi % PALETTE.length] });
      bar.append(svg("title", {}, `${v.name} p${q}: ${estimate(e)} s`));
      chart.append(bar);
      const cx = x + (barW - 2) / 2; // the whisker: the confidence interval
      chart.append(svg("line", { x1: cx, x2: cx, y1: y(e.high), y2: y(e.low), class: "whisker" }));
    });
  });
  return chart;
}

function legend(report) {
  return el("div", { class: "legend" }, ...report.variants.map((v, i) => {
    const swatch = el("span", { class: "swatch" });
    swatch.style.background = PALETTE[i % PALETTE.length];
    return el("span", {}, swatch, v.name);
  }), el("span", { class: "muted" }, "bars: percentiles; whiskers: their confidence intervals"));
}

// -- keys ---------------------------------------------------------------------------------------

function usageCell(usage, kind) {
  if (usage === null || usage === undefined) return el("td", { class: "muted" }, "-");
  if (typeof usage === "string") return el("td", { class: "error" }, usage);
  const bucket = usage.find((b) => b.kind === kind);
  if (!bucket) return el("td", { class: "muted" }, "no limit");
  const label = `${bucket.remaining} / ${bucket.capacity} (${bucket.limit}/min)`;
  return el("td", { class: `usage-${kind}` }, meter(bucket.remaining / bucket.capacity, label));
}

async function refreshKeys() {
  let data;
  try {
    data = await (await api("/admin/console/keys")).json();
  } catch (error) {
    $("#keys-note").textContent = error.message;
    return;
  }
  if (data.store === null) {
    $("#keys-note").textContent = "This gateway runs with auth: none: no API keys. Below, the anonymous caller's limits, if any.";
    fillTable($("#keys-table"), []);
    fillTable($("#tenants-table"), [el("tr", {}, el("td", {}, "(anonymous)"), el("td", {}, "-"),
      usageCell(data.anonymous, "requests"), usageCell(data.anonymous, "tokens"))]);
    return;
  }
  $("#keys-note").textContent = `Keys in the ${data.store} store. Usage is measured for the first ${data.usage_keys_max} active keys.`;
  fillTable($("#keys-table"), data.keys.map((k) => {
    const armed = armedRevoke === k.id;
    const revoke = el("button", { type: "button", class: `revoke admin-only${armed ? " armed" : ""}`, disabled: k.status !== "active" },
      armed ? `Confirm revoking ${k.name}` : "Revoke");
    revoke.addEventListener("click", () => confirmRevoke(k));
    return el("tr", { "data-key": k.id, "data-status": k.status },
      el("td", {}, el("strong", {}, k.name), el("div", { class: "muted" }, `${k.id} · ${k.hint}`)),
      el("td", {}, k.tenant),
      el("td", {}, k.models.length ? k.models.join(", ") : "all"),
      el("td", {}, k.priority),
      el("td", {}, when(k.expires)),
      el("td", {}, el("span", { class: `badge ${k.status}` }, k.status)),
      usageCell(k.usage, "requests"),
      usageCell(k.usage, "tokens"),
      el("td", {}, revoke));
  }));
  fillTable($("#tenants-table"), data.tenants.map((t) => el("tr", { "data-tenant": t.tenant },
    el("td", {}, t.tenant), el("td", {}, t.keys), usageCell(t.usage, "requests"), usageCell(t.usage, "tokens"))));
}

// Two clicks: "Revoke", then "Confirm" within 4 s (no modal dialog). The armed key survives
// the table's refreshes.
let armedRevoke = null;

function confirmRevoke(key) {
  if (armedRevoke === key.id) {
    armedRevoke = null;
    revokeKey(key.id);
    return;
  }
  armedRevoke = key.id;
  refreshKeys();
  setTimeout(() => {
    if (armedRevoke === key.id) {
      armedRevoke = null;
      refreshKeys();
    }
  }, 4000);
}

async function revokeKey(id) {
  try {
    await api(`/admin/console/keys/${encodeURIComponent(id)}/revoke`, { method: "POST" });
    $("#key-error").textContent = "";
  } catch (error) {
    $("#key-error").textContent = error.message;
  }
  await refreshKeys();
}

async function createKey(event) {
  event.preventDefault();
  const form = new FormData($("#key-form"));
  const text = (name) => String(form.get(name) || "").trim();
  const body = { name: text("name"), priority: text("priority") };
  if (text("tenant")) body.tenant = text("tenant");
  if (text("models")) body.models = text("models").split(",").map((m) => m.trim()).filter(Boolean);
  if (text("rpm")) body.rpm = Number(text("rpm"));
  if (text("tpm")) body.tpm = Number(text("tpm"));
  if (text("expires")) body.expires = text("expires");
  try {
    const created = await (await api("/admin/console/keys", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    })).json();
    // The secret lives only in this element, until "Done" or the page is left.
    $("#new-key-name").textContent = `${created.key.name} (${created.key.id})`;
    $("#new-secret").textContent = created.secret;
    $("#new-key").hidden = false;
    $("#key-error").textContent = "";
    $("#key-form").reset();
  } catch (error) {
    $("#key-error").textContent = error.message;
  }
  await refreshKeys();
}

function forgetSecret() {
  $("#new-secret").textContent = "";
  $("#new-key").hidden = true;
}

// -- playground ---------------------------------------------------------------------------------

let messages = [];
let controller = null;

function clientHeaders() {
  const key = $("#api-key").value.trim();
  sessionStorage.setItem(API_KEY, key);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function loadModels() {
  $("#chat-error").textContent = "";
  try {
    const response = await fetch("/v1/models", { headers: clientHeaders() });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
    const chosen = $("#model").value;
    $("#model").replaceChildren(...body.data.map((m) => el("option", { value: m.id, selected: m.id === chosen }, m.id)));
  } catch (error) {
    $("#chat-error").textContent = `models: ${error.message} (an API key goes above; then Reload models)`;
  }
}

function addTurn(role, text) {
  const body = el("div", { class: "text" }, text);
  $("#transcript").append(el("div", { class: `turn ${role}` }, el("span", { class: "role" }, role), body));
  return body;
}

// Server-sent events, parsed as they arrive: `data: {json}` lines, then `data: [DONE]`.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function sendChat(event) {
  event.preventDefault();
  const prompt = $("#prompt").value.trim();
  if (!prompt || controller) return;
  $("#chat-error").textContent = "";
  messages.push({ role: "user", content: prompt });
  addTurn("user", prompt);
  $("#prompt").value = "";
  const output = addTurn("assistant", "");
  for (const id of ["#ttft", "#tps", "#tokens"]) $(id).textContent = "…";
  controller = new AbortController();
  $("#send").disabled = true;
  $("#stop").disabled = false;
  const started = performance.now();
  let first = null, last = null, deltas = 0, usage = null, text = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      signal: controller.signal,
      headers: { "Content-Type": "application/json", ...clientHeaders() },
      body: JSON.stringify({
        model: $("#model").value, messages, stream: true, stream_options: { include_usage: true },
        max_tokens: Number($("#max-tokens").value) || 128,
      }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : `${response.status} ${response.statusText}`);
    }
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const piece = chunk.choices && chunk.choices[0] && chunk.choices[0].delta && chunk.choices[0].delta.content;
      if (!piece) continue;
      last = performance.now();
      if (first === null) {
        first = last;
        $("#ttft").textContent = (first - started).toFixed(0);
      }
      deltas += 1;
      text += piece;
      output.textContent = text;
    }
    messages.push({ role: "assistant", content: text });
  } catch (error) {
    messages.pop(); // the turn did not complete: it is not part of the conversation
    $("#chat-error").textContent = error.name === "AbortError" ? "stopped" : error.message;
  } finally {
    controller = null;
    $("#send").disabled = false;
    $("#stop").disabled = true;
  }
  const tokens = usage ? usage.completion_tokens : deltas;
  $("#tokens").textContent = tokens;
  if (first === null) $("#ttft").textContent = "-";
  // Decode speed: tokens after the first over the time after the first.
  $("#tps").textContent = first !== null && last > first && tokens > 1 ? ((tokens - 1) / ((last - first) / 1000)).toFixed(1) : "-";
}

function clearChat() {
  messages = [];
  $("#transcript").replaceChildren();
  $("#chat-error").textContent = "";
}

// -- start --------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", async () => {
  $("#login-form").addEventListener("submit", login);
  $("#logout").addEventListener("click", logout);
  document.querySelectorAll("#tabs button").forEach((b) => b.addEventListener("click", () => showTab(b.dataset.tab)));
  $("#report-refresh").addEventListener("click", () => reportName && loadReport(reportName));
  $("#key-form").addEventListener("submit", createKey);
  $("#new-key-done").addEventListener("click", forgetSecret);
  $("#chat-form").addEventListener("submit", sendChat);
  $("#stop").addEventListener("click", () => controller && controller.abort());
  $("#clear").addEventListener("click", clearChat);
  $("#models-reload").addEventListener("click", loadModels);
  $("#api-key").value = sessionStorage.getItem(API_KEY) || "";
  try {
    await checkSession(); // with the key of this tab, or none: read-only on loopback
    showConsole();
  } catch (error) {
    // No stored key: just ask for one. A stored key the gateway refused: say so.
    const stored = sessionStorage.getItem(ADMIN_KEY);
    sessionStorage.removeItem(ADMIN_KEY);
    showLogin(stored || error.status === 403 ? error.message : "");
  }
});
