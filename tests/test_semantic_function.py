"""Declaring and calling semantic functions: signatures, options, bad calls."""

import pytest

import parrot as P
from parrot.semantic_vars import SamplingConfig


@P.semantic_function(max_tokens=20, temperature=0.5, seed=3)
def qa(question: P.Input, answer: P.Output, note: P.Output(max_tokens=5, stop=["."])):
    """Q: {{input:question}}
    A: {{output:answer}}
    Note: {{output:note|temperature=0}}"""


def test_signature_and_per_output_sampling():
    assert qa.input_names == ("question",)
    assert qa.output_names == ("answer", "note")
    assert qa.output_sampling["answer"] == SamplingConfig(max_tokens=20, temperature=0.5, seed=3)
    # decorator < Output(...) annotation < template option
    assert qa.output_sampling["note"] == SamplingConfig(max_tokens=5, temperature=0.0, stop=(".",), seed=3)


def test_docstring_is_dedented_into_the_template():
    assert qa.template.source.startswith("Q: {{input:question}}\nA: ")


def test_function_from_a_template_string():
    fn = P.SemanticFunction("Say {{input:x}}: {{output:y|max_tokens=3}}", name="say")
    assert fn.output_sampling["y"].max_tokens == 3
    assert fn.input_names == ("x",)


def test_parameter_missing_from_template():
    with pytest.raises(P.TemplateError, match="'extra' does not appear"):

        @P.semantic_function
        def f(x: P.Input, extra: P.Input, y: P.Output):
            """{{input:x}} {{output:y}}"""


def test_template_name_missing_from_signature():
    with pytest.raises(P.TemplateError, match="uses output 'z'") as info:

        @P.semantic_function
        def f(x: P.Input, y: P.Output):
            """{{input:x}} {{output:y}} {{output:z}}"""

    assert info.value.position == 25


def test_unannotated_parameter_and_missing_docstring():
    with pytest.raises(TypeError, match="must be annotated"):

        @P.semantic_function
        def f(x, y: P.Output):
            """{{input:x}} {{output:y}}"""

    with pytest.raises(P.TemplateError, match="no docstring"):

        @P.semantic_function
        def g(y: P.Output): ...


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"stop": [""]}, "stop"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_bad_sampling_options_name_the_field(kwargs, field):
    with pytest.raises(P.SamplingConfigError) as info:
        P.semantic_function(**kwargs)
    assert info.value.field == field


def test_bad_options_inside_the_template():
    with pytest.raises(P.TemplateError, match="unknown option 'colour'"):
        P.SemanticFunction("{{output:y|colour=red}}")
    with pytest.raises(P.TemplateError, match="not a valid max_tokens"):
        P.SemanticFunction("{{output:y|max_tokens=lots}}")
    with pytest.raises(P.TemplateError, match="unknown option 'rate' for input"):
        P.SemanticFunction("{{input:x|rate=2}} {{output:y}}")


def test_calling_outside_a_session_is_a_typed_error():
    with pytest.raises(P.NoActiveSessionError):
        qa("why?")


def test_bad_bindings_are_rejected_before_anything_is_submitted(runtime):
    with P.Session(runtime) as s:
        with pytest.raises(TypeError, match="missing input"):
            qa()
        with pytest.raises(TypeError, match="unexpected input 'nope'"):
            qa("q", nope="x")
        with pytest.raises(TypeError, match="is an output"):
            qa(question="q", answer="x")
        with pytest.raises(TypeError, match="must be a str or a SemanticVariable"):
            qa(42)
    assert runtime.graph.calls == {}
    assert runtime.client_requests["submit"] == 0


def test_a_closed_session_takes_no_calls(runtime):
    with P.Session(runtime) as s:
        pass
    with pytest.raises(P.SessionClosedError):
        s.variable("x")
