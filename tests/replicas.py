"""Shape-faithful offline replicas of the hub presets' repositories, in a Hugging Face cache.

No machine of this project reaches the Hub, so the hub presets are proven on replicas: the real
repos' file names and formats (``.bin`` vs safetensors, ``tokenizer.model`` vs
``tokenizer.json``), weight key names and shard assignment, config fields and sidecar files,
with the sizes shrunk (hidden sizes, vocabulary) and random weights. They are written as the
cache layout ``models--org--name/snapshots/<rev>/...`` + ``refs/main`` that ``HF_HUB_OFFLINE=1``
reads. The facts below were read off the real repositories (their file listings, configs,
tokenizer and processor files, shard indexes) and are written here so that the tests need
nothing outside the project.

Shrunk: vocabulary 32000 → ``VOCAB`` (a SentencePiece model trained here), padded vocabulary
32064 → ``VOCAB + 64`` (the same 64 extra rows), hidden sizes (kept multiples of 32 where 4-bit
runs on them, as bitsandbytes' CPU kernel needs and every real size is). Kept: layer counts,
image size and patch size (576 image tokens), dtypes, special-token ids relative to the
vocabulary, every file name.
"""

from __future__ import annotations

import copy
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import torch
from safetensors.torch import save_file

VOCAB = 320  # stands for 32000
PAD_ROWS = 64  # llava-hf pads 32000 -> 32064
REVISION = "0" * 40

# --- the real files, sizes shrunk -------------------------------------------------------------

_SPECIAL = {"content": "", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def _token(text: str, **extra: object) -> dict:
    return {**_SPECIAL, "content": text, **extra}


LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
CLIP_336_PREPROCESSOR = {
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "processor_class": "LlavaProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}
# CLIP ViT-L/14-336 with its widths shrunk; 24 layers, 336 px, 14 px patches as the real one
CLIP_VISION = {
    "hidden_size": 32,
    "image_size": 336,
    "intermediate_size": 128,
    "model_type": "clip_vision_model",
    "num_attention_heads": 2,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "projection_dim": 24,
    "vocab_size": 32000,
}


def _llama_tokenizer_config(**extra: object) -> dict:
    """Vicuna v1.5's tokenizer_config.json (a slow LlamaTokenizer: tokenizer.model only)."""
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": _token("<s>", __type="AddedToken"),
        "clean_up_tokenization_spaces": False,
        "eos_token": _token("</s>", __type="AddedToken"),
        "legacy": False,
        "model_max_length": 4096,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": _token("<unk>", __type="AddedToken"),
        **extra,
    }


def _llava_tokenizer_config(added: dict[str, int]) -> dict:
    """llava-hf's tokenizer_config.json: <image> and <pad> as added special tokens."""
    decoder = {str(i): {**_token(t), "special": True} for i, t in ((0, "<unk>"), (1, "<s>"), (2, "</s>"))}
    decoder.update({str(i): {**_token(t), "special": True} for t, i in added.items()})
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": None,
        "added_tokens_decoder": decoder,
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "extra_special_tokens": {"image_token": "<image>"},
        "image_token": "<image>",
        "legacy": False,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>",
        "padding_side": "left",
        "processor_class": "LlavaProcessor",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "trust_remote_code": False,
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }


def _special_tokens_map(pad: str | dict | None) -> dict:
    out = {"bos_token": _token("<s>"), "eos_token": _token("</s>"), "unk_token": _token("<unk>")}
    if pad is not None:
        out["pad_token"] = pad
    return out


# --- what a replica is --------------------------------------------------------------------------


@dataclass(frozen=True)
class Repo:
    """One hub repository: its id, config, how its weights are stored and split, its sidecars.

    ``weights``: 'safetensors' or 'bin'; ``shard_of``: the file a tensor is stored in (an index
    is written when there are several). ``tokenizer``: 'model' (tokenizer.model
    only), 'json' (tokenizer.json only) or 'both'; ``added``: added tokens and their ids.
    """

    repo_id: str
    config: dict
    weights: str
    shard_of: Callable[[str], str]
    dtype: torch.dtype
    tokenizer: str
    sidecars: dict[str, object] = field(default_factory=dict)
    added: dict[str, int] = field(default_factory=dict)
    rotary_buffers: bool = False  # old transformers saved each layer's rotary inv_freq buffer


@dataclass(frozen=True)
class PresetReplica:
    preset: str
    tuned: Repo
    base: Repo


def _layer(name: str) -> int:
    m = re.search(r"layers\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def _llava_15_shard(name: str) -> int:
    """llava-1.5-7b-hf's model.safetensors.index.json: shard 1 holds the vision tower, the
    projector, the embeddings, layers 0-9 and layer 10's q_proj; shard 2 the rest of layer 10
    to layer 21 and layer 22's attention; shard 3 the rest."""
    if not name.startswith("language_model.") or "embed_tokens" in name:
        return 1
    layer, attention = _layer(name), ".self_attn." in name
    if layer < 10 or (layer == 10 and "q_proj" in name):
        return 1
    if layer < 22 or (layer == 22 and attention):
        return 2
    return 3


def _vicuna_7b_shard(name: str) -> int:
    """vicuna-7b-v1.5's pytorch_model.bin.index.json: the embeddings and layers 0-23 in the
    first file, layers 24-31, the final norm and lm_head in the second."""
    return 1 if "embed_tokens" in name or 0 <= _layer(name) <= 23 else 2


def _tiny_llava_shard(name: str) -> int:
    """tiny-llava-v1-hf (fp32, 4.98 GB + 661 MB): the second file holds the last language-model
    layers, the final norm and lm_head (the split layer is an estimate from the file sizes)."""
    return 2 if _layer(name) >= 20 or name.endswith(("model.norm.weight", "lm_head.weight")) else 1


def _files(pattern: str, count: int, rule: Callable[[str], int]) -> Callable[[str], str]:
    """Tensor name -> shard file name, from a rule giving the 1-based shard number."""
    return lambda name: pattern.format(rule(name), count)


def _text_config(real: dict, *, hidden: int, intermediate: int, heads: int, kv_heads: int, layers: int, vocab: int) -> dict:
    return {**real, "hidden_size": hidden, "intermediate_size": intermediate, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "num_hidden_layers": layers, "vocab_size": vocab}


def _llava_config(text_config: dict, **extra: object) -> dict:
    """A llava-hf config.json: <image> and <pad> right after the base vocabulary, padded to
    VOCAB + 64 rows, CLIP ViT-L/14-336 (shrunk), the penultimate layer's patch features."""
    return {
        "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": VOCAB, "model_type": "llava",
        "pad_token_id": VOCAB + 1, "projector_hidden_act": "gelu", "text_config": text_config, "vision_config": CLIP_VISION,
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": VOCAB + PAD_ROWS, **extra,
    }


def llava_15_7b() -> PresetReplica:
    """llava-hf/llava-1.5-7b-hf (3 safetensors shards, tokenizer.json + tokenizer.model, chat
    template files) and lmsys/vicuna-7b-v1.5 (2 pickle .bin shards + index, tokenizer.model only,
    no chat template)."""
    image, pad, padded = VOCAB, VOCAB + 1, VOCAB + PAD_ROWS
    sizes = {"hidden": 64, "intermediate": 192, "heads": 4, "kv_heads": 4, "layers": 32}
    vicuna_config = {
        "_name_or_path": "vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 4096, "model_type": "llama",
        "pad_token_id": 0, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
        "torch_dtype": "float16", "transformers_version": "4.31.0", "use_cache": True,
    }
    text = {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096,
            "model_type": "llama", "rms_norm_eps": 1e-05, "torch_dtype": "float16"}
    llava_config = _llava_config(_text_config(text, vocab=padded, **sizes), tie_word_embeddings=False, torch_dtype="float16",
                                 transformers_version="4.36.0.dev0")
    added = {"<image>": image, "<pad>": pad}
    tuned = Repo(
        "llava-hf/llava-1.5-7b-hf",
        llava_config,
        "safetensors",
        _files("model-{:05d}-of-{:05d}.safetensors", 3, _llava_15_shard),
        torch.float16,
        "both",
        {
            "added_tokens.json": added,
            "chat_template.json": {"chat_template": LLAVA_CHAT_TEMPLATE},
            "chat_template.jinja": LLAVA_CHAT_TEMPLATE,
            "generation_config.json": {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": pad,
                                       "transformers_version": "4.36.0.dev0"},
            "preprocessor_config.json": CLIP_336_PREPROCESSOR,
            "processor_config.json": {"image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": 14,
                                      "processor_class": "LlavaProcessor", "vision_feature_select_strategy": "default"},
            "special_tokens_map.json": _special_tokens_map(_token("<pad>")),
            "tokenizer_config.json": _llava_tokenizer_config(added),
        },
        added,
    )
    base = Repo(
        "lmsys/vicuna-7b-v1.5",
        _text_config(vicuna_config, vocab=VOCAB, **sizes),
        "bin",
        _files("pytorch_model-{:05d}-of-{:05d}.bin", 2, _vicuna_7b_shard),
        torch.float16,
        "model",
        {
            "generation_config.json": {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "temperature": 0.9, "max_length": 4096,
                                       "top_p": 0.6, "transformers_version": "4.31.0"},
            "special_tokens_map.json": _special_tokens_map("<unk>"),
            "tokenizer_config.json": _llama_tokenizer_config(),
        },
        rotary_buffers=True,
    )
    return PresetReplica("llava-1.5-7b", tuned, base)


def tiny_llava_14b() -> PresetReplica:
    """bczhou/tiny-llava-v1-hf (2 fp32 safetensors shards, tokenizer.json only, no chat template,
    grouped-query attention) and PY007/TinyLlama-1.1B-Chat-v0.3 (one pytorch_model.bin, no index;
    tokenizer.model with 3 added ChatML tokens: vocabulary 32003)."""
    image, pad, padded = VOCAB, VOCAB + 1, VOCAB + PAD_ROWS
    sizes = {"hidden": 64, "intermediate": 176, "heads": 8, "kv_heads": 1, "layers": 22}
    text = {"_name_or_path": "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "rms_norm_eps": 1e-05, "torch_dtype": "bfloat16"}
    llava_config = _llava_config(_text_config(text, vocab=padded, **sizes), torch_dtype="float32", transformers_version="4.36.2")
    base_config = {
        "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "initializer_range": 0.02,
        "max_position_embeddings": 2048, "model_type": "llama", "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.31.0", "use_cache": True,
    }
    chatml = {"[PAD]": VOCAB, "<|im_start|>": VOCAB + 1, "<|im_end|>": VOCAB + 2}
    added = {"<image>": image, "<pad>": pad}
    tuned = Repo(
        "bczhou/tiny-llava-v1-hf",
        llava_config,
        "safetensors",
        _files("model-{:05d}-of-{:05d}.safetensors", 2, _tiny_llava_shard),
        torch.float32,
        "json",
        {
            "generation_config.json": {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": pad,
                                       "transformers_version": "4.36.2"},
            "preprocessor_config.json": CLIP_336_PREPROCESSOR,
            "special_tokens_map.json": _special_tokens_map(_token("<pad>")),
            "tokenizer_config.json": {k: v for k, v in _llava_tokenizer_config(added).items() if k != "extra_special_tokens"},
        },
        added,
    )
    base = Repo(
        "PY007/TinyLlama-1.1B-Chat-v0.3",
        _text_config(base_config, vocab=VOCAB + len(chatml), **sizes),
        "bin",
        lambda name: "pytorch_model.bin",
        torch.float16,
        "model",
        {
            "added_tokens.json": chatml,
            "generation_config.json": {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "transformers_version": "4.31.0"},
            "special_tokens_map.json": _special_tokens_map("[PAD]"),
            "tokenizer_config.json": _llama_tokenizer_config(model_max_length=2048),
        },
        chatml,
    )
    return PresetReplica("tiny-llava-1.4b", tuned, base)


REPLICAS: dict[str, Callable[[], PresetReplica]] = {"llava-1.5-7b": llava_15_7b, "tiny-llava-1.4b": tiny_llava_14b}

# --- writing them -------------------------------------------------------------------------------


@cache
def sentencepiece_model() -> bytes:
    """A tiny Llama-style SentencePiece model (BPE, byte fallback, <unk>/<s>/</s> = 0/1/2),
    trained here on a few English sentences so that no tokenizer file needs downloading."""
    import sentencepiece as spm

    words = (
        "the a of to in is what where who which how many capital country city river colour red blue green "
        "dog cat car image picture photo yes no there are answer question king queen paris france water"
    ).split()
    sentences = [" ".join(words[(i * 7 + j) % len(words)] for j in range(9)) for i in range(600)]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=out, vocab_size=VOCAB, model_type="bpe", byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2,
    )
    return out.getvalue()


def _tokenizer_files(repo: Repo, work: Path) -> dict[str, bytes]:
    """tokenizer.model and/or tokenizer.json, the latter converted from the former by
    transformers with the repo's added tokens."""
    files = {"tokenizer.model": sentencepiece_model()}
    if repo.tokenizer in ("json", "both"):
        from transformers import AddedToken, AutoTokenizer

        source = work / "sp"
        source.mkdir(parents=True, exist_ok=True)
        (source / "tokenizer.model").write_bytes(files["tokenizer.model"])
        (source / "tokenizer_config.json").write_text(json.dumps(_llama_tokenizer_config()))
        tokenizer = AutoTokenizer.from_pretrained(source)
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in sorted(repo.added, key=repo.added.get)], special_tokens=True)
        assert all(tokenizer.convert_tokens_to_ids(t) == i for t, i in repo.added.items())
        tokenizer.save_pretrained(work / "fast")
        files["tokenizer.json"] = (work / "fast" / "tokenizer.json").read_bytes()
    if repo.tokenizer == "json":
        del files["tokenizer.model"]
    return files


def _weights(replica: PresetReplica, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base, tuned) state dicts in the repos' on-disk names: the tuned language model is the
    base plus a small change everywhere and a large one on a few FFN neurons; the vision tower
    and projector are random; the tuned model's extra vocabulary rows are random."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    base_model = LlamaForCausalLM(LlamaConfig(**copy.deepcopy(replica.base.config)))
    base = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    llava = LlavaForConditionalGeneration(LlavaConfig(**copy.deepcopy(replica.tuned.config)))
    rows = replica.tuned.config["text_config"]["vocab_size"]
    shared = VOCAB  # rows both vocabularies have (the base's extra tokens are not the tuned model's)
    tuned: dict[str, torch.Tensor] = {}
    for name, w in base.items():
        changed = w + 0.01 * torch.randn(w.shape, generator=gen)
        if name.endswith("mlp.gate_proj.weight"):
            changed[:3] += 0.5 * torch.randn(3, w.shape[1], generator=gen)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            changed = torch.cat([changed[:shared], 0.02 * torch.randn(rows - shared, w.shape[1], generator=gen)])
        tuned["language_model." + name] = changed
    for name, w in llava.state_dict().items():
        rest = name.removeprefix("model.")
        if rest.startswith(("vision_tower.", "multi_modal_projector.")):
            tuned[rest] = w.detach().clone()
    base = {k: v.to(replica.base.dtype) for k, v in base.items()}
    tuned = {k: v.to(replica.tuned.dtype) for k, v in tuned.items()}
    if replica.base.rotary_buffers:  # Vicuna v1.5's shards hold them, in float32
        inv_freq = base_model.model.rotary_emb.inv_freq.detach().float().clone()
        for layer in range(replica.base.config["num_hidden_layers"]):
            base[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = inv_freq
    return base, tuned


def _write_weights(directory: Path, repo: Repo, tensors: dict[str, torch.Tensor]) -> None:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name in tensors:
        groups.setdefault(repo.shard_of(name), {})[name] = tensors[name].contiguous()
    for file, group in groups.items():
        if repo.weights == "safetensors":
            save_file(group, str(directory / file), metadata={"format": "pt"})
        else:
            torch.save(group, directory / file)
    if len(groups) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {name: file for file, group in groups.items() for name in sorted(group)},
        }
        suffix = "model.safetensors.index.json" if repo.weights == "safetensors" else "pytorch_model.bin.index.json"
        (directory / suffix).write_text(json.dumps(index, indent=2))


def write_repo(cache_dir: Path, repo: Repo, tensors: dict[str, torch.Tensor], work: Path) -> Path:
    """One repo in the hub cache layout; returns its snapshot directory."""
    root = cache_dir / f"models--{repo.repo_id.replace('/', '--')}"
    snapshot = root / "snapshots" / REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(REVISION)
    (snapshot / "config.json").write_text(json.dumps(repo.config, indent=2))
    for name, content in repo.sidecars.items():
        text = content if isinstance(content, str) else json.dumps(content, indent=2)
        (snapshot / name).write_text(text)
    for name, data in _tokenizer_files(repo, work / repo.repo_id.replace("/", "--")).items():
        (snapshot / name).write_bytes(data)
    _write_weights(snapshot, repo, tensors)
    return snapshot


def write_replica(cache_dir: Path, preset: str, work: Path, seed: int = 0) -> PresetReplica:
    """Both repos of a hub preset into ``cache_dir`` (a ``HF_HUB_CACHE``)."""
    replica = REPLICAS[preset]()
    base, tuned = _weights(replica, seed)
    write_repo(cache_dir, replica.base, base, work)
    write_repo(cache_dir, replica.tuned, tuned, work)
    return replica
