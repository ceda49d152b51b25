// Reading the service's DAG JSON: small pure helpers shared by the views.

export const STATES = ["waiting", "ready", "running", "done", "failed", "cancelled"];

/** The compression ratio a call node carries, whatever the field is called
 *  (compression_ratio, compression.ratio, ...); null when it has none. */
export function compressionRatio(call) {
  const find = (value, depth) => {
    if (typeof value === "number" && Number.isFinite(value)) return value;
    if (!value || typeof value !== "object" || depth > 3) return null;
    for (const [k, v] of Object.entries(value)) {
      if (/ratio/i.test(k)) {
        const r = find(v, depth + 1);
        if (r !== null) return r;
      }
    }
    for (const v of Object.values(value)) {
      if (v && typeof v === "object") {
        const r = find(v, depth + 1);
        if (r !== null) return r;
      }
    }
    return null;
  };
  for (const [k, v] of Object.entries(call)) {
    if (!k.startsWith("compress")) continue;
    const r = /ratio/i.test(k) ? find(v, 0) : v && typeof v === "object" ? find(v, 1) : null;
    if (r !== null) return r;
  }
  return null;
}

/** Shared-prefix groups: prefix keys held by two or more calls, numbered 1.. */
export function prefixGroups(calls) {
  const counts = new Map();
  for (const c of calls) if (c.prefix_key) counts.set(c.prefix_key, (counts.get(c.prefix_key) || 0) + 1);
  const index = new Map();
  for (const [key, n] of counts) if (n > 1) index.set(key, index.size + 1);
  return index;
}

export function fmtSeconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1) return `${(s * 1000).toFixed(s < 0.01 ? 2 : 1)} ms`;
  return `${s.toFixed(2)} s`;
}

export function countStates(calls) {
  const n = Object.fromEntries(STATES.map((s) => [s, 0]));
  for (const c of calls) n[c.state] = (n[c.state] || 0) + 1;
  return n;
}

/** Text for the DOM: never HTML. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}
