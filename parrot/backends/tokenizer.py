"""The tokenizer of a local model folder, behind the small surface engines use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence


class Tokenizer:
    """Wraps a Hugging Face tokenizer loaded from a local folder (never the hub)."""

    def __init__(self, path: str | Path, eos_token_ids: Sequence[int] = ()) -> None:
        from transformers import AutoTokenizer  # imported here: transformers is slow to import

        self.path = Path(path)
        if not (self.path / "tokenizer.json").exists() and not (self.path / "tokenizer.model").exists():
            raise FileNotFoundError(f"{self.path}: no tokenizer.json or tokenizer.model in the model folder")
        self.hf = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        # Engines check prompt length against the model themselves; silence
        # the tokenizer's own warning about it.
        self.hf.model_max_length = 1 << 62
        self.bos_token_id: int | None = self.hf.bos_token_id
        eos = set(eos_token_ids)
        if self.hf.eos_token_id is not None:
            eos.add(self.hf.eos_token_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        self.vocab_size = len(self.hf)
        # Decoding runs once per generated token: call the Rust tokenizer
        # directly when the wrapper would add nothing (it converts and checks
        # every id in Python first).
        cleanup = bool(getattr(self.hf, "clean_up_tokenization_spaces", False))
        self._backend = getattr(self.hf, "backend_tokenizer", None) if self.hf.is_fast and not cleanup else None
        # A second Rust tokenizer that reads special tokens written in text as
        # plain characters. Its own copy: the flag is state on the tokenizer,
        # and toggling one shared copy per call would race between threads.
        self._plain = None
        backend = getattr(self.hf, "backend_tokenizer", None)
        if self.hf.is_fast and backend is not None:
            from tokenizers import Tokenizer as RustTokenizer

            self._plain = RustTokenizer.from_str(backend.to_str())
            self._plain.encode_special_tokens = True

    def encode(self, text: str, *, add_bos: bool = False, special: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_bos`` prepends the BOS token if the model has one.

        By default every character is text: ``<s>`` or ``<|system|>`` written
        in user text become ordinary tokens, so a user cannot forge control
        tokens. ``special=True`` reads them as the control tokens they name;
        only a template's own text is encoded so.
        """
        if special:
            ids: list[int] = self.hf.encode(text, add_special_tokens=False)
        elif self._plain is not None:
            ids = self._plain.encode(text, add_special_tokens=False).ids
        else:  # a slow tokenizer takes the option per call
            ids = self.hf.encode(text, add_special_tokens=False, split_special_tokens=True)
        if add_bos and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids`` with special tokens dropped."""
        if self._backend is not None:
            return self._backend.decode(list(token_ids), skip_special_tokens=True)
        return self.hf.decode(list(token_ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> str:
        """The prompt the model's own chat template makes of ``messages``."""
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def read_generation_eos(path: str | Path) -> list[int]:
    """EOS ids from ``generation_config.json``, which some models list there only."""
    file = Path(path) / "generation_config.json"
    if not file.exists():
        return []
    eos = json.loads(file.read_text()).get("eos_token_id")
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)
