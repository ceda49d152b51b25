"""Load a local Hugging Face checkpoint folder into :class:`LlamaFamilyModel`.

Only ``config.json`` plus ``*.safetensors`` (single file or sharded with
``model.safetensors.index.json``) are read; nothing is ever downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from parrot.backends.model import LlamaFamilyModel, ModelConfig

INDEX_FILE = "model.safetensors.index.json"


def _folder(path: str | Path) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(folder)!r} does not exist or is not a directory")
    return folder


def read_model_config(path: str | Path) -> ModelConfig:
    """Read ``<path>/config.json`` into a :class:`ModelConfig`.

    Raises ``FileNotFoundError`` if the folder or its ``config.json`` is
    missing, ``ValueError`` if the config is not valid JSON or not supported.
    """
    config_path = _folder(path) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in checkpoint folder {str(config_path.parent)!r}")
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(config_path)!r} is not valid JSON: {e}") from e
    try:
        return ModelConfig.from_hf_dict(data)
    except ValueError as e:
        raise ValueError(f"{config_path}: {e}") from e


def _safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files: those named by the shard index, else every ``*.safetensors``."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{str(index)!r} has no 'weight_map'")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"shards listed in {str(index)!r} are missing: {absent}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    other = sorted(p.name for p in folder.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".gguf"})
    hint = f" (found {other}; only safetensors checkpoints are supported)" if other else ""
    raise FileNotFoundError(f"no *.safetensors weight files in checkpoint folder {str(folder)!r}{hint}")


class _LazyTensors(Mapping[str, torch.Tensor]):
    """Read-on-access view of the tensors of several open safetensors files.

    Loading through it keeps peak host memory at one tensor rather than the
    whole checkpoint.
    """

    def __init__(self, handles: list[Any]) -> None:
        self._where: dict[str, Any] = {}
        for handle in handles:
            for name in handle.keys():
                self._where[name] = handle

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> LlamaFamilyModel:
    """Build a :class:`LlamaFamilyModel` from a local checkpoint folder.

    ``dtype`` defaults to bfloat16 on CUDA and float32 elsewhere. The model is
    returned in eval mode. Raises ``FileNotFoundError`` for a missing folder,
    ``config.json`` or safetensors files, ``ValueError`` for unsupported
    configs or weights that do not match the config.
    """
    folder = _folder(path)
    config = read_model_config(folder)
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    files = _safetensors_files(folder)
    model = LlamaFamilyModel(config, dtype=dtype, device=device)
    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(f), framework="pt", device="cpu")) for f in files]
        try:
            model.load_state_dict_hf(_LazyTensors(handles))
        except ValueError as e:
            raise ValueError(f"{folder}: {e}") from e
    return model.eval()
