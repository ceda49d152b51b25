"""Choosing the next token from logits: greedy, or temperature + top-p.

One row's numerical trouble (logits with inf or nan, a distribution that
collapses) never fails the batch: that row falls back to its argmax and the
other rows sample as they would alone.
"""

from __future__ import annotations

import torch

from parrot.semantic_vars import SamplingConfig


def make_generator(config: SamplingConfig, device: torch.device) -> torch.Generator | None:
    """A per-request RNG, seeded when the config asks for reproducibility."""
    if config.greedy:
        return None
    gen = torch.Generator(device=device)
    if config.seed is not None:
        gen.manual_seed(config.seed)  # SamplingConfig keeps seeds within 64 bits
    else:
        gen.seed()
    return gen


def _distribution(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """The probabilities of one row after temperature and top-p; a one-hot on
    the argmax when they are not a usable distribution (no host sync)."""
    scaled = torch.nan_to_num(logits / config.temperature, nan=float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if config.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest set whose mass reaches top_p (always the top token).
        outside = sorted_probs.cumsum(0) - sorted_probs >= config.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    usable = torch.isfinite(probs).all() & (probs.sum() > 0)
    fallback = torch.zeros_like(probs)
    fallback[torch.nan_to_num(logits, nan=float("-inf")).argmax()] = 1.0
    return torch.where(usable, probs, fallback)


def sample(
    logits: torch.Tensor, configs: list[SamplingConfig], generators: list[torch.Generator | None]
) -> list[int]:
    """One token per row of ``logits`` (``[B, vocab]``, float32).

    Everything stays on the logits' device; the tokens cross to the host in
    one transfer at the end.
    """
    out = logits.argmax(dim=-1)
    for row, (config, gen) in enumerate(zip(configs, generators)):
        if config.greedy:
            continue
        out[row] = torch.multinomial(_distribution(logits[row], config), 1, generator=gen)[0]
    return out.tolist()
