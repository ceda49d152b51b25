"""Picklable recipes for engines.

An :class:`EngineSpec` is plain data, so it crosses process boundaries: a Ray
actor receives one and builds its engine on its own node (where the GPU and
the model folder are), and ``parrot serve`` builds in-process engines from
the same recipes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .engine import Engine

EngineKind = Literal["torch", "remote"]


@dataclass(frozen=True)
class EngineSpec:
    """How to build one engine.

    ``kind="torch"``: a :class:`~parrot.backends.torch_engine.TorchEngine` on
    ``model`` (a local Hugging Face folder, a ``.gguf`` file or a model name;
    default ``$PARROT_MODEL``, else the default model, see
    :func:`~parrot.backends.models.resolve_model`) and ``device`` (default: CUDA if visible, else
    CPU); ``max_running`` bounds its batch.

    ``kind="remote"``: a :class:`~parrot.backends.remote_engine.RemoteEngine`
    on the OpenAI-compatible server at ``url``, serving ``remote_model``
    (default: the first it lists), with ``api_key``; ``tokenizer`` is a local
    folder for exact token counts; ``max_running`` is its concurrency.
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

        from .models import resolve_model

        folder = resolve_model(self.model)  # None: $PARROT_MODEL, else the default model
        config = TorchEngineConfig(max_running=self.max_running) if self.max_running else None
        return TorchEngine.from_pretrained(folder, device=self.device, name=self.name, config=config)


__all__ = ["EngineKind", "EngineSpec"]
