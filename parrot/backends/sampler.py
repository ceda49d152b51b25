"""Choosing the next token from logits: greedy, or temperature + top-p."""

from __future__ import annotations

import torch

from parrot.semantic_vars import SamplingConfig


def make_generator(config: SamplingConfig, device: torch.device) -> torch.Generator | None:
    """A per-request RNG, seeded when the config asks for reproducibility."""
    if config.greedy:
        return None
    gen = torch.Generator(device=device)
    if config.seed is not None:
        gen.manual_seed(config.seed)
    else:
        gen.seed()
    return gen


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
        probs = torch.softmax(logits[row] / config.temperature, dim=-1)
        if config.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest set whose mass reaches top_p (always the top token).
            outside = sorted_probs.cumsum(0) - sorted_probs >= config.top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        out[row] = torch.multinomial(probs, 1, generator=gen)[0]
    return out.tolist()
