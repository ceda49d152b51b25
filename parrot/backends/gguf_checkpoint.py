"""Llama-family GGUF files, converted once into a Hugging Face folder.

A GGUF file (llama.cpp's format) holds quantized weights, the model's
hyper-parameters and its tokenizer in one file. :func:`convert_gguf` turns one
into the folder layout :func:`parrot.backends.checkpoint.load_model` and
``transformers`` read (``config.json``, ``model.safetensors``,
``tokenizer.json``, ``tokenizer_config.json`` with the chat template,
``generation_config.json``), cached under ``<cache>/gguf/`` and keyed by the
file's SHA-256, so a second start reads the folder and converts nothing.

What is done by which library, and why:

* the file is read with the ``gguf`` package (maintained with llama.cpp):
  ``GGUFReader`` for metadata and tensors, ``gguf.dequantize`` for Q4_1, Q8_0
  and the other block formats, and gguf's tensor-name map for the names;
* llama.cpp's converter permutes the rows of ``q_proj``/``k_proj`` (its RoPE
  pairs adjacent dimensions, Hugging Face pairs halves); that is undone here;
* the tokenizer is converted by ``transformers``'s own GGUF tokenizer support
  (``AutoTokenizer.from_pretrained(..., gguf_file=...)``), which knows the
  vocabulary types (byte-level BPE, SentencePiece) and their special tokens.
  transformers' GGUF *model* loading is not used: it needs ``accelerate``, and
  its checkpoint reader is a private module whose signature moves between the
  transformers versions Parrot supports.

Weights are stored in float32: every dequantized value is exact there, and
the loader casts to the engine's dtype (bfloat16 on CUDA) at load time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = ["GGUFError", "convert_gguf", "file_sha256", "gguf_folder_name"]

#: Bump when the conversion's output changes for the same input file.
_CONVERTER_VERSION = 1
_DONE = ".parrot-converted"  # written last: a folder without it is a crashed build
_SUPPORTED_ARCHS = ("llama",)


class GGUFError(ValueError):
    """A GGUF file Parrot cannot convert (unknown architecture, missing field or tensor)."""


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def gguf_folder_name(path: Path, sha256: str) -> str:
    """``<stem>-v<converter>-<hash>``: a new file or converter lands in a new folder."""
    return f"{path.stem}-v{_CONVERTER_VERSION}-{sha256[:16]}"


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _require(reader: Any, key: str) -> Any:
    value = _field(reader, key)
    if value is None:
        raise GGUFError(f"the GGUF file has no {key!r} field")
    return value


def hf_config(reader: Any) -> dict[str, Any]:
    """The Hugging Face ``config.json`` of a Llama-architecture GGUF file."""
    arch = _require(reader, "general.architecture")
    if arch not in _SUPPORTED_ARCHS:
        raise GGUFError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(_SUPPORTED_ARCHS)})")
    hidden = int(_require(reader, f"{arch}.embedding_length"))
    heads = int(_require(reader, f"{arch}.attention.head_count"))
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", 0) or _field(reader, f"{arch}.rope.dimension_count", 0)
                   or hidden // heads)
    tokens = _require(reader, "tokenizer.ggml.tokens")
    names = {t.name for t in reader.tensors}
    rope_theta = float(_field(reader, f"{arch}.rope.freq_base", 10000.0))
    scaling_type = _field(reader, f"{arch}.rope.scaling.type")
    if scaling_type not in (None, "none"):
        raise GGUFError(f"RoPE scaling {scaling_type!r} in a GGUF file is not supported yet")
    bos, eos = _field(reader, "tokenizer.ggml.bos_token_id"), _field(reader, "tokenizer.ggml.eos_token_id")
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(_field(reader, f"{arch}.vocab_size", len(tokens))),
        "hidden_size": hidden,
        "intermediate_size": int(_require(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_require(reader, f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(_require(reader, f"{arch}.context_length")),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        # Both spellings: transformers 4 reads rope_theta, transformers 5 rope_parameters.
        "rope_theta": rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
        "pad_token_id": None if pad is None else int(pad),
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def _unpermute(w: "np.ndarray", n_head: int) -> "np.ndarray":
    """Undo llama.cpp's q/k row order (RoPE over adjacent pairs) back to Hugging Face's (halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensors(reader: Any, config: dict[str, Any]) -> dict[str, "torch.Tensor"]:
    """The file's tensors under Hugging Face Llama names, dequantized to float32."""
    import gguf
    import numpy as np
    import torch

    from .default_model import hf_weight_shapes

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    by_name = {t.name: t for t in reader.tensors}
    out: dict[str, torch.Tensor] = {}
    for hf_name, shape in hf_weight_shapes(config).items():
        base, suffix = hf_name.rsplit(".", 1)
        gguf_base = name_map.get_name(base)
        tensor = by_name.get(f"{gguf_base}.{suffix}") if gguf_base else None
        if tensor is None:
            raise GGUFError(f"the GGUF file has no tensor for {hf_name} (looked for {gguf_base}.{suffix})")
        values = np.asarray(gguf.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
        if base.endswith("self_attn.q_proj"):
            values = _unpermute(values, config["num_attention_heads"])
        elif base.endswith("self_attn.k_proj"):
            values = _unpermute(values, config["num_key_value_heads"])
        out[hf_name] = torch.from_numpy(np.array(values, order="C"))  # a writable copy
    return out


def _write_tokenizer(gguf_path: Path, reader: Any, dest: Path) -> dict[str, Any]:
    """tokenizer.json + tokenizer_config.json (chat template, special tokens); returns the config."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(dest))
    config_file = dest / "tokenizer_config.json"
    tok_config = json.loads(config_file.read_text(encoding="utf-8"))
    # A class name transformers 4 and 5 both know (5 writes its own "TokenizersBackend"),
    # and none of the loading-time keys of this one conversion.
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("backend", "is_local", "local_files_only", "name_or_path"):
        tok_config.pop(key, None)
    # The template goes into tokenizer_config.json, where transformers 4 and 5 both read it.
    template = _field(reader, "tokenizer.chat_template")
    (dest / "chat_template.jinja").unlink(missing_ok=True)
    if template:
        tok_config["chat_template"] = template
    # BOS as the file says: llama.cpp's add_bos_token (SmolLM2: no BOS; its template writes <|im_start|>).
    tok_config["add_bos_token"] = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    tok_config["add_eos_token"] = bool(_field(reader, "tokenizer.ggml.add_eos_token", False))
    tok_config["clean_up_tokenization_spaces"] = False
    config_file.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return tok_config


def _generation_config(reader: Any, config: dict[str, Any]) -> dict[str, Any]:
    eos = [config["eos_token_id"]] if config["eos_token_id"] is not None else []
    eot = _field(reader, "tokenizer.ggml.eot_token_id")
    if eot is not None and int(eot) not in eos:
        eos.append(int(eot))  # the end of a chat turn ends generation too
    return {"bos_token_id": config["bos_token_id"], "eos_token_id": eos, "pad_token_id": config["pad_token_id"]}


def build_folder(gguf_path: Path, dest: Path) -> None:
    """Write the Hugging Face folder of ``gguf_path`` into ``dest`` (prefer :func:`convert_gguf`)."""
    from gguf import GGUFReader
    from safetensors.torch import save_file

    try:
        reader = GGUFReader(str(gguf_path))
    except Exception as exc:  # the reader's own errors: bad magic, truncated file, unknown version
        raise GGUFError(f"{gguf_path} is not a readable GGUF file: {exc}") from exc
    config = hf_config(reader)
    dest.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(gguf_path, reader, dest)
    save_file(hf_tensors(reader, config), str(dest / "model.safetensors"), metadata={"format": "pt"})
    (dest / "model.safetensors").chmod(0o644)  # a shared cache is readable by its other users
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    generation = _generation_config(reader, config)
    (dest / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    name = _field(reader, "general.name", gguf_path.stem)
    license_ = _field(reader, "general.license", "see the original model card")
    (dest / "README.md").write_text(
        f"# {name}\n\nConverted by Parrot from `{gguf_path.name}` (dequantized to float32).\n"
        f"License of the weights: {license_}.\n",
        encoding="utf-8",
    )
    (dest / _DONE).write_text(json.dumps({"source": str(gguf_path), "converter": _CONVERTER_VERSION}) + "\n")


def convert_gguf(
    gguf_path: str | Path, *, root: Path | None = None, progress: Callable[[str], None] | None = None
) -> Path:
    """The Hugging Face folder for a GGUF file, converted on first use.

    Cached in ``<root>/gguf/<stem>-v<converter>-<sha256>`` (``root`` defaults
    to :func:`parrot.backends.default_model.cache_dir`); built in a temporary
    folder and renamed, so a crash or a concurrent start never leaves half a
    folder in place. Raises ``FileNotFoundError`` for a missing file and
    :class:`GGUFError` for one that cannot be converted.
    """
    from .default_model import cache_dir

    path = Path(gguf_path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    emit = progress or (lambda _msg: None)
    parent = (root or cache_dir()) / "gguf"
    final = parent / gguf_folder_name(path, file_sha256(path))
    if (final / _DONE).is_file():
        return final
    parent.mkdir(parents=True, exist_ok=True)
    emit(f"converting {path.name} ({path.stat().st_size / 2**20:.0f} MiB) into {final} (first use)")
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=parent))
    try:
        tmp.chmod(0o755)
        build_folder(path, tmp)
        if final.exists():  # a crashed build without the marker, or a concurrent finisher
            if (final / _DONE).is_file():
                return final
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / _DONE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    emit(f"converted in {time.perf_counter() - start:.1f} s")
    return final
