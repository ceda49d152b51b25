"""LLMLingua-family compression (parrot.compression) on the embedded model.

The embedded model's weights are random, so these tests check the mechanism
(budgets, forced tokens, subsequence, conditioning, ranking consistency),
never the quality of what is kept.
"""

from __future__ import annotations

import itertools
import math
import random
import re

import pytest
import torch

from parrot.backends.kv_cache import AttentionBatch, SequenceKV, SequenceSlice
from parrot.compression import CompressionResult, Compressor, compress
from parrot.compression.cli import main as cli_main
from parrot.semantic_vars import InvalidArgumentError

WORDS = (
    "the river stone market quiet lantern across morning over silver garden paper window under "
    "small bright harbor road winter bread table letter field north slowly mountain evening"
).split()


def filler(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def paragraphs(count: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [filler(rng, words).capitalize() + "." for _ in range(count)]


@pytest.fixture(scope="module")
def compressor(default_model_dir) -> Compressor:
    return Compressor(default_model_dir, device="cpu")


@pytest.fixture(scope="module")
def scorer(compressor):
    return compressor.scorer


@pytest.fixture(scope="module")
def long_text() -> str:
    paras = paragraphs(8, 24, seed=1)
    paras[2] += " The access code for vault 17 is 4821 and the courier is named Okonkwo today."
    paras[6] += " Remember the blue heron signal."
    return "\n\n".join(paras)


def same_but_spacing(context: str, decoded: str) -> bool:
    """The context is the kept tokens' text; only the spacing put back between them differs."""
    return re.sub(r"\s+", "", context) == re.sub(r"\s+", "", decoded)


def is_subsequence(small, big) -> bool:
    it = iter(big)
    return all(any(x == y for y in it) for x in small)


# ----------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("rate", [0.5, 0.33, 0.2])
def test_rate_is_met(compressor, long_text, rate):
    r = compressor.compress(long_text, rate=rate)
    assert isinstance(r, CompressionResult)
    target = round(rate * r.original_tokens)
    assert r.target_tokens == target
    assert abs(r.compressed_tokens - target) <= max(3, 0.15 * target)
    assert r.ratio == pytest.approx(r.original_tokens / r.compressed_tokens)
    assert r.rate == pytest.approx(r.compressed_tokens / r.original_tokens)
    assert r.compressed_tokens == len(r.kept_token_ids)
    assert r.seconds > 0


@pytest.mark.parametrize("coarse", [True, False])
def test_target_tokens_is_met(compressor, long_text, coarse):
    r = compressor.compress(long_text, target_tokens=120, coarse=coarse)
    assert abs(r.compressed_tokens - 120) <= max(3, 0.15 * 120)
    if not coarse:
        assert r.kept_segments == tuple(range(r.segments))


def test_budget_controller_keeps_instruction_and_question(compressor, long_text):
    instruction = "Read the notes below and answer the question."
    question = "What is the access code for vault 17?"
    r = compressor.compress(long_text, rate=0.3, instruction=instruction, question=question)
    total = sum(compressor.count_tokens(t) for t in (instruction, long_text, question))
    assert r.original_tokens == total
    assert abs(r.compressed_tokens - round(0.3 * total)) <= max(3, 0.15 * 0.3 * total)
    assert r.instruction == instruction and r.question == question
    assert r.text.startswith(instruction + "\n\n") and r.text.endswith("\n\n" + question)
    assert r.text == "\n\n".join([instruction, r.context, question])
    # A lower question rate compresses the question too, still within the total budget.
    r2 = compressor.compress(long_text, rate=0.3, question=question, question_rate=0.5)
    assert compressor.count_tokens(question) > len(compressor.scorer.encode(r2.question))


# ----------------------------------------------------------------------------- forced tokens, subsequence
def test_forced_tokens_survive(compressor, long_text):
    r = compressor.compress(long_text, rate=0.2, force=["blue heron"])
    # The force string's paragraph is protected from the coarse pass, and the string kept whole.
    assert "blue heron" in r.context
    # Numbers and mid-sentence names survive in the kept segments.
    if 2 in r.kept_segments:
        assert "4821" in r.context and "17" in r.context and "Okonkwo" in r.context
    # Fine-grained only: nothing is dropped wholesale, so every number and name survives.
    r = compressor.compress(long_text, rate=0.2, coarse=False, force="blue heron")
    for key in ("4821", "17", "Okonkwo", "blue heron"):
        assert key in r.context
    assert r.forced_tokens > 0


def test_forcing_can_be_turned_off(compressor):
    text = " ".join(f"item {n} costs {n * 7} coins" for n in range(1, 25))
    kept = compressor.compress(text, rate=0.2)
    assert all(str(n * 7) in kept.context for n in range(1, 25))
    free = compressor.compress(text, rate=0.2, force_numbers=False)
    assert abs(free.compressed_tokens - free.target_tokens) <= 3


def test_output_is_a_token_subsequence(compressor, scorer, long_text):
    ids = scorer.encode(long_text)
    for kwargs in ({"rate": 0.3}, {"rate": 0.5, "question": "Who is the courier?"}, {"target_tokens": 40}):
        r = compressor.compress(long_text, **kwargs)
        assert list(r.original_token_ids) == ids
        assert is_subsequence(r.kept_token_ids, ids)
        assert same_but_spacing(r.context, scorer.decode(r.kept_token_ids))
    # A list of segments: the context is the segments joined by the separator.
    docs = paragraphs(5, 30, seed=3)
    r = compressor.compress(docs, rate=0.4)
    assert list(r.original_token_ids) == scorer.encode("\n\n".join(docs))
    assert is_subsequence(r.kept_token_ids, r.original_token_ids)
    assert r.segments == 5


def test_multibyte_characters_are_kept_whole(compressor):
    text = " ".join(["Zürich café naïve über déjà vu"] * 12)
    r = compressor.compress(text, rate=0.3, force_names=False)
    assert "\ufffd" not in r.context


def test_empty_and_tiny_inputs_are_unchanged(compressor):
    r = compressor.compress("", rate=0.3)
    assert (r.text, r.original_tokens, r.compressed_tokens, r.ratio) == ("", 0, 0, 1.0)
    tiny = "Hello there, world."
    r = compressor.compress(tiny, rate=0.3)
    assert r.text == tiny and r.context == tiny and r.ratio == 1.0 and r.compressed_tokens == r.original_tokens
    r = compressor.compress(tiny * 20, target_tokens=10_000)
    assert r.text == tiny * 20 and r.ratio == 1.0


# ----------------------------------------------------------------------------- ranking
def test_question_aware_ranking_mechanism(compressor, scorer):
    rng = random.Random(7)
    question = "Where did the courier Okonkwo leave the silver lantern?"
    docs = [
        "The courier Okonkwo left the silver lantern by the harbor road. " + filler(rng, 12),
        filler(rng, 25),
        filler(rng, 25),
        filler(rng, 25),
    ]
    ranking = compressor.rank_segments(docs, question)
    assert ranking.kind == "question"
    # The scores are the mean surprisal of the question given each document, computed independently here.
    q = scorer.encode(question)
    for doc, score in zip(docs, ranking.scores):
        assert score == pytest.approx(float(scorer.surprisal(q, context=scorer.encode(doc)).mean()), abs=1e-4)
    # Best first: the document under which the question is least surprising.
    assert list(ranking.order) == sorted(range(len(docs)), key=lambda i: ranking.scores[i])

    # The coarse pass keeps exactly the best-ranked document when only one fits.
    lengths = [len(scorer.encode(d)) for d in docs]
    budget = max(lengths) + 2 + len(q)
    assert budget - len(q) < min(lengths[i] + lengths[j] for i in range(4) for j in range(4) if i != j)
    r = compressor.compress(docs, target_tokens=budget, question=question, fine=False)
    assert r.kept_segments == (ranking.order[0],)
    assert same_but_spacing(r.context, scorer.decode(r.kept_token_ids))

    # Without a question, segments rank by their own perplexity, highest first.
    plain = compressor.rank_segments(docs, criterion="perplexity")
    assert plain.kind == "perplexity"
    for doc, score in zip(docs, plain.scores):
        assert score == pytest.approx(float(scorer.surprisal(scorer.encode(doc)).mean()), abs=1e-4)
    assert list(plain.order) == sorted(range(len(docs)), key=lambda i: -plain.scores[i])
    # The default: density of force-kept tokens (the first document holds a name), ties by peak surprisal.
    dense = compressor.rank_segments(docs)
    assert dense.kind == "entities" and dense.order[0] == 0 and dense.scores[0] > 0
    assert all(dense.scores[i] == 0 for i in (1, 2, 3))
    peak = compressor.rank_segments(docs, criterion="peak")
    assert list(dense.order[1:]) == [i for i in peak.order if i != 0]
    assert tuple(dense.tiebreak) == tuple(peak.scores)
    with pytest.raises(InvalidArgumentError) as info:
        compressor.rank_segments(docs, criterion="loudest")
    assert info.value.field == "criterion"


def test_itpc_conditions_on_the_compressed_prefix(compressor, scorer):
    """Each window keeps its top tokens by surprisal given the tokens kept so far."""
    small = Compressor(scorer, window_tokens=16)
    text = paragraphs(1, 30, seed=11)[0]
    ids = scorer.encode(text)
    n = len(ids)
    assert n > 32  # three windows at least
    r = small.compress(text, rate=0.5, force_numbers=False, force_names=False)

    cum = list(itertools.accumulate([r.target_tokens / n] * n))
    windows = [(a, min(n, a + 16)) for a in range(0, n, 16)]
    kept: list[int] = []
    for w, (a, b) in enumerate(windows):
        goal = r.target_tokens if w == len(windows) - 1 else round(cum[b - 1])
        quota = max(0, min(b - a, goal - len(kept)))
        values = scorer.surprisal(ids[a:b], context=kept)  # conditioned on the compressed prefix
        best = sorted(range(b - a), key=lambda i: (-float(values[i]), i))[:quota]
        kept += [ids[a + i] for i in sorted(best)]
    assert list(r.kept_token_ids) == kept
    assert len(kept) == r.target_tokens


def test_progress_callback(compressor, long_text):
    calls = []
    compressor.compress(long_text, rate=0.3, question="Who is the courier?", progress=lambda *a: calls.append(a))
    stages = {c[0] for c in calls}
    assert stages == {"rank", "tokens"}
    last = [c for c in calls if c[0] == "tokens"][-1]
    assert last[1] == last[2]


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rate": 0.0}, "rate"),
        ({"rate": 1.5}, "rate"),
        ({"rate": float("nan")}, "rate"),
        ({"rate": "0.5"}, "rate"),
        ({}, "rate"),
        ({"rate": 0.5, "target_tokens": 10}, "target_tokens"),
        ({"target_tokens": -5}, "target_tokens"),
        ({"target_tokens": 0}, "target_tokens"),
        ({"target_tokens": 2.5}, "target_tokens"),
        ({"rate": 0.5, "force": [""]}, "force"),
        ({"rate": 0.5, "force": [3]}, "force"),
        ({"rate": 0.5, "instruction_rate": 0}, "instruction_rate"),
        ({"rate": 0.5, "question_rate": 2}, "question_rate"),
        ({"rate": 0.5, "coarse_factor": 0.5}, "coarse_factor"),
        ({"rate": 0.5, "dynamic_ratio": 1.5}, "dynamic_ratio"),
        ({"rate": 0.5, "contrastive": True}, "contrastive"),
        ({"rate": 0.5, "question": 42}, "question"),
    ],
)
def test_bad_options_raise_typed_errors(compressor, kwargs, field):
    with pytest.raises(InvalidArgumentError) as info:
        compressor.compress("Some text to compress. " * 10, **kwargs)
    assert info.value.field == field
    assert field in str(info.value)


def test_bad_text_device_and_model(compressor, tmp_path, default_model_dir):
    with pytest.raises(InvalidArgumentError) as info:
        compressor.compress(123, rate=0.5)
    assert info.value.field == "text"
    with pytest.raises(InvalidArgumentError) as info:
        Compressor(default_model_dir, device="tpu7")
    assert info.value.field == "device"
    if not torch.cuda.is_available():
        with pytest.raises(InvalidArgumentError) as info:
            compress("x " * 50, rate=0.5, model=default_model_dir, device="cuda")
        assert info.value.field == "device"
    with pytest.raises(InvalidArgumentError) as info:
        Compressor(tmp_path / "missing")
    assert info.value.field == "model"
    with pytest.raises(InvalidArgumentError) as info:
        Compressor(compressor.scorer, window_tokens=4)
    assert info.value.field == "window_tokens"


# ----------------------------------------------------------------------------- the scorer
def full_forward_surprisal(model, ids: list[int]) -> torch.Tensor:
    """Surprisal of ids[1:] from one plain forward, written out here."""
    c = model.config
    kv = SequenceKV(c.num_layers, c.num_kv_heads, c.head_dim, dtype=torch.float32, device="cpu", initial_capacity=len(ids))
    batch = AttentionBatch([SequenceSlice(kv, 0, len(ids))])
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(len(ids)), batch)
        batch.commit()
        logprobs = torch.log_softmax(model.compute_logits(hidden), dim=-1)
    return -logprobs[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_conditioned_scoring_matches_one_pass(scorer):
    rng = random.Random(5)
    context_ids = scorer.encode(filler(rng, 40))
    text_ids = scorer.encode(" " + filler(rng, 30))
    bos = [scorer.bos_token_id]
    reference = full_forward_surprisal(scorer.model, bos + context_ids + text_ids)
    want = reference[len(context_ids):]  # surprisals of text_ids
    assert len(want) == len(text_ids)

    ctx = scorer.context(context_ids)  # computed once ...
    for _ in range(2):  # ... and reused: the context itself is left unchanged
        got = scorer.surprisal(text_ids, context=ctx)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert len(ctx) == 1 + len(context_ids)
    torch.testing.assert_close(scorer.surprisal(text_ids, context=context_ids), want, atol=1e-4, rtol=0)
    one_pass = scorer.surprisal(context_ids + text_ids)
    torch.testing.assert_close(one_pass[len(context_ids):], want, atol=1e-4, rtol=0)
    torch.testing.assert_close(one_pass, reference, atol=1e-4, rtol=0)

    # Extending in chunks, and the fused step of the iterative pass, agree too.
    ext = scorer.context()
    parts = [scorer.extend(ext, context_ids[:7]), scorer.extend(ext, context_ids[7:] + text_ids)]
    torch.testing.assert_close(torch.cat(parts), reference, atol=1e-4, rtol=0)  # BOS already in ext
    step_ctx = scorer.context(context_ids[:10])
    (probe,) = scorer.step([(step_ctx, context_ids[10:], text_ids)])
    torch.testing.assert_close(probe, want, atol=1e-4, rtol=0)
    assert step_ctx.ids == bos + context_ids and step_ctx.kv.length == len(step_ctx.ids)


def test_batched_scoring_matches_single(scorer):
    rng = random.Random(9)
    texts = [scorer.encode(filler(rng, n)) for n in (5, 40, 17)]
    ctx = scorer.encode(filler(rng, 12))
    batched = scorer.surprisal_batch(texts, contexts=[None, ctx, scorer.context(ctx)])
    singles = [scorer.surprisal(texts[0]), scorer.surprisal(texts[1], context=ctx), scorer.surprisal(texts[2], context=ctx)]
    for a, b in zip(batched, singles):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    # A tiny batch budget splits sequences across forwards with the same result.
    small = type(scorer)(scorer.model, scorer.tokenizer, max_batch_tokens=7, chunk_tokens=5)
    for a, b in zip(small.surprisal_batch(texts, contexts=[None, ctx, ctx]), singles):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert all(math.isfinite(float(x)) for t in batched for x in t)


def test_compressor_reuses_an_engine(default_engine, scorer):
    comp = Compressor(default_engine)
    assert comp.scorer.model is default_engine.model
    ids = scorer.encode("The river stone market")
    torch.testing.assert_close(comp.scorer.surprisal(ids), scorer.surprisal(ids), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- module function and CLI
def test_module_compress_and_cli(default_model_dir, long_text, tmp_path, capsys):
    r = compress(long_text, rate=0.5, model=default_model_dir, device="cpu")
    assert abs(r.compressed_tokens - r.target_tokens) <= max(3, 0.15 * r.target_tokens)
    path = tmp_path / "notes.txt"
    path.write_text(long_text)
    code = cli_main([str(path), "--rate", "0.3", "--model", str(default_model_dir), "--device", "cpu", "--force", "blue heron"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "blue heron" in out
    for label in ("original tokens", "compressed tokens", "ratio", "time", "tokens/s"):
        assert label in err
    assert cli_main([str(path), "--rate", "3", "--model", str(default_model_dir), "--device", "cpu"]) == 2
    assert "rate" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the benchmark entry
def test_benchmark_runs_at_its_smallest_and_says_which_weights(default_model_dir, tmp_path, capsys):
    import json
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:  # `benchmarks` is a folder of the repo, not an installed package
        sys.path.insert(0, str(root))
    from benchmarks import compression as bench

    out = tmp_path / "compression.json"
    bench.main(["--device", "cpu", "--trials", "1", "--paragraphs", "4", "--sentences", "3", "--facts", "2",
                "--questions", "1", "--rates", "2,5", "--throughput-tokens", "300", "--repeats", "1",
                "--json", str(out)])
    report = capsys.readouterr().out
    assert "weights are random" in report and "mechanism" in report
    data = json.loads(out.read_text())
    assert data["context"]["weights_kind"] == "random" and data["context"]["device"] == "cpu"
    tp = data["throughput"]
    assert tp["input_tokens"] >= 300 and tp["compress_tokens_per_s"] > 0 and tp["token_level_tokens_per_s"] > 0
    results = data["needle"]["results"]
    assert set(results) == {"llmlingua", "llmlingua, perplexity coarse", "llmlingua, peak coarse", "longllmlingua",
                            "token-level only", "token-level, no forcing", "random drop"}
    for method in results.values():
        for label in ("2x", "5x"):
            assert 0.0 <= method[label]["retention"] <= 1.0 and method[label]["facts"] >= 1
    # Random dropping is matched to LLMLingua's achieved token count.
    assert results["random drop"]["2x"]["ratio"] == pytest.approx(results["llmlingua"]["2x"]["ratio"], rel=1e-6)
