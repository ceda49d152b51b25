"""The interface a :class:`~parrot.semantic_vars.session.Session` submits to.

A runtime is either in-process (:class:`parrot.dataflow.LocalRuntime`) or a
client of the HTTP service. Both take the same messages: a call carries its
function, its input bindings and the ids of its output variables, so the
client learns nothing it must wait for and the whole DAG is resolved on the
runtime's side.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

from .errors import InvalidArgumentError
from .portal import Portal
from .sampling import SamplingConfig

Perf = Literal["latency", "throughput"]
PERF_VALUES: tuple[Perf, ...] = ("latency", "throughput")


def check_perf(perf: str) -> Perf:
    """Validate a ``perf`` annotation."""
    if perf not in PERF_VALUES:
        raise InvalidArgumentError("perf", f"must be one of {', '.join(PERF_VALUES)}, got {perf!r}")
    return perf  # type: ignore[return-value]


def new_id(prefix: str) -> str:
    """A fresh, unguessable id such as ``var-3f2a...``."""
    return f"{prefix}-{uuid.uuid4().hex[:20]}"


@dataclass(frozen=True)
class FunctionSpec:
    """A semantic function as the runtime sees it: a template, per-output
    sampling and the inputs to compress (input name -> fraction of tokens to
    keep; the template's own ``compress=`` options are included).

    ``public_prefix`` marks a function the service's admin published for every
    tenant: the constant text its template starts with (a public app's system
    prompt) may then share its KV cache across tenants. Everything after that
    head stays scoped to the calling tenant.
    """

    name: str
    template: str
    output_sampling: Mapping[str, SamplingConfig]
    input_compression: Mapping[str, float] = field(default_factory=dict)
    public_prefix: bool = False
    # A chat exchange: the prompt is the model's chat template applied to the
    # system text, the earlier turns ``history`` ((role, content) pairs) and a
    # user turn holding the template up to its first output; the outputs are
    # the assistant's turn (see parrot.dataflow.program.build_request).
    chat: bool = False
    system: str | None = None
    history: tuple[tuple[str, str], ...] = ()

    def chat_messages(self) -> list[dict[str, str]]:
        """The messages before the templated user turn: the system text, then ``history``."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": role, "content": content} for role, content in self.history]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "template": self.template,
            "output_sampling": {k: v.to_dict() for k, v in self.output_sampling.items()},
            "input_compression": dict(self.input_compression),
            "public_prefix": self.public_prefix,
        }
        if self.chat:
            d |= {"chat": True, "system": self.system, "history": [list(turn) for turn in self.history]}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FunctionSpec":
        sampling = {k: SamplingConfig.from_dict(v) for k, v in d["output_sampling"].items()}
        # Records written before compression existed have no such key.
        compression = {k: float(v) for k, v in (d.get("input_compression") or {}).items()}
        return cls(name=d["name"], template=d["template"], output_sampling=sampling, input_compression=compression,
                   public_prefix=bool(d.get("public_prefix", False)), chat=bool(d.get("chat", False)),
                   system=d.get("system"), history=tuple((r, c) for r, c in d.get("history") or ()))


@dataclass(frozen=True)
class Call:
    """One call of a semantic function, as a runtime receives it. Every layer
    names it so: the dataflow keeps it as a node (``CallNode``), HTTP carries
    it as ``CallBody``, an engine runs it as a ``GenerationRequest``.

    ``inputs`` binds input names to variable ids, ``constants`` binds input
    names to literal text, ``outputs`` names the ids the outputs will get.
    """

    call_id: str
    function: FunctionSpec
    inputs: Mapping[str, str] = field(default_factory=dict)
    constants: Mapping[str, str] = field(default_factory=dict)
    outputs: Mapping[str, str] = field(default_factory=dict)


class Runtime(ABC):
    """Where sessions, variables and calls live. All methods are coroutines
    run on :attr:`portal`'s loop."""

    #: When True the SDK resolves every input on the client before submitting
    #: a call (the request-level baseline) instead of sending the DAG.
    request_level: bool = False
    #: When True a :class:`Session` opens with its first batch of calls
    #: (:meth:`open_session_with_calls`: one round trip to a remote runtime
    #: for both) instead of when its block is entered.
    opens_with_first_submit: bool = False

    def __init__(self, portal: Portal | None = None) -> None:
        self.portal = portal or Portal.shared()

    @abstractmethod
    async def open_session(self) -> str:
        """Open a session and return its id."""

    @abstractmethod
    async def close_session(self, session_id: str, *, cancel: bool = False) -> None:
        """Close a session: wait for its calls to finish, or cancel them."""

    @abstractmethod
    async def create_variable(self, session_id: str, var_id: str, name: str, value: str | None = None) -> None:
        """Declare a free variable, optionally with its value."""

    @abstractmethod
    async def set_variable(self, session_id: str, var_id: str, value: str) -> None:
        """Give a free variable its value (once)."""

    @abstractmethod
    async def submit_calls(self, session_id: str, calls: Sequence[Call]) -> None:
        """Add calls to the DAG in one message; each runs as soon as its
        inputs are set. Seeing them together lets the runtime group them."""

    async def open_session_with_calls(self, calls: Sequence[Call]) -> str:
        """Open a session and submit ``calls`` to it; its id. The default
        opens, then submits; a remote runtime does both in one request."""
        session_id = await self.open_session()
        if calls:
            await self.submit_calls(session_id, calls)
        return session_id

    @abstractmethod
    async def get_variable(self, session_id: str, var_id: str, perf: Perf = "latency") -> str:
        """Record the ``perf`` annotation on the DAG, then wait for the value."""

    async def shutdown(self) -> None:
        """Release engines and connections. The default does nothing."""
