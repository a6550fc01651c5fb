"""Tiny base/tuned checkpoint pairs built on the fly: a Llama base LLM and a LLaVA model tuned
from it, in either key layout, sharded, with a few neurons changed much more than the rest
(so that neuron location has a known right answer)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

BASE_VOCAB = 96
EXTRA_VOCAB = 4  # the tuned model's <image> token and padding, like llava-hf's 32000 -> 32064
IMAGE_TOKEN = BASE_VOCAB  # first extra row


def text_config(vocab: int = BASE_VOCAB, kv_heads: int = 4, model_type: str = "llama", hidden: int = 32) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def write_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], config: dict, shards: int = 3) -> Path:
    """Save ``tensors`` as ``shards`` safetensors files with an index, plus config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    groups = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for i, group in enumerate(groups, 1):
        file = f"model-{i:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in group}, str(directory / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in group})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@dataclass
class Pair:
    base: Path
    tuned: Path
    hot: dict[str, list[int]]  # base tensor name -> indices of neurons given a large change


def _perturb(weights: dict[str, torch.Tensor], hot_layers: int, gen: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """Small noise everywhere, and a large change on FFN neurons 3 and 11 and attention value
    neurons 5 of every layer (rows of gate/up/v, columns of down/o)."""
    out = {}
    for name, w in weights.items():
        out[name] = (w.float() + 0.01 * torch.randn(w.shape, generator=gen)).to(w.dtype)
    hot: dict[str, list[int]] = {}
    for layer in range(hot_layers):
        p = f"model.layers.{layer}."
        for proj, axis, idx in (("mlp.gate_proj", 0, [3, 11]), ("mlp.up_proj", 0, [3, 11]), ("mlp.down_proj", 1, [3, 11]), ("self_attn.v_proj", 0, [5]), ("self_attn.o_proj", 1, [5])):
            t = out[p + proj + ".weight"].float()
            sl = t.index_select(axis, torch.tensor(idx))
            t.index_copy_(axis, torch.tensor(idx), sl + 0.5 * torch.randn(sl.shape, generator=gen))
            out[p + proj + ".weight"] = t.to(weights[p + proj + ".weight"].dtype)
            hot[p + proj + ".weight"] = idx
    return out, hot


def build_pair(root: Path, *, layout: str = "llava", dtype: torch.dtype = torch.bfloat16, seed: int = 0, shards: int = 3, kv_heads: int = 4) -> Pair:
    """A base LLM and a tuned model: layout 'llava' (language_model.model.*), 'nested'
    (model.language_model.*) or 'llm' (a plain fine-tuned LLM)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    base_model = LlamaForCausalLM(text_config(kv_heads=kv_heads)).to(dtype)
    base_sd = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    base_cfg = base_model.config.to_dict()
    write_checkpoint(root / "base", base_sd, base_cfg, shards)

    tuned_lm, hot = _perturb(base_sd, 2, gen)
    if layout == "llm":
        write_checkpoint(root / "tuned", tuned_lm, base_cfg, shards)
        return Pair(root / "base", root / "tuned", hot)

    vocab = BASE_VOCAB + EXTRA_VOCAB
    cfg = LlavaConfig(
        text_config=text_config(vocab=vocab, kv_heads=kv_heads),
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14, projection_dim=16),
        image_token_id=IMAGE_TOKEN,
    )
    llava = LlavaForConditionalGeneration(cfg).to(dtype)
    tensors: dict[str, torch.Tensor] = {}
    lm_prefix, head = ("language_model.model.", "language_model.lm_head.weight") if layout == "llava" else ("model.language_model.", "lm_head.weight")
    for name, w in tuned_lm.items():
        if name == "lm_head.weight":
            key = head
        else:
            key = lm_prefix + name.removeprefix("model.")
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            w = torch.cat([w, (0.02 * torch.randn(EXTRA_VOCAB, w.shape[1], generator=gen)).to(dtype)])
        tensors[key] = w
    for name, w in llava.state_dict().items():
        if ".vision_tower." in f".{name}" or ".multi_modal_projector." in f".{name}":
            rest = name.removeprefix("model.")
            tensors[rest if layout == "llava" else "model." + rest] = w.detach().clone()
    write_checkpoint(root / "tuned", tensors, cfg.to_dict(), shards)
    return Pair(root / "base", root / "tuned", hot)


def load_llava(path: Path) -> LlavaForConditionalGeneration:
    return LlavaForConditionalGeneration.from_pretrained(path)
