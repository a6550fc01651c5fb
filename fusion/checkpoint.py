"""Checkpoint access: a lazy, memory-mapped view of a model directory or hub repo, and the key
mapping between a LLaVA-style checkpoint and its base LLM.

Tensors are read with ``safetensors.safe_open``: headers are parsed (and checked) up front,
data are memory-mapped and paged in only when a tensor is used, so opening a 7B checkpoint
costs no RAM. Pickle ``.bin`` weights can run code when loaded; they are read only when the
caller passes ``allow_pickle=True``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .errors import FusionError

# Files that make a checkpoint usable besides its weights; copied from the tuned model.
SIDECAR_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "preprocessor_config.json",
    "processor_config.json",
    "image_processor_config.json",
    "chat_template.json",
    "chat_template.jinja",
)
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class Checkpoint:
    """The tensors and config of one model directory, read lazily.

    ``ref`` is what the user named (a path or a hub repo id); ``directory`` is where the files
    are. ``get(name)`` returns a CPU tensor backed by the file's memory map (do not modify it).
    """

    def __init__(self, directory: Path, ref: str | None = None, *, allow_pickle: bool = False) -> None:
        self.directory = Path(directory)
        self.ref = ref or str(directory)
        self.config = self._read_config()
        self._index: dict[str, TensorInfo] = {}
        self._handles: dict[Path, Any] = {}
        files = sorted(self.directory.glob("*.safetensors"))
        if files:
            for file in files:
                self._open_safetensors(file)
        else:
            pickles = sorted(self.directory.glob("*.bin"))
            if not pickles:
                raise FusionError(f"{self.directory}: no .safetensors weight files found")
            if not allow_pickle:
                raise FusionError(
                    f"{self.directory} holds only pickle .bin weights ({pickles[0].name}, ...), which can run code "
                    "when loaded; convert them to safetensors, or pass --allow-pickle if you trust the source"
                )
            for file in pickles:
                self._open_pickle(file)

    def _read_config(self) -> dict[str, Any]:
        path = self.directory / "config.json"
        if not path.is_file():
            raise FusionError(f"{self.directory}: no config.json (is this a model directory?)")
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise FusionError(f"{path}: not valid JSON ({err})") from None

    def _add(self, name: str, info: TensorInfo) -> None:
        if name in self._index:
            raise FusionError(f"tensor '{name}' appears in both {self._index[name].file.name} and {info.file.name}")
        self._index[name] = info

    def _open_safetensors(self, file: Path) -> None:
        try:
            handle = safe_open(str(file), framework="pt")
            for name in handle.keys():
                part = handle.get_slice(name)
                self._add(name, TensorInfo(file, tuple(part.get_shape()), _SAFETENSORS_DTYPES[part.get_dtype()]))
        except (SafetensorError, OSError) as err:
            raise FusionError(f"{file}: not a readable safetensors file (corrupt or truncated?): {err}") from None
        except KeyError as err:
            raise FusionError(f"{file}: unsupported tensor dtype {err}") from None
        self._handles[file] = handle

    def _open_pickle(self, file: Path) -> None:
        try:
            tensors = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except Exception as err:  # torch raises many types for a bad archive
            raise FusionError(f"{file}: not a readable PyTorch weights file: {err}") from None
        for name, tensor in tensors.items():
            self._add(name, TensorInfo(file, tuple(tensor.shape), tensor.dtype))
        self._handles[file] = tensors

    # --- queries -----------------------------------------------------------------------

    def keys(self) -> list[str]:
        return list(self._index)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def info(self, name: str) -> TensorInfo:
        return self._index[name]

    def get(self, name: str) -> torch.Tensor:
        """The tensor, memory-mapped from its file; raises FusionError naming file and tensor
        if the data cannot be read."""
        info = self._index[name]
        handle = self._handles[info.file]
        if isinstance(handle, dict):
            return handle[name]
        try:
            return handle.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as err:
            raise FusionError(f"{info.file}: cannot read tensor '{name}': {err}") from None

    def text_config(self) -> dict[str, Any]:
        """The language model's config: ``text_config`` of a multimodal model, else the config."""
        return self.config.get("text_config") or self.config

    def sidecar_files(self) -> Iterator[Path]:
        for pattern in SIDECAR_PATTERNS:
            path = self.directory / pattern
            if path.is_file():
                yield path

    def fingerprint(self) -> list[tuple[str, int, int]]:
        """(file, size, mtime) of every weight and config file: what the cache key depends on."""
        files = sorted({info.file for info in self._index.values()} | set(self.sidecar_files()))
        return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def resolve_directory(ref: str, *, allow_pickle: bool = False) -> Path:
    """A local directory as it is, or a hub repo id downloaded (safetensors and sidecar files
    only, unless ``allow_pickle``) into the Hugging Face cache. With no network, a complete
    cached copy is used; with neither, a FusionError says so."""
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FusionError(f"{ref}: not a directory (expected a model directory or a hub repo id)")
        return path
    if not _HUB_ID.match(ref):
        raise FusionError(f"{ref}: no such directory, and not a hub repo id of the form owner/name")
    from huggingface_hub import snapshot_download

    patterns = ["*.safetensors", "*.safetensors.index.json", *SIDECAR_PATTERNS] + (["*.bin", "*.bin.index.json"] if allow_pickle else [])
    try:
        return Path(snapshot_download(ref, allow_patterns=patterns))
    except Exception as online_error:  # network, auth, missing repo: try the local cache
        try:
            return Path(snapshot_download(ref, allow_patterns=patterns, local_files_only=True))
        except Exception:
            raise FusionError(
                f"cannot fetch '{ref}' from the Hugging Face Hub ({type(online_error).__name__}: "
                f"{str(online_error).splitlines()[0] if str(online_error) else 'no detail'}) and no local copy is "
                f"cached under {os.environ.get('HF_HOME', '~/.cache/huggingface')}"
            ) from None


def open_checkpoint(ref: str, *, allow_pickle: bool = False) -> Checkpoint:
    """Open a checkpoint named by a local path or a hub repo id."""
    return Checkpoint(resolve_directory(ref, allow_pickle=allow_pickle), ref, allow_pickle=allow_pickle)


# --- key mapping --------------------------------------------------------------------------

# (prefix in the tuned checkpoint, prefix in the base LLM); first match wins.
_LAYOUTS: dict[str, tuple[tuple[str, str], ...]] = {
    # llava-hf on-disk layout (transformers < 4.52 and still written by save_pretrained)
    "llava": (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")),
    # newer in-memory layout, also found on disk
    "llava-nested": (("model.language_model.", "model."), ("lm_head.", "lm_head.")),
    # a plain LLM fine-tuned from the base: every tensor maps to itself
    "llm": (("", ""),),
}


def detect_layout(keys: list[str]) -> str:
    """Which naming a tuned checkpoint uses: 'llava', 'llava-nested', or 'llm'."""
    if any(k.startswith("language_model.") for k in keys):
        return "llava"
    if any(k.startswith("model.language_model.") for k in keys):
        return "llava-nested"
    return "llm"


def base_key(key: str, layout: str) -> str | None:
    """The base LLM's name for a tuned tensor, or None if it is not part of the language model
    (vision tower, projector, ...)."""
    for tuned_prefix, base_prefix in _LAYOUTS[layout]:
        if key.startswith(tuned_prefix):
            return base_prefix + key[len(tuned_prefix) :]
    return None
