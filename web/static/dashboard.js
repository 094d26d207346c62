// streametl's live dashboard: polls the worker's JSON API every POLL_MS and draws it.
// No library: counters are turned into rates by differencing two polls.
"use strict";

const POLL_MS = 1500;
const HISTORY = 80; // points per sparkline
// Rates are taken over the last RATE_SAMPLES polls (~6 s): cluster counters move in
// steps of a status interval (2 s), which a difference of two polls would alias.
const RATE_SAMPLES = 5;
const state = { samples: {}, history: { in: [], out: [] } };

function token() { return sessionStorage.getItem("streametl-token") || ""; }

async function getJSON(path) {
  const headers = token() ? { Authorization: "Bearer " + token() } : {};
  const response = await fetch(path, { headers, cache: "no-store" });
  if (response.status === 401) {
    document.getElementById("token-form").hidden = false;
    throw new Error("unauthorized");
  }
  if (response.status === 404) return null;
  return { status: response.status, body: await response.json() };
}

function text(id, value) { document.getElementById(id).textContent = value; }
function fmt(n) { return n === null || n === undefined || Number.isNaN(n) ? "–" : Math.round(n).toLocaleString("en-US"); }
// The rate of counter `name` from its samples over the last polls (null until two).
function rate(name, now, value) {
  const samples = (state.samples[name] = state.samples[name] || []);
  samples.push([now, value]);
  if (samples.length > RATE_SAMPLES) samples.shift();
  const [t0, v0] = samples[0];
  return samples.length < 2 || now <= t0 ? null : Math.max(0, (value - v0) / (now - t0));
}

function cell(value, numeric) {
  const td = document.createElement("td");
  td.textContent = value;
  if (numeric) td.className = "num";
  return td;
}

function fillTable(id, rows) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren(...rows.map(cells => {
    const tr = document.createElement("tr");
    cells.forEach(([value, numeric]) => tr.appendChild(cell(value, numeric)));
    return tr;
  }));
}

function spark(id, values) {
  const svg = document.getElementById(id);
  const max = Math.max(1, ...values);
  const step = 120 / Math.max(1, HISTORY - 1);
  const points = values.map((v, i) => `${(i * step).toFixed(1)},${(29 - (v / max) * 28).toFixed(1)}`).join(" ");
  svg.innerHTML = `<polyline points="${points}"></polyline>`;
}

function push(series, value) {
  series.push(value === null ? 0 : value);
  if (series.length > HISTORY) series.shift();
}

// "tumbling 5s, grace 1s" from a window spec (durations in ms; a count window counts records).
function describeWindow(spec) {
  if (!spec) return "";
  const kind = spec.kind || spec.type || "";
  const parts = Object.entries(spec).filter(([k]) => k !== "kind" && k !== "type").map(([k, v]) =>
    typeof v === "number" && kind !== "count" ? `${k.replace("_", " ")} ${v / 1000}s` : `${k.replace("_", " ")} ${v}`);
  return [kind, parts.join(", ")].filter(Boolean).join(" ");
}

// "events 0,1 · alerts 2" from [{topic, partition}], without the topics' common prefix.
function groupPartitions(parts) {
  const topics = [...new Set(parts.map(tp => tp.topic))].sort();
  let prefix = topics.length > 1 ? topics[0] : "";
  for (const t of topics) while (prefix && !t.startsWith(prefix)) prefix = prefix.slice(0, -1);
  prefix = prefix.slice(0, prefix.lastIndexOf(".") + 1);
  return topics.map(t => `${t.slice(prefix.length)} ${parts.filter(tp => tp.topic === t)
    .map(tp => tp.partition).sort((a, b) => a - b).join(",")}`).join(" · ");
}

// Cluster-wide counters when the worker has the cluster view (docs/operations.md), else its own.
function pipelineCounters(p) { return p.cluster_counters || p.counters; }
function windowStats(w) { return w.cluster_stats || w.stats || {}; }

async function poll() {
  const [health, pipelines, windows, cluster, alerts] = await Promise.all([
    getJSON("/health"), getJSON("/api/v1/pipelines"), getJSON("/api/v1/windows"),
    getJSON("/api/v1/cluster"), getJSON("/api/v1/alerts?limit=10"),
  ]);
  const now = performance.now() / 1000;

  const badge = document.getElementById("health");
  const ok = health && health.status === 200;
  badge.textContent = ok ? "healthy" : "not ready";
  badge.className = "badge " + (ok ? "ok" : "bad");

  let totalIn = 0, totalOut = 0, rateIn = null, rateOut = null;
  const pipelineRows = ((pipelines && pipelines.body.pipelines) || []).map(p => {
    const c = pipelineCounters(p);
    const rIn = rate("in:" + p.name, now, c.in), rOut = rate("out:" + p.name, now, c.out);
    totalIn += c.in; totalOut += c.out;
    if (rIn !== null) rateIn = (rateIn || 0) + rIn;
    if (rOut !== null) rateOut = (rateOut || 0) + rOut;
    return [[p.name], [p.source + " → " + p.sink], [fmt(rIn), true], [fmt(rOut), true],
            [fmt(c.in), true], [fmt(c.out), true], [fmt(c.dropped), true], [fmt(c.dead_lettered), true]];
  });
  if (pipelines) {
    const scope = pipelines.body.cluster_workers ? `${pipelines.body.cluster_workers.length} workers` : "this worker";
    text("app-id", `${pipelines.body.worker.app_id} · ${scope} · answered by :${pipelines.body.worker.web_port}`);
  }
  fillTable("pipelines", pipelineRows);
  text("total-in-rate", fmt(rateIn));
  text("total-out-rate", fmt(rateOut));
  text("total-in", fmt(totalIn));
  push(state.history.in, rateIn);
  push(state.history.out, rateOut);
  spark("spark-in", state.history.in);
  spark("spark-out", state.history.out);

  let emitted = 0;
  const windowRows = ((windows && windows.body.windows) || []).map(w => {
    const s = windowStats(w);
    emitted += s.emitted || 0;
    const r = rate("window:" + w.name, now, s.records || 0);
    return [[w.name], [describeWindow(w.window)], [fmt(r), true],
            [fmt(s.records || 0), true], [fmt(s.emitted || 0), true], [fmt(s.late || 0), true]];
  });
  fillTable("windows", windowRows);
  text("windows-emitted", fmt(emitted));

  const workers = (cluster && cluster.body.workers) || null;
  if (workers) {
    fillTable("workers", workers.map(w => {
      const parts = w.partitions || [];
      return [[w.worker], [`${parts.length}: ${groupPartitions(parts)}`], [fmt(w.lag_records), true],
              [w.updated_at ? new Date(w.updated_at * 1000).toLocaleTimeString() : ""]];
    }));
    text("total-lag", fmt(cluster.body.totals.lag_records));
  } else {
    fillTable("workers", [[["this worker only (no cluster view)"], [""], ["–"], [""]]]);
  }

  const list = (alerts && alerts.body.alerts) || [];
  text("alert-count", fmt(list.length));
  document.getElementById("alerts").replaceChildren(...list.map(a => {
    const li = document.createElement("li");
    const name = document.createElement("span");
    name.className = "pattern";
    name.textContent = a.pattern;
    li.append(name, ` key ${a.key} · ${a.detected_at ? new Date(a.detected_at * 1000).toLocaleTimeString() : ""}`);
    return li;
  }));

  text("updated", "updated " + new Date().toLocaleTimeString());
}

async function loop() {
  try { await poll(); } catch (e) { text("updated", "update failed: " + e.message); }
  setTimeout(loop, POLL_MS);
}

const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
if (fromHash) sessionStorage.setItem("streametl-token", fromHash);
document.getElementById("token-form").addEventListener("submit", event => {
  event.preventDefault();
  sessionStorage.setItem("streametl-token", document.getElementById("token").value);
  document.getElementById("token-form").hidden = true;
});
loop();
