"""Constrained decoding on the embedded random model: the constraint, not the
model, guarantees the shape. Engine level (masks inside a shared batch,
logprobs against a transformers forward, the grammar cache), the SDK
(``P.Output(choices=/regex=/schema=)``, template options, ``get_parsed``) and
the typed errors for bad constraints."""

from __future__ import annotations

import asyncio
import json
import pickle
import re
from typing import Literal

import jsonschema
import pytest

from structured_schema import SCHEMA
from pydantic import BaseModel, Field

import parrot as P
from parrot.backends.constraints import compiler_for
from parrot.backends.engine import Fill, Gen, GenerationRequest
from parrot.semantic_vars import Constraint, ConstraintError, SamplingConfig, TemplateError

SEEDS = range(12)


class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)
    colour: Literal["red", "green", "blue"]


def _run(engine, requests):
    async def go():
        streams = [engine.submit(r) for r in requests]
        return [await s.results() for s in streams]

    return asyncio.run(go())


def _request(engine, prompt: str, sampling: SamplingConfig) -> GenerationRequest:
    return GenerationRequest([Fill(tuple(engine.tokenizer.encode(prompt, add_bos=True))), Gen(sampling, name="out")])


def test_constrained_and_free_rows_share_a_batch(default_engine):
    """One batch mixes free greedy rows and constrained rows of every kind:
    the free rows give what they give alone, the constrained rows their shape."""
    free = SamplingConfig(max_tokens=24)
    alone = _run(default_engine, [_request(default_engine, "The cat sat", free)])[0][0][0]
    kinds = [Constraint.choices(["yes", "no", "maybe so"]), Constraint.regex(r"[0-9]{3}-[a-z]{2,5}"),
             Constraint.json_schema(SCHEMA), Constraint.grammar('root ::= "(" [a-c]+ ")"')]
    requests = [_request(default_engine, "The cat sat", free)]
    for seed in range(4):
        for c in kinds:
            requests.append(_request(default_engine, f"Q{seed}:", SamplingConfig(max_tokens=80, temperature=1.0, seed=seed, constraint=c)))
    results = _run(default_engine, requests)
    assert results[0][0][0].text == alone.text
    for i, (res, _) in enumerate(results[1:]):
        c, out = kinds[i % len(kinds)], res[0]
        assert out.finish_reason == "eos", out
        if c.kind == "choices":
            assert out.text in c.spec
        elif c.kind == "regex":
            assert re.fullmatch(c.spec, out.text), out.text
        elif c.kind == "json_schema":
            jsonschema.validate(json.loads(out.text), SCHEMA)
        else:
            assert re.fullmatch(r"\([a-c]+\)", out.text), out.text


def test_logprobs_match_a_transformers_forward(default_engine, default_model_dir):
    """The engine's per-token logprobs are the model's: a teacher-forced
    transformers forward over prompt + output gives the same numbers, and at
    temperature 0 the chosen token is the top alternative."""
    import torch
    from transformers import AutoModelForCausalLM

    prompt = default_engine.tokenizer.encode("Logprobs are", add_bos=True)
    sampling = SamplingConfig(max_tokens=8, logprobs=3)
    (res, _), = _run(default_engine, [GenerationRequest([Fill(tuple(prompt)), Gen(sampling)])])
    out = res[0]
    assert len(out.logprobs) == len(out.token_ids) > 0
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, torch_dtype=torch.float32)
    ids = torch.tensor([prompt + list(out.token_ids)])
    with torch.no_grad():
        ref = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    for k, entry in enumerate(out.logprobs):
        row = ref[len(prompt) - 1 + k]
        assert entry.token_id == out.token_ids[k]
        assert entry.logprob == pytest.approx(row[entry.token_id].item(), abs=1e-3)
        assert [t for t, _ in entry.top] == row.topk(3).indices.tolist()
        assert entry.top[0] == (entry.token_id, pytest.approx(entry.logprob, abs=1e-6))


def test_grammars_compile_once_per_tokenizer_and_constraint(default_engine):
    compiler = compiler_for(default_engine.tokenizer, default_engine.model.config.vocab_size)
    c = Constraint.regex(r"z[0-9]{2}q")
    before = compiler.compiled
    compiler.compile(c)
    compiler.compile(Constraint.regex(r"z[0-9]{2}q", field="elsewhere"))  # equal constraint, same entry
    assert compiler.compiled == before + 1


def test_constraints_survive_pickling_and_the_wire_form():
    for c in [Constraint.choices(["a", "b"]), Constraint.regex("x+"), Constraint.json_schema(Person),
              Constraint.json_object(), Constraint.grammar('root ::= "a"'), Constraint.json_schema(SCHEMA, strict=False)]:
        config = SamplingConfig(max_tokens=9, constraint=c, logprobs=2)
        assert pickle.loads(pickle.dumps(config)) == config
        assert SamplingConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    # The JSON schema keeps its property order: it is the order the output is written in.
    assert list(Constraint.json_schema(SCHEMA).schema["properties"]) == list(SCHEMA["properties"])


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: P.Output(choices=[]), "Output.choices"),
        (lambda: P.Output(choices=["a", "a"]), "Output.choices"),
        (lambda: P.Output(choices=["a", 3]), "Output.choices.1"),
        (lambda: P.Output(regex="[a-"), "Output.regex"),
        (lambda: P.Output(schema={"type": 5}), "Output.json_schema.type"),
        (lambda: P.Output(schema=[1]), "Output.json_schema"),
        (lambda: P.Output(grammar="x ::= 'a'"), "Output.grammar"),
        (lambda: P.Output(choices=["a"], regex="a"), "Output"),
        (lambda: SamplingConfig(constraint={"regex": "a", "choices": ["b"]}), "constraint"),
        (lambda: SamplingConfig(constraint={"pattern": "a"}), "constraint.pattern"),
        (lambda: SamplingConfig(logprobs=21), "logprobs"),
    ],
)
def test_bad_constraints_are_typed_errors_naming_the_field(make, field):
    with pytest.raises(P.SamplingConfigError) as e:
        make()
    assert e.value.field == field


def test_a_constraint_the_grammar_library_rejects_fails_at_submit(default_engine):
    # Python's re accepts a lookahead; xgrammar does not: a ConstraintError at
    # submit, for this request only.
    bad = SamplingConfig(constraint=Constraint.regex(r"(?=a)ab"))

    async def submit():
        default_engine.submit(_request(default_engine, "x", bad))

    with pytest.raises(ConstraintError) as e:
        asyncio.run(submit())
    assert e.value.field == "constraint.regex" and "Lookahead" in str(e.value)


def test_template_constraint_options():
    fn = P.SemanticFunction("Pick: {{output:a|choices=red, green,blue}} then {{output:b|max_tokens=9|regex=(x|y){2}|z}}")
    assert fn.output_sampling["a"].constraint == Constraint.choices(["red", "green", "blue"])
    assert fn.output_sampling["b"].constraint == Constraint.regex("(x|y){2}|z")
    assert fn.output_sampling["b"].max_tokens == 9
    with pytest.raises(TemplateError):
        P.SemanticFunction("{{output:a|choices=a,,b}}")
    with pytest.raises(TemplateError):
        P.SemanticFunction("{{output:a|regex=[}}")


@P.semantic_function(max_tokens=60, temperature=1.0, seed=20261201)  # seeded: see the README on surrogates
def classify(text: P.Input, label: P.Output(choices=["positive", "negative", "neutral"]),
             code: P.Output(regex=r"[A-Z]{2}-[0-9]{2,4}"), flag: P.Output, person: P.Output(schema=Person),
             record: P.Output(schema=SCHEMA, max_tokens=100)):
    """Text: {{input:text}}
    Label: {{output:label}}
    Code: {{output:code}} ({{output:flag|choices=yes,no}})
    Person: {{output:person}}
    Record: {{output:record}}"""


def test_sdk_outputs_have_their_shape(runtime):
    with P.Session(runtime):
        calls = [classify(f"review number {i}") for i in SEEDS]
        for label, code, flag, person, record in calls:
            assert label.get() in ("positive", "negative", "neutral")
            assert re.fullmatch(r"[A-Z]{2}-[0-9]{2,4}", code.get()), code.get()
            assert flag.get() in ("yes", "no")
            parsed = person.get_parsed()
            assert isinstance(parsed, Person), parsed
            assert json.loads(person.get()) == parsed.model_dump()
            value = record.get_parsed()
            jsonschema.validate(value, SCHEMA)
            assert label.get_parsed() == label.get()  # no schema: the text


def test_penalties_and_logit_bias_move_the_logits():
    import torch

    from parrot.backends.sampler import apply_penalties

    logits = torch.zeros(3, 10)
    configs = [SamplingConfig(frequency_penalty=0.5, presence_penalty=1.0, logit_bias={2: 3.0, 9: -100}),
               SamplingConfig(), SamplingConfig(logit_bias=[(4, 1.5)])]
    apply_penalties(logits, configs, [[5, 5, 7], [5], [4]])
    expected = torch.zeros(3, 10)
    expected[0, 5], expected[0, 7], expected[0, 2], expected[0, 9] = -(2 * 0.5 + 1.0), -(0.5 + 1.0), 3.0, -100.0
    expected[2, 4] = 1.5
    assert torch.equal(logits, expected)
    config = SamplingConfig(logit_bias={"7": 2})
    assert config.logit_bias == ((7, 2.0),) and SamplingConfig.from_dict(config.to_dict()) == config
    with pytest.raises(P.SamplingConfigError) as e:
        SamplingConfig(frequency_penalty=3)
    assert e.value.field == "frequency_penalty"


def test_preempted_constrained_requests_keep_their_place_in_the_grammar(tiny_llama_dir):
    """Six constrained requests in a pool that holds about one: decoders
    preempt the newest, which resume later. Each matcher lives on its
    request, so a resumed request continues its grammar where it stopped and
    every output equals the one from an engine that never preempts."""
    from parrot.backends.torch_engine import TorchEngine, TorchEngineConfig

    sampling = SamplingConfig(max_tokens=34, constraint=Constraint.regex(r"[a-z]{30}"))
    prompts = ["Blocks of keys", "Values in fixed-size blocks for every token", "Requests that share a prompt",
               "A prefix", "Their blocks instead of computing", "Engines keep them"]
    roomy = TorchEngine.from_pretrained(tiny_llama_dir, device="cpu")
    try:
        expected = _run(roomy, [_request(roomy, p, sampling) for p in prompts])
        c = roomy.model.config
        per_block = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4 * roomy.config.block_size
    finally:
        roomy.close()
    small = TorchEngine.from_pretrained(tiny_llama_dir, device="cpu", config=TorchEngineConfig(
        max_model_len=64, kv_cache_bytes=per_block * 6, prefix_cache=False))
    try:
        got = _run(small, [_request(small, p, sampling) for p in prompts])
        assert small.counters.preemptions > 0
    finally:
        small.close()
    for (want, _), (res, _) in zip(expected, got):
        assert re.fullmatch(r"[a-z]{30}", res[0].text), res[0].text
        assert res[0].token_ids == want[0].token_ids
