// Shoal's live dashboard: polls dashboard/state every second and draws it (no dependencies).
"use strict";

const POLL_MS = 1000;
const KEY_STORE = "shoal-dashboard-key";
const SVG_NS = "http://www.w3.org/2000/svg";
const W = 600, H = 160, PAD = {left: 48, right: 8, top: 8, bottom: 18};
const COLORS = {p50: "#2f6fde", p90: "#d9822b"};
const $ = (id) => document.getElementById(id);

let apiKey = takeKey();

/** The API key from `?key=` (then dropped from the address bar) or from this tab's storage. */
function takeKey() {
  const url = new URL(location.href);
  const given = url.searchParams.get("key");
  if (given !== null) {
    sessionStorage.setItem(KEY_STORE, given);
    url.searchParams.delete("key");
    history.replaceState(null, "", url);
  }
  return sessionStorage.getItem(KEY_STORE);
}

function setStatus(state, text) {
  const el = $("status");
  el.dataset.state = state;
  el.textContent = text;
}

function fmtNumber(v, digits = 1) {
  return v === null || v === undefined ? "–" : Number(v).toFixed(digits);
}

function fmtSeconds(v) {
  if (v === null || v === undefined) return "–";
  if (v === 0) return "0";
  return v < 1 ? `${(v * 1000).toFixed(v < 0.01 ? 2 : 0)} ms` : `${v.toFixed(2)} s`;
}

function last(values) {
  return values.length ? values[values.length - 1] : null;
}

function el(tag, attrs = {}, text = null, ns = null) {
  const node = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== null) node.textContent = text;
  return node;
}

/** Draw lines ({values, color}) over times t (seconds, <= 0) into an SVG, the last windowS seconds. */
function drawChart(svg, t, lines, windowS, fmt) {
  const inWindow = t.map((x) => x >= -windowS);
  const ys = lines.flatMap((l) => l.values.filter((v, i) => inWindow[i] && v !== null));
  const top = Math.max(...ys, 0) * 1.1 || 1;
  const x = (s) => PAD.left + (W - PAD.left - PAD.right) * (1 + s / windowS);
  const y = (v) => H - PAD.bottom - (H - PAD.top - PAD.bottom) * (v / top);
  svg.replaceChildren();
  for (const frac of [0, 0.5, 1]) {
    const v = top * frac;
    svg.append(el("line", {class: "grid", x1: PAD.left, x2: W - PAD.right, y1: y(v), y2: y(v)}, null, SVG_NS));
    svg.append(el("text", {x: PAD.left - 4, y: y(v) + 3, "text-anchor": "end"}, fmt(v), SVG_NS));
  }
  svg.append(el("text", {x: PAD.left, y: H - 4}, `-${windowS / 60} min`, SVG_NS));
  svg.append(el("text", {x: W - PAD.right, y: H - 4, "text-anchor": "end"}, "now", SVG_NS));
  let points = 0;
  for (const line of lines) {
    let d = "", pen = "M";
    line.values.forEach((v, i) => {
      if (!inWindow[i] || v === null) { pen = "M"; return; }
      d += `${pen}${x(t[i]).toFixed(1)},${y(v).toFixed(1)}`;
      pen = "L";
      points += 1;
    });
    svg.append(el("path", {d, stroke: line.color}, null, SVG_NS));
  }
  svg.dataset.points = points;
}

function renderInstances(rows) {
  const body = $("instances").tBodies[0];
  body.replaceChildren(...rows.map((r) => {
    const tr = el("tr", {"data-instance-id": r.id, "data-state": r.state});
    for (const [field, text] of [["id", `#${r.id}`], ["role", r.role], ["state", r.state],
                                 ["running", r.running ?? "–"], ["waiting", r.waiting ?? "–"],
                                 ["swapped", r.swapped ?? "–"]]) {
      tr.append(el("td", {"data-field": field}, String(text)));
    }
    const kv = el("td", {"data-field": "kv_usage"});
    if (r.kv_usage !== null) {
      const bar = el("span", {class: "kv"});
      bar.append(el("span", {style: `width: ${(100 * r.kv_usage).toFixed(1)}%`}));
      kv.append(bar, `${(100 * r.kv_usage).toFixed(1)}%`);
    } else {
      kv.textContent = "–";
    }
    tr.append(kv);
    return tr;
  }));
}

function describe(e) {
  const to = (id) => (id === null || id === undefined ? "nowhere" : `#${id}`);
  switch (e.kind) {
    case "migration": return `migration #${e.from} → ${to(e.to)} (${e.reason}): ${e.outcome}`;
    case "pd_transfer": return `P/D transfer #${e.from} → ${to(e.to)}: ${e.outcome}`;
    case "scale": return `scale ${e.direction}: instance #${e.instance}`;
    case "instance_died": return `instance #${e.instance} died`;
    case "redispatch": return `request re-sent from dead instance #${e.from}`;
    default: return e.kind;
  }
}

function renderEvents(events) {
  if (!events.length) {
    $("events").replaceChildren(el("li", {class: "empty"}, "none yet: a cluster's migrations, P/D transfers, "
                                       + "scaling and instance deaths show here"));
    return;
  }
  $("events").replaceChildren(...events.slice(-200).reverse().map((e) => {
    const li = el("li", {"data-kind": e.kind});
    li.append(el("time", {}, new Date(e.time * 1000).toLocaleTimeString()), describe(e));
    return li;
  }));
}

function render(state) {
  const s = state.series;
  const windowS = Number($("window").value);
  const busy = state.instances.filter((r) => r.running !== null);
  $("model").textContent = state.model;
  $("tokens-per-s").textContent = fmtNumber(last(s.tokens_per_s));
  $("requests-per-s").textContent = fmtNumber(last(s.requests_per_s), 2);
  $("total-tokens").textContent = state.totals.output_tokens;
  $("total-requests").textContent = state.totals.requests;
  $("queues").textContent = `${busy.reduce((a, r) => a + r.running, 0)} / ${busy.reduce((a, r) => a + r.waiting, 0)}`;
  drawChart($("chart-tokens"), s.t, [{values: s.tokens_per_s, color: COLORS.p50}], windowS, (v) => v.toFixed(0));
  drawChart($("chart-requests"), s.t, [{values: s.requests_per_s, color: COLORS.p50}], windowS, (v) => v.toFixed(1));
  for (const name of ["ttft", "tpot"]) {
    const lines = ["p50", "p90"].map((p) => ({values: s[`${name}_${p}_s`], color: COLORS[p]}));
    drawChart($(`chart-${name}`), s.t, lines, windowS, fmtSeconds);
  }
  renderInstances(state.instances);
  renderEvents(state.events);
}

async function poll() {
  try {
    const response = await fetch("dashboard/state", {
      cache: "no-store", headers: apiKey ? {Authorization: `Bearer ${apiKey}`} : {},
    });
    $("auth").hidden = response.status !== 401;
    if (response.status === 401) {
      setStatus("auth", "an API key is needed");
    } else if (!response.ok) {
      setStatus("error", `error: HTTP ${response.status}`);
    } else {
      render(await response.json());
      setStatus("ok", `live · ${new Date().toLocaleTimeString()}`);
    }
  } catch (err) {
    setStatus("error", "server unreachable");
  }
  setTimeout(poll, POLL_MS);
}

$("auth").addEventListener("submit", (event) => {
  event.preventDefault();
  apiKey = $("auth-key").value;
  sessionStorage.setItem(KEY_STORE, apiKey);
});

poll();
