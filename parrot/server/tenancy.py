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
    """Live usage of one tenant: calls in flight and tokens in the last minute."""

    WINDOW = 60.0

    def __init__(self) -> None:
        self.in_flight: set[str] = set()  # call ids not yet finished
        self._tokens: deque[tuple[float, int]] = deque()

    def tokens_last_minute(self, now: float) -> int:
        while self._tokens and self._tokens[0][0] <= now - self.WINDOW:
            self._tokens.popleft()
        return sum(n for _, n in self._tokens)

    def check(self, quotas: Quotas, new_calls: int) -> None:
        """Raise :class:`QuotaExceededError` if ``new_calls`` more would exceed a quota."""
        now = time.monotonic()
        if quotas.max_concurrent_calls is not None and len(self.in_flight) + new_calls > quotas.max_concurrent_calls:
            raise QuotaExceededError(
                f"{len(self.in_flight)} calls in flight and {new_calls} more asked; the limit is {quotas.max_concurrent_calls}",
                field="max_concurrent_calls",
                retry_after=1.0,
            )
        if quotas.tokens_per_minute is not None and self.tokens_last_minute(now) >= quotas.tokens_per_minute:
            oldest = self._tokens[0][0] if self._tokens else now
            raise QuotaExceededError(
                f"used {self.tokens_last_minute(now)} tokens in the last minute; the limit is {quotas.tokens_per_minute}",
                field="tokens_per_minute",
                retry_after=max(1.0, oldest + self.WINDOW - now),
            )

    def record_tokens(self, n: int) -> None:
        if n > 0:
            self._tokens.append((time.monotonic(), n))
