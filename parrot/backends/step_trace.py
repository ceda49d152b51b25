"""An optional per-step trace of the torch engine, for profiling served runs.

``PARROT_STEP_TRACE=/some/prefix`` makes every torch engine started in the
process (and in child processes, which inherit the variable) append one JSON
line per step to ``/some/prefix-<engine>-<pid>.jsonl``: when the step began
and how long it took (monotonic seconds, so lines of one machine line up with
each other and with the requests' own stats), its decode and prefill tokens,
and each request's id, tokens this step and objective rank. Lines are
buffered and flushed every second, when the engine goes idle and at close, so tracing costs a few
microseconds per step. Off (no file) when the variable is unset.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import IO

from .engine_scheduler import StepPlan


class StepTrace:
    """Writes one line per engine step (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file: IO[str] | None = path.open("a", buffering=1 << 16)
        self._flushed = time.monotonic()

    @classmethod
    def from_env(cls, engine_name: str) -> "StepTrace | None":
        prefix = os.environ.get("PARROT_STEP_TRACE")
        if not prefix:
            return None
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in engine_name)
        return cls(Path(f"{prefix}-{safe}-{os.getpid()}.jsonl"))

    def record(self, started: float, plan: StepPlan) -> None:
        """One step that began at ``started`` and ended now."""
        if self._file is None:
            return
        now = time.monotonic()
        decode = sum(1 for item in plan.items if item.decoding)
        line = {"t": round(started, 6), "ms": round((now - started) * 1e3, 3), "decode": decode,
                "prefill": sum(item.tokens for item in plan.items if not item.decoding),
                "reqs": [[item.request.request_id, item.tokens, item.request.rank] for item in plan.items]}
        self._file.write(json.dumps(line, separators=(",", ":")) + "\n")
        if now - self._flushed > 1.0:
            self.flush()

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            self._flushed = time.monotonic()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


__all__ = ["StepTrace"]
