"""The decoder layer's small operations, fused: RMSNorm (with the residual
add), rotary embedding of queries and keys, and the SwiGLU gate.

Unfused, each is several elementwise kernels; at decode batch sizes the
forward of a 32-layer model then launches about a thousand kernels per
step, and their fixed cost, not the bytes they move, sets the step time.
On CUDA with triton installed each operation here is one Triton kernel
(:mod:`parrot.kernels.triton_layer_ops`); elsewhere, for float32, or with
``PARROT_LAYER_OPS=torch``, its torch twin below runs. The Triton kernels
round where the twins round (every intermediate the twins hold in the
input's dtype is rounded to it in the kernel too), so their results agree
with the twins to the last bit but for the order of the RMS reduction.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import triton_available

# "auto": Triton on CUDA when triton is installed; "torch": the twins always
# (the side-by-side baseline of benchmarks/engine.py).
LAYER_OPS_BACKEND = os.environ.get("PARROT_LAYER_OPS", "auto")
if LAYER_OPS_BACKEND not in ("auto", "torch"):
    raise ValueError(f"PARROT_LAYER_OPS must be 'auto' or 'torch', got {LAYER_OPS_BACKEND!r}")
_TRITON_DTYPES = (torch.bfloat16, torch.float16)
_HAS_RMS_NORM = hasattr(F, "rms_norm")


def _use_triton(device: torch.device, dtype: torch.dtype) -> bool:
    return LAYER_OPS_BACKEND == "auto" and device.type == "cuda" and dtype in _TRITON_DTYPES and triton_available()


def _triton(x: torch.Tensor) -> bool:
    return _use_triton(x.device, x.dtype)


# -- torch twins -------------------------------------------------------------
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as Llama defines it: normalise in float32, round to ``x``'s
    dtype, then scale by ``weight``."""
    if x.dtype == torch.float32 and _HAS_RMS_NORM:
        return F.rms_norm(x, weight.shape, weight, eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rotary_tables(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and signed ``sin`` ``[N, 1, head_dim]`` in ``dtype`` for the
    rotate-half convention: ``x * cos + roll(x, head_dim / 2) * sin``."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    sin = emb.sin()
    half = sin.shape[-1] // 2
    sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return emb.cos().to(dtype), sin.to(dtype)


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x [N, heads, head_dim]`` (a new tensor)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gate: ``silu(gate) * up`` of ``gate_up = [gate | up]`` ``[N, 2I]``."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# -- public entry points -----------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of ``x [N, hidden]`` (see :func:`rms_norm_reference`)."""
    if _triton(x):
        from .triton_layer_ops import add_rms_norm_triton

        return add_rms_norm_triton(x, None, weight, eps)[0]
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(residual + x), residual + x)``; the sum is rounded to the
    input dtype first, as an unfused add would. On the Triton path the new
    residual is written over ``residual``."""
    if _triton(x):
        from .triton_layer_ops import add_rms_norm_triton

        return add_rms_norm_triton(x, residual, weight, eps)
    total = residual + x
    return rms_norm_reference(total, weight, eps), total


class Rotary:
    """Rotary embedding for one step's positions, shared by every layer.

    The twin builds the ``cos``/``sin`` tables once per step; the Triton
    kernel computes them in place from ``positions`` and ``inv_freq``.
    """

    def __init__(self, positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> None:
        self.positions = positions
        self.inv_freq = inv_freq.float()
        self.triton = _use_triton(positions.device, dtype)
        self.tables = None if self.triton else rotary_tables(positions, inv_freq, dtype)

    def apply(self, qk: torch.Tensor) -> torch.Tensor:
        """Rotate ``qk [N, heads, head_dim]``; on the Triton path in place
        (``qk`` may be a strided view, such as the q/k part of a fused qkv)."""
        if self.triton:
            from .triton_layer_ops import rotary_triton_

            return rotary_triton_(qk, self.positions, self.inv_freq)
        cos, sin = self.tables
        return rotary_reference(qk, cos, sin)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` ``[N, I]`` of ``gate_up [N, 2I]``."""
    if _triton(gate_up):
        from .triton_layer_ops import silu_mul_triton

        return silu_mul_triton(gate_up)
    return silu_mul_reference(gate_up)


def store_kv_reference(
    key_cache: torch.Tensor, value_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor
) -> None:
    """Write ``key``/``value`` rows ``[N, Hkv, D]`` at flat ``slots`` ``[N]``
    (``block * block_size + offset``) of paged caches ``[num_blocks, block_size, Hkv, D]``."""
    num_blocks, block_size, heads, dim = key_cache.shape
    key_cache.view(num_blocks * block_size, heads, dim).index_copy_(0, slots, key)
    value_cache.view(num_blocks * block_size, heads, dim).index_copy_(0, slots, value)


def store_kv(
    key_cache: torch.Tensor, value_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor
) -> None:
    """One step's keys and values into the paged caches (one kernel for both on CUDA)."""
    if _triton(key) and key_cache.is_contiguous() and value_cache.is_contiguous():
        from .triton_layer_ops import store_kv_triton

        store_kv_triton(key_cache, value_cache, key, value, slots)
        return
    store_kv_reference(key_cache, value_cache, key, value, slots)


__all__ = [
    "LAYER_OPS_BACKEND", "Rotary", "add_rms_norm", "rms_norm", "rms_norm_reference", "rotary_reference",
    "rotary_tables", "silu_mul", "silu_mul_reference", "store_kv", "store_kv_reference",
]
