// The details panel: one call (prompt with its variables filled in, outputs,
// timings, prefix-cache hits, engine) or one variable.
import { compressionRatio, el, fmtSeconds } from "./model.js";

const FOLD_AT = 160; // characters; longer values are folded

/** A value, folded behind a <details> when long. */
export function foldable(text, cls) {
  if (text === null || text === undefined) return el("span", { class: `${cls} pending` }, "(not set yet)");
  if (text.length <= FOLD_AT) return el("span", { class: cls }, text);
  return el("details", { class: `${cls} fold` },
    el("summary", {}, `${text.slice(0, 80)}… (${text.length} chars)`),
    el("span", {}, text));
}

function row(label, field, value) {
  return [el("dt", {}, label), el("dd", { "data-field": field }, value ?? "–")];
}

function promptView(detail) {
  return el("pre", { class: "prompt", "data-field": "prompt" },
    detail.prompt.map((seg) => {
      if (seg.kind === "text") return seg.text;
      const title = `${seg.kind}:${seg.name}`;
      const node = seg.value === null || seg.value === undefined
        ? el("span", { class: `var-${seg.kind} pending` }, `{{${title}}}`)
        : foldable(seg.value, `var-${seg.kind}`);
      node.setAttribute("title", title);
      return node;
    }));
}

export function callDetails(detail) {
  const t = detail.timings || {};
  const ratio = compressionRatio(detail);
  const compression = Object.entries(detail).filter(([k]) => k.startsWith("compress"));
  return el("div", { class: "detail", "data-call-id": detail.call_id },
    el("h3", {}, detail.function, " ", el("span", { class: `badge state-${detail.state}`, "data-field": "state" }, detail.state)),
    el("p", { class: "mono small" }, detail.call_id),
    detail.error ? el("p", { class: "error", "data-field": "error" }, detail.error) : null,
    el("dl", {},
      row("engine", "engine", detail.engine),
      row("objective", "objective", detail.objective),
      row("task group", "group", detail.group),
      row("prefill tokens", "prefill_tokens", String(detail.prefill_tokens)),
      row("prefix-cache hit", "cached_tokens", `${detail.cached_tokens} tokens`),
      row("generated tokens", "generated_tokens", String(detail.generated_tokens)),
      row("queued", "queued", fmtSeconds(t.queued_s)),
      row("prefill", "prefill", fmtSeconds(t.prefill_s)),
      row("decode", "decode", fmtSeconds(t.decode_s)),
      row("submitted → finished", "total",
        t.finished_at !== null && t.finished_at !== undefined ? fmtSeconds(t.finished_at - t.submitted_at) : "–"),
      ratio !== null ? row("compression", "compression", `${ratio.toFixed(2)}×`) : null,
      compression.filter(([, v]) => typeof v !== "object").map(([k, v]) => row(k, k, String(v)))),
    el("h4", {}, "Prompt"),
    promptView(detail),
    el("h4", {}, "Outputs"),
    el("dl", { class: "outputs" }, detail.outputs.map((o) => [
      el("dt", {}, o.name), el("dd", { "data-output": o.name }, o.error ? el("span", { class: "error" }, o.error) : foldable(o.value, "value")),
    ])));
}

export function variableDetails(dag, varId, value) {
  const v = dag.variables.find((x) => x.var_id === varId);
  if (!v) return el("p", {}, "This variable is gone.");
  const consumers = dag.calls.filter((c) => Object.values(c.inputs).includes(varId));
  const name = (id) => dag.calls.find((c) => c.call_id === id)?.function ?? id;
  return el("div", { class: "detail", "data-var-id": varId },
    el("h3", {}, v.name, " ", el("span", { class: "badge" }, v.constant ? "constant" : v.ready ? "set" : "pending")),
    el("p", { class: "mono small" }, varId),
    el("dl", {},
      row("produced by", "producer", v.producer ? name(v.producer) : (v.constant ? "the caller (constant)" : "the caller")),
      row("read by", "consumers", consumers.map((c) => c.function).join(", ") || "–"),
      row("get() annotation", "perf", v.perf)),
    v.error ? el("p", { class: "error" }, v.error) : null,
    el("h4", {}, "Value"),
    el("div", { "data-field": "value" }, foldable(value, "value")));
}
