"""The template parser: placeholders, options, and every kind of bad input."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from parrot.semantic_vars import Placeholder, Template, TemplateError, Text


def test_parses_inputs_outputs_and_text_in_order():
    t = Template("Q: {{input:q}} and {{ input:ctx }}\nA: {{output:a}} then {{output:b}}.")
    assert t.inputs == ("q", "ctx")
    assert t.outputs == ("a", "b")
    kinds = [(type(s).__name__, getattr(s, "name", None)) for s in t.segments]
    assert kinds == [
        ("Text", None), ("Placeholder", "q"), ("Text", None), ("Placeholder", "ctx"),
        ("Text", None), ("Placeholder", "a"), ("Text", None), ("Placeholder", "b"), ("Text", None),
    ]
    assert t.constant_prefix == "Q: "


def test_an_input_may_be_quoted_twice():
    t = Template("{{input:x}} / {{input:x}} = {{output:y}}")
    assert t.inputs == ("x",)
    assert t.render({"x": "6", "y": "1"}) == "6 / 6 = 1"


def test_options_are_parsed_and_unescaped():
    t = Template("A: {{output:a|max_tokens=8|stop=\\n}}")
    p = t.placeholder("output", "a")
    assert isinstance(p, Placeholder)
    assert dict(p.options) == {"max_tokens": "8", "stop": "\n"}


def test_render_leaves_unknown_holes_visible():
    t = Template("Q: {{input:q}} A: {{output:a}}")
    assert t.render({"q": "why"}) == "Q: why A: {{output:a}}"


@pytest.mark.parametrize(
    "source, fragment, position",
    [
        ("Hello {{input:x} world {{output:y}}", "unclosed placeholder", 6),
        ("Hello {{input:x", "unclosed placeholder", 6),
        ("A {{x}} {{output:y}}", "malformed placeholder", 2),
        ("A {{prompt:x}} {{output:y}}", "unknown placeholder kind 'prompt'", 2),
        ("A {{input:9x}} {{output:y}}", "invalid variable name '9x'", 2),
        ("A {{input:}} {{output:y}}", "invalid variable name ''", 2),
        ("{{output:y}} {{output:y}}", "duplicate output 'y'", 13),
        ("{{input:y}} {{output:y}}", "both as an input and as an output", 12),
        ("{{output:y}} {{input:y}}", "both as an input and as an output", 13),
        ("{{output:y|max_tokens}}", "malformed option", 0),
        ("{{output:y|a=1|a=2}}", "given twice", 0),
    ],
)
def test_bad_templates_raise_with_position(source, fragment, position):
    with pytest.raises(TemplateError) as info:
        Template(source)
    assert fragment in str(info.value)
    assert info.value.position == position
    assert "line 1, column" in str(info.value)


def test_error_position_reports_line_and_column():
    with pytest.raises(TemplateError) as info:
        Template("first line\nsecond {{bogus:x}}\n{{output:y}}")
    assert "(line 2, column 8)" in str(info.value)


def test_a_template_without_outputs_is_rejected():
    with pytest.raises(TemplateError, match="no \\{\\{output"):
        Template("just {{input:x}}")


def test_non_string_template_is_rejected():
    with pytest.raises(TemplateError):
        Template(42)  # type: ignore[arg-type]


names = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)
texts = st.text(alphabet=st.characters(blacklist_characters="{}"), max_size=20)


@given(st.lists(st.tuples(texts, names), min_size=1, max_size=5, unique_by=lambda p: p[1]), texts)
def test_render_round_trips_generated_templates(parts, tail):
    source = "".join(f"{text}{{{{output:{name}}}}}" for text, name in parts) + tail
    t = Template(source)
    assert t.outputs == tuple(name for _, name in parts)
    assert t.render({}) == source
    values = {name: f"<{name}>" for _, name in parts}
    assert t.render(values) == "".join(f"{text}<{name}>" for text, name in parts) + tail
    assert all(isinstance(s, (Text, Placeholder)) for s in t.segments)
