"""One request inside the torch engine: its sequence and the state that the
engine scheduler, the KV manager and the model runner keep about it."""

from __future__ import annotations

import torch

from .block_manager import BlockTable
from .constraints import RowGrammar
from .engine import RequestStream
from .prefix_cache import PrefixEntry
from .sampler import make_generator
from .sequence import Sequence


class EngineRequest:
    """A sequence plus the engine-side state of its stay in the engine.

    Worker-thread state, except where the engine's lock says otherwise.
    """

    def __init__(
        self,
        seq: Sequence,
        stream: RequestStream,
        device: torch.device,
        prefix: tuple[str, tuple[int, ...]] | None = None,
    ) -> None:
        self.seq = seq
        self.stream = stream
        self.device = device
        self.namespace = seq.request.namespace
        self.generators: dict[int, torch.Generator | None] = {}
        # The constrained current Gen's grammar matcher, with that Gen's
        # index. It lives here, not in the runner, so it survives preemption:
        # the request keeps its tokens and so its place in the grammar.
        self.grammar: tuple[int, RowGrammar] | None = None
        # Prefix-hint state (the KV manager's): the hint's key and tokens,
        # the store entry this request holds a reference on, whether it waits
        # for another request computing the prefix (parked), and whether it
        # is the one computing it.
        self.prefix = prefix
        self.prefix_entry: PrefixEntry | None = None
        self.parked = False
        self.computes = False
        self.gone = False  # it has left the engine (finished, failed, cancelled or closed)
        self.preempted = 0  # times sent back to the queue
        # In-flight prefix dedup (the KV manager's): digests of the full
        # blocks this request is computing that others may wait for, and the
        # digest it waits for itself (parked behind the request computing it).
        self.inflight: list[bytes] = []
        self.waits_for: bytes | None = None

    @property
    def request_id(self) -> str:
        return self.seq.request.request_id

    @property
    def rank(self) -> int:
        """Admission rank by the request's objective (lower is admitted first)."""
        return self.seq.request.rank

    @property
    def queued_tokens(self) -> int:
        """Context positions its admission will have to compute (at most)."""
        return len(self.seq.tokens) - self.table.length

    @property
    def table(self) -> BlockTable:
        return self.seq.kv  # type: ignore[return-value]

    def generator(self) -> torch.Generator | None:
        """The seeded generator of the current Gen (None: the global one)."""
        index = self.seq.gen_index
        if index not in self.generators:
            self.generators[index] = make_generator(self.seq.current_gen.sampling, self.device)
        return self.generators[index]
