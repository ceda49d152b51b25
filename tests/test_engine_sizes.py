"""KV pool and context sizes: settable from the environment and the CLI; the CPU default always starts."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from parrot.backends.spec import EngineSpec, engine_sizes_from_env, parse_bytes
from parrot.backends.torch_engine import TorchEngine
from parrot.semantic_vars import EngineError


def test_sizes_parse_with_units():
    assert parse_bytes("1073741824") == 2**30
    assert parse_bytes("512MiB") == parse_bytes("512m") == 512 * 2**20
    assert parse_bytes("1.5GiB") == 3 * 2**29
    for bad in ("", "lots", "-1G", "12 parsecs"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_environment_names_the_bad_variable(monkeypatch):
    monkeypatch.setenv("PARROT_KV_CACHE_BYTES", "huge")
    with pytest.raises(ValueError, match="PARROT_KV_CACHE_BYTES"):
        engine_sizes_from_env()
    monkeypatch.setenv("PARROT_KV_CACHE_BYTES", "8MiB")
    monkeypatch.setenv("PARROT_MAX_MODEL_LEN", "0")
    with pytest.raises(ValueError, match="PARROT_MAX_MODEL_LEN"):
        engine_sizes_from_env()
    monkeypatch.setenv("PARROT_MAX_MODEL_LEN", "256")
    assert engine_sizes_from_env() == {"kv_cache_bytes": 8 * 2**20, "max_model_len": 256}


def test_spec_applies_environment_sizes(monkeypatch, default_model_dir):
    monkeypatch.setenv("PARROT_KV_CACHE_BYTES", "4MiB")
    monkeypatch.setenv("PARROT_MAX_MODEL_LEN", "512")
    engine = EngineSpec(name="sized", model=str(default_model_dir), device="cpu").build()
    try:
        assert engine.max_model_len == 512
        per_block = engine.pool.bytes_per_block(4, engine.config.block_size, 2, 32, engine.dtype)
        assert engine.capacity().total_blocks == 4 * 2**20 // per_block
    finally:
        engine.close()
    # Explicit sizes that cannot hold one request are refused, saying which.
    with pytest.raises(EngineError, match="kv_cache_bytes"):
        EngineSpec(name="small", model=str(default_model_dir), device="cpu", kv_cache_bytes=2**16).build()


def test_cpu_default_caps_a_context_it_cannot_hold(tmp_path, default_model_dir, caplog):
    folder = tmp_path / "long"
    shutil.copytree(default_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 1 << 24  # 16M tokens: far more than the CPU pool's bound
    (folder / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="parrot.backends.torch_engine"):
        engine = TorchEngine.from_pretrained(folder, device="cpu")
    try:
        assert 0 < engine.max_model_len < 1 << 24
        assert "max_model_len capped" in caplog.text
    finally:
        engine.close()
