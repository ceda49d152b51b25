"""Parrot's embedded default model: a tiny Llama checkpoint built locally, no download.

``parrot`` must run out of the box on a machine without network access, so
the project ships the recipe for a small Llama-architecture checkpoint
instead of weights: a committed byte-level BPE tokenizer (``tokenizer.json``)
and a seeded random initialisation. :func:`default_model_path` builds it once
into the user's cache directory and returns the folder, which
``transformers`` (and Parrot's own backends) load like any Hugging Face
checkpoint.

It is a *test model*: its weights are random, so the text it generates is not
meaningful. It exercises the real code paths (tokenizer, chat template,
attention with grouped-query heads, RoPE, KV cache) at a size that runs on CPU.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_MODEL_NAME",
    "build_default_model",
    "cache_dir",
    "default_model_config",
    "default_model_dir_name",
    "default_model_path",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "parrot-tiny-llama"

# Bump when the weight-filling recipe changes in a way the config hash cannot see.
_RECIPE_VERSION = 1
_SEED = 20240601
_INIT_STD = 0.02
_MAX_LENGTH = 4096

_HERE = Path(__file__).resolve().parent
_TOKENIZER_JSON = _HERE / "tokenizer.json"

# Temp folders older than this are leftovers of a crashed build, never a live one
# (a build takes seconds).
_STALE_AFTER_S = 3600.0

_BOS, _EOS, _UNK, _PAD = "<s>", "</s>", "<unk>", "<pad>"
_CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# Phi-3-like layout: every message is "<|role|>\n{content}<|end|>\n".
_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_README = f"""\
# {DEFAULT_MODEL_NAME}

Parrot's embedded default model, built on this machine by
`parrot.backends.default_model` so that Parrot runs without downloading anything.

**This is a test model.** It has the Llama architecture (4 layers, hidden size
256, 8 query heads sharing 2 key/value heads, RoPE, RMSNorm, SwiGLU) and a real
byte-level BPE tokenizer, but its weights are random numbers drawn from a
seeded generator (seed {_SEED}). The text it generates is not meaningful.
Use it to exercise serving code, not to judge output quality.

The folder is a cache: delete it and Parrot rebuilds it, bit for bit.
"""

_REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "README.md",
)


@functools.cache
def _token_ids() -> dict[str, int]:
    """Ids of the special tokens and the vocabulary size, read from the committed tokenizer."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(_TOKENIZER_JSON))
    ids: dict[str, int] = {"vocab_size": tokenizer.get_vocab_size()}
    for token in (_BOS, _EOS, _UNK, _PAD, *_CHAT_TOKENS):
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise RuntimeError(f"{_TOKENIZER_JSON} lacks the special token {token!r}")
        ids[token] = token_id
    return ids


def default_model_config() -> dict[str, Any]:
    """Return the Hugging Face ``config.json`` contents of the embedded model.

    Written so that both transformers 4 (``rope_theta``, ``torch_dtype``) and
    transformers 5 (``rope_parameters``, ``dtype``) read the same settings.
    """
    ids = _token_ids()
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": ids["vocab_size"],
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "hidden_act": "silu",
        "max_position_embeddings": _MAX_LENGTH,
        "initializer_range": _INIT_STD,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": ids[_BOS],
        "eos_token_id": ids[_EOS],
        "pad_token_id": ids[_PAD],
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def _generation_config() -> dict[str, Any]:
    ids = _token_ids()
    return {
        "bos_token_id": ids[_BOS],
        # <|end|> closes a chat turn, so generation stops there too.
        "eos_token_id": [ids[_EOS], ids["<|end|>"]],
        "pad_token_id": ids[_PAD],
    }


def _special_tokens_map() -> dict[str, Any]:
    return {
        "bos_token": _BOS,
        "eos_token": _EOS,
        "unk_token": _UNK,
        "pad_token": _PAD,
        "additional_special_tokens": list(_CHAT_TOKENS),
    }


def _tokenizer_config() -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **_special_tokens_map(),
        "model_max_length": _MAX_LENGTH,
        # BOS comes from the chat template; plain encode() adds nothing, so
        # decode(encode(s)) == s holds for every string.
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": _CHAT_TEMPLATE,
    }


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _metadata_files() -> dict[str, bytes]:
    """Every file of the model except the weights, as bytes."""
    return {
        "config.json": _json_bytes(default_model_config()),
        "generation_config.json": _json_bytes(_generation_config()),
        "tokenizer.json": _TOKENIZER_JSON.read_bytes(),
        "tokenizer_config.json": _json_bytes(_tokenizer_config()),
        "special_tokens_map.json": _json_bytes(_special_tokens_map()),
        "README.md": _README.encode("utf-8"),
    }


def default_model_dir_name() -> str:
    """Cache folder name: ``parrot-tiny-llama-v<recipe>-<hash>``.

    The hash covers the config, tokenizer and seed, so changing any of them
    lands in a fresh folder instead of reusing a stale build.
    """
    digest = hashlib.sha256(f"seed={_SEED};std={_INIT_STD}".encode())
    for name, data in sorted(_metadata_files().items()):
        if name != "README.md":  # documentation wording does not change the model
            digest.update(name.encode() + b"\0" + data + b"\0")
    return f"{DEFAULT_MODEL_NAME}-v{_RECIPE_VERSION}-{digest.hexdigest()[:10]}"


def cache_dir() -> Path:
    """Parrot's cache root: ``$PARROT_CACHE_DIR``, else ``$XDG_CACHE_HOME/parrot``, else ``~/.cache/parrot``."""
    if explicit := os.environ.get("PARROT_CACHE_DIR"):
        return Path(explicit).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "parrot"
    return Path.home() / ".cache" / "parrot"


def hf_weight_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Hugging Face Llama parameter names and shapes for ``config`` (no
    ``lm_head`` when the embeddings are tied)."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q_dim = config["num_attention_heads"] * head_dim
    kv_dim = config["num_key_value_heads"] * head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not config.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.self_attn.q_proj.weight": (q_dim, hidden),
            f"{p}.self_attn.k_proj.weight": (kv_dim, hidden),
            f"{p}.self_attn.v_proj.weight": (kv_dim, hidden),
            f"{p}.self_attn.o_proj.weight": (hidden, q_dim),
            f"{p}.mlp.gate_proj.weight": (inter, hidden),
            f"{p}.mlp.up_proj.weight": (inter, hidden),
            f"{p}.mlp.down_proj.weight": (hidden, inter),
            f"{p}.input_layernorm.weight": (hidden,),
            f"{p}.post_attention_layernorm.weight": (hidden,),
        }
    return shapes


def _weights(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Seeded float32 weights: N(0, 0.02) for matrices, ones for RMSNorm scales.

    Filled by hand in sorted name order from one generator, because model
    classes' own init differs between transformers versions.
    """
    import torch  # deferred: importing this package should stay cheap

    generator = torch.Generator(device="cpu").manual_seed(_SEED)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in sorted(hf_weight_shapes(config).items()):
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=torch.float32)
        else:
            tensor = torch.empty(shape, dtype=torch.float32)
            tensors[name] = tensor.normal_(0.0, _INIT_STD, generator=generator)
    return tensors


def build_default_model(dest: Path) -> None:
    """Write the embedded model's files into ``dest`` (created if missing).

    Produces ``config.json``, ``generation_config.json``, ``model.safetensors``,
    the tokenizer files and a README. The weights are byte-identical on every
    run for a given torch version. Prefer :func:`default_model_path`, which
    builds atomically into the cache.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name, data in _metadata_files().items():
        (dest / name).write_bytes(data)
    from safetensors.torch import save_file

    weights_path = dest / "model.safetensors"
    save_file(_weights(default_model_config()), str(weights_path), metadata={"format": "pt"})
    weights_path.chmod(0o644)  # safetensors creates it owner-only; match the other files


def _is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in _REQUIRED_FILES)


def _remove_stale_temps(root: Path) -> None:
    """Best effort: delete temp folders that crashed builds left behind."""
    now = time.time()
    for entry in root.glob(f".{DEFAULT_MODEL_NAME}-*.tmp-*"):
        try:
            if now - entry.stat().st_mtime > _STALE_AFTER_S:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:  # removed meanwhile by another process
            pass


def default_model_path(*, progress: Callable[[str], None] | None = None) -> Path:
    """Return the embedded model's folder in :func:`cache_dir`, building it on first use.

    The build goes into a temporary sibling folder that is renamed into place
    in one step, so a crash or a concurrent process never exposes a half-written
    model; if another process finishes first, its folder is used. ``progress``
    receives human-readable status lines (e.g. ``print``).
    """

    def emit(message: str) -> None:
        logger.info(message)
        if progress is not None:
            progress(message)

    root = cache_dir()
    final = root / default_model_dir_name()
    if _is_complete(final):
        return final

    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root)
    if final.exists() and not _is_complete(final):
        # Only reachable if someone deleted files by hand: move it aside atomically,
        # so a concurrent process never sees it half-deleted.
        broken = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-broken-", dir=root))
        try:
            os.replace(final, broken / "model")
        except OSError:
            pass  # another process got there first
        shutil.rmtree(broken, ignore_errors=True)

    emit(f"building the embedded test model in {final} (first use; random weights, text is not meaningful)")
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0o700 would hide a shared cache from other users
        build_default_model(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Lost the race: another process renamed its complete build first.
            if not _is_complete(final):
                raise
            emit(f"using the embedded test model another process just built in {final}")
            return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    emit(f"built the embedded test model in {time.perf_counter() - start:.1f} s")
    return final
