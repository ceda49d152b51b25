"""Our Llama-family forward and checkpoint loader against transformers' reference models.

Tiny random models (2 layers, hidden 64) are saved with ``save_pretrained``
and loaded back with :func:`parrot.backends.checkpoint.load_model`; logits are
compared in float32 for whole prompts, chunked prefill + decode, and mixed
flat batches.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from parrot.backends.checkpoint import load_model, read_model_config  # noqa: E402
from parrot.backends.kv_cache import AttentionBatch, SequenceKV, SequenceSlice  # noqa: E402
from parrot.backends.model import LlamaFamilyModel, ModelConfig, rope_inv_freq  # noqa: E402

ATOL = 1e-4
VOCAB = 500
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)

# name -> (config class, model class, extra config kwargs)
FAMILIES = {
    "llama3-gqa": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            max_position_embeddings=131072,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        ),
    ),
    "llama-linear-bias": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            num_key_value_heads=4,
            rope_scaling={"type": "linear", "factor": 2.0},
            attention_bias=True,
            mlp_bias=True,
            eos_token_id=[2, 3],
        ),
    ),
    "qwen2-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict()),
}


def _make_hf_model(name: str, seed: int = 0):
    config_cls, model_cls, extra = FAMILIES[name]
    kwargs = {**COMMON, **extra}
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).float().eval()
    # HF's init (std 0.02, zero biases, unit norms) makes tiny logits that would
    # hide mistakes; perturb every parameter so biases and norms matter too.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory) -> tuple[object, LlamaFamilyModel]:
    """(transformers reference model, our model loaded from its saved checkpoint)."""
    hf = _make_hf_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    ours = load_model(folder)
    return hf, ours


@torch.no_grad()
def _reference_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    return hf(input_ids=ids[None]).logits[0].float()


def _new_kv(model: LlamaFamilyModel) -> SequenceKV:
    c = model.config
    # Small initial capacity so the cache has to grow mid-test.
    return SequenceKV(c.num_layers, c.num_kv_heads, c.head_dim, dtype=torch.float32, device="cpu", initial_capacity=4)


@torch.no_grad()
def _step(model: LlamaFamilyModel, work: list[tuple[SequenceKV, torch.Tensor]]) -> list[torch.Tensor]:
    """One flat forward over several sequences' new tokens; returns each one's logits."""
    slices, ids, positions, start = [], [], [], 0
    for kv, tokens in work:
        kv.reserve(len(tokens))
        slices.append(SequenceSlice(kv, start, len(tokens)))
        ids.append(tokens)
        positions.append(torch.arange(kv.length, kv.length + len(tokens)))
        start += len(tokens)
    batch = AttentionBatch(slices)
    hidden = model(torch.cat(ids), torch.cat(positions), batch)
    batch.commit()
    logits = model.compute_logits(hidden)
    assert logits.dtype == torch.float32
    return [logits[s.start : s.start + s.num_tokens] for s in slices]


def _prompt(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def test_full_prompt_matches(pair):
    hf, ours = pair
    ids = _prompt(20, seed=1)
    (logits,) = _step(ours, [(_new_kv(ours), ids)])
    torch.testing.assert_close(logits, _reference_logits(hf, ids), atol=ATOL, rtol=0)


def test_chunked_prefill_then_decode_matches(pair):
    hf, ours = pair
    ids = _prompt(24, seed=2)
    ref = _reference_logits(hf, ids)
    kv = _new_kv(ours)
    bounds = [(0, 13), (13, 18)] + [(i, i + 1) for i in range(18, 24)]
    for lo, hi in bounds:
        (logits,) = _step(ours, [(kv, ids[lo:hi])])
        torch.testing.assert_close(logits, ref[lo:hi], atol=ATOL, rtol=0, msg=f"tokens [{lo}, {hi})")
    assert kv.length == 24


def test_mixed_flat_batch_matches_each_alone(pair):
    hf, ours = pair
    a, b, c = _prompt(15, seed=3), _prompt(11, seed=4), _prompt(9, seed=5)

    # Alone: each sequence on its own cache.
    alone_a = _step(ours, [(_new_kv(ours), a)])[0]
    kv_b = _new_kv(ours)
    _step(ours, [(kv_b, b[:10])])
    alone_b = _step(ours, [(kv_b, b[10:])])[0]
    kv_c = _new_kv(ours)
    _step(ours, [(kv_c, c[:4])])
    alone_c = _step(ours, [(kv_c, c[4:])])[0]

    # Together: a prefilling, b decoding one token, c mid-prompt chunk, in one flat batch.
    kv_b2, kv_c2 = _new_kv(ours), _new_kv(ours)
    _step(ours, [(kv_b2, b[:10]), (kv_c2, c[:4])])
    mixed_a, mixed_b, mixed_c = _step(ours, [(_new_kv(ours), a), (kv_b2, b[10:]), (kv_c2, c[4:])])

    torch.testing.assert_close(mixed_a, alone_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed_b, alone_b, atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed_c, alone_c, atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed_b, _reference_logits(hf, b)[10:], atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed_c, _reference_logits(hf, c)[4:], atol=ATOL, rtol=0)


def test_config_fields(pair):
    hf, ours = pair
    c, ref = ours.config, hf.config
    assert c.model_type == ref.model_type
    assert (c.num_layers, c.num_heads, c.num_kv_heads) == (2, 4, ref.num_key_value_heads)
    assert c.head_dim == 16
    assert c.tie_word_embeddings == (ref.model_type == "qwen2")
    assert c.attention_bias == (ref.model_type == "qwen2" or bool(getattr(ref, "attention_bias", False)))
    if ref.model_type == "mistral":
        assert c.sliding_window == ref.sliding_window


@pytest.mark.parametrize("name", ["llama3-gqa", "llama-linear-bias"])
def test_rope_frequencies_match_transformers(name):
    hf = _make_hf_model(name)
    ours = ModelConfig.from_hf_dict(hf.config.to_dict())
    rotary = hf.model.rotary_emb
    torch.testing.assert_close(rope_inv_freq(ours), rotary.inv_freq.float(), atol=0, rtol=1e-6)
    assert getattr(rotary, "attention_scaling", 1.0) == 1.0


def test_sharded_checkpoint_loads(tmp_path):
    hf = _make_hf_model("llama3-gqa")
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ours = load_model(tmp_path)
    ids = _prompt(7, seed=6)
    (logits,) = _step(ours, [(_new_kv(ours), ids)])
    torch.testing.assert_close(logits, _reference_logits(hf, ids), atol=ATOL, rtol=0)


# ---------------------------------------------------------------- config layouts


BASE_V4 = {
    "model_type": "llama",
    "vocab_size": 100,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 4096,
    "eos_token_id": 2,
    "bos_token_id": 1,
}


def test_transformers4_layout():
    d = {
        **BASE_V4,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "eos_token_id": [128001, 128009],
    }
    c = ModelConfig.from_hf_dict(d)
    assert c.rope_theta == 500000.0
    assert c.rope_scaling == {**d["rope_scaling"], "rope_type": "llama3"}
    assert c.eos_token_ids == [128001, 128009]
    assert (c.num_kv_heads, c.head_dim) == (4, 16)  # defaults

    legacy = ModelConfig.from_hf_dict({**BASE_V4, "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert legacy.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert legacy.rope_theta == 10000.0
    assert legacy.eos_token_ids == [2]
    assert ModelConfig.from_hf_dict({**BASE_V4, "rope_scaling": None}).rope_scaling is None


def test_transformers5_layout():
    d = {**BASE_V4, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "head_dim": 32}
    c = ModelConfig.from_hf_dict(d)
    assert (c.rope_theta, c.rope_scaling, c.head_dim) == (1e6, None, 32)
    qwen = ModelConfig.from_hf_dict(
        {**BASE_V4, "model_type": "qwen2", "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
         "use_sliding_window": False, "sliding_window": 4096}
    )
    assert qwen.attention_bias and qwen.sliding_window is None


# ---------------------------------------------------------------- errors


def test_unsupported_model_type(tmp_path):
    with pytest.raises(ValueError, match="model_type.*gpt2"):
        ModelConfig.from_hf_dict({**BASE_V4, "model_type": "gpt2"})
    (tmp_path / "config.json").write_text(json.dumps({**BASE_V4, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type"):
        read_model_config(tmp_path)


@pytest.mark.parametrize("field", ["hidden_size", "vocab_size", "num_hidden_layers"])
def test_missing_field_is_named(field):
    d = dict(BASE_V4)
    del d[field]
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_hf_dict(d)


def test_unsupported_rope_type_is_named():
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_hf_dict({**BASE_V4, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="low_freq_factor"):
        ModelConfig.from_hf_dict({**BASE_V4, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})


def test_folder_without_safetensors(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps(BASE_V4))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        load_model(tmp_path)


def test_missing_folder_and_config(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)


def test_mismatched_weights_are_listed(tmp_path: Path):
    from safetensors.torch import load_file, save_file

    hf = _make_hf_model("mistral")
    hf.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.extra.weight"] = torch.zeros(1)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing 1 \['model.layers.1.mlp.up_proj.weight'\].*model.extra.weight"):
        load_model(tmp_path)
