"""The embedded default model: reproducible build, atomic caching, loads in transformers."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from parrot.backends import default_model as dm

FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "README.md",
}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("PARROT_CACHE_DIR", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One build shared by the read-only tests."""
    path = tmp_path_factory.mktemp("model")
    dm.build_default_model(path)
    return path


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(Path(dm.__file__).parent / "tokenizer.json"))


def test_build_writes_all_files(built: Path) -> None:
    assert {p.name for p in built.iterdir()} == FILES
    assert "not meaningful" in (built / "README.md").read_text()


def test_build_is_byte_identical(tmp_path: Path, built: Path) -> None:
    dm.build_default_model(tmp_path / "again")
    for name in FILES:
        assert (tmp_path / "again" / name).read_bytes() == (built / name).read_bytes(), name


def test_config_matches_tokenizer_and_weights(built: Path, tokenizer: Tokenizer) -> None:
    from safetensors import safe_open

    config = dm.default_model_config()
    assert config["vocab_size"] == tokenizer.get_vocab_size()
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # GQA
    assert config["bos_token_id"] == tokenizer.token_to_id("<s>")
    assert config["eos_token_id"] == tokenizer.token_to_id("</s>")
    with safe_open(str(built / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.k_proj.weight").shape == (64, 256)
        assert f.get_tensor("model.norm.weight").eq(1).all()
    assert len(names) == 3 + 9 * config["num_hidden_layers"]
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.layers.3.mlp.down_proj.weight"} <= names


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PARROT_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert dm.cache_dir() == tmp_path / ".cache" / "parrot"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dm.cache_dir() == tmp_path / "xdg" / "parrot"
    monkeypatch.setenv("PARROT_CACHE_DIR", str(tmp_path / "p"))
    assert dm.cache_dir() == tmp_path / "p"


def test_default_model_path_builds_once(cache: Path) -> None:
    messages: list[str] = []
    first = dm.default_model_path(progress=messages.append)
    builds = [m for m in messages if m.startswith("building")]
    assert len(builds) == 1 and str(first) in builds[0]
    assert first.parent == cache and first.name.startswith(f"{dm.DEFAULT_MODEL_NAME}-v1-")
    mtime = (first / "model.safetensors").stat().st_mtime_ns

    second = dm.default_model_path(progress=messages.append)
    assert second == first
    assert [m for m in messages if m.startswith("building")] == builds
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in cache.iterdir()] == [first.name]  # no temp folder left


def test_leftover_temp_folders_do_not_break_the_next_call(cache: Path) -> None:
    name = dm.default_model_dir_name()
    fresh = cache / f".{name}.tmp-crashed"
    stale = cache / f".{name}.tmp-old"
    for half_built in (fresh, stale):
        half_built.mkdir(parents=True)
        (half_built / "config.json").write_text("{")  # truncated
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))

    path = dm.default_model_path()
    assert {p.name for p in path.iterdir()} == FILES
    assert not stale.exists()  # cleaned up
    assert fresh.exists()  # might belong to a live build; left alone


def test_incomplete_cache_folder_is_rebuilt(cache: Path) -> None:
    path = dm.default_model_path()
    (path / "model.safetensors").unlink()
    messages: list[str] = []
    assert dm.default_model_path(progress=messages.append) == path
    assert any(m.startswith("building") for m in messages)
    assert (path / "model.safetensors").is_file()


def test_losing_the_rename_race_uses_the_winner(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    winner = cache / dm.default_model_dir_name()
    real_build = dm.build_default_model

    def build_while_another_process_finishes(dest: Path) -> None:
        real_build(winner)  # the other process wins while we are still building
        real_build(dest)

    monkeypatch.setattr(dm, "build_default_model", build_while_another_process_finishes)
    assert dm.default_model_path() == winner
    assert [p.name for p in cache.iterdir()] == [winner.name]


def test_concurrent_callers_share_one_folder(cache: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    # Threads race through the same mkdtemp/rename steps that separate processes would.
    with ThreadPoolExecutor(4) as pool:
        paths = set(pool.map(lambda _: dm.default_model_path(), range(4)))
    assert len(paths) == 1
    (path,) = paths
    assert [p.name for p in cache.iterdir()] == [path.name]
    assert {p.name for p in path.iterdir()} == FILES


def test_transformers_loads_it_offline(cache: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = dm.default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert len(tok) == model.config.vocab_size
    assert model.config.num_key_value_heads == 2 and model.config.head_dim == 32

    ids = tok("Summarize the document, please.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()

    text = "naïve café 🦜\n\ttabs  and  spaces "
    assert tok.decode(tok(text).input_ids) == text


def test_chat_template_renders(cache: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dm.default_model_path())
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye."},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<s><|system|>\nBe brief.<|end|>\n<|user|>\nHi!<|end|>\n"
        "<|assistant|>\nHello.<|end|>\n<|user|>\nBye.<|end|>\n<|assistant|>\n"
    )
    ids = tok(text).input_ids
    for special in ("<s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"):
        assert tok.convert_tokens_to_ids(special) in ids  # one token each, not spelled out


def test_tokenizer_file_is_small_and_complete(tokenizer: Tokenizer) -> None:
    path = Path(dm.__file__).parent / "tokenizer.json"
    assert path.stat().st_size < 400_000
    assert 4000 <= tokenizer.get_vocab_size() <= 4200
    for token in ("<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"):
        assert tokenizer.token_to_id(token) is not None
    # Common English words are single tokens.
    assert len(tokenizer.encode(" the document").ids) == 2


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text())
def test_tokenizer_round_trips_any_text(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text).ids
    # Byte-level BPE never needs <unk>; only a literal "<unk>" in the text is one.
    if "<unk>" not in text:
        assert tokenizer.token_to_id("<unk>") not in ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["a", " ", "\n", "\r\n", "\t", "é", "🦜", "世界", "\u200d", "<s>", "{{"]), max_size=30))
def test_tokenizer_round_trips_tricky_pieces(tokenizer: Tokenizer, pieces: list[str]) -> None:
    text = "".join(pieces)
    assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == text
