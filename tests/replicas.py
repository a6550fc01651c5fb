"""Shape-faithful offline replicas of the hub presets' repositories, in a Hugging Face cache.

No machine of this project reaches the Hub, so the hub presets are proven on replicas: the real
repos' file names and formats (``.bin`` vs safetensors, ``tokenizer.model`` vs
``tokenizer.json``), weight key names and shard assignment, config fields and sidecar files,
with the sizes shrunk (hidden sizes, vocabulary) and random weights. They are written as the
cache layout ``models--org--name/snapshots/<rev>/...`` + ``refs/main`` that ``HF_HUB_OFFLINE=1``
reads. The facts below were read off the real repositories (their file listings, configs,
tokenizer and processor files, shard indexes) and are written here so that the tests need
nothing outside the project.

Shrunk: vocabularies (Llama 2 and Mistral's 32000 → ``VOCAB``, a SentencePiece model trained
here; Qwen2's 151643 and Llama 3's 128000 BPE tokens → ``BPE_VOCAB``, a byte-level BPE trained
here, their special tokens after it in the real order), padded vocabularies by the same extra
rows (32064 → ``VOCAB + 64``), widths (multiples of 64 wherever 4-bit runs on them, as
bitsandbytes' CPU kernel needs and every real size is; head counts and grouped-query ratios
scaled with them, Qwen2.5-VL's rope sections with its head width). Kept: layer counts and vision
depths, image, tile and patch sizes, grid pinpoints, dtypes, special-token ids relative to the
vocabulary, every file name, the shard files (their split estimated from the real file sizes
where no index was seen, and said so).
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

from fusion.architectures import IN_MEMORY, language_config, layout_named

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
    is written when there are several). ``tokenizer``: 'model' (tokenizer.model only), 'json'
    (tokenizer.json only) or 'both' for a SentencePiece (Llama 2, Mistral) vocabulary; 'qwen'
    (vocab.json, merges.txt, tokenizer.json) or 'llama3' (tokenizer.json) for a byte-level BPE
    one. ``added``: added tokens and their ids. ``layout``: a tuned MLLM's on-disk layout (a
    ``fusion.architectures`` layout name).
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
    layout: str = "llava"


@dataclass(frozen=True)
class PresetReplica:
    """Both repos of a preset. ``shared_rows``: the vocabulary rows both models' tokens share
    (the rest of the tuned model's rows are its own, random); None: all of the smaller's."""

    preset: str
    tuned: Repo
    base: Repo
    shared_rows: int | None = None


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
    return PresetReplica("tiny-llava-1.4b", tuned, base, shared_rows=VOCAB)


def _by_layers(starts: tuple[int, ...], shards: int | None = None) -> Callable[[str], int]:
    """A shard rule from the first layer of each shard, estimated from the real shard sizes where
    the index was not seen: embeddings and vision modules in the first shard, the final norm
    and lm_head in the last (of ``shards``, default one per start)."""

    def rule(name: str) -> int:
        layer = _layer(name)
        if layer < 0:
            return (shards or len(starts)) if name.endswith(("model.norm.weight", "lm_head.weight")) else 1
        return sum(1 for start in starts if layer >= start)

    return rule


def llava_15_13b() -> PresetReplica:
    """llava-hf/llava-1.5-13b-hf (6 safetensors shards, 40 layers, 40 heads; no processor_config.json
    or chat_template.jinja in its tree, unlike the 7B's) and
    lmsys/vicuna-13b-v1.5 (pickle .bin shards, tokenizer.model only, no chat template; three
    shards as its v1.3 sibling's 9.95 / 9.9 / 6.18 GB, the v1.5 tree was not seen)."""
    seven = llava_15_7b()
    sizes = {"hidden": 192, "intermediate": 512, "heads": 12, "kv_heads": 12, "layers": 40}  # 5120/13824/40 heads, shrunk (multiples of 64 for 4-bit)
    llava_config = {**seven.tuned.config, "text_config": _text_config({**seven.tuned.config["text_config"], "_name_or_path": "lmsys/vicuna-13b-v1.5"},
                                                                     vocab=VOCAB + PAD_ROWS, **sizes)}
    vicuna_config = _text_config({**seven.base.config, "_name_or_path": "vicuna-13b-v1.5", "max_length": 4096}, vocab=VOCAB, **sizes)
    tuned = Repo("llava-hf/llava-1.5-13b-hf", llava_config, "safetensors",
                 _files("model-{:05d}-of-{:05d}.safetensors", 6, _by_layers((0, 7, 15, 23, 31, 39))), torch.float16, "both",
                 {k: v for k, v in seven.tuned.sidecars.items() if k not in ("chat_template.jinja", "processor_config.json")}, seven.tuned.added)
    base = Repo("lmsys/vicuna-13b-v1.5", vicuna_config, "bin", _files("pytorch_model-{:05d}-of-{:05d}.bin", 3, _by_layers((0, 16, 32))), torch.float16,
                "model", seven.base.sidecars, rotary_buffers=True)
    return PresetReplica("llava-1.5-13b", tuned, base)


# --- byte-level BPE vocabularies (Qwen2, Llama 3) ------------------------------------------------------

BPE_VOCAB = 320  # the byte-level BPE tokens; stands for Qwen2's 151643 and Llama 3's 128000
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
                "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
                "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
QWEN_ROWS = BPE_VOCAB + 152064 - 151643  # Qwen2's 152064 embedding rows: 421 above its BPE tokens
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                  "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|reserved_special_token_4|>", "<|eot_id|>"] + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant."
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def _qwen_tokenizer_config(added: dict[str, int], *, eos: str, chat_template: str | None, extra_special: list[str]) -> dict:
    """A Qwen2 tokenizer_config.json: the added tokens from the BPE vocabulary's end on."""
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): {**_token(t), "special": True} for t, i in sorted(added.items(), key=lambda kv: kv[1])},
        "additional_special_tokens": extra_special, "bos_token": None, "clean_up_tokenization_spaces": False, "eos_token": eos,
        "errors": "replace", "model_max_length": 131072, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config


def _qwen2_text(**extra: object) -> dict:
    """Qwen2-7B's language-model fields, widths shrunk (3584/18944/28 heads/4 KV heads)."""
    return {"hidden_act": "silu", "hidden_size": 64, "intermediate_size": 192, "max_position_embeddings": 32768, "model_type": "qwen2",
            "num_attention_heads": 4, "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
            **extra}


def _qwen_base(repo_id: str, *, eos: int, max_positions: int, chat_template: str, **extra: object) -> Repo:
    """A Qwen2 / Qwen2.5 LLM repo: 4 safetensors shards, vocab.json + merges.txt + tokenizer.json."""
    added = {t: BPE_VOCAB + i for i, t in enumerate(QWEN_SPECIAL[:3])}
    config = {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": BPE_VOCAB, "eos_token_id": BPE_VOCAB + eos,
              "initializer_range": 0.02, "max_window_layers": 28, "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "transformers_version": "4.41.2", "use_cache": True, "use_sliding_window": False, "vocab_size": QWEN_ROWS,
              **_qwen2_text(max_position_embeddings=max_positions), **extra}
    return Repo(repo_id, config, "safetensors", _files("model-{:05d}-of-{:05d}.safetensors", 4, _by_layers((0, 8, 16, 24))), torch.bfloat16, "qwen",
                {"generation_config.json": {"bos_token_id": BPE_VOCAB, "eos_token_id": BPE_VOCAB + eos, "transformers_version": "4.37.0"},
                 "tokenizer_config.json": _qwen_tokenizer_config(added, eos=QWEN_SPECIAL[eos], chat_template=chat_template, extra_special=["<|im_start|>", "<|im_end|>"])},
                added)


SIGLIP_384 = {"hidden_size": 32, "image_size": 384, "intermediate_size": 64, "model_type": "siglip_vision_model", "num_attention_heads": 2,
              "num_hidden_layers": 26, "patch_size": 14, "vision_use_head": False}  # so400m's 27 layers, the last one unused (feature layer -1 of 26)
ONEVISION_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + content['text'] }}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def llava_onevision_qwen2_7b() -> PresetReplica:
    """llava-hf/llava-onevision-qwen2-7b-ov-hf (4 safetensors shards, the llava-hf layout, SigLIP
    at 384 px in up to 36 grid shapes, vocabulary padded by 64 rows, <image>/<video> after
    Qwen2's first three special tokens) and Qwen/Qwen2-7B-Instruct (4 shards, q/k/v biases)."""
    image, video = BPE_VOCAB + 3, BPE_VOCAB + 4
    added = {**{t: BPE_VOCAB + i for i, t in enumerate(QWEN_SPECIAL[:3])}, "<image>": image, "<video>": video}
    config = {
        "architectures": ["LlavaOnevisionForConditionalGeneration"], "ignore_index": -100, "image_grid_pinpoints": ONEVISION_PINPOINTS,
        "image_token_index": image, "model_type": "llava_onevision", "projector_hidden_act": "gelu",
        "text_config": {"_name_or_path": "Qwen/Qwen2-7B-Instruct", "architectures": ["Qwen2ForCausalLM"], "eos_token_id": BPE_VOCAB + 2,
                        **_qwen2_text(), "torch_dtype": "bfloat16", "vocab_size": QWEN_ROWS + PAD_ROWS},
        "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.45.0.dev0", "use_image_newline_parameter": True,
        "video_token_index": video, "vision_aspect_ratio": "anyres_max_9", "vision_config": SIGLIP_384, "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
    }
    del config["text_config"]["max_position_embeddings"]  # dropped from the text_config by the repo's own config commit
    preprocessor = {"crop_size": {"height": 384, "width": 384}, "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True,
                    "do_resize": True, "image_grid_pinpoints": ONEVISION_PINPOINTS, "image_mean": [0.5, 0.5, 0.5],
                    "image_processor_type": "LlavaOnevisionImageProcessor", "image_std": [0.5, 0.5, 0.5], "processor_class": "LlavaOnevisionProcessor",
                    "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"height": 384, "width": 384}}
    tuned = Repo(
        "llava-hf/llava-onevision-qwen2-7b-ov-hf", config, "safetensors",
        _files("model-{:05d}-of-{:05d}.safetensors", 4, _by_layers((0, 7, 15, 27))), torch.float16, "qwen",
        {"added_tokens.json": added, "chat_template.json": {"chat_template": ONEVISION_CHAT_TEMPLATE},
         "generation_config.json": {"_from_model_config": True, "bos_token_id": BPE_VOCAB, "eos_token_id": BPE_VOCAB + 2, "transformers_version": "4.45.0.dev0"},
         "preprocessor_config.json": preprocessor,
         "processor_config.json": {"image_token": "<image>", "num_image_tokens": 729, "processor_class": "LlavaOnevisionProcessor",
                                   "video_token": "<video>", "vision_feature_select_strategy": "full"},
         "special_tokens_map.json": {"additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "eos_token": _token("<|im_end|>"), "pad_token": _token("<|endoftext|>")},
         "tokenizer_config.json": {**_qwen_tokenizer_config(added, eos="<|im_end|>", chat_template=None, extra_special=["<|im_start|>", "<|im_end|>"]),
                                   "processor_class": "LlavaOnevisionProcessor"}},
        added,
    )
    base = _qwen_base("Qwen/Qwen2-7B-Instruct", eos=2, max_positions=32768, chat_template=QWEN_CHAT_TEMPLATE)
    return PresetReplica("llava-onevision-qwen2-7b", tuned, base)


QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _qwen25_vl_shard(name: str) -> int:
    """Qwen2.5-VL-7B-Instruct's model.safetensors.index.json: 436/97/97/98/1 tensors, layers
    split mid-layer after layers 3, 11 and 19, lm_head alone in the fifth shard."""
    if name == "lm_head.weight":
        return 5
    layer = _layer(name)
    if layer < 0:
        return 4 if name == "model.norm.weight" else 1
    for shard, (split, moved) in enumerate(((3, ("mlp.",)), (11, ("mlp.down_proj", "mlp.gate_proj")), (19, ("mlp.down_proj",))), start=1):
        if layer < split or (layer == split and not any(f".{m}" in name for m in moved)):
            return shard
    return 4


def qwen25_vl_7b() -> PresetReplica:
    """Qwen/Qwen2.5-VL-7B-Instruct (5 safetensors shards; the language model under the LLM's own
    names, the vision tower under ``visual.``; the config flat, its rope multimodal) and
    Qwen/Qwen2.5-7B (4 shards)."""
    added = {t: BPE_VOCAB + i for i, t in enumerate(QWEN_SPECIAL)}
    config = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": BPE_VOCAB, "eos_token_id": BPE_VOCAB + 2,
        "vision_start_token_id": added["<|vision_start|>"], "vision_end_token_id": added["<|vision_end|>"], "vision_token_id": added["<|vision_pad|>"],
        "image_token_id": added["<|image_pad|>"], "video_token_id": added["<|video_pad|>"], "initializer_range": 0.02,
        **_qwen2_text(max_position_embeddings=128000), "max_window_layers": 28, "model_type": "qwen2_5_vl", "sliding_window": 32768,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True, "use_sliding_window": False,
        # depth, patch, window and full-attention blocks as the real tower; widths shrunk, out_hidden_size = the LM's hidden size
        "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "in_chans": 3, "out_hidden_size": 64,
                          "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                          "tokens_per_second": 2, "temporal_patch_size": 2},
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},  # [16, 24, 24] for 128-wide heads; these heads are 16 wide
        "vocab_size": QWEN_ROWS,
    }
    tuned = Repo(
        "Qwen/Qwen2.5-VL-7B-Instruct", config, "safetensors", _files("model-{:05d}-of-{:05d}.safetensors", 5, _qwen25_vl_shard), torch.bfloat16, "qwen",
        {"chat_template.json": {"chat_template": QWEN_VL_CHAT_TEMPLATE},
         "generation_config.json": {"bos_token_id": BPE_VOCAB, "pad_token_id": BPE_VOCAB, "do_sample": True, "eos_token_id": [BPE_VOCAB + 2, BPE_VOCAB],
                                    "repetition_penalty": 1.05, "temperature": 0.000001, "transformers_version": "4.37.0"},
         "preprocessor_config.json": {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
                                      "image_mean": CLIP_336_PREPROCESSOR["image_mean"], "image_std": CLIP_336_PREPROCESSOR["image_std"],
                                      "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"},
         "tokenizer_config.json": {**_qwen_tokenizer_config(added, eos="<|im_end|>", chat_template=QWEN_VL_CHAT_TEMPLATE, extra_special=QWEN_SPECIAL[1:14]),
                                   "add_bos_token": False}},
        added, layout="qwen-vl",
    )
    base = _qwen_base("Qwen/Qwen2.5-7B", eos=0, max_positions=131072, chat_template=QWEN_CHAT_TEMPLATE, rope_scaling=None)
    return PresetReplica("qwen2.5-vl-7b", tuned, base)




LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
LLAVA_NEXT_PREPROCESSOR = {
    **{k: v for k, v in CLIP_336_PREPROCESSOR.items() if k not in ("image_processor_type", "processor_class")},
    "aspect_ratio_setting": "anyres", "do_pad": True, "image_grid_pinpoints": LLAVA_NEXT_PINPOINTS,
    "image_processor_type": "LlavaNextImageProcessor", "processor_class": "LlavaNextProcessor",
}
LLAVA_NEXT_PROCESSOR = {"image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": 14, "processor_class": "LlavaNextProcessor",
                        "vision_feature_select_strategy": "default"}
MISTRAL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '<\\s> '}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# Mistral-7B-Instruct's own [INST] format for its text-only turns
MISTRAL_LLM_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def _llava_next_config(text: dict, sizes: dict) -> dict:
    """A llava-hf LLaVA-NeXT config.json: CLIP-336 tiles in five grid shapes, an image_newline."""
    return {
        "architectures": ["LlavaNextForConditionalGeneration"], "ignore_index": -100, "image_grid_pinpoints": LLAVA_NEXT_PINPOINTS,
        "image_token_index": VOCAB, "model_type": "llava_next", "projector_hidden_act": "gelu",
        "text_config": _text_config(text, vocab=VOCAB + PAD_ROWS, **sizes), "torch_dtype": "float16", "transformers_version": "4.39.0.dev0",
        "use_image_newline_parameter": True, "vision_config": CLIP_VISION, "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
        "vocab_size": VOCAB + PAD_ROWS,
    }


def llava_v16_mistral_7b() -> PresetReplica:
    """llava-hf/llava-v1.6-mistral-7b-hf (4 safetensors shards, the last with little more than
    lm_head; <image> and <pad> added; the [INST] chat template) and
    mistralai/Mistral-7B-Instruct-v0.2 (gated, so its tree was not seen: 3 safetensors shards,
    tokenizer.model + tokenizer.json as its Mistral siblings ship, the chat template in its
    tokenizer_config.json)."""
    sizes = {"hidden": 64, "intermediate": 192, "heads": 4, "kv_heads": 2, "layers": 32}  # 4096/14336/32 heads/8 KV heads, shrunk
    text = {"_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2", "architectures": ["MistralForCausalLM"], "max_position_embeddings": 32768,
            "model_type": "mistral", "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None, "torch_dtype": "bfloat16"}
    added = {"<image>": VOCAB, "<pad>": VOCAB + 1}
    tuned = Repo(
        "llava-hf/llava-v1.6-mistral-7b-hf", _llava_next_config(text, sizes), "safetensors",
        _files("model-{:05d}-of-{:05d}.safetensors", 4, _by_layers((0, 10, 21), 4)), torch.float16, "both",
        {"added_tokens.json": added, "chat_template.json": {"chat_template": MISTRAL_CHAT_TEMPLATE},
         "generation_config.json": {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "transformers_version": "4.39.0.dev0"},
         "preprocessor_config.json": LLAVA_NEXT_PREPROCESSOR, "processor_config.json": LLAVA_NEXT_PROCESSOR,
         "special_tokens_map.json": _special_tokens_map(_token("<pad>")),
         "tokenizer_config.json": {**_llava_tokenizer_config(added), "processor_class": "LlavaNextProcessor"}},
        added,
    )
    base_config = {"architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
                   "initializer_range": 0.02, "max_position_embeddings": 32768, "model_type": "mistral", "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
                   "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.36.0", "use_cache": True}
    base = Repo(
        "mistralai/Mistral-7B-Instruct-v0.2", _text_config(base_config, vocab=VOCAB, **sizes), "safetensors",
        _files("model-{:05d}-of-{:05d}.safetensors", 3, _by_layers((0, 11, 22))), torch.bfloat16, "both",
        {"generation_config.json": {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "transformers_version": "4.36.0"},
         "special_tokens_map.json": _special_tokens_map(None),
         "tokenizer_config.json": _llama_tokenizer_config(chat_template=MISTRAL_LLM_TEMPLATE, model_max_length=1000000000000000019884624838656)},
    )
    return PresetReplica("llava-v1.6-mistral-7b", tuned, base)


def llava_v16_vicuna_7b() -> PresetReplica:
    """llava-hf/llava-v1.6-vicuna-7b-hf (3 safetensors shards; <image> the only added token;
    LLaVA-1.5's chat template) and lmsys/vicuna-7b-v1.5, the same base repo as llava-1.5-7b's.
    Its processor_config.json (added after the tree seen) is taken as its Mistral sibling's."""
    seven = llava_15_7b()
    sizes = {"hidden": 64, "intermediate": 192, "heads": 4, "kv_heads": 4, "layers": 32}
    text = {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096, "model_type": "llama",
            "pad_token_id": 0, "rms_norm_eps": 1e-05, "torch_dtype": "float16"}
    added = {"<image>": VOCAB}
    tuned = Repo(
        "llava-hf/llava-v1.6-vicuna-7b-hf", _llava_next_config(text, sizes), "safetensors",
        _files("model-{:05d}-of-{:05d}.safetensors", 3, _by_layers((0, 11, 23))), torch.float16, "both",
        {"added_tokens.json": added, "chat_template.json": {"chat_template": LLAVA_CHAT_TEMPLATE},
         "generation_config.json": {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "transformers_version": "4.39.0.dev0"},
         "preprocessor_config.json": LLAVA_NEXT_PREPROCESSOR, "processor_config.json": LLAVA_NEXT_PROCESSOR,
         "special_tokens_map.json": _special_tokens_map("<unk>"),
         "tokenizer_config.json": {**_llava_tokenizer_config(added), "pad_token": "<unk>", "processor_class": "LlavaNextProcessor"}},
        added,
    )
    return PresetReplica("llava-v1.6-vicuna-7b", tuned, seven.base)


def llava_llama_3_8b() -> PresetReplica:
    """xtuner/llava-llama-3-8b-v1_1-transformers (4 safetensors shards, the llava-hf layout, a
    Llama 3 byte-level BPE vocabulary padded by 64 rows, no chat template) and
    meta-llama/Meta-Llama-3-8B-Instruct (gated; 4 shards, tokenizer.json only, its chat template
    in tokenizer_config.json). XTuner's token 128256 was not seen: the replica names it."""
    sizes = {"hidden": 64, "intermediate": 192, "heads": 4, "kv_heads": 2, "layers": 32}  # 4096/14336/32 heads/8 KV heads, shrunk
    rows = BPE_VOCAB + len(LLAMA3_SPECIAL)  # stands for 128256
    image, pad = rows + 1, rows + 2
    added = {t: BPE_VOCAB + i for i, t in enumerate(LLAMA3_SPECIAL)}
    tuned_added = {**added, "<|xtuner_128256|>": rows, "<image>": image, "<pad>": pad}
    begin, eot = added["<|begin_of_text|>"], added["<|eot_id|>"]
    text = {"architectures": ["LlamaForCausalLM"], "bos_token_id": begin, "eos_token_id": added["<|end_of_text|>"], "max_position_embeddings": 8192,
            "model_type": "llama", "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "torch_dtype": "float16"}
    config = {"architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": image, "model_type": "llava",
              "pad_token_id": pad, "projector_hidden_act": "gelu", "text_config": _text_config(text, vocab=rows + PAD_ROWS, **sizes),
              "torch_dtype": "float16", "transformers_version": "4.40.1", "vision_config": {**CLIP_VISION, "architectures": ["CLIPVisionModel"]},
              "vision_feature_layer": -2, "vision_feature_select_strategy": "default"}
    llama3_tokenizer = {"bos_token": "<|begin_of_text|>", "clean_up_tokenization_spaces": True, "eos_token": "<|eot_id|>",
                        "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 1000000000000000019884624838656,
                        "tokenizer_class": "PreTrainedTokenizerFast"}
    tuned = Repo(
        "xtuner/llava-llama-3-8b-v1_1-transformers", config, "safetensors",
        _files("model-{:05d}-of-{:05d}.safetensors", 4, _by_layers((0, 8, 20, 31))), torch.float16, "llama3",
        {"generation_config.json": {"_from_model_config": True, "bos_token_id": begin, "eos_token_id": added["<|end_of_text|>"], "transformers_version": "4.40.1"},
         "preprocessor_config.json": CLIP_336_PREPROCESSOR,
         "special_tokens_map.json": {"bos_token": _token("<|begin_of_text|>"), "eos_token": _token("<|eot_id|>"), "pad_token": _token("<pad>")},
         "tokenizer_config.json": {**llama3_tokenizer, "pad_token": "<pad>", "processor_class": "LlavaProcessor"}},
        tuned_added,
    )
    base_config = {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": begin, "eos_token_id": eot,
                   "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 8192, "model_type": "llama", "pretraining_tp": 1,
                   "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
                   "transformers_version": "4.40.0.dev0", "use_cache": True}
    base = Repo(
        "meta-llama/Meta-Llama-3-8B-Instruct", _text_config(base_config, vocab=rows, **sizes), "safetensors",
        _files("model-{:05d}-of-{:05d}.safetensors", 4, _by_layers((0, 9, 20, 31))), torch.bfloat16, "llama3",
        {"generation_config.json": {"bos_token_id": begin, "eos_token_id": [added["<|end_of_text|>"], eot], "do_sample": True, "temperature": 0.6,
                                    "max_length": 4096, "top_p": 0.9, "transformers_version": "4.40.0.dev0"},
         "special_tokens_map.json": {"bos_token": _token("<|begin_of_text|>"), "eos_token": _token("<|eot_id|>")},
         "tokenizer_config.json": {**llama3_tokenizer, "chat_template": LLAMA3_CHAT_TEMPLATE}},
        added,
    )
    return PresetReplica("llava-llama-3-8b", tuned, base)


REPLICAS: dict[str, Callable[[], PresetReplica]] = {
    "llava-1.5-7b": llava_15_7b,
    "llava-1.5-13b": llava_15_13b,
    "llava-llama-3-8b": llava_llama_3_8b,
    "llava-v1.6-mistral-7b": llava_v16_mistral_7b,
    "llava-v1.6-vicuna-7b": llava_v16_vicuna_7b,
    "llava-onevision-qwen2-7b": llava_onevision_qwen2_7b,
    "qwen2.5-vl-7b": qwen25_vl_7b,
    "tiny-llava-1.4b": tiny_llava_14b,
}

# --- writing them -------------------------------------------------------------------------------


_WORDS = (
    "the a of to in is what where who which how many capital country city river colour red blue green "
    "dog cat car image picture photo yes no there are answer question king queen paris france water"
).split()
_SENTENCES = [" ".join(_WORDS[(i * 7 + j) % len(_WORDS)] for j in range(9)) for i in range(600)]


@cache
def sentencepiece_model() -> bytes:
    """A tiny Llama-style SentencePiece model (BPE, byte fallback, <unk>/<s>/</s> = 0/1/2),
    trained here on a few English sentences so that no tokenizer file needs downloading."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_SENTENCES), model_writer=out, vocab_size=VOCAB, model_type="bpe", byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2,
    )
    return out.getvalue()


@cache
def bpe_tokenizer_json() -> str:
    """A tiny byte-level BPE vocabulary (``BPE_VOCAB`` tokens: the 256 bytes and their first
    merges), trained here on a few English sentences, as Qwen2's and Llama 3's tokenizer.json
    hold (a byte-level BPE model, no <unk>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_SENTENCES, trainer)
    assert tokenizer.get_vocab_size() == BPE_VOCAB
    return tokenizer.to_str()


def _bpe_files(repo: Repo) -> dict[str, bytes]:
    """tokenizer.json (and, for Qwen, vocab.json + merges.txt) with the repo's added tokens at
    their ids; Llama 3's prepends <|begin_of_text|>."""
    from tokenizers import AddedToken, Tokenizer, processors

    tokenizer = Tokenizer.from_str(bpe_tokenizer_json())
    ordered = sorted(repo.added, key=repo.added.get)
    assert [repo.added[t] for t in ordered] == list(range(BPE_VOCAB, BPE_VOCAB + len(ordered))), "added tokens follow the BPE vocabulary"
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ordered])
    if repo.tokenizer == "llama3":
        begin = "<|begin_of_text|>"
        tokenizer.post_processor = processors.TemplateProcessing(single=f"{begin} $A", pair=f"{begin} $A {begin} $B", special_tokens=[(begin, repo.added[begin])])
    files = {"tokenizer.json": tokenizer.to_str(pretty=True).encode()}
    if repo.tokenizer == "qwen":
        model = json.loads(bpe_tokenizer_json())["model"]
        files["vocab.json"] = json.dumps(model["vocab"], ensure_ascii=False).encode()
        files["merges.txt"] = ("#version: 0.2\n" + "\n".join(m if isinstance(m, str) else " ".join(m) for m in model["merges"]) + "\n").encode()
    return files


def _tokenizer_files(repo: Repo, work: Path) -> dict[str, bytes]:
    """The repo's tokenizer files: a byte-level BPE vocabulary's, or tokenizer.model and/or
    tokenizer.json, the latter converted from the former by transformers with the repo's added
    tokens."""
    if repo.tokenizer in ("qwen", "llama3"):
        return _bpe_files(repo)
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


def _config(config: dict) -> object:
    """A transformers config object of a config.json's contents."""
    from transformers import AutoConfig

    fields = copy.deepcopy(config)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def _weights(replica: PresetReplica, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base, tuned) state dicts in the repos' on-disk names: the tuned language model is the
    base plus a small change everywhere and a large one on a few FFN neurons; the vision modules
    are the MLLM class's own random ones; the tuned model's own vocabulary rows are random."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    base_model = AutoModelForCausalLM.from_config(_config(replica.base.config))
    base = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    mllm = AutoModelForImageTextToText.from_config(_config(replica.tuned.config))
    rows = language_config(replica.tuned.config)["vocab_size"]
    shared = replica.shared_rows or min(rows, replica.base.config["vocab_size"])
    on_disk, in_memory = layout_named(replica.tuned.layout), layout_named(IN_MEMORY)
    tuned: dict[str, torch.Tensor] = {}
    for name, w in base.items():
        changed = w + 0.01 * torch.randn(w.shape, generator=gen)
        if name.endswith("mlp.gate_proj.weight"):
            changed[:3] += 0.5 * torch.randn(3, w.shape[1], generator=gen)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            changed = torch.cat([changed[:shared], 0.02 * torch.randn(rows - shared, w.shape[1], generator=gen)])
        tuned[on_disk.tuned_key(name)] = changed
    for name, w in mllm.state_dict().items():
        if in_memory.base_key(name) is None:  # a vision module: at the top level on disk, in every layout the repos ship
            tuned[name.removeprefix("model.")] = w.detach().clone()
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
