// The live DAG drawn with cytoscape.js; dagre lays it out. Calls and
// Semantic Variables are nodes (the graph is bipartite, as in the runtime);
// task groups are compound nodes; shared-prefix groups are a class with a
// border colour per group.
import cytoscape from "cytoscape";
import dagre from "cytoscape-dagre";
import { compressionRatio, prefixGroups } from "./model.js";

cytoscape.use(dagre);

export const PREFIX_COLOURS = ["#d9480f", "#7048e8", "#0c8599", "#c2255c", "#5c940d", "#1864ab"];
const STATE_COLOURS = {
  waiting: "#dee2e6", ready: "#ffe066", running: "#74c0fc", done: "#8ce99a", failed: "#ff8787", cancelled: "#adb5bd",
};

const STYLE = [
  { selector: "node", style: { "font-family": "system-ui, sans-serif", "font-size": 11, color: "#212529" } },
  {
    selector: "node.call",
    style: {
      shape: "round-rectangle", width: 170, height: 58, "background-color": (n) => STATE_COLOURS[n.data("state")] || "#fff",
      "border-width": 1, "border-color": "#495057", label: "data(label)", "text-wrap": "wrap",
      "text-valign": "center", "text-halign": "center", "text-max-width": 160,
    },
  },
  { selector: "node.call.prefix", style: { "border-width": 4, "border-color": "data(prefixColour)" } },
  { selector: "node.call.compressed", style: { "border-style": "double", "border-width": 5 } },
  { selector: "node.call.state-running", style: { "border-color": "#1864ab", "border-width": 3 } },
  {
    selector: "node.var",
    style: {
      shape: "ellipse", width: 22, height: 22, "background-color": "#fff", "border-width": 2, "border-color": "#868e96",
      label: "data(label)", "text-valign": "bottom", "text-margin-y": 4, "font-size": 10, color: "#495057",
    },
  },
  { selector: "node.var.set", style: { "background-color": "#868e96" } },
  { selector: "node.var.const", style: { shape: "round-rectangle", width: 18, height: 14, "border-style": "dashed" } },
  { selector: "node.var.failed", style: { "border-color": "#e03131", "background-color": "#ffc9c9" } },
  {
    selector: "node.group",
    style: {
      shape: "round-rectangle", "background-color": "#f1f3f5", "background-opacity": 0.6, "border-style": "dashed",
      "border-width": 2, "border-color": "#868e96", label: "data(label)", "text-valign": "top", "text-halign": "center",
      "font-size": 11, color: "#495057", padding: 14,
    },
  },
  {
    selector: "edge",
    style: {
      width: 1.5, "line-color": "#adb5bd", "target-arrow-color": "#adb5bd", "target-arrow-shape": "triangle",
      "curve-style": "bezier", "arrow-scale": 0.8,
    },
  },
  { selector: "edge.output", style: { "line-color": "#495057", "target-arrow-color": "#495057" } },
  { selector: ":selected", style: { "overlay-color": "#1c7ed6", "overlay-opacity": 0.2, "overlay-padding": 6 } },
];

/** The cytoscape elements for a DAG JSON. */
export function elementsOf(dag) {
  const prefix = prefixGroups(dag.calls);
  const groupInfo = new Map((dag.groups || []).map((g) => [g.group_id, g]));
  const out = [];
  const groups = new Set(dag.calls.map((c) => c.group).filter(Boolean));
  for (const g of groups) {
    const n = dag.calls.filter((c) => c.group === g).length;
    const objective = dag.calls.find((c) => c.group === g)?.objective;
    out.push({
      group: "nodes",
      data: { id: `group:${g}`, kind: "group", label: `task group · ${n} calls${objective ? ` · ${objective}` : ""}`,
        consumer: groupInfo.get(g)?.consumer },
      classes: "group",
    });
  }
  for (const c of dag.calls) {
    const ratio = compressionRatio(c);
    const p = c.prefix_key ? prefix.get(c.prefix_key) : undefined;
    const lines = [c.function, `${c.state}${c.objective ? ` · ${c.objective}` : ""}`];
    const extra = [c.engine, p ? `prefix #${p}` : null, ratio !== null ? `compressed ${ratio.toFixed(1)}×` : null];
    if (extra.some(Boolean)) lines.push(extra.filter(Boolean).join(" · "));
    const classes = ["call", `state-${c.state}`];
    if (p) classes.push("prefix");
    if (ratio !== null) classes.push("compressed");
    out.push({
      group: "nodes",
      data: {
        id: c.call_id, kind: "call", label: lines.join("\n"), state: c.state, objective: c.objective,
        engine: c.engine, function: c.function, prefix: p || null, compressionRatio: ratio,
        prefixColour: p ? PREFIX_COLOURS[(p - 1) % PREFIX_COLOURS.length] : "#495057",
        parent: c.group ? `group:${c.group}` : undefined,
      },
      classes: classes.join(" "),
    });
  }
  for (const v of dag.variables) {
    const classes = ["var"];
    if (v.ready) classes.push("set");
    if (v.constant) classes.push("const");
    if (v.error) classes.push("failed");
    out.push({
      group: "nodes",
      data: { id: v.var_id, kind: "var", label: v.name, ready: v.ready, constant: v.constant, producer: v.producer },
      classes: classes.join(" "),
    });
  }
  const vars = new Set(dag.variables.map((v) => v.var_id));
  for (const c of dag.calls) {
    for (const [name, vid] of Object.entries(c.inputs)) {
      if (vars.has(vid)) out.push({ group: "edges", data: { id: `${vid}->${c.call_id}`, source: vid, target: c.call_id, name }, classes: "input" });
    }
    for (const [name, vid] of Object.entries(c.outputs)) {
      if (vars.has(vid)) out.push({ group: "edges", data: { id: `${c.call_id}->${vid}`, source: c.call_id, target: vid, name }, classes: "output" });
    }
  }
  return out;
}

export class DagView {
  constructor(container, onSelect) {
    this.cy = cytoscape({ container, style: STYLE, elements: [], wheelSensitivity: 0.3, minZoom: 0.2, maxZoom: 3 });
    this.cy.on("tap", "node.call, node.var", (e) => onSelect(e.target.data("kind"), e.target.id()));
    this.layoutRuns = 0;
  }

  /** Bring the drawing to `dag`: new or removed elements re-run the layout;
   *  state changes only restyle. */
  update(dag) {
    const want = elementsOf(dag);
    const ids = new Set(want.map((e) => e.data.id));
    let changed = false;
    this.cy.batch(() => {
      const stale = this.cy.elements().filter((e) => !ids.has(e.id()));
      if (stale.length) {
        stale.remove();
        changed = true;
      }
      // Parents first, then nodes, then edges, so every reference exists.
      for (const e of want) {
        const have = this.cy.getElementById(e.data.id);
        if (have.nonempty()) {
          const { parent, ...data } = e.data;
          if (have.isNode() && (have.data("parent") || undefined) !== parent) {
            have.move({ parent: parent ?? null });
            changed = true;
          }
          have.data(data);
          have.classes(e.classes);
        } else {
          this.cy.add(e);
          changed = true;
        }
      }
    });
    if (changed) this.layout();
  }

  layout() {
    this.layoutRuns += 1;
    this.cy.layout({
      name: "dagre", rankDir: "LR", nodeSep: 18, rankSep: 60, edgeSep: 8, fit: true, padding: 24, animate: false,
    }).run();
  }

  clear() {
    this.cy.elements().remove();
  }
}
