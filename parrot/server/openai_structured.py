"""The structured parts of the OpenAI surface: ``response_format``, ``tools`` /
``tool_choice``, and the ``logprobs`` objects of responses.

Structured outputs are constrained decoding (:class:`~parrot.semantic_vars.Constraint`):
the engine masks every token that would leave the schema, so the shape holds
whatever the model is. Tool calls are JSON generated under a schema built
from the tools' ``parameters``:

* ``tool_choice`` a named function: the output is that function's arguments;
* ``"required"``: ``{"name": ..., "arguments": ...}`` for one of the tools;
* ``"auto"``: free text; it is a tool call when it is such an object (bare or
  in ``<tool_call>`` tags), else the message's content;
* ``"none"``: free text, and the tools are not shown to the model.

JSON is always decoded strictly (no properties the schema does not name),
whatever ``strict`` says: the text is valid under the schema either way.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Sequence

from parrot.semantic_vars import Constraint, ConstraintError, InvalidArgumentError, new_id

TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOOLS = 128
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def response_format_constraint(rf: dict[str, Any] | None) -> Constraint | None:
    """The constraint a chat ``response_format`` asks for (None for text)."""
    if rf is None:
        return None
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint.json_object(field="response_format")
    if kind != "json_schema":
        raise InvalidArgumentError("response_format.type", f"expected text, json_object or json_schema, got {kind!r}")
    spec = rf.get("json_schema")
    if not isinstance(spec, dict):
        raise InvalidArgumentError("response_format.json_schema", "must be an object with name and schema")
    name = spec.get("name")
    if not isinstance(name, str) or not TOOL_NAME.match(name):
        raise InvalidArgumentError("response_format.json_schema.name", "needs a name of letters, digits, _ and - (at most 64)")
    schema = spec.get("schema", {"type": "object"})
    try:
        return Constraint.json_schema(schema, field="response_format")
    except ConstraintError as exc:
        raise _renamed(exc, "response_format.json_schema", "response_format.json_schema.schema") from None


def _renamed(exc: ConstraintError, old: str, new: str) -> ConstraintError:
    """``exc`` with the start of its field path ``old`` written as ``new``."""
    rest = exc.field[len(old):] if exc.field.startswith(old) else ""
    return ConstraintError(new + rest, str(exc)[len(exc.field) + 2:])


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request uses its tools."""

    tools: dict[str, dict[str, Any]]  # name -> parameters schema
    descriptions: dict[str, str]
    mode: str  # "auto" | "required" | "named"
    named: str | None = None

    def constraint(self) -> Constraint | None:
        if self.mode == "named":
            return Constraint.json_schema(self.tools[self.named], field="tools")  # type: ignore[index]
        if self.mode == "required":
            options = [
                {"type": "object", "properties": {"name": {"const": n}, "arguments": p},
                 "required": ["name", "arguments"], "additionalProperties": False}
                for n, p in self.tools.items()
            ]
            schema = options[0] if len(options) == 1 else {"anyOf": options}
            return Constraint.json_schema(schema, field="tools")
        return None

    def system_note(self) -> str:
        """What the model is told about the tools (added to the system message)."""
        listed = [{"name": n, "description": self.descriptions.get(n, ""), "parameters": p} for n, p in self.tools.items()]
        return ("You can call these functions:\n" + json.dumps(listed, ensure_ascii=False)
                + '\nTo call one, reply with only {"name": <function name>, "arguments": <arguments object>}.')

    def calls(self, text: str) -> list[dict[str, Any]] | None:
        """The ``tool_calls`` of a generated text, or None when it is plain content."""
        if self.mode == "named":
            return [_tool_call(self.named, text)]  # type: ignore[arg-type]
        body = text.strip()
        tagged = re.fullmatch(r"<tool_call>\s*(.*?)\s*</tool_call>", body, re.DOTALL)
        if tagged:
            body = tagged.group(1)
        try:
            value = json.loads(body)
        except ValueError:
            return None
        if (isinstance(value, dict) and value.get("name") in self.tools and isinstance(value.get("arguments"), dict)):
            return [_tool_call(value["name"], json.dumps(value["arguments"], ensure_ascii=False))]
        return None


def _tool_call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": new_id("call"), "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_plan(tools: list[Any] | None, tool_choice: Any) -> ToolPlan | None:
    """Check ``tools`` and ``tool_choice``; None when no tool may be called."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise InvalidArgumentError("tool_choice", "a tool choice needs tools")
        return None
    if len(tools) > MAX_TOOLS:
        raise InvalidArgumentError("tools", f"at most {MAX_TOOLS} tools, got {len(tools)}")
    params: dict[str, dict[str, Any]] = {}
    descriptions: dict[str, str] = {}
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise InvalidArgumentError(f"{where}.type", "only function tools are supported")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise InvalidArgumentError(f"{where}.function", "must be an object with a name")
        name = fn.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise InvalidArgumentError(f"{where}.function.name", f"must be letters, digits, _ and - (at most 64), got {name!r}")
        if name in params:
            raise InvalidArgumentError(f"{where}.function.name", f"two tools are named {name!r}")
        schema = fn.get("parameters") or EMPTY_PARAMETERS
        try:
            Constraint.json_schema(schema)
        except ConstraintError as exc:
            raise _renamed(exc, "constraint.json_schema", f"{where}.function.parameters") from None
        params[name] = schema
        descriptions[name] = str(fn.get("description") or "")
    if tool_choice in (None, "auto"):
        return ToolPlan(params, descriptions, "auto")
    if tool_choice == "none":
        return None
    if tool_choice == "required":
        return ToolPlan(params, descriptions, "required")
    if isinstance(tool_choice, dict) and tool_choice.get("type", "function") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        if name not in params:
            raise InvalidArgumentError("tool_choice.function.name", f"no tool is named {name!r}")
        return ToolPlan(params, descriptions, "named", name)
    raise InvalidArgumentError("tool_choice", 'expected "none", "auto", "required" or {"type": "function", "function": {"name": ...}}')


def tool_messages(messages: Sequence[Any], plan: ToolPlan | None) -> list[dict[str, Any]]:
    """Messages with tool turns written as text (assistant ``tool_calls`` as
    the JSON the model would write, ``tool`` results as user turns), and the
    tools described in the system message when the model may call them."""
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        data = msg.model_dump(exclude_none=True)
        if msg.role == "tool":
            if not msg.tool_call_id:
                raise InvalidArgumentError(f"messages.{i}.tool_call_id", "a tool message needs the id of its call")
            content = msg.content if isinstance(msg.content, str) else "".join(p.text or "" for p in msg.content or [])
            data = {"role": "user", "content": f"<tool_response>{content}</tool_response>"}
        elif msg.role == "assistant" and msg.tool_calls:
            calls = []
            for j, call in enumerate(msg.tool_calls):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise InvalidArgumentError(f"messages.{i}.tool_calls.{j}.function", "needs a name and arguments")
                try:
                    args = json.loads(fn.get("arguments") or "{}")
                except ValueError:
                    raise InvalidArgumentError(f"messages.{i}.tool_calls.{j}.function.arguments", "is not JSON") from None
                calls.append(json.dumps({"name": fn["name"], "arguments": args}, ensure_ascii=False))
            text = msg.content if isinstance(msg.content, str) else ""
            data = {"role": "assistant", "content": text + "".join(f"<tool_call>{c}</tool_call>" for c in calls)}
        out.append(data)
    if plan is not None:
        note = plan.system_note()
        if out and out[0].get("role") in ("system", "developer") and isinstance(out[0].get("content"), str):
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + note}
        else:
            out.insert(0, {"role": "system", "content": note})
    return out


# -- logprobs ---------------------------------------------------------------
def _token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id])


def chat_logprobs(entries: Sequence[Any] | None, tokenizer: Any) -> dict[str, Any] | None:
    """A chat choice's ``logprobs`` object from the engine's per-token entries."""
    if entries is None:
        return None

    def item(token_id: int, logprob: float) -> dict[str, Any]:
        text = _token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]
    return {"content": content, "refusal": None}


def completion_logprobs(entries: Sequence[Any] | None, tokenizer: Any, offset: int = 0) -> dict[str, Any] | None:
    """A completion choice's (legacy) ``logprobs`` object."""
    if entries is None:
        return None
    tokens, offsets, position = [], [], offset
    for e in entries:
        text = _token_text(tokenizer, e.token_id)
        tokens.append(text)
        offsets.append(position)
        position += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{_token_text(tokenizer, t): lp for t, lp in e.top} for e in entries],
        "text_offset": offsets,
    }
