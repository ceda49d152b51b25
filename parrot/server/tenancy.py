"""Tenants, API keys and quotas.

API keys are random tokens shown once; only their SHA-256 is kept. Every
object belongs to a tenant, and a request for another tenant's object is
answered as if it did not exist (404), so ids leak nothing.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Iterable

# The errors live with the others in semantic_vars, so the SDK raises the same classes.
from parrot.semantic_vars import AuthenticationError, PromptTooLongError, QuotaExceededError

__all__ = ["AuthenticationError", "PromptTooLongError", "QuotaExceededError", "QuotaMeter", "Quotas", "Tenant",
           "hash_key", "new_api_key"]


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def new_api_key() -> str:
    return "pk-" + secrets.token_urlsafe(32)


@dataclass
class Quotas:
    """Limits of one tenant; ``None`` is unlimited."""

    max_concurrent_calls: int | None = None
    tokens_per_minute: int | None = None
    max_prompt_tokens: int | None = None


@dataclass
class Tenant:
    id: str
    name: str
    quotas: Quotas = field(default_factory=Quotas)

    def record(self) -> dict:
        return {"id": self.id, "name": self.name, "quotas": asdict(self.quotas)}

    @classmethod
    def from_record(cls, r: dict) -> "Tenant":
        return cls(r["id"], r["name"], Quotas(**r["quotas"]))


class QuotaMeter:
    """Live usage of one tenant: calls in flight, the tokens they may still
    use, and the tokens used in the last minute.

    ``tokens_per_minute`` is checked against the worst case: a call is
    admitted only if the tokens used in the last minute, plus what the calls
    in flight have reserved, plus this call's own worst case (its prompt and
    every output's ``max_tokens``) fit the limit. When a call ends its
    reservation is replaced by what it really used.
    """

    WINDOW = 60.0

    def __init__(self) -> None:
        self.in_flight: set[str] = set()  # call ids not yet finished
        self.reserved: dict[str, int] = {}  # call id -> worst-case tokens, while in flight
        self._tokens: deque[tuple[float, int]] = deque()

    def tokens_last_minute(self, now: float) -> int:
        while self._tokens and self._tokens[0][0] <= now - self.WINDOW:
            self._tokens.popleft()
        return sum(n for _, n in self._tokens)

    def check(self, quotas: Quotas, new_calls: int, new_tokens: int = 0) -> None:
        """Raise :class:`QuotaExceededError` if ``new_calls`` more, which may
        use up to ``new_tokens`` tokens, would exceed a quota."""
        now = time.monotonic()
        if quotas.max_concurrent_calls is not None and len(self.in_flight) + new_calls > quotas.max_concurrent_calls:
            raise QuotaExceededError(
                f"{len(self.in_flight)} calls in flight and {new_calls} more asked; the limit is {quotas.max_concurrent_calls}",
                field="max_concurrent_calls",
                retry_after=1.0,
            )
        limit = quotas.tokens_per_minute
        if limit is None:
            return
        if new_tokens > limit:
            raise QuotaExceededError(
                f"the request may use up to {new_tokens} tokens (prompt and max_tokens); the limit is {limit} "
                "tokens per minute: lower max_tokens",
                field="tokens_per_minute",
                retry_after=self.WINDOW,
            )
        used, held = self.tokens_last_minute(now), sum(self.reserved.values())
        if used + held + new_tokens > limit:
            oldest = self._tokens[0][0] if self._tokens else now
            raise QuotaExceededError(
                f"used {used} tokens in the last minute and {held} are reserved by calls in flight; this request "
                f"may use up to {new_tokens}; the limit is {limit}",
                field="tokens_per_minute",
                retry_after=max(1.0, oldest + self.WINDOW - now if self._tokens else 1.0),
            )

    def admit(self, reservations: dict[str, int]) -> None:
        """Count calls as in flight, holding their worst-case tokens."""
        self.in_flight.update(reservations)
        self.reserved.update(reservations)

    def release(self, call_ids: Iterable[str]) -> None:
        """Forget calls that never ran (their batch was refused)."""
        for call_id in call_ids:
            self.in_flight.discard(call_id)
            self.reserved.pop(call_id, None)

    def finish(self, call_id: str, used: int) -> None:
        """A call ended: its reservation becomes the tokens it really used."""
        self.in_flight.discard(call_id)
        self.reserved.pop(call_id, None)
        self.record_tokens(used)

    def record_tokens(self, n: int) -> None:
        if n > 0:
            self._tokens.append((time.monotonic(), n))
