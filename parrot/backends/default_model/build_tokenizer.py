"""Regenerate ``tokenizer.json`` for Parrot's embedded test model.

Run with::

    python -m parrot.backends.default_model.build_tokenizer

It trains a byte-level BPE tokenizer on text available offline: the
docstrings of a fixed list of standard-library modules plus ``corpus.txt``
beside this file. Docstrings differ a little between Python versions, so the
output is committed and :func:`~parrot.backends.default_model.build_default_model`
copies it rather than retraining; that is what keeps the default model
identical across machines. Rerun this script only to change the tokenizer on
purpose (which also changes the model's cache folder name).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import warnings
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = Path(__file__).resolve().parent
TOKENIZER_PATH = HERE / "tokenizer.json"
CORPUS_PATH = HERE / "corpus.txt"

VOCAB_SIZE = 4096

# Ids 0-3 follow the Llama convention (unk, bos, eos) so configs look familiar.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# A fixed, sorted list so the corpus only changes when this list does.
STDLIB_MODULES = [
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar",
    "collections", "concurrent.futures", "configparser", "contextlib", "copy",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message",
    "enum", "fractions", "functools", "glob", "gzip", "hashlib", "heapq",
    "html", "http.client", "http.server", "inspect", "io", "ipaddress",
    "itertools", "json", "logging", "mailbox", "math", "mimetypes",
    "multiprocessing", "numbers", "operator", "os", "pathlib", "pickle",
    "platform", "pprint", "queue", "random", "re", "sched", "secrets",
    "selectors", "shlex", "shutil", "smtplib", "socket", "sqlite3",
    "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "time", "tokenize", "traceback", "typing", "unittest",
    "urllib.parse", "urllib.request", "uuid", "warnings", "weakref",
    "xml.dom.minidom", "zipfile",
]


def _docstrings(module_name: str) -> Iterator[str]:
    """Yield the module's docstring and those of its public classes, functions and methods."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:  # e.g. a Python built without sqlite3
        return
    objects: list[object] = [module]
    for name in sorted(vars(module)):
        if name.startswith("_"):
            continue
        obj = vars(module)[name]
        # Only objects defined here: re-exports would repeat other modules' text.
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            objects.append(obj)
            if inspect.isclass(obj):
                objects.extend(
                    member
                    for member_name, member in sorted(vars(obj).items())
                    if not member_name.startswith("_") and inspect.isfunction(member)
                )
    for obj in objects:
        # __doc__ rather than inspect.getdoc: inherited docstrings would repeat.
        doc = obj.__doc__ if isinstance(obj.__doc__, str) else None
        if doc:
            yield inspect.cleandoc(doc)


def corpus() -> list[str]:
    """The training texts: deduplicated stdlib docstrings, then corpus.txt's paragraphs."""
    seen: set[str] = set()
    texts: list[str] = []
    with warnings.catch_warnings():
        # Touching deprecated aliases (typing.io, ...) warns; their text is still fine.
        warnings.simplefilter("ignore", DeprecationWarning)
        for module_name in STDLIB_MODULES:
            for doc in _docstrings(module_name):
                if doc not in seen:
                    seen.add(doc)
                    texts.append(doc)
    prose = CORPUS_PATH.read_text(encoding="utf-8")
    # Repeat the prose so everyday English outweighs API jargon in the merges.
    texts.extend(p for p in prose.split("\n\n") for _ in range(8) if p.strip())
    return texts


def train(texts: list[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train a byte-level BPE tokenizer that round-trips any text exactly."""
    tokenizer = Tokenizer(models.BPE())
    # No normalizer and no prefix space: decode(encode(s)) == s for every string.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS + CHAT_TOKENS,
        # All 256 byte symbols, so no input ever needs <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def main(argv: list[str] | None = None) -> None:
    """Train the tokenizer and write it to ``tokenizer.json`` (or ``--output``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=TOKENIZER_PATH)
    args = parser.parse_args(argv)
    texts = corpus()
    tokenizer = train(texts)
    # Compact JSON keeps the committed file small.
    tokenizer.save(str(args.output), pretty=False)
    size_kb = args.output.stat().st_size / 1024
    print(
        f"trained on {len(texts)} texts ({sum(map(len, texts)) / 1e6:.2f} M chars): "
        f"vocab {tokenizer.get_vocab_size()}, wrote {args.output} ({size_kb:.0f} KB)"
    )


if __name__ == "__main__":
    main()
