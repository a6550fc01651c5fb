"""Checkpoint access: a lazy, memory-mapped view of a model directory or hub repo.

Tensors are read with ``safetensors.safe_open``: headers are parsed (and checked) up front,
data are memory-mapped and paged in only when a tensor is used, so opening a 7B checkpoint
costs no RAM. Some real checkpoints ship only pickle ``.bin`` shards (Vicuna v1.5): those are
read with ``torch.load(weights_only=True)``, an unpickler that rebuilds tensors and plain types
and refuses anything else, with a notice naming the files; ``allow_pickle=False`` refuses them.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .architectures import language_config
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
CARD_PATTERN = "README.md"  # read for the merge's own card (the license), never copied into the output
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


# What torch's weights-only unpickler says when a pickle asks for a global or an operation it
# will not run (rather than bytes it cannot parse).
_CODE_IN_PICKLE = re.compile(r"Unsupported global: GLOBAL (\S+)")

# A config or shard index is small (llava-1.5-13b's index: 70 KB); a bigger one is not one,
# and reading it would cost memory many times its size.
MAX_JSON_BYTES = 16 << 20


def _json_type(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(type(value), "a number")


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """``path`` as a JSON object, or a FusionError naming the file and what is wrong: too large,
    not JSON, nested too deeply to parse, or JSON that is not an object (``[]``, ``null``)."""
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise FusionError(f"{path}: {size / 2**20:.0f} MB is too large for a {what} (at most {MAX_JSON_BYTES >> 20} MB)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise FusionError(f"{path}: not valid JSON ({err})") from None
    except ValueError:  # text that is not UTF-8, or a number longer than Python converts
        raise FusionError(f"{path}: not readable as JSON (not UTF-8 text, or a number of thousands of digits)") from None
    except RecursionError:
        raise FusionError(f"{path}: nested too deeply to be a {what}") from None
    if not isinstance(data, dict):
        raise FusionError(f"{path}: a {what} must be a JSON object, not {_json_type(data)}")
    return data


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


# The weight files a checkpoint may have, in the order ``from_pretrained`` looks for them: an
# index (which then names every shard) or a single file; safetensors before pickle.
WEIGHT_SOURCES: tuple[tuple[str, bool], ...] = (
    ("model.safetensors.index.json", True),
    ("model.safetensors", False),
    ("pytorch_model.bin.index.json", True),
    ("pytorch_model.bin", False),
)
SAFETENSORS_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
PICKLE_PATTERNS = ("*.bin", "*.bin.index.json")
log = logging.getLogger("fusion")


class Checkpoint:
    """The tensors and config of one model directory, read lazily.

    ``ref`` is what the user named (a path or a hub repo id); ``directory`` is where the files
    are. ``get(name)`` returns a CPU tensor backed by the file's memory map (do not modify it).
    The weight files are the ones ``from_pretrained`` would read: those a shard index lists
    (every one must exist; other files beside them are ignored), or the single weights file.
    """

    def __init__(self, directory: Path, ref: str | None = None, *, allow_pickle: bool = True) -> None:
        self.directory = Path(directory)
        self.ref = ref or str(directory)
        self.config = self._read_config()
        self._index: dict[str, TensorInfo] = {}
        self._handles: dict[Path, Any] = {}
        files, listed = self._weight_files()
        if files[0].suffix == ".bin":
            if not allow_pickle:
                raise FusionError(
                    f"{self.ref} holds only pickle .bin weights ({', '.join(f.name for f in files)}) and pickle reading was turned "
                    "off (--no-pickle / allow_pickle=False); allow it, or convert the weights to safetensors"
                )
            log.warning(
                "%s: reading pickle weights %s with torch.load(weights_only=True), which loads tensors and plain types only",
                self.ref,
                ", ".join(f.name for f in files),
            )
        for file in files:
            self._open_safetensors(file) if file.suffix == ".safetensors" else self._open_pickle(file)
        for name, file in (listed or {}).items():
            if name not in self._index or self._index[name].file != file:
                raise FusionError(f"{file}: the shard index lists tensor '{name}' in this file, but the file does not hold it")
        if not self._index:
            raise FusionError(f"{self.ref}: its weight files ({', '.join(f.name for f in files)}) hold no tensors")

    def _weight_files(self) -> tuple[list[Path], dict[str, Path] | None]:
        """The weight files to read and, from an index, where it says each tensor is."""
        for name, is_index in WEIGHT_SOURCES:
            path = self.directory / name
            if not path.is_file():
                continue
            if not is_index:
                return [path], None
            weight_map = read_json_object(path, "shard index").get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise FusionError(f"{path}: not a readable shard index (its 'weight_map' must map tensor names to file names)")
            listed = {tensor: self.directory / file for tensor, file in weight_map.items()}
            files = sorted(set(listed.values()))
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise FusionError(f"{path} lists shard {missing[0]}, which is missing from {self.directory}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
            if not files:
                raise FusionError(f"{path}: the shard index lists no tensors")
            return files, listed
        raise FusionError(f"{self.directory}: no weights (expected {', '.join(name for name, _ in WEIGHT_SOURCES)})")

    def _read_config(self) -> dict[str, Any]:
        path = self.directory / "config.json"
        if not path.is_file():
            raise FusionError(f"{self.directory}: no config.json (is this a model directory?)")
        config = read_json_object(path, "model config")
        if not isinstance(config.get("text_config", {}), dict):
            raise FusionError(f"{path}: 'text_config' must be a JSON object, not {_json_type(config['text_config'])}")
        return config

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
        except pickle.UnpicklingError as err:
            asked = _CODE_IN_PICKLE.search(str(err))
            if asked is None:  # bytes the unpickler cannot parse: damage, not code
                raise FusionError(f"{file}: not a readable PyTorch weights file (corrupt or truncated?)") from None
            raise FusionError(
                f"{file}: refused: it asks for '{asked.group(1)[:80]}', which is not a tensor or plain type and could run code "
                "when loaded (a damaged file can look like this too); convert the checkpoint to safetensors, or load it yourself "
                "if you trust where it came from"
            ) from None
        except Exception as err:  # torch raises many types for a damaged archive; its words name internals
            raise FusionError(f"{file}: not a readable PyTorch weights file (corrupt or truncated?; {type(err).__name__})") from None
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise FusionError(f"{file}: not a PyTorch state dict (expected a mapping of tensor names to tensors)")
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
        """The language model's config (``architectures.language_config``)."""
        return language_config(self.config)

    def sidecar_files(self) -> Iterator[Path]:
        """The sidecar files there are, each checked: a symbolic link must lead to a file inside
        the model (for a hub cache snapshot, inside the repo's cache folder, where its blobs
        are); one that leads outside would copy a stranger's file into the output, and one that
        leads nowhere (a loop) would silently drop a file the output needs."""
        root = self.directory.resolve()
        if root.parent.name == "snapshots":  # .../models--org--name/snapshots/<revision>
            root = root.parents[1]
        for pattern in SIDECAR_PATTERNS:
            path = self.directory / pattern
            if path.is_symlink():
                try:
                    target = path.resolve(strict=True)
                except (OSError, RuntimeError):
                    raise FusionError(f"{path}: a symbolic link that leads nowhere (a loop, or its target is missing)") from None
                if not target.is_relative_to(root):
                    raise FusionError(f"{path}: a symbolic link to {target}, outside the model; copy the file in instead")
            if path.is_file():
                yield path

    def fingerprint(self) -> list[tuple[str, int, int]]:
        """(file, size, mtime) of every weight and config file: what the cache key depends on."""
        files = sorted({info.file for info in self._index.values()} | set(self.sidecar_files()))
        return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def is_hub_id(ref: str) -> bool:
    """Whether ``ref`` names a Hub repository (``owner/name``) rather than a directory here."""
    return bool(_HUB_ID.match(ref)) and not Path(ref).expanduser().exists()


def resolve_directory(ref: str, *, allow_pickle: bool = True) -> Path:
    """A local directory as it is, or a hub repo id fetched into the Hugging Face cache: its
    safetensors weights and sidecar files, or, for a repo without safetensors (Vicuna v1.5 ships
    only pickle shards), its ``.bin`` weights and their index. With no network (or
    ``HF_HUB_OFFLINE=1``) a cached copy is used; with neither, a FusionError says so."""
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FusionError(f"{ref}: not a directory (expected a model directory or a hub repo id)")
        return path
    if not is_hub_id(ref):
        raise FusionError(f"{ref}: no such directory, and not a hub repo id of the form owner/name")
    directory = _snapshot(ref, (*SAFETENSORS_PATTERNS, *SIDECAR_PATTERNS, CARD_PATTERN))
    if allow_pickle and not any(directory.glob("*.safetensors")):
        directory = _snapshot(ref, (*PICKLE_PATTERNS, *SIDECAR_PATTERNS, CARD_PATTERN))
    return directory


def _snapshot(ref: str, patterns: tuple[str, ...]) -> Path:
    """``snapshot_download`` of the files matching ``patterns``; offline or unreachable, the
    cached snapshot. Raises FusionError only when the hub was needed and could not be had."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref, allow_patterns=list(patterns)))
    except Exception as online_error:  # network, auth, missing repo, offline mode: try the local cache
        try:
            return Path(snapshot_download(ref, allow_patterns=list(patterns), local_files_only=True))
        except Exception:
            detail = str(online_error).strip().splitlines()[0] if str(online_error).strip() else "no detail"
            raise FusionError(
                f"cannot fetch '{ref}' from the Hugging Face Hub ({type(online_error).__name__}: {detail[:200]}) and no copy "
                "of it is in the local Hugging Face cache"
            ) from None


def open_checkpoint(ref: str, *, allow_pickle: bool = True) -> Checkpoint:
    """Open a checkpoint named by a local path or a hub repo id."""
    return Checkpoint(resolve_directory(ref, allow_pickle=allow_pickle), ref, allow_pickle=allow_pickle)
