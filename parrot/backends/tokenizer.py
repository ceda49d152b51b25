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
        # Whether a plain prompt starts with BOS: as the tokenizer itself does
        # it (Llama adds one; SmolLM2, whose BOS is <|im_start|>, does not).
        probe = self.hf.encode("a", add_special_tokens=True)
        self.prompt_bos: bool = self.bos_token_id is not None and probe[:1] == [self.bos_token_id]
        # Decoding runs once per generated token: call the Rust tokenizer
        # directly when the wrapper would add nothing (it converts and checks
        # every id in Python first).
        cleanup = bool(getattr(self.hf, "clean_up_tokenization_spaces", False))
        self._backend = getattr(self.hf, "backend_tokenizer", None) if self.hf.is_fast and not cleanup else None
        self._frames: dict[tuple[tuple[str, str], ...], tuple[list[int], list[int]]] = {}
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

    #: The model's chat template is here (a model without one raises ValueError on use).
    renders_chat = True

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> str:
        """The prompt the model's own chat template makes of ``messages``."""
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The chat template's text of ``messages`` ready to prompt with: the
        engine puts BOS before every prompt, so a BOS the template writes too
        is dropped. Raises ``ValueError`` when the template rejects them."""
        try:
            text = self.apply_chat_template(messages)
        except Exception as exc:  # jinja's raise_exception, a model without a template, ...
            raise ValueError(f"the model's chat template rejected the messages: {exc}") from exc
        bos = self.hf.bos_token
        if bos and self.bos_token_id is not None and text.startswith(bos):
            text = text[len(bos):]
        return text

    def chat_frame(self, messages: Sequence[dict[str, str]] = ()) -> tuple[list[int], list[int]]:
        """Token ids the chat template puts before and after one more user turn.

        ``messages`` (a system message, earlier turns) come first; the user
        turn's content is left out, so a caller tokenizes it in pieces. The
        head ends where that content starts, the tail where the assistant's
        answer starts. The template's own text (role markers, BOS if the
        template writes it) is tokenized with special tokens; the messages'
        contents never are. Raises ``ValueError`` when the model has no chat
        template or the template does not place contents verbatim.
        """
        key = tuple((m["role"], m["content"]) for m in messages)
        if key not in self._frames:
            self._frames[key] = self._chat_frame(list(messages))
        return self._frames[key]

    def _chat_frame(self, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        markers = [f"\x1fparrot-turn-{i}\x1f" for i in range(len(messages) + 1)]
        marked = [{"role": m["role"], "content": markers[i]} for i, m in enumerate(messages)]
        try:
            rest = self.apply_chat_template([*marked, {"role": "user", "content": markers[-1]}])
        except Exception as exc:  # no template, or jinja's raise_exception (say, no system role)
            raise ValueError(f"the model's chat template cannot render these turns: {exc}") from exc
        head: list[int] = []
        for marker, message in zip(markers, [*messages, None]):
            frame, found, rest = rest.partition(marker)
            if not found:
                raise ValueError("the model's chat template does not place message contents verbatim")
            head += self.hf.encode(frame, add_special_tokens=False)
            if message is not None:
                head += self.hf.encode(message["content"], add_special_tokens=False, split_special_tokens=True)
        return head, self.hf.encode(rest, add_special_tokens=False)


def read_generation_eos(path: str | Path) -> list[int]:
    """EOS ids from ``generation_config.json``, which some models list there only."""
    file = Path(path) / "generation_config.json"
    if not file.exists():
        return []
    eos = json.loads(file.read_text()).get("eos_token_id")
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)
