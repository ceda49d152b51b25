"""The SDK's HTTP runtime: the same programs, run by a Parrot server.

``HttpRuntime`` speaks the native API (``/api/v1``) with ``httpx``. Every
method is a coroutine run on the runtime's portal loop, like the in-process
runtime, and it sends the same messages: a batch of calls is ONE request
(``POST /api/v1/sessions/{sid}/calls``) carrying the client-chosen call and
output variable ids, so the server resolves the whole DAG and the program only
waits where it reads a value (a long-poll ``GET``).

Error answers come back as the SDK's typed exceptions, chosen by the
``error.type`` of the server's JSON body, so ``except P.TemplateError`` (or
``P.CallFailedError``, ``P.VariableAlreadySetError``, ...) works unchanged.
The service's own errors are the same classes (defined in
:mod:`parrot.semantic_vars.errors`): :class:`AuthenticationError` (401),
:class:`QuotaExceededError` (429, with ``retry_after``) and
:class:`PromptTooLongError` (413). A server that cannot
be reached raises :class:`ParrotConnectionError` naming the URL.

``httpx`` is imported only when a runtime is built, so ``import parrot``
stays free of it; this module imports nothing outside ``semantic_vars``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any, Mapping, NoReturn, Sequence
from urllib.parse import quote

from .errors import (
    AuthenticationError,
    CallFailedError,
    ConstraintError,
    ContextLengthError,
    DataflowCycleError,
    EngineError,
    InvalidArgumentError,
    ParrotError,
    PromptTooLongError,
    QuotaExceededError,
    SamplingConfigError,
    SessionClosedError,
    TemplateError,
    UnknownSessionError,
    UnknownVariableError,
    VariableAlreadySetError,
)
from .env import env_flag
from .portal import Portal
from .runtime import Call, FunctionSpec, Perf, Runtime, check_perf

API = "/api/v1"
#: Seconds the server holds one long-poll ``GET`` of a variable.
POLL_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0
#: Read timeout of ordinary requests (open, submit, set, ...).
REQUEST_TIMEOUT_S = 60.0
#: How long a waiting ``get`` keeps reconnecting to a server that dropped
#: it (a restart): the value is often there a few seconds later.
RECONNECT_S = 60.0
#: The server's limit on calls per submit request (``CallsSubmit.calls``).
MAX_CALLS_PER_REQUEST = 10_000


class ParrotConnectionError(ParrotError, ConnectionError):
    """The server could not be reached (refused, timed out, dropped)."""


class ServerError(ParrotError):
    """An answer the SDK has no typed error for (e.g. HTTP 5xx); ``status`` is its code."""

    def __init__(self, message: str, *, status: int, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.field = field


def _with_message(cls: type[BaseException], message: str, **attrs: Any) -> BaseException:
    """An instance of ``cls`` whose ``str()`` is exactly the server's message.

    The server's message is already final (``InvalidArgumentError`` prefixes
    its field, ``TemplateError`` adds line and column), so the constructors,
    which would format it again, are bypassed.
    """
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    for key, value in attrs.items():
        setattr(exc, key, value)
    return exc


#: ``error.type`` -> SDK class, for the types rebuilt with the server's message as is.
_PLAIN: dict[str, type[ParrotError]] = {
    "AuthenticationError": AuthenticationError,
    "VariableAlreadySetError": VariableAlreadySetError,
    "SessionClosedError": SessionClosedError,
    "DataflowCycleError": DataflowCycleError,
    "CallFailedError": CallFailedError,
    "EngineError": EngineError,
    "PromptTooLongError": PromptTooLongError,
}


def error_from_response(status: int, body: Any, headers: Mapping[str, str] | None = None, *, url: str = "") -> ParrotError:
    """The SDK exception for an error answer (status, parsed JSON body, headers)."""
    headers = headers or {}
    detail = body.get("error") if isinstance(body, dict) else None
    if not isinstance(detail, dict):
        text = body if isinstance(body, str) else repr(body)
        if status == 401:
            return AuthenticationError(f"the server at {url} refused the API key (HTTP 401)")
        return ServerError(f"HTTP {status} from {url}: {text[:500]}", status=status)
    kind = str(detail.get("type") or "")
    message = str(detail.get("message") or f"HTTP {status}")
    field = detail.get("field")
    position = detail.get("position")
    if kind == "TemplateError":
        return _with_message(TemplateError, message, position=position, template=None, field=field)
    if kind == "ConstraintError":
        return _with_message(ConstraintError, message, field=field or "constraint")
    if kind == "ContextLengthError":
        return _with_message(ContextLengthError, message, field=field or "request")
    if kind in ("SamplingConfigError", "InvalidArgumentError", "ValidationError"):
        # A pydantic answer about a sampling option (``calls.0.function.sampling.top_p``).
        sampling = kind == "SamplingConfigError" or (
            isinstance(field, str) and bool({"sampling", "output_sampling"} & set(field.split(".")))
        )
        cls = SamplingConfigError if sampling else InvalidArgumentError
        return _with_message(cls, message, field=field or "request")
    if kind == "UnknownSessionError":
        return UnknownSessionError(message, field=field)
    if kind == "UnknownVariableError":
        return UnknownVariableError(message, field=field)
    if kind == "QuotaExceededError" or status == 429:
        try:
            retry_after = float(headers.get("retry-after", "1"))
        except ValueError:
            retry_after = 1.0
        return QuotaExceededError(message, field=field, retry_after=retry_after)
    if kind in _PLAIN:
        return _with_message(_PLAIN[kind], message, field=field)
    if kind == "MalformedJSON":
        return _with_message(InvalidArgumentError, message, field="body")
    if status == 401:
        return _with_message(AuthenticationError, message)
    if status == 404:
        return UnknownVariableError(message, field=field)
    return ServerError(f"{kind or 'HTTP ' + str(status)}: {message}", status=status, field=field)


def function_body(spec: FunctionSpec) -> dict[str, Any]:
    """A :class:`FunctionSpec` as the server's inline ``function`` body."""
    body: dict[str, Any] = {
        "name": spec.name,
        "template": spec.template,
        "output_sampling": {
            name: {k: v for k, v in config.to_dict().items() if v is not None}
            for name, config in spec.output_sampling.items()
        },
    }
    if spec.input_compression:
        body["compress"] = dict(spec.input_compression)
    if spec.chat:
        body["chat"] = True
        if spec.system:
            body["system"] = spec.system
        if spec.history:
            body["history"] = [list(turn) for turn in spec.history]
    return body


def call_body(call: Call) -> dict[str, Any]:
    """A :class:`Call` as one entry of a submit request."""
    return {
        "call_id": call.call_id,
        "function": function_body(call.function),
        "inputs": dict(call.inputs),
        "constants": dict(call.constants),
        "outputs": dict(call.outputs),
    }


class HttpRuntime(Runtime):
    """A :class:`Runtime` that is a client of a Parrot server.

    ``url`` is the server's base URL (``http://host:8000``); ``api_key`` the
    tenant's key, sent as ``Authorization: Bearer``. ``requests`` counts the
    HTTP requests sent, by kind (``open_session``, ``create_variable``,
    ``set``, ``submit``, ``get`` -- one per long-poll --, ``close_session``).
    ``request_level`` (default: ``$PARROT_REQUEST_LEVEL``) makes the SDK
    resolve every input on the client, as with the in-process baseline.
    A session opens with its first batch of calls, in one request
    (``open_session`` then carries the batch; its ``id`` is None until then,
    unless it declares a free variable first).
    A waiting ``get`` whose server drops or refuses the connection (a
    restart) reconnects for up to ``reconnect_s`` seconds before it raises
    :class:`ParrotConnectionError`; other requests raise at once.
    ``client_options`` are extra keyword arguments of the runtime's
    ``httpx.AsyncClient``: ``event_hooks`` (coroutine functions run on every
    request and response, e.g. to trace or delay them), ``limits`` (httpx
    holds at most 100 connections by default; a program reading more
    outputs at once than that queues its long-polls), ``transport``, ...
    """

    opens_with_first_submit = True

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        portal: Portal | None = None,
        request_level: bool | None = None,
        poll_timeout: float = POLL_TIMEOUT_S,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        request_timeout: float = REQUEST_TIMEOUT_S,
        reconnect_s: float = RECONNECT_S,
        client_options: Mapping[str, Any] | None = None,
    ) -> None:
        import httpx  # here, not at module level: `import parrot` must not import httpx

        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise InvalidArgumentError("url", f"must be an http:// or https:// URL, got {url!r}")
        if not 0 < poll_timeout <= 300:
            raise InvalidArgumentError("poll_timeout", f"must be in (0, 300] seconds, got {poll_timeout}")
        super().__init__(portal)
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.request_level = env_flag("PARROT_REQUEST_LEVEL") if request_level is None else request_level
        self.poll_timeout = float(poll_timeout)
        if not reconnect_s >= 0:
            raise InvalidArgumentError("reconnect_s", f"must be >= 0 seconds, got {reconnect_s}")
        self.reconnect_s = float(reconnect_s)
        self.requests: Counter[str] = Counter()
        self._timeout = httpx.Timeout(request_timeout, connect=connect_timeout)
        # The long-poll's read timeout outlasts the server's hold of it.
        self._poll_http_timeout = httpx.Timeout(self.poll_timeout + request_timeout, connect=connect_timeout)
        # Closing a session waits for its calls, which may take long.
        self._close_http_timeout = httpx.Timeout(None, connect=connect_timeout)
        self.client_options = dict(client_options or {})
        self._client: Any = None  # httpx.AsyncClient, made on the portal loop

    def __repr__(self) -> str:
        return f"HttpRuntime({self.url!r})"

    # -- transport ---------------------------------------------------------
    def _http(self) -> Any:
        if self._client is None or self._client.is_closed:
            import httpx

            headers = {"Accept": "application/json", "User-Agent": "parrot-sdk"}
            if self.api_key:
                headers["Authorization"] = f"Bearer {self.api_key}"
            options = {"base_url": self.url, "headers": headers, "timeout": self._timeout, **self.client_options}
            self._client = httpx.AsyncClient(**options)
        return self._client

    async def _request(self, kind: str, method: str, path: str, *, timeout: Any = None, **kwargs: Any) -> Any:
        """Send one request; the parsed JSON of a 2xx answer, else the typed error."""
        import httpx

        self.requests[kind] += 1
        if timeout is not None:
            kwargs["timeout"] = timeout
        try:
            response = await self._http().request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ParrotConnectionError(
                f"the Parrot server at {self.url} did not answer {method} {path} in time ({type(exc).__name__})"
            ) from exc
        except httpx.TransportError as exc:
            raise ParrotConnectionError(f"cannot reach the Parrot server at {self.url}: {exc or type(exc).__name__}") from exc
        if response.is_success:
            try:
                return response.json()
            except ValueError as exc:
                raise ServerError(
                    f"{method} {path}: the server at {self.url} answered {response.status_code} with a non-JSON body",
                    status=response.status_code,
                ) from exc
        self._raise(response)

    def _raise(self, response: Any) -> NoReturn:
        try:
            body: Any = response.json()
        except ValueError:
            body = response.text
        raise error_from_response(response.status_code, body, response.headers, url=self.url)

    @staticmethod
    def _path(*parts: str) -> str:
        return API + "".join("/" + quote(p, safe="") for p in parts)

    # -- Runtime -------------------------------------------------------------
    async def open_session(self) -> str:
        body = await self._request("open_session", "POST", self._path("sessions"))
        return body["session_id"]

    async def open_session_with_calls(self, calls: Sequence[Call]) -> str:
        """Open a session with its first batch of calls in one request (the
        server submits them all or closes the session again); a batch larger
        than the per-request limit sends its rest in consecutive requests."""
        first, rest = calls[:MAX_CALLS_PER_REQUEST], calls[MAX_CALLS_PER_REQUEST:]
        body = await self._request("open_session", "POST", self._path("sessions"),
                                   json={"calls": [call_body(c) for c in first]})
        session_id = body["session_id"]
        if rest:
            await self.submit_calls(session_id, rest)
        return session_id

    async def close_session(self, session_id: str, *, cancel: bool = False) -> None:
        await self._request(
            "close_session", "DELETE", self._path("sessions", session_id),
            params={"cancel": "true" if cancel else "false"}, timeout=self._close_http_timeout,
        )

    async def create_variable(self, session_id: str, var_id: str, name: str, value: str | None = None) -> None:
        body: dict[str, Any] = {"var_id": var_id, "name": name}
        if value is not None:
            body["value"] = value
        await self._request("create_variable", "POST", self._path("sessions", session_id, "variables"), json=body)

    async def set_variable(self, session_id: str, var_id: str, value: str) -> None:
        await self._request(
            "set", "PUT", self._path("sessions", session_id, "variables", var_id), json={"value": value}
        )

    async def submit_calls(self, session_id: str, calls: Sequence[Call]) -> None:
        """All calls in one request (all or none are added); a batch larger than
        the server's per-request limit goes in consecutive requests."""
        bodies = [call_body(c) for c in calls]
        path = self._path("sessions", session_id, "calls")
        for start in range(0, len(bodies), MAX_CALLS_PER_REQUEST):
            await self._request("submit", "POST", path, json={"calls": bodies[start:start + MAX_CALLS_PER_REQUEST]})

    async def get_variable(self, session_id: str, var_id: str, perf: Perf = "latency") -> str:
        """Long-poll until the value exists; a failed producer raises
        :class:`CallFailedError` with the server's reason."""
        check_perf(perf)
        path = self._path("sessions", session_id, "variables", var_id)
        params = {"perf": perf, "timeout": f"{self.poll_timeout:g}"}
        lost_at: float | None = None  # when the server was last reachable, while it is not
        backoff = 0.05
        while True:
            try:
                state = await self._request("get", "GET", path, params=params, timeout=self._poll_http_timeout)
            except ParrotConnectionError:
                # Reading is idempotent: wait for a restarting server, within bounds.
                now = time.monotonic()
                lost_at = now if lost_at is None else lost_at
                if now - lost_at >= self.reconnect_s:
                    raise
                await asyncio.sleep(backoff)
                backoff = min(1.0, backoff * 2)
                continue
            lost_at, backoff = None, 0.05
            if state.get("ready"):
                return state["value"]
            if state.get("error") is not None:
                raise CallFailedError(f"variable {state.get('name', var_id)!r} will never be set: {state['error']}")

    async def shutdown(self) -> None:
        """Close the connection pool (the server keeps its sessions)."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def close(self) -> None:
        """:meth:`shutdown` from blocking code."""
        self.portal.call(self.shutdown())
