"""Llama-family decoder (Llama, Mistral, Qwen2) running on a flat token batch.

The forward takes the new tokens of every scheduled sequence concatenated
into one ``[N]`` tensor (see :mod:`parrot.backends.kv_cache`): the linear
layers run once over all ``N`` rows, and attention is left to the batch
description (:class:`~parrot.backends.kv_cache.KVBatch`), which knows where
each sequence's keys and values live (contiguous or paged).

Parameter layout differs from Hugging Face in one way: q/k/v and gate/up
projections are stored fused (one GEMM instead of three/two), and
:meth:`LlamaFamilyModel.load_state_dict_hf` maps HF names onto the slices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from parrot.backends.kv_cache import KVBatch
from parrot.kernels import layer_ops

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def _require(d: Mapping[str, Any], key: str, where: str = "config") -> Any:
    if d.get(key) is None:
        raise ValueError(f"{where} is missing required field {key!r}")
    return d[key]


def _normalise_rope(d: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Return ``(rope_theta, rope_scaling)`` from either config layout.

    transformers >= 5 writes ``rope_parameters: {"rope_type", "rope_theta", ...}``;
    transformers 4 writes top-level ``rope_theta`` plus ``rope_scaling`` whose
    kind is under ``rope_type`` or, in older files, ``type``.
    """
    params = d.get("rope_parameters")
    field_name = "rope_parameters"
    if params is None:
        params, field_name = d.get("rope_scaling"), "rope_scaling"
    params = dict(params or {})
    if params and all(isinstance(v, Mapping) for v in params.values()):
        # Per-layer-type rope (Gemma-style); no family we support uses it.
        raise ValueError(f"per-layer-type {field_name} is not supported: {sorted(params)}")

    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    partial = params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if partial is not None and float(partial) != 1.0:
        raise ValueError(f"partial_rotary_factor={partial} is not supported (must be 1.0)")

    rope_type = params.get("rope_type", params.get("type")) or "default"
    where = f"{field_name} (rope_type {rope_type!r})"
    if rope_type == "default":
        return theta, None
    if rope_type == "linear":
        return theta, {"rope_type": "linear", "factor": float(_require(params, "factor", where))}
    if rope_type == "llama3":
        scaling: dict[str, Any] = {"rope_type": "llama3"}
        for key in ("factor", "low_freq_factor", "high_freq_factor"):
            scaling[key] = float(_require(params, key, where))
        scaling["original_max_position_embeddings"] = int(
            _require(params, "original_max_position_embeddings", where)
        )
        return theta, scaling
    raise ValueError(
        f"unsupported rope type {rope_type!r} in {field_name}; supported: default, linear, llama3"
    )


@dataclass
class ModelConfig:
    """Architecture of a Llama-family checkpoint, normalised from ``config.json``.

    ``rope_scaling`` is ``None`` (plain RoPE), ``{"rope_type": "linear",
    "factor"}`` or ``{"rope_type": "llama3", "factor", "low_freq_factor",
    "high_freq_factor", "original_max_position_embeddings"}``.

    ``attention_bias`` is the q/k/v projection bias (always on for Qwen2);
    ``attention_out_bias`` the o_proj bias (Llama's ``attention_bias`` sets
    both). ``sliding_window`` is recorded from Mistral/Qwen2 configs but NOT
    applied: attention is always full causal, which matches the reference
    model only while sequences stay within the window.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    bos_token_id: int | None
    eos_token_ids: list[int] = field(default_factory=list)
    attention_out_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict (transformers 4 or 5 layout).

        Raises ``ValueError`` naming the offending field for an unsupported
        ``model_type``, activation or rope type, or a missing required field.
        """
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        hidden_act = d.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {hidden_act!r}; only 'silu' is supported")

        hidden = int(_require(d, "hidden_size"))
        num_heads = int(_require(d, "num_attention_heads"))
        num_kv_heads = int(d.get("num_key_value_heads") or num_heads)
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}"
            )
        head_dim = d.get("head_dim")
        if head_dim is None:
            if hidden % num_heads:
                raise ValueError(
                    f"head_dim is not set and hidden_size={hidden} is not divisible by "
                    f"num_attention_heads={num_heads}"
                )
            head_dim = hidden // num_heads
        rope_theta, rope_scaling = _normalise_rope(d)

        eos = d.get("eos_token_id")
        eos_ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]

        if model_type == "llama":
            qkv_bias = out_bias = bool(d.get("attention_bias", False))
            mlp_bias = bool(d.get("mlp_bias", False))
        else:
            qkv_bias, out_bias, mlp_bias = model_type == "qwen2", False, False

        if model_type == "mistral":
            sliding_window = d.get("sliding_window")
        elif model_type == "qwen2" and d.get("use_sliding_window"):
            sliding_window = d.get("sliding_window")
        else:
            sliding_window = None

        return cls(
            model_type=model_type,
            vocab_size=int(_require(d, "vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(_require(d, "intermediate_size")),
            num_layers=int(_require(d, "num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(d.get("max_position_embeddings") or 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            bos_token_id=None if d.get("bos_token_id") is None else int(d["bos_token_id"]),
            eos_token_ids=eos_ids,
            attention_out_bias=out_bias,
            mlp_bias=mlp_bias,
            sliding_window=None if sliding_window is None else int(sliding_window),
        )


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Per-pair rotary frequencies ``[head_dim // 2]`` (float32), scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    # llama3: leave high frequencies alone, divide low ones by ``factor``, and
    # blend linearly (in wavelength-ratio space) between the two bands.
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(is_medium, blended, scaled)




def _param(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    # Uninitialised on purpose: weights always come from a checkpoint, and
    # random init of a multi-billion-parameter model is slow for nothing.
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class _DecoderLayer(nn.Module):
    """Pre-norm attention + SwiGLU MLP block with fused qkv and gate/up weights."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        c = config
        self.q_size = c.num_heads * c.head_dim
        self.kv_size = c.num_kv_heads * c.head_dim
        h, i = c.hidden_size, c.intermediate_size
        self.input_norm = _param((h,), dtype, device)
        self.qkv_weight = _param((self.q_size + 2 * self.kv_size, h), dtype, device)
        self.qkv_bias = _param((self.q_size + 2 * self.kv_size,), dtype, device) if c.attention_bias else None
        self.o_weight = _param((h, self.q_size), dtype, device)
        self.o_bias = _param((h,), dtype, device) if c.attention_out_bias else None
        self.post_norm = _param((h,), dtype, device)
        self.gate_up_weight = _param((2 * i, h), dtype, device)
        self.gate_up_bias = _param((2 * i,), dtype, device) if c.mlp_bias else None
        self.down_weight = _param((h, i), dtype, device)
        self.down_bias = _param((h,), dtype, device) if c.mlp_bias else None


class LlamaFamilyModel(nn.Module):
    """Llama/Mistral/Qwen2 decoder over a flat batch with per-sequence KV caches.

    Parameters are allocated uninitialised; load them with
    :meth:`load_state_dict_hf` (or :func:`parrot.backends.checkpoint.load_model`).
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embed_weight = _param((c.vocab_size, c.hidden_size), dtype, device)
        self.layers = nn.ModuleList(_DecoderLayer(c, dtype, device) for _ in range(c.num_layers))
        self.final_norm = _param((c.hidden_size,), dtype, device)
        self.lm_head_weight = None if c.tie_word_embeddings else _param((c.vocab_size, c.hidden_size), dtype, device)
        # float32 and non-persistent: computed once from the config, never loaded.
        self.register_buffer("inv_freq", rope_inv_freq(c).to(device), persistent=False)

    # ------------------------------------------------------------------ forward

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: KVBatch) -> torch.Tensor:
        """Run the decoder on a flat batch; returns final-normed hidden states ``[N, hidden]``.

        ``positions[r]`` must equal the row's position in its sequence (RoPE
        reads ``positions``; the causal mask reads the batch's lengths). New
        keys/values are written to each sequence's cache; lengths are left
        for the caller to advance with ``batch.commit()``.
        """
        if batch.num_tokens != input_ids.shape[0]:
            raise ValueError(f"batch covers {batch.num_tokens} tokens but input_ids has {input_ids.shape[0]}")
        c = self.config
        rotary = layer_ops.Rotary(positions, self.inv_freq, self.embed_weight.dtype)
        residual = F.embedding(input_ids, self.embed_weight)
        x = layer_ops.rms_norm(residual, self.layers[0].input_norm, c.rms_norm_eps) if self.layers else residual
        for index, layer in enumerate(self.layers):
            qkv = F.linear(x, layer.qkv_weight, layer.qkv_bias)
            qk, v = qkv.split([layer.q_size + layer.kv_size, layer.kv_size], dim=-1)
            qk = rotary.apply(qk.view(-1, c.num_heads + c.num_kv_heads, c.head_dim))
            q, k = qk.split([c.num_heads, c.num_kv_heads], dim=1)
            v = v.view(-1, c.num_kv_heads, c.head_dim)
            attn = batch.attend(index, q, k, v)
            out = F.linear(attn.view(-1, layer.q_size), layer.o_weight, layer.o_bias)
            x, residual = layer_ops.add_rms_norm(out, residual, layer.post_norm, c.rms_norm_eps)
            gate_up = F.linear(x, layer.gate_up_weight, layer.gate_up_bias)
            out = F.linear(layer_ops.silu_mul(gate_up), layer.down_weight, layer.down_bias)
            # The next layer's input norm (or the final one) takes the residual add with it.
            following = self.layers[index + 1].input_norm if index + 1 < len(self.layers) else self.final_norm
            x, residual = layer_ops.add_rms_norm(out, residual, following, c.rms_norm_eps)
        return x if self.layers else layer_ops.rms_norm(residual, self.final_norm, c.rms_norm_eps)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Project hidden states ``[M, hidden]`` to float32 logits ``[M, vocab]``."""
        weight = self.embed_weight if self.lm_head_weight is None else self.lm_head_weight
        return F.linear(hidden, weight).float()

    # ------------------------------------------------------------------ loading

    def _hf_targets(self) -> dict[str, tuple[torch.Tensor, int, int]]:
        """Map each expected HF parameter name to ``(destination, row_start, row_end)``."""
        c = self.config
        targets: dict[str, tuple[torch.Tensor, int, int]] = {}

        def whole(name: str, t: torch.Tensor | None) -> None:
            if t is not None:
                targets[name] = (t, 0, t.shape[0])

        whole("model.embed_tokens.weight", self.embed_weight)
        whole("model.norm.weight", self.final_norm)
        whole("lm_head.weight", self.lm_head_weight)
        inter = c.intermediate_size
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            q, kv = layer.q_size, layer.kv_size
            bounds = {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv)}
            for proj, (lo, hi) in bounds.items():
                targets[f"{p}self_attn.{proj}.weight"] = (layer.qkv_weight, lo, hi)
                if layer.qkv_bias is not None:
                    targets[f"{p}self_attn.{proj}.bias"] = (layer.qkv_bias, lo, hi)
            whole(f"{p}self_attn.o_proj.weight", layer.o_weight)
            whole(f"{p}self_attn.o_proj.bias", layer.o_bias)
            for proj, (lo, hi) in {"gate_proj": (0, inter), "up_proj": (inter, 2 * inter)}.items():
                targets[f"{p}mlp.{proj}.weight"] = (layer.gate_up_weight, lo, hi)
                if layer.gate_up_bias is not None:
                    targets[f"{p}mlp.{proj}.bias"] = (layer.gate_up_bias, lo, hi)
            whole(f"{p}mlp.down_proj.weight", layer.down_weight)
            whole(f"{p}mlp.down_proj.bias", layer.down_bias)
            whole(f"{p}input_layernorm.weight", layer.input_norm)
            whole(f"{p}post_attention_layernorm.weight", layer.post_norm)
        return targets

    @torch.no_grad()
    def load_state_dict_hf(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy weights named as in a Hugging Face checkpoint into this model.

        Tensors are fetched one at a time (``tensors`` may be a lazy mapping)
        and cast to the model's dtype/device. Rotary ``inv_freq`` buffers are
        ignored; with tied embeddings a stray ``lm_head.weight`` is ignored too.
        Raises ``ValueError`` listing missing/unexpected names or shape mismatches.
        """
        targets = self._hf_targets()
        names = set(tensors.keys())
        ignored = {n for n in names if n.endswith("rotary_emb.inv_freq")}
        if self.config.tie_word_embeddings:
            ignored.add("lm_head.weight")
        missing = sorted(set(targets) - names)
        unexpected = sorted(names - set(targets) - ignored)
        if missing or unexpected:
            raise ValueError(
                "checkpoint does not match the model config: "
                f"missing {len(missing)} {missing[:10]}{' ...' if len(missing) > 10 else ''}; "
                f"unexpected {len(unexpected)} {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}"
            )
        for name, (dest, lo, hi) in targets.items():
            src = tensors[name]
            expected = (hi - lo, *dest.shape[1:])
            if tuple(src.shape) != expected:
                raise ValueError(f"{name}: checkpoint shape {tuple(src.shape)}, model expects {expected}")
            dest[lo:hi].copy_(src)
