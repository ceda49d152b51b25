"""The read-only DAG views of the service (timings, call details), the
visualizer's static files at /ui, and ``parrot dag export`` in every format,
against a real server that ran a real map-reduce workflow."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

import parrot as P
from parrot import cli, workflows
from parrot.semantic_vars.http_runtime import HttpRuntime

CHUNKS = workflows.split_paragraphs(workflows.SAMPLE_DOCUMENT)


@pytest.fixture(scope="module")
def key(live_server):
    return live_server.new_tenant("dag-view")


@pytest.fixture(scope="module")
def finished(live_server, key):
    """A map-reduce session run to the end over HTTP: (session id, reduce output)."""
    runtime = HttpRuntime(live_server.url, api_key=key)
    try:
        with P.Session(runtime) as s:
            partial, merged = workflows.map_reduce_summary(CHUNKS)
            value = merged.get()
    finally:
        runtime.close()
    return s.id, value


def test_dag_json_has_timings_and_session_state(live_server, key, finished):
    sid, _ = finished
    with live_server.client(key) as c:
        dag = c.get(f"/api/v1/sessions/{sid}/dag").json()
    assert dag["open"] is False and dag["now"] > 0
    assert len(dag["calls"]) == len(CHUNKS) + 1
    for call in dag["calls"]:
        t = call["timings"]
        assert call["state"] == "done" and call["engine"]
        # Stamps are seconds since the first submit and come in order.
        order = [t[k] for k in ("submitted_at", "ready_at", "started_at", "engine_started_at", "first_token_at", "finished_at")]
        assert all(x is not None for x in order) and order == sorted(order) and order[0] >= 0
        assert t["prefill_s"] == pytest.approx(t["first_token_at"] - t["engine_started_at"], abs=1e-5)
        assert t["decode_s"] == pytest.approx(t["finished_at"] - t["first_token_at"], abs=1e-5)
    assert min(c["timings"]["submitted_at"] for c in dag["calls"]) == 0
    maps = [c for c in dag["calls"] if c["function"] == "summarize_chunk"]
    assert len({c["group"] for c in maps}) == 1 and maps[0]["group"]  # one task group
    assert len({c["prefix_key"] for c in maps}) == 1 and maps[0]["prefix_key"]  # one shared prefix


def test_call_detail_fills_the_prompt(live_server, key, finished):
    sid, merged = finished
    with live_server.client(key) as c:
        dag = c.get(f"/api/v1/sessions/{sid}/dag").json()
        reduce_call = next(x for x in dag["calls"] if x["function"].startswith("reduce_"))
        detail = c.get(f"/api/v1/sessions/{sid}/calls/{reduce_call['call_id']}").json()
        a_map = next(x for x in dag["calls"] if x["function"] == "summarize_chunk")
        map_detail = c.get(f"/api/v1/sessions/{sid}/calls/{a_map['call_id']}").json()
    assert detail["state"] == "done" and detail["engine"] == reduce_call["engine"]
    assert detail["outputs"] == [{"name": "summary", "var_id": reduce_call["outputs"]["summary"], "value": merged,
                                  "ready": True, "constant": False, "error": None}]
    inputs = [s for s in detail["prompt"] if s["kind"] == "input"]
    assert [s["name"] for s in inputs] == [f"part{i}" for i in range(len(CHUNKS))]
    assert all(isinstance(s["value"], str) for s in inputs)  # the maps' outputs, filled in
    assert detail["prompt"][0] == {"kind": "text", "text": "Here are notes about one topic:\n- "}
    assert detail["prompt"][-1]["kind"] == "output" and detail["prompt"][-1]["value"] == merged
    chunk = next(s for s in map_detail["prompt"] if s["kind"] == "input")
    assert chunk["value"] in CHUNKS and chunk["constant"] is True
    assert map_detail["prefill_tokens"] + map_detail["cached_tokens"] > 0
    assert set(detail["timings"]) >= {"queued_s", "prefill_s", "decode_s"}


def test_call_detail_is_owned(live_server, key, finished):
    sid, _ = finished
    other = live_server.new_tenant("dag-view-intruder")
    with live_server.client(key) as c:
        call_id = c.get(f"/api/v1/sessions/{sid}/dag").json()["calls"][0]["call_id"]
        own_other = c.post("/api/v1/sessions").json()["session_id"]
        r = c.get(f"/api/v1/sessions/{sid}/calls/nope")
        assert r.status_code == 404 and r.json()["error"]["field"] == "call_id"
        # A call of another session of the same tenant is not in this one.
        assert c.get(f"/api/v1/sessions/{own_other}/calls/{call_id}").status_code == 404
    with live_server.client(other) as c:
        assert c.get(f"/api/v1/sessions/{sid}/calls/{call_id}").status_code == 404
        assert c.get(f"/api/v1/sessions/{sid}/dag").status_code == 404
    with live_server.client("pk-wrong") as c:
        assert c.get(f"/api/v1/sessions/{sid}/calls/{call_id}").status_code == 401


def test_the_visualizer_is_served(live_server):
    import httpx

    r = httpx.get(live_server.url + "/ui", follow_redirects=True, timeout=30)
    assert r.status_code == 200 and r.url.path == "/ui/"
    assert '<script src="app.js"></script>' in r.text and "text/html" in r.headers["content-type"]
    js = httpx.get(live_server.url + "/ui/app.js", timeout=30)
    assert js.status_code == 200 and "javascript" in js.headers["content-type"] and "parrotCy" in js.text
    assert httpx.get(live_server.url + "/ui/app.css", timeout=30).status_code == 200
    assert httpx.get(live_server.url + "/ui/nothing.js", timeout=30).status_code == 404


def export(live_server, key, sid, fmt, out, *extra):
    return cli.main(["dag", "export", sid, "--format", fmt, "--url", live_server.url, "--api-key", key, "-o", str(out), *extra])


def test_dag_export_json_dot_svg(live_server, key, finished, tmp_path, monkeypatch, capsys):
    sid, _ = finished
    assert export(live_server, key, sid, "json", tmp_path / "dag.json") == 0
    dag = json.loads((tmp_path / "dag.json").read_text())
    assert dag["session_id"] == sid and len(dag["calls"]) == len(CHUNKS) + 1

    assert export(live_server, key, sid, "dot", tmp_path / "dag.dot") == 0
    dot = (tmp_path / "dag.dot").read_text()
    assert dot.startswith(f'digraph "session {sid}" {{') and dot.rstrip().endswith("}")
    edges = [line for line in dot.splitlines() if " -> " in line]
    n_edges = sum(len(c["inputs"]) + len(c["outputs"]) for c in dag["calls"])
    assert len(edges) == n_edges == 3 * len(CHUNKS) + 1
    assert dot.count("subgraph \"cluster_") == 1  # the maps' task group
    assert dot.count('fillcolor="#8ce99a"') == len(CHUNKS) + 1  # every call done
    assert dot.count("prefix #1") == len(CHUNKS)

    assert export(live_server, key, sid, "svg", tmp_path / "dag.svg") == 0
    svg = ET.parse(tmp_path / "dag.svg").getroot()
    ns = {"s": "http://www.w3.org/2000/svg"}
    nodes = svg.findall(".//s:g[@class='node']", ns)
    assert len(nodes) == len(dag["calls"]) + len(dag["variables"])
    assert len(svg.findall(".//s:g[@class='edge']", ns)) == n_edges
    assert len(svg.findall(".//s:g[@class='cluster']", ns)) == 1

    # Standard output, and the key from the environment.
    monkeypatch.setenv("PARROT_API_KEY", key)
    capsys.readouterr()
    assert cli.main(["dag", "export", sid, "--format", "json", "--url", live_server.url]) == 0
    assert json.loads(capsys.readouterr().out)["session_id"] == sid


def test_dag_export_errors(live_server, key, finished, tmp_path, monkeypatch):
    sid, _ = finished
    with pytest.raises(SystemExit, match="HTTP 404: unknown session"):
        export(live_server, key, "session-nope", "json", tmp_path / "x.json")
    with pytest.raises(SystemExit, match="HTTP 401"):
        export(live_server, "pk-wrong", sid, "dot", tmp_path / "x.dot")
    monkeypatch.setenv("PATH", str(tmp_path))  # no Graphviz here
    with pytest.raises(SystemExit, match="Graphviz's `dot` program, which is not on PATH"):
        export(live_server, key, sid, "svg", tmp_path / "x.svg")
    assert not (tmp_path / "x.svg").exists()
    monkeypatch.delenv("PARROT_API_KEY", raising=False)
    with pytest.raises(SystemExit, match="--api-key"):
        cli.main(["dag", "export", sid, "--url", live_server.url])


def test_dot_marks_compression_when_a_call_carries_it(live_server, key, finished):
    from parrot.dag_export import compression_ratio, to_dot

    sid, _ = finished
    with live_server.client(key) as c:
        dag = c.get(f"/api/v1/sessions/{sid}/dag").json()
    assert all(compression_ratio(call) is None for call in dag["calls"])  # none ran here
    assert "compressed" not in to_dot(dag)
    dag["calls"][0]["compression_ratio"] = 3.0
    dag["calls"][1]["compression"] = {"original_tokens": 90, "ratio": 2.25}
    dot = to_dot(dag)
    assert dot.count("compressed 3.0x") == 1 and dot.count("compressed 2.2x") == 1
