"""A session's DAG as a static picture: fetched from a running service and
written as JSON, Graphviz DOT, or SVG (DOT laid out by Graphviz ``dot``).

Used by ``parrot dag export``; needs only ``httpx`` (the client extra), and
Graphviz for SVG.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any, Literal

ExportFormat = Literal["json", "dot", "svg"]
FORMATS: tuple[ExportFormat, ...] = ("json", "dot", "svg")

# Fill colours by call state, as in the browser view.
STATE_COLOURS = {
    "waiting": "#dee2e6", "ready": "#ffe066", "running": "#74c0fc",
    "done": "#8ce99a", "failed": "#ff8787", "cancelled": "#adb5bd",
}
PREFIX_COLOURS = ("#d9480f", "#7048e8", "#0c8599", "#c2255c", "#5c940d", "#1864ab")


class ExportError(RuntimeError):
    """The DAG could not be fetched or rendered; the message says why."""


def fetch_dag(url: str, api_key: str, session_id: str, *, timeout: float = 30.0) -> dict[str, Any]:
    """GET the session's DAG JSON from the service at ``url``."""
    import httpx

    try:
        r = httpx.get(
            f"{url.rstrip('/')}/api/v1/sessions/{session_id}/dag",
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout,
        )
    except httpx.TransportError as exc:
        raise ExportError(f"cannot reach the service at {url}: {exc}") from exc
    if r.status_code != 200:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text
        raise ExportError(f"HTTP {r.status_code}: {message}")
    return r.json()


def _quote(text: str) -> str:
    """A DOT double-quoted string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def compression_ratio(call: dict[str, Any]) -> float | None:
    """The ratio in whatever compression field the call carries, if any."""

    def find(value: Any, depth: int) -> float | None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, dict) and depth < 3:
            for k, v in sorted(value.items(), key=lambda kv: "ratio" not in kv[0]):
                if "ratio" in k or isinstance(v, dict):
                    r = find(v, depth + 1)
                    if r is not None:
                        return r
        return None

    for key, value in call.items():
        if key.startswith("compress") and ("ratio" in key or isinstance(value, dict)):
            r = find(value, 0 if "ratio" in key else 1)
            if r is not None:
                return r
    return None


def to_dot(dag: dict[str, Any]) -> str:
    """Graphviz DOT for a DAG JSON: calls as boxes filled by state, variables
    as ellipses, task groups as clusters, shared-prefix groups by border colour."""
    counts: dict[str, int] = {}
    for c in dag["calls"]:
        if c.get("prefix_key"):
            counts[c["prefix_key"]] = counts.get(c["prefix_key"], 0) + 1
    prefix_no = {k: i + 1 for i, k in enumerate(k for k, n in counts.items() if n > 1)}

    lines = [f"digraph {_quote('session ' + dag['session_id'])} {{", "  rankdir=LR;",
             '  node [fontname="Helvetica", fontsize=10];', '  edge [color="#868e96"];']

    def call_node(c: dict[str, Any], indent: str) -> str:
        label = [c["function"], c["state"] + (f" · {c['objective']}" if c.get("objective") else "")]
        extra = [c.get("engine") or ""]
        p = prefix_no.get(c.get("prefix_key") or "")
        if p:
            extra.append(f"prefix #{p}")
        ratio = compression_ratio(c)
        if ratio is not None:
            extra.append(f"compressed {ratio:.1f}x")
        if any(extra):
            label.append(" · ".join(e for e in extra if e))
        attrs = [f"label={_quote(chr(10).join(label))}", "shape=box", 'style="rounded,filled"',
                 f"fillcolor={_quote(STATE_COLOURS.get(c['state'], '#ffffff'))}"]
        if p:
            attrs += [f"color={_quote(PREFIX_COLOURS[(p - 1) % len(PREFIX_COLOURS)])}", "penwidth=3"]
        return f"{indent}{_quote(c['call_id'])} [{', '.join(attrs)}];"

    grouped: dict[str, list[dict[str, Any]]] = {}
    for c in dag["calls"]:
        if c.get("group"):
            grouped.setdefault(c["group"], []).append(c)
        else:
            lines.append(call_node(c, "  "))
    for i, (group, members) in enumerate(sorted(grouped.items())):
        objective = members[0].get("objective")
        label = f"task group · {len(members)} calls" + (f" · {objective}" if objective else "")
        lines.append(f"  subgraph {_quote(f'cluster_{i}')} {{")
        lines.append(f'    label={_quote(label)}; style=dashed; color="#868e96";')
        lines.extend(call_node(c, "    ") for c in members)
        lines.append("  }")
    for v in dag["variables"]:
        style = "dashed" if v.get("constant") else ("filled" if v.get("ready") else "solid")
        lines.append(f'  {_quote(v["var_id"])} [label={_quote(v["name"])}, shape=ellipse, style={style}, '
                     f'fillcolor="#ced4da", fontsize=9];')
    known = {v["var_id"] for v in dag["variables"]}
    for c in dag["calls"]:
        for name, vid in c["inputs"].items():
            if vid in known:
                lines.append(f"  {_quote(vid)} -> {_quote(c['call_id'])};")
        for name, vid in c["outputs"].items():
            if vid in known:
                lines.append(f"  {_quote(c['call_id'])} -> {_quote(vid)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_svg(dot_text: str) -> str:
    """Lay out DOT with Graphviz's ``dot`` into SVG."""
    dot = shutil.which("dot")
    if dot is None:
        raise ExportError(
            "SVG needs Graphviz's `dot` program, which is not on PATH: install Graphviz "
            "(Debian/Ubuntu: apt-get install graphviz; macOS: brew install graphviz), "
            "or export --format dot and render it elsewhere"
        )
    done = subprocess.run([dot, "-Tsvg"], input=dot_text, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise ExportError(f"dot failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def render(dag: dict[str, Any], fmt: ExportFormat) -> str:
    """The DAG in ``fmt``."""
    if fmt == "json":
        return json.dumps(dag, indent=2) + "\n"
    if fmt == "dot":
        return to_dot(dag)
    if fmt == "svg":
        return to_svg(to_dot(dag))
    raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
