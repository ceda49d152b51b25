"""Compression marked in templates and functions, applied by the dataflow.

Real engine, real compressor (the embedded model, random weights): these
check the mechanism -- the prompt the engine sees is shorter, the variable
keeps its value, the call node and the DAG JSON carry the statistics, bad
options are typed errors -- never the quality of what is kept.
"""

from __future__ import annotations

import random

import pytest

import parrot as P
from parrot.dataflow import build_request
from parrot.semantic_vars import FunctionSpec, InvalidArgumentError, Template, TemplateError
from parrot.semantic_vars.http_runtime import HttpRuntime

WORDS = "river stone market quiet lantern morning silver garden paper window harbor road winter bread".split()


def notes_text(seed: int = 0, sentences: int = 10) -> str:
    rng = random.Random(seed)
    return " ".join(" ".join(rng.choice(WORDS) for _ in range(10)).capitalize() + "." for _ in range(sentences))


NOTES = notes_text() + " The vault code is 4821."
PLAIN = "Notes: {{input:notes}}\nAnswer: {{output:answer|max_tokens=2}}"
MARKED = "Notes: {{input:notes|compress=0.4}}\nAnswer: {{output:answer|max_tokens=2}}"


def prompt_tokens(call) -> int:
    return call.prefill_tokens + call.cached_tokens


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize("raw, rate", [("0.3", 0.3), ("1", 1.0), ("25%", 0.25), ("4x", 0.25), (" 0.5 ", 0.5)])
def test_compress_option_in_the_template(raw, rate):
    t = Template(f"A {{{{input:a|compress={raw}}}}} b {{{{input:b}}}} {{{{input:a}}}} {{{{output:y}}}}")
    assert dict(t.input_compression) == {"a": pytest.approx(rate)}


@pytest.mark.parametrize(
    "template, message",
    [
        ("x {{input:a|compress=abc}} {{output:y}}", "'abc' is not a number"),
        ("x {{input:a|compress=1.5}} {{output:y}}", "out of range"),
        ("x {{input:a|compress=0}} {{output:y}}", "out of range"),
        ("x {{input:a|compress=-0.2}} {{output:y}}", "out of range"),
        ("x {{input:a|compress=nan}} {{output:y}}", "out of range"),
        ("x {{input:a|compress=0.5x}} {{output:y}}", "at least 1x"),
        ("x {{input:a|compress=}} {{output:y}}", "is not a number"),
        ("x {{input:a|squeeze=0.3}} {{output:y}}", "unknown option 'squeeze' for input 'a': inputs accept compress"),
        ("x {{input:a|compress=0.3}} {{input:a|compress=0.5}} {{output:y}}", "two different compress rates"),
    ],
)
def test_bad_compress_options_are_positioned_template_errors(template, message):
    with pytest.raises(TemplateError, match=message) as info:
        Template(template)
    # The position is the placeholder at fault (the second one, for a conflict).
    assert info.value.position == template.rindex("{{input:a")
    assert "line 1, column" in str(info.value)
    with pytest.raises(TemplateError, match=message):
        P.SemanticFunction(template)


def test_compress_option_on_the_function():
    @P.semantic_function(compress={"notes": "3x", "q": 0.5})
    def answer(notes: P.Input, q: P.Input, a: P.Output):
        """{{input:notes}} Q: {{input:q|compress=0.8}} A: {{output:a}}"""

    # The template's option is more specific than the function's.
    assert dict(answer.spec.input_compression) == {"notes": pytest.approx(1 / 3), "q": 0.8}
    again = FunctionSpec.from_dict(answer.spec.to_dict())
    assert dict(again.input_compression) == dict(answer.spec.input_compression)
    # Records written before compression existed still load.
    old = {k: v for k, v in answer.spec.to_dict().items() if k != "input_compression"}
    assert FunctionSpec.from_dict(old).input_compression == {}


@pytest.mark.parametrize(
    "compress, field, message",
    [
        ({"nope": 0.3}, "compress.nope", "no input 'nope'"),
        ({"x": 2}, "compress.x", "out of range"),
        ({"x": "lots"}, "compress.x", "not a number"),
        ({"x": True}, "compress.x", "not a compression rate"),
        (["x"], "compress", "must map input names"),
    ],
)
def test_bad_function_compress_options_name_the_field(compress, field, message):
    with pytest.raises(InvalidArgumentError, match=message) as info:
        P.SemanticFunction("{{input:x}} {{output:y}}", compress=compress)
    assert info.value.field == field


# ----------------------------------------------------------------------------- the dataflow
def test_marked_input_is_compressed_before_the_prompt_is_built(runtime, default_engine):
    plain = P.SemanticFunction(PLAIN, name="plain")
    marked = P.SemanticFunction(MARKED, name="marked")
    with P.Session(runtime) as s:
        notes = s.variable("notes")
        a = plain(notes)
        b = marked(notes)
        notes.set(NOTES)
        a.get(), b.get()
        # The variable keeps its original value for every reader.
        assert notes.get() == NOTES
    graph = runtime.graph
    assert graph.variables[notes.id].value == NOTES
    call_a, call_b = (graph.calls[v.producer] for v in (a, b))
    assert call_a.compression is None and call_a.compressed_inputs == {}
    stats = call_b.compression
    assert stats is not None and call_b.compress == {"notes": 0.4}
    short = call_b.compressed_inputs["notes"]
    assert short != NOTES and len(short) < len(NOTES)
    assert "4821" in short  # numbers are force-kept
    # Statistics: the rate is met within tolerance, scored by the engine's own model.
    original, compressed = stats["original_tokens"], stats["compressed_tokens"]
    assert original == len(default_engine.tokenizer.encode(NOTES, add_bos=False))
    assert abs(compressed - round(0.4 * original)) <= max(3, 0.15 * 0.4 * original)
    assert stats["ratio"] == pytest.approx(original / compressed, rel=1e-3)
    assert stats["inputs"]["notes"]["rate"] == 0.4 and stats["model"] == default_engine.name
    # The engine saw the shorter prompt: exactly the template with the compressed text.
    assert prompt_tokens(call_b) < prompt_tokens(call_a)
    request = build_request(call_b.function, call_b.template, {"notes": short}, default_engine.tokenizer, request_id="x")
    assert prompt_tokens(call_b) == sum(len(step.token_ids) for step in request.program if hasattr(step, "token_ids"))
    assert f"compressed {original}->{compressed} tokens" in runtime.describe(s.id)


def test_function_option_applies_and_events_carry_the_statistics(runtime):
    @P.semantic_function(max_tokens=2, compress={"text": 0.5})
    def summarize(text: P.Input, summary: P.Output):
        """Summarize: {{input:text}} Summary: {{output:summary}}"""

    events = []
    unsubscribe = runtime.subscribe(events.append)
    try:
        with P.Session(runtime) as s:
            out = summarize(NOTES)
            out.get()
    finally:
        unsubscribe()
    call = runtime.graph.calls[out.producer]
    assert call.compression["ratio"] == pytest.approx(2.0, rel=0.2)
    mine = [e for e in events if e.get("call_id") == call.id and e["type"] == "call_state"]
    assert mine[-1]["state"] == "done" and mine[-1]["compression"] == call.compression
    # The statistics are known before the call runs (an event says so while it is still ready).
    assert any(e["state"] == "ready" and e["compression"] for e in mine)


def test_question_after_the_input_makes_compression_question_aware(runtime, default_engine):
    asked = P.SemanticFunction(
        "Notes: {{input:notes|compress=0.4}}\nUser: {{input:who}}\nAnswer: {{output:answer|max_tokens=2}}",
        name="asked",
    )
    with P.Session(runtime):
        out = asked(NOTES, "Tell me, what is the vault code?")
        out.get()
    call = runtime.graph.calls[out.producer]
    per_input = call.compression["inputs"]["notes"]
    assert per_input["question"] == "Tell me, what is the vault code?"  # its field label left out
    # The budget is the rate of the input's own tokens; the question is not spliced in with it.
    original = len(default_engine.tokenizer.encode(NOTES, add_bos=False))
    assert per_input["original_tokens"] == original
    assert abs(per_input["compressed_tokens"] - round(0.4 * original)) <= max(3, 0.15 * 0.4 * original)
    assert "vault code?" not in call.compressed_inputs["notes"]
    # No question after the input: plain (question-free) compression, as before.
    plain = P.SemanticFunction(MARKED, name="marked")
    with P.Session(runtime):
        out = plain(NOTES)
        out.get()
    assert "question" not in runtime.graph.calls[out.producer].compression["inputs"]["notes"]


def test_short_inputs_pass_unchanged(runtime):
    marked = P.SemanticFunction(MARKED, name="marked")
    with P.Session(runtime):
        out = marked("a few words")
        out.get()
    call = runtime.graph.calls[out.producer]
    assert call.compressed_inputs == {"notes": "a few words"} and call.compression["ratio"] == 1.0


# ----------------------------------------------------------------------------- over HTTP
def test_compression_over_http_and_in_the_dag_json(live_server):
    key = live_server.new_tenant("compression")
    function = {"name": "answer", "template": MARKED}
    with live_server.client(key) as c:
        sid = c.post("/api/v1/sessions").json()["session_id"]
        r = c.post(f"/api/v1/sessions/{sid}/calls", json={"calls": [
            {"call_id": "call-c1", "function": function, "constants": {"notes": NOTES}, "outputs": {"answer": "var-c1"}},
        ]})
        assert r.status_code == 201, r.text
        assert c.get(f"/api/v1/sessions/{sid}/variables/var-c1", params={"timeout": 60}).json()["ready"]
        dag = c.get(f"/api/v1/sessions/{sid}/dag").json()
        (call,) = dag["calls"]
        assert call["compress"] == {"notes": 0.4}
        stats = call["compression"]
        assert stats["original_tokens"] > stats["compressed_tokens"] > 0
        assert stats["ratio"] == pytest.approx(stats["original_tokens"] / stats["compressed_tokens"], rel=1e-3)
        assert call["prefill_tokens"] + call["cached_tokens"] < stats["original_tokens"]

        # Bad options: 422 with the field (and the position, for the template).
        bad = {"name": "bad", "template": "x {{input:a|compress=abc}} {{output:y}}"}
        r = c.post(f"/api/v1/sessions/{sid}/calls", json={"calls": [{"function": bad, "constants": {"a": "t"}}]})
        err = r.json()["error"]
        assert r.status_code == 422 and err["type"] == "TemplateError" and err["position"] == 2
        assert "'abc' is not a number" in err["message"]
        bad = {"name": "bad", "template": MARKED, "compress": {"nope": 0.3}}
        r = c.post(f"/api/v1/sessions/{sid}/calls", json={"calls": [{"function": bad, "constants": {"notes": "t"}}]})
        err = r.json()["error"]
        assert r.status_code == 422 and err["field"] == "calls.0.function.compress.nope"
        r = c.post("/api/v1/functions", json={"name": "f", "template": PLAIN, "compress": {"notes": 7}})
        assert r.status_code == 422 and r.json()["error"]["field"] == "compress.notes"


def test_sdk_function_option_reaches_the_server(live_server):
    @P.semantic_function(max_tokens=2, compress={"text": "2x"})
    def summarize(text: P.Input, summary: P.Output):
        """Summarize: {{input:text}} Summary: {{output:summary}}"""

    runtime = HttpRuntime(live_server.url, api_key=live_server.new_tenant("compression-sdk"))
    with P.Session(runtime) as s:
        out = summarize(NOTES)
        out.get()
        sid = s.id
    with live_server.client(runtime.api_key) as c:
        (call,) = c.get(f"/api/v1/sessions/{sid}/dag").json()["calls"]
    assert call["compress"] == {"text": 0.5}
    assert call["compression"]["ratio"] == pytest.approx(2.0, rel=0.2)
