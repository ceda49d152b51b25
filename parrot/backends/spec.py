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
    ``model`` (a local Hugging Face folder, a ``.gguf`` file or a model name;
    default ``$PARROT_MODEL``, else the default model, see
    :func:`~parrot.backends.models.resolve_model`) and ``device`` (default: CUDA if visible, else
    CPU); ``max_running`` bounds its batch, ``max_step_tokens`` the tokens
    of one engine step (prefill chunks and decodes together: a small cap
    keeps decode steps short, a large one batches more prefill), and
    ``prefix_cache=False`` turns the engine's automatic prefix cache off.

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
    kv_cache_bytes: int | None = None  # torch: KV pool size (default: $PARROT_KV_CACHE_BYTES, else the engine's)
    max_model_len: int | None = None  # torch: longest context (default: $PARROT_MAX_MODEL_LEN, else the model's)
    max_step_tokens: int | None = None  # torch: tokens per engine step (default: the engine's, 2048)
    prefix_cache: bool = True  # torch: False turns the automatic prefix cache off
    # torch: a sparse prefill pattern JSON (parrot.backends.sparse_calibration writes one)
    sparse_config: str | None = None
    process: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("torch", "remote"):
            raise ValueError(f"engine kind must be 'torch' or 'remote', got {self.kind!r}")
        if self.kind == "remote" and not self.url:
            raise ValueError(f"remote engine {self.name!r} needs a url")
        if self.max_running is not None and self.max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {self.max_running}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be > 0, got {self.kv_cache_bytes}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.max_step_tokens is not None and self.max_step_tokens < 1:
            raise ValueError(f"max_step_tokens must be >= 1, got {self.max_step_tokens}")

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
        sizes = engine_sizes_from_env()
        options = {"max_running": self.max_running, "kv_cache_bytes": self.kv_cache_bytes or sizes["kv_cache_bytes"],
                   "max_model_len": self.max_model_len or sizes["max_model_len"],
                   "max_step_tokens": self.max_step_tokens, "sparse_prefill": self.sparse_config}
        config = TorchEngineConfig(prefix_cache=self.prefix_cache,
                                   **{k: v for k, v in options.items() if v is not None})
        if self.process:
            from .process_engine import ProcessEngine

            return ProcessEngine(str(folder), config=config, device=self.device, name=self.name)
        return TorchEngine.from_pretrained(folder, device=self.device, name=self.name, config=config)


_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30}


def parse_bytes(text: str | int) -> int:
    """A size in bytes from ``1073741824``, ``512MiB``, ``1.5GiB`` or ``2G``; ``ValueError`` otherwise."""
    if isinstance(text, int):
        return text
    raw = text.strip().lower().replace(" ", "")
    number = raw.rstrip("kmgib")
    unit = raw[len(number):]
    try:
        value = float(number) * _UNITS[unit]
    except (KeyError, ValueError):
        raise ValueError(f"{text!r} is not a size: give bytes, or a number with KiB, MiB or GiB") from None
    if value <= 0:
        raise ValueError(f"{text!r}: a size must be > 0")
    return int(value)


def engine_sizes_from_env() -> dict[str, int | None]:
    """``PARROT_KV_CACHE_BYTES`` and ``PARROT_MAX_MODEL_LEN``, parsed (``None`` when unset)."""
    kv, length = os.environ.get("PARROT_KV_CACHE_BYTES"), os.environ.get("PARROT_MAX_MODEL_LEN")
    try:
        kv_bytes = parse_bytes(kv) if kv else None
    except ValueError as exc:
        raise ValueError(f"PARROT_KV_CACHE_BYTES: {exc}") from None
    if length and not (length.isdigit() and int(length) >= 1):
        raise ValueError(f"PARROT_MAX_MODEL_LEN must be a token count >= 1, got {length!r}")
    return {"kv_cache_bytes": kv_bytes, "max_model_len": int(length) if length else None}


__all__ = ["EngineKind", "EngineSpec", "engine_sizes_from_env", "parse_bytes"]
