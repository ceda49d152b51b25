"""Picklable recipes for engines.

An :class:`EngineSpec` is plain data, so it crosses process boundaries: a Ray
actor receives one and builds its engine on its own node (where the GPU and
the model folder are), and ``parrot serve`` builds in-process engines from
the same recipes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from .engine import Engine

EngineKind = Literal["torch", "remote"]


@dataclass(frozen=True)
class EngineSpec:
    """How to build one engine.

    ``kind="torch"``: a :class:`~parrot.backends.torch_engine.TorchEngine` on
    ``model`` (a local Hugging Face folder; default ``$PARROT_MODEL``, else
    the embedded test model) and ``device`` (default: CUDA if visible, else
    CPU); ``max_running`` bounds its batch.

    ``kind="remote"``: a :class:`~parrot.backends.remote_engine.RemoteEngine`
    on the OpenAI-compatible server at ``url``, serving ``remote_model``
    (default: the first it lists), with ``api_key``; ``tokenizer`` is a local
    folder for exact token counts; ``max_running`` is its concurrency.

    ``process=True`` (torch only): the engine runs in a child process behind
    a :class:`~parrot.backends.process_engine.ProcessEngine` proxy, so the
    caller's Python work never shares a GIL with its step loop.
    """

    name: str
    kind: EngineKind = "torch"
    model: str | None = None
    device: str | None = None
    max_running: int | None = None
    url: str | None = None
    remote_model: str | None = None
    api_key: str | None = None
    tokenizer: str | None = None
    process: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("torch", "remote"):
            raise ValueError(f"engine kind must be 'torch' or 'remote', got {self.kind!r}")
        if self.kind == "remote" and not self.url:
            raise ValueError(f"remote engine {self.name!r} needs a url")
        if self.max_running is not None and self.max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {self.max_running}")

    def build(self) -> Engine:
        """The engine, built here (in this process, on this node)."""
        if self.kind == "remote":
            from .remote_engine import RemoteEngine

            assert self.url is not None
            return RemoteEngine(self.url, model=self.remote_model, api_key=self.api_key, tokenizer=self.tokenizer,
                                max_concurrency=self.max_running or 16, name=self.name)
        from .torch_engine import TorchEngine, TorchEngineConfig

        model = self.model or os.environ.get("PARROT_MODEL")
        if not model:
            from .default_model import default_model_path

            model = str(default_model_path())
        config = TorchEngineConfig(max_running=self.max_running) if self.max_running else None
        if self.process:
            from .process_engine import ProcessEngine

            return ProcessEngine(os.path.expanduser(model), config=config, device=self.device, name=self.name)
        return TorchEngine.from_pretrained(os.path.expanduser(model), device=self.device, name=self.name, config=config)


__all__ = ["EngineKind", "EngineSpec"]
