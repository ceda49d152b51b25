// A Gantt chart of calls per engine, drawn as SVG from the DAG's timings:
// queued (ready until an engine admitted it), prefill, decode. Calls that
// overlap on one engine (a batch) are stacked in sub-rows.
import { fmtSeconds } from "./model.js";

const SVG = "http://www.w3.org/2000/svg";
const ROW = 16;
const LABEL_W = 90;

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

/** Place intervals into the first sub-row where they fit (first fit by start time). */
function stack(items) {
  const rowsEnd = [];
  for (const it of [...items].sort((a, b) => a.start - b.start)) {
    let r = rowsEnd.findIndex((end) => end <= it.start);
    if (r < 0) r = rowsEnd.push(-Infinity) - 1;
    rowsEnd[r] = it.end;
    it.row = r;
  }
  return Math.max(1, rowsEnd.length);
}

export function renderTimeline(container, dag, onSelect, selected) {
  container.replaceChildren();
  const now = dag.now ?? 0;
  const lanes = new Map();
  for (const c of dag.calls) {
    const t = c.timings || {};
    const start = t.ready_at ?? t.submitted_at;
    if (start === null || start === undefined || c.state === "waiting") continue;
    const lane = c.engine || "(not placed yet)";
    const end = t.finished_at ?? now;
    if (!lanes.has(lane)) lanes.set(lane, []);
    lanes.get(lane).push({ call: c, t, start, end: Math.max(end, start) });
  }
  if (!lanes.size) {
    container.append(document.createTextNode("No call has started yet."));
    return;
  }
  const span = Math.max(now, ...[...lanes.values()].flat().map((i) => i.end), 1e-3);
  const width = Math.max(container.clientWidth || 800, 400);
  const plot = width - LABEL_W - 10;
  const x = (s) => LABEL_W + (plot * s) / span;
  let y = 18;
  const root = svg("svg", { width, class: "gantt", role: "img", "aria-label": "timeline of calls per engine" });
  for (let i = 0; i <= 5; i++) {
    const s = (span * i) / 5;
    root.append(svg("line", { x1: x(s), x2: x(s), y1: 12, y2: "100%", class: "tick" }));
    const anchor = i === 0 ? "start" : i === 5 ? "end" : "middle";
    root.append(svg("text", { x: x(s), y: 10, class: "tick-label", "text-anchor": anchor }, fmtSeconds(s)));
  }
  for (const [lane, items] of [...lanes].sort((a, b) => a[0].localeCompare(b[0]))) {
    const rows = stack(items);
    const h = rows * ROW + 6;
    root.append(svg("rect", { x: 0, y, width, height: h, class: "lane" }));
    root.append(svg("text", { x: 4, y: y + 14, class: "lane-label" }, lane));
    for (const it of items) {
      const top = y + 3 + it.row * ROW;
      const g = svg("g", { class: `bar state-${it.call.state}${it.call.call_id === selected ? " selected" : ""}`, "data-call-id": it.call.call_id });
      const { t } = it;
      const admitted = t.engine_started_at ?? t.started_at;
      const first = t.first_token_at;
      const segments = [
        ["queued", it.start, admitted ?? it.end],
        ["prefill", admitted, first ?? (admitted !== null && admitted !== undefined ? it.end : null)],
        ["decode", first, first !== null && first !== undefined ? it.end : null],
      ];
      for (const [kind, a, b] of segments) {
        if (a === null || a === undefined || b === null || b === undefined) continue;
        g.append(svg("rect", { x: x(a), y: top, width: Math.max(1, x(b) - x(a)), height: ROW - 3, class: kind }));
      }
      g.append(svg("title", {}, `${it.call.function} (${it.call.state})\nqueued ${fmtSeconds(t.queued_s)} · prefill ${fmtSeconds(t.prefill_s)} · decode ${fmtSeconds(t.decode_s)}`));
      g.addEventListener("click", () => onSelect("call", it.call.call_id));
      root.append(g);
    }
    y += h + 4;
  }
  root.setAttribute("height", y + 4);
  const legend = document.createElement("div");
  legend.className = "gantt-legend";
  for (const kind of ["queued", "prefill", "decode"]) {
    const item = document.createElement("span");
    item.className = `key ${kind}`;
    item.textContent = kind;
    legend.append(item);
  }
  container.append(root, legend);
}
