// Corral's live dashboard: polls /status.json and /status/series.json and redraws in place.
// No library: tables are built with the DOM, graphs are SVG polylines drawn here.
"use strict";

const POLL_MS = 2000;
const LIVE = new Set(["running", "draining", "ollama-down", "breaker-open", "breaker-half-open"]);
const SVG = "http://www.w3.org/2000/svg";

function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== undefined && value !== null) node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    node.append(child instanceof Node ? child : String(child ?? ""));
  }
  return node;
}

function s(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  return node;
}

async function getJSON(url) {
  const reply = await fetch(url, { cache: "no-store", credentials: "same-origin" });
  if (!reply.ok) throw new Error(`${url} answered ${reply.status}`);
  return reply.json();
}

const fmt = {
  num: (v) => (v == null ? "–" : Number(v).toLocaleString()),
  pct: (v) => (typeof v === "number" ? `${v.toFixed(0)}%` : "–"),
  bytes(v) {
    if (typeof v !== "number") return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
    return `${v.toFixed(i ? 1 : 0)} ${units[i]}`;
  },
  value(v, unit) {
    if (v == null || Number.isNaN(v)) return "–";
    if (unit === "s") return v < 1 ? `${(v * 1000).toFixed(v < 0.01 ? 1 : 0)} ms` : `${v.toFixed(2)} s`;
    const digits = Math.abs(v) >= 100 ? 0 : Math.abs(v) >= 10 ? 1 : 2;
    return `${v.toFixed(digits)}${unit === "%" ? "%" : ""}`;
  },
};

function names(entries) {
  return (entries || []).map((m) => m.name || m.model || "").filter(Boolean);
}

function bar(busy, total) {
  const width = total ? Math.min(100, (100 * busy) / total) : 0;
  return h("span", { class: "track" }, h("span", { style: `width:${width}%` }));
}

function renderTiles(st) {
  const nodes = st.nodes;
  const live = nodes.filter((n) => LIVE.has(n.state)).length;
  const slots = nodes.reduce((a, n) => a + (n.record.slots_total || 0), 0);
  const busy = nodes.reduce((a, n) => a + (n.record.slots_busy || 0), 0);
  const queued = st.queues.reduce((a, q) => a + q.queued, 0);
  const running = st.queues.reduce((a, q) => a + q.streams.reduce((b, x) => b + x.pending, 0), 0);
  const r = st.retries;
  const tiles = [
    ["nodes live", `${live} / ${nodes.length}`, live < nodes.length],
    ["slots busy", `${busy} / ${slots}`, false],
    ["queued", fmt.num(queued), false],
    ["running", fmt.num(running), false],
    ["retries waiting", fmt.num(r.inbox + r.scheduled), false],
    ["dead letters", fmt.num(r.dead_letters), r.dead_letters > 0],
    ["gateways", fmt.num(st.gateways), false],
  ];
  if (st.level !== undefined) {
    const load = st.load && st.load.load !== undefined ? ` (load ${st.load.load.toFixed(2)})` : "";
    tiles.push(["degradation level", fmt.num(st.level) + load, st.level > 0]);
  }
  document.getElementById("tiles").replaceChildren(
    ...tiles.map(([label, value, bad]) =>
      h("div", { class: "tile", "data-tile": label }, h("b", { class: bad ? "bad" : "" }, value), label)),
  );
  const when = new Date(st.taken_at * 1000).toLocaleTimeString();
  document.getElementById("summary").textContent =
    `${live} of ${nodes.length} nodes live · ${queued} queued · ${busy}/${slots} slots busy · ` +
    `read at ${when} by ${st.gateway}`;
  document.title = `Corral: ${queued} queued, ${busy}/${slots} busy`;
}

function gpuText(gpus) {
  if (!gpus || !gpus.length) return "–";
  return gpus.map((g) => `${g.name || "GPU" + g.index}: ${fmt.pct(g.util_percent)} · ` +
    `${fmt.bytes(g.mem_used)} / ${fmt.bytes(g.mem_total)}`).join("\n");
}

function renderNodes(nodes) {
  const box = document.getElementById("nodes");
  if (!nodes.length) {
    box.replaceChildren(h("p", { class: "muted" }, "No worker has sent a heartbeat."));
    return;
  }
  const head = h("tr", {}, ["node", "state", "breaker", "weight", "slots", "loaded models",
    "GPU · VRAM", "CPU", "memory", "heartbeat"].map((t) => h("th", {}, t)));
  const rows = nodes.map((n) => {
    const rec = n.record;
    const live = LIVE.has(n.state);
    const busy = rec.slots_busy || 0;
    const total = rec.slots_total || 0;
    return h("tr", { "data-node": n.node_id, "data-state": n.state, class: live ? "" : "down" },
      h("td", {}, h("code", {}, n.node_id), h("br"), h("span", { class: "muted" }, rec.ollama_url || "")),
      h("td", { class: n.state === "running" ? "ok" : live ? "warn" : "bad" }, n.state),
      breakerCell(rec.breaker),
      h("td", { class: "num" }, rec.weight === undefined ? "–" : `${rec.weight}${rec.backup ? " backup" : ""}`),
      h("td", { class: "num" }, `${busy}/${total}`, bar(busy, total)),
      h("td", {}, names(rec.loaded).join(", ") || "–"),
      h("td", { style: "white-space:pre" }, gpuText(rec.gpus)),
      h("td", { class: "num" }, fmt.pct(rec.cpu_percent)),
      h("td", { class: "num" }, rec.mem ? `${fmt.bytes(rec.mem.used)} (${fmt.pct(rec.mem.percent)})` : "–"),
      h("td", { class: live ? "num" : "num bad" }, `${n.heartbeat_age.toFixed(1)} s ago`));
  });
  box.replaceChildren(h("table", {}, head, ...rows));
}

function breakerCell(breaker) {
  // The heartbeat's breaker: its state, and the failures in its window when there are any.
  if (!breaker || typeof breaker !== "object") return h("td", {}, "–");
  const fails = breaker.recent_failures ? ` · ${breaker.recent_failures} failed` : "";
  const cls = breaker.state === "closed" ? "ok" : breaker.state === "open" ? "bad" : "warn";
  return h("td", { class: cls }, `${breaker.state}${fails}`);
}

function renderQueues(queues) {
  const box = document.getElementById("queues");
  if (!queues.length) {
    box.replaceChildren(h("p", { class: "muted" }, "No job was ever queued."));
    return;
  }
  const head = h("tr", {}, ["model", "priority", "queued", "running"].map((t) => h("th", {}, t)));
  const rows = [];
  for (const q of queues) {
    const streams = q.streams.filter((x) => x.waiting || x.pending);
    rows.push(h("tr", { "data-model": q.model }, h("td", {}, h("code", {}, q.model)), h("td", {}, "all"),
      h("td", { class: "num" }, fmt.num(q.queued)),
      h("td", { class: "num" }, fmt.num(q.streams.reduce((a, x) => a + x.pending, 0)))));
    for (const x of streams) {
      rows.push(h("tr", {}, h("td", {}), h("td", { class: "muted" }, `p${x.priority}`),
        h("td", { class: "num" }, fmt.num(x.waiting)), h("td", { class: "num" }, fmt.num(x.pending))));
    }
  }
  box.replaceChildren(h("table", {}, head, ...rows));
}

function renderCounters(stats) {
  const box = document.getElementById("counters");
  const entries = Object.entries(stats);
  box.replaceChildren(entries.length
    ? h("div", { class: "tiles" }, entries.map(([k, v]) => h("div", { class: "tile" }, h("b", {}, fmt.num(v)), k)))
    : h("p", { class: "muted" }, "None yet."));
}

function chart(graph, start, step) {
  const W = 400, H = 120, L = 4, R = 4, T = 14, B = 14;
  const count = Math.max(...graph.lines.map((l) => l.values.length), 2);
  let max = 0;
  let sum = 0;
  for (const line of graph.lines) {
    for (const v of line.values) if (v != null) { max = Math.max(max, v); sum += v; }
  }
  if (graph.unit === "%") max = Math.max(max, 100);
  max = max > 0 ? max * 1.1 : 1;
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none",
    "data-graph": graph.id, "data-sum": sum.toFixed(6), role: "img", "aria-label": graph.title });
  svg.append(s("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }));
  const top = s("text", { x: L, y: 10 });
  top.textContent = fmt.value(max, graph.unit) + (graph.unit && graph.unit !== "%" && graph.unit !== "s" ? ` ${graph.unit}` : "");
  svg.append(top);
  const span = (count - 1) * step;
  const left = s("text", { x: L, y: H - 2 });
  left.textContent = span >= 120 ? `-${Math.round(span / 60)} min` : `-${span} s`;
  const right = s("text", { x: W - R, y: H - 2, "text-anchor": "end" });
  right.textContent = "now";
  svg.append(left, right);
  graph.lines.forEach((line, i) => {
    let d = "";
    let pen = false;
    line.values.forEach((v, x) => {
      if (v == null) { pen = false; return; }
      const px = L + ((W - L - R) * x) / (count - 1);
      const py = H - B - ((H - B - T) * v) / max;
      d += `${pen ? "L" : "M"}${px.toFixed(1)},${py.toFixed(1)} `;
      pen = true;
    });
    svg.append(s("path", { d: d.trim() || "M0,0", fill: "none", stroke: `var(--c${i % 8})`,
      "stroke-width": 1.6, "vector-effect": "non-scaling-stroke", "data-line": line.name }));
  });
  const last = (line) => [...line.values].reverse().find((v) => v != null);
  const legend = h("div", { class: "legend" }, graph.lines.map((line, i) =>
    h("span", {}, h("i", { style: `background:var(--c${i % 8})` }), `${line.name} ${fmt.value(last(line), graph.unit)}`)));
  if (!graph.lines.length) legend.append(h("span", {}, "no data yet"));
  return h("div", { class: "graph" }, h("h3", {}, graph.title + (graph.unit ? ` (${graph.unit})` : "")), svg, legend);
}

function renderGraphs(series) {
  document.getElementById("graphs").replaceChildren(
    ...series.graphs.map((g) => chart(g, series.start, series.step)));
}

function showError(message) {
  const box = document.getElementById("error");
  box.hidden = !message;
  box.textContent = message ? `Not updating: ${message}` : "";
}

async function refresh() {
  const [res, span] = document.getElementById("range").value.split(":");
  try {
    const [st, series] = await Promise.all([
      getJSON("/status.json"),
      getJSON(`/status/series.json?resolution=${res}&span=${span}`),
    ]);
    renderTiles(st);
    renderNodes(st.nodes);
    renderQueues(st.queues);
    renderCounters(st.stats);
    renderGraphs(series);
    showError("");
    document.body.dataset.updated = String(Date.now());
  } catch (err) {
    showError(err.message);
  }
}

document.getElementById("range").addEventListener("change", refresh);
refresh();
setInterval(refresh, POLL_MS);
