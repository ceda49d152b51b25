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


def model_logprobs(logits: torch.Tensor, configs: list[SamplingConfig]) -> tuple[list[int], torch.Tensor] | None:
    """Log-probabilities of the rows whose config asks for ``logprobs``, taken
    from the model's logits before temperature and grammar masks (call
    before masking). ``None`` when no row asks."""
    rows = [i for i, c in enumerate(configs) if c.logprobs is not None]
    if not rows:
        return None
    index = torch.tensor(rows, device=logits.device)
    return rows, torch.log_softmax(logits.index_select(0, index).float(), dim=-1)


def pick_logprobs(
    prepared: tuple[list[int], torch.Tensor] | None, configs: list[SamplingConfig], tokens: list[int]
) -> list[tuple[float, list[tuple[int, float]]] | None]:
    """Per row: ``(logprob of the sampled token, top-k alternatives)`` or None;
    one transfer to the host."""
    out: list[tuple[float, list[tuple[int, float]]] | None] = [None] * len(configs)
    if prepared is None:
        return out
    rows, logp = prepared
    k = max(configs[i].logprobs or 0 for i in rows)
    chosen = torch.tensor([tokens[i] for i in rows], device=logp.device)
    picked = logp.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
    top_v, top_i = (logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long()))
    top_v, top_i = top_v.tolist(), top_i.tolist()
    for j, i in enumerate(rows):
        n = configs[i].logprobs or 0
        out[i] = (picked[j], list(zip(top_i[j][:n], top_v[j][:n])))
    return out


def apply_penalties(logits: torch.Tensor, configs: list[SamplingConfig], histories: list[list[int]]) -> None:
    """Frequency and presence penalties over each row's generated tokens
    (``histories``) and its logit bias, in place; rows without them are left alone."""
    for row, (config, history) in enumerate(zip(configs, histories)):
        if not config.penalized:
            continue
        if history and (config.frequency_penalty or config.presence_penalty):
            counts = torch.bincount(torch.tensor(history, device=logits.device), minlength=logits.shape[-1])
            counts = counts[: logits.shape[-1]].to(logits.dtype)
            logits[row] -= config.frequency_penalty * counts + config.presence_penalty * (counts > 0).to(logits.dtype)
        bias = [(t, b) for t, b in config.logit_bias if t < logits.shape[-1]]
        if bias:
            ids = torch.tensor([t for t, _ in bias], device=logits.device)
            logits[row].index_add_(0, ids, torch.tensor([b for _, b in bias], device=logits.device, dtype=logits.dtype))
