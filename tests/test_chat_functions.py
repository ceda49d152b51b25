"""Chat-shaped semantic functions and prompt ends, on the embedded test model's real tokenizer."""

from __future__ import annotations

import pytest

import parrot as P
from parrot.backends import Fill, Gen
from parrot.backends.tokenizer import Tokenizer
from parrot.dataflow import build_request
from parrot.dataflow.program import output_value, space_led_outputs
from parrot.semantic_vars import FunctionSpec, InvalidArgumentError, SamplingConfig, Template


@pytest.fixture(scope="module")
def tokenizer(default_model_dir) -> Tokenizer:
    return Tokenizer(default_model_dir)


def _program(fn: P.SemanticFunction, tokenizer, **values):
    return build_request(fn.spec, fn.template, values, tokenizer, request_id="r").program


def test_a_chat_function_is_the_models_chat_template_with_bos_once(tokenizer):
    fn = P.SemanticFunction("Summarize: {{input:text}}\n{{output:summary}}", system="Be brief.")
    fill, gen = _program(fn, tokenizer, text="a long text")
    assert isinstance(fill, Fill) and isinstance(gen, Gen)
    expected = tokenizer.hf.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Summarize: a long text"}],
        tokenize=True, add_generation_prompt=True)["input_ids"]
    assert list(fill.token_ids) == list(expected)
    assert list(fill.token_ids).count(tokenizer.bos_token_id) == 1
    # A plain function gets BOS only as the tokenizer adds it itself (this one does not).
    [plain_fill, _] = _program(P.SemanticFunction("Summarize: {{input:text}}\n{{output:summary}}"), tokenizer,
                               text="a long text")
    assert (plain_fill.token_ids[0] == tokenizer.bos_token_id) == tokenizer.prompt_bos


def test_text_between_outputs_stays_in_the_assistant_turn(tokenizer):
    fn = P.SemanticFunction("Describe {{input:x}}.{{output:line}}\nTag:{{output:tag}}", chat=True)
    program = _program(fn, tokenizer, x="parrots")
    assert [type(step).__name__ for step in program] == ["Fill", "Gen", "Fill", "Gen"]
    head, tail = tokenizer.chat_frame()
    assert list(program[0].token_ids[: len(head)]) == head and list(program[0].token_ids[-len(tail):]) == tail
    assert list(program[2].token_ids) == tokenizer.encode("\nTag:")


def test_system_and_history_text_is_never_read_as_special_tokens(tokenizer):
    end = tokenizer.hf.convert_tokens_to_ids("<|end|>")
    head, _ = tokenizer.chat_frame([{"role": "system", "content": "say <|end|> twice"},
                                    {"role": "user", "content": "hi"}, {"role": "assistant", "content": "<|end|>"}])
    plain_head, _ = tokenizer.chat_frame()
    # The template writes <|end|> after each of the three turns; the texts' own never become the token.
    assert head.count(end) == 3 and plain_head.count(end) == 0
    assert "say <|end|> twice" in tokenizer.hf.decode(head)


def test_trailing_spaces_before_an_output_are_not_sent(tokenizer):
    fn = P.SemanticFunction("Q: capital of France?\nA: {{output:a}} and {{output:b}}\n{{output:c}}")
    program = _program(fn, tokenizer)
    assert list(program[0].token_ids) == tokenizer.encode("Q: capital of France?\nA:", add_bos=tokenizer.prompt_bos)
    assert list(program[2].token_ids) == tokenizer.encode(" and")
    assert list(program[4].token_ids) == tokenizer.encode("\n")  # a newline is a real separator: kept
    assert space_led_outputs(fn.template) == {"a", "b"}
    assert output_value(fn.template, "a", " Paris") == "Paris" and output_value(fn.template, "c", " x") == " x"
    # A released value fed back as text gets its space again.
    [fill, gen, *_] = build_request(fn.spec, fn.template, {}, tokenizer, request_id="r", fixed_outputs={"a": "Paris"}).program
    assert list(fill.token_ids[-len(tokenizer.encode(" Paris and")):]) == tokenizer.encode(" Paris and")


def test_chat_options_round_trip_and_are_checked():
    fn = P.SemanticFunction("{{input:q}}{{output:a}}", system="Be brief.", history=[("user", "hi"), ("assistant", "hello")])
    spec = FunctionSpec.from_dict(fn.spec.to_dict())
    assert spec == fn.spec and spec.chat and spec.chat_messages()[0] == {"role": "system", "content": "Be brief."}
    assert not FunctionSpec.from_dict(P.SemanticFunction("{{output:a}}").spec.to_dict()).chat
    with pytest.raises(InvalidArgumentError) as err:
        P.SemanticFunction("{{output:a}}", history=[("robot", "beep")])
    assert err.value.field == "history.0.role"


def test_chat_and_plain_prompts_of_the_same_text_never_share_a_prefix_key():
    from parrot.dataflow import DataflowGraph, PrefixIndex
    from parrot.semantic_vars import Call

    text = "A shared opening long enough to be a prefix boundary. {{input:x}}{{output:y}}"
    functions = {"plain": P.SemanticFunction(text).spec, "chat": P.SemanticFunction(text, chat=True).spec,
                 "chat2": P.SemanticFunction(text, chat=True).spec,
                 "system": P.SemanticFunction(text, system="Be brief.").spec}
    graph, index = DataflowGraph(), PrefixIndex(min_chars=32)
    keys = {}
    for name, spec in functions.items():
        node = graph.add_call("s", Call(name, spec, {}, {"x": "same"}, {"y": f"{name}.y"}))
        index.add(node, graph, "tenant")
        keys[name] = index.boundaries[name][0].key
    assert keys["chat"] == keys["chat2"]  # the same chat frame: shared
    assert len({keys["plain"], keys["chat"], keys["system"]}) == 3
