"""Train the pocket pair the way LLaVA-1.5 is made, scaled down:

0. a vision encoder pretrained on its own, contrastively, on the world's pictures and captions
   (``fusion.pocket.vision``), then frozen for good, as LLaVA-1.5 keeps CLIP frozen;
1. a base LM (Vicuna's part) pretrained on the language world: statements, questions, chats;
2. LLaVA stage 1: a new projector trained alone on captions (vision and LM frozen);
3. LLaVA stage 2: LM and projector tuned together (AdamW, warm-up and cosine decay, no weight
   decay, as LLaVA-1.5's recipe) on visual instructions mixed with a small share of text-only
   chat, as LLaVA-1.5's instruction mix holds ShareGPT's.

    python -m fusion.pocket train --out assets/pocket --seed 0

Nothing here chooses which neurons move: no loss term, mask or freezing inside the LM, so
whatever shape the change takes comes from the recipe. Deterministic for a seed and thread
count (seeded generators, fixed data order). Writes ``base/`` (LlamaForCausalLM + tokenizer),
``llava/`` (LlavaForConditionalGeneration + tokenizer with ``<image>`` + processor), both
safetensors, and ``training.json`` with the command, sizes, timings, losses and probes.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import (
    CLIPImageProcessor,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from . import vision as vision_encoder
from .data import CHAT_TEMPLATE, IMAGE_TOKEN, Example, batches, build_tokenizer, chat_example, render, text_example
from .language import small_talk
from .optim import optimise
from .scenes import VisualChat, caption, description, draw
from .world import World, make_world, probes_json

Log = Callable[[str], None]


@dataclass(frozen=True)
class Recipe:
    """Model and training sizes; the defaults make the shipped pair."""

    hidden: int = 160
    intermediate: int = 640
    layers: int = 4
    heads: int = 4
    vocab: int = 1024
    max_positions: int = 256
    base_steps: int = 3500
    base_lr: float = 3e-3
    base_batch: int = 32
    align_steps: int = 400  # stage 1: projector only
    align_lr: float = 1e-3
    tune_steps: int = 6000  # stage 2: LM and projector
    tune_lr: float = 2.5e-4
    tune_batch: int = 8
    text_share: float = 0.05  # of stage 2's examples: text-only chats
    text_chats: str = "long"  # which: "long" (open-ended, as ShareGPT's) or "all" (short questions too)
    hidden_act: str = "relu"
    vision: vision_encoder.VisionSizes = field(default_factory=vision_encoder.VisionSizes)


def train(model: torch.nn.Module, data: Iterable, steps: int, params: Sequence[torch.nn.Parameter], lr: float, weight_decay: float, log: Log, name: str) -> list[float]:
    """``optimise`` on the LM's next-token loss over ``data``'s batches (token ids, mask,
    labels, and pixels where the batch has images)."""

    def losses() -> Iterator[torch.Tensor]:
        for ids, mask, labels, images in data:
            kwargs = {"pixel_values": images} if images is not None else {}
            yield model(input_ids=ids, attention_mask=mask, labels=labels, **kwargs).loss

    return optimise(model, losses(), steps, params, lr, weight_decay, log, name)


def corpus(world: World) -> list[str]:
    """Every text the pair is trained on, for the tokenizer."""
    texts = list(world.statements) + [render([(i.question, i.target)])[0] for i in world.text_train]
    texts += [render(c.turns)[0] for c in world.chats + world.long_chats + world.visual_train]
    texts += [render([(v.question, v.target)])[0] for v in world.described + world.captions]
    return texts


def base_examples(world: World, tok: PreTrainedTokenizerFast) -> list[Example]:
    """The base LM's pretraining: every fact as a statement and the scenes' descriptions
    (loss on all: the words and grammar of pictures, as Vicuna has them, so that stage 1 maps
    images onto sentences the LM can already say); questions, chats and small talk in the chat
    format (loss on the replies)."""
    scenes = [v.scene for v in world.captions]
    plain = [*world.statements, *(caption(s)[:1].upper() + caption(s)[1:] + "." for s in scenes[:1000]), *(description(s) for s in scenes[1000:2000])]
    examples = [text_example(tok, s) for s in plain]
    examples += [chat_example(tok, [(i.question, i.target)]) for i in world.text_train]
    examples += [chat_example(tok, c.turns) for c in world.chats + world.long_chats]
    examples += [chat_example(tok, [(d.question, d.target)]) for d in world.described]
    examples += [chat_example(tok, [turn]) for turn in small_talk()] * 4
    return examples


def text_config(tok: PreTrainedTokenizerFast, recipe: Recipe, vocab: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=recipe.hidden,
        intermediate_size=recipe.intermediate,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        max_position_embeddings=recipe.max_positions,
        hidden_act=recipe.hidden_act,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def train_base(world: World, out: Path, recipe: Recipe, rng: random.Random, log: Log) -> list[float]:
    """Tokenizer and base LM with the world's language skills, saved to ``out``."""
    tok = build_tokenizer(corpus(world), recipe.vocab)
    base = LlamaForCausalLM(text_config(tok, recipe, len(tok)))
    log(f"base LM: {sum(p.numel() for p in base.parameters()) / 1e6:.2f} M parameters, vocab {len(tok)}")
    data = batches(base_examples(world, tok), recipe.base_batch, recipe.base_steps, tok.pad_token_id, rng)
    curve = train(base, data, recipe.base_steps, list(base.parameters()), recipe.base_lr, 0.1, log, "base")
    base.generation_config.pad_token_id = tok.pad_token_id
    base.save_pretrained(out)
    tok.save_pretrained(out)
    return curve


def make_processor(tok: PreTrainedTokenizerFast, recipe: Recipe) -> LlavaProcessor:
    size = recipe.vision.image_size
    images = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tok,
        patch_size=recipe.vision.patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_llava(base_dir: Path, tower: torch.nn.Module, recipe: Recipe) -> tuple[LlavaForConditionalGeneration, PreTrainedTokenizerFast, LlavaProcessor]:
    """A new LLaVA from the base LM and the pretrained vision tower, with a fresh projector;
    ``<image>`` added and the vocabulary padded to a multiple of 64, as llava-hf does
    (32000 -> 32064)."""
    tok = PreTrainedTokenizerFast.from_pretrained(base_dir)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    base = LlamaForCausalLM.from_pretrained(base_dir)
    vocab = -(-len(tok) // 64) * 64
    grid = recipe.vision.image_size // recipe.vision.patch
    config = LlavaConfig(
        text_config=text_config(tok, recipe, vocab),
        vision_config=vision_encoder.vision_config(recipe.vision),
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=grid * grid,
        vision_feature_layer=recipe.vision.feature_layer,
    )
    llava = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        llava.model.vision_tower.load_state_dict(tower.state_dict())
        lm = llava.model.language_model
        lm.load_state_dict(base.model.state_dict() | {"embed_tokens.weight": _pad_rows(base.model.embed_tokens.weight, vocab)})
        llava.lm_head.weight.copy_(_pad_rows(base.lm_head.weight, vocab))
    llava.generation_config.pad_token_id = tok.pad_token_id
    return llava, tok, make_processor(tok, recipe)


def image_examples(chats: Sequence[VisualChat], tok: PreTrainedTokenizerFast, processor: LlavaProcessor, image_tokens: int) -> list[Example]:
    """Each conversation with its scene's pixels, the image tokens before its first question."""
    examples = []
    for chat in chats:
        ex = chat_example(tok, chat.turns, image_tokens)
        ex.image = processor.image_processor(draw(chat.scene), return_tensors="pt")["pixel_values"][0]
        examples.append(ex)
    return examples


def tune_llava(world: World, base_dir: Path, tower: torch.nn.Module, out: Path, recipe: Recipe, rng: random.Random, log: Log) -> dict[str, list[float]]:
    """LLaVA's two stages. Stage 1 trains the projector alone on captions, so image tokens land
    where the frozen LM can read them; stage 2 tunes LM and projector on the instruction mix.
    The vision tower stays frozen throughout. Returns both loss curves."""
    llava, tok, processor = build_llava(base_dir, tower, recipe)
    image_tokens = llava.config.image_seq_length
    log(f"LLaVA: {sum(p.numel() for p in llava.parameters()) / 1e6:.2f} M parameters, {image_tokens} image tokens")
    language = [*llava.model.language_model.parameters(), *llava.lm_head.parameters()]
    projector = list(llava.model.multi_modal_projector.parameters())
    for p in llava.model.vision_tower.parameters():
        p.requires_grad_(False)
    pad = tok.pad_token_id

    for p in language:
        p.requires_grad_(False)
    captions = [VisualChat(c.scene, ((c.question, c.target),), ("caption",)) for c in world.captions]
    data = batches(image_examples(captions, tok, processor, image_tokens), recipe.tune_batch, recipe.align_steps, pad, rng)
    align = train(llava, data, recipe.align_steps, projector, recipe.align_lr, 0.0, log, "stage 1")
    for p in language:
        p.requires_grad_(True)

    mix = image_examples(world.visual_train, tok, processor, image_tokens)
    n_text = round(recipe.text_share / (1 - recipe.text_share) * len(mix))
    chats = [c.turns for c in (world.long_chats if recipe.text_chats == "long" else world.chats + world.long_chats)]
    mix += [chat_example(tok, chats[rng.randrange(len(chats))]) for _ in range(n_text)]
    data = batches(mix, recipe.tune_batch, recipe.tune_steps, pad, rng)
    tune = train(llava, data, recipe.tune_steps, language + projector, recipe.tune_lr, 0.0, log, "stage 2")
    llava.save_pretrained(out)
    processor.save_pretrained(out)
    return {"stage1": align, "stage2": tune}


def train_pocket(out: Path, seed: int = 0, recipe: Recipe = Recipe(), log: Log = print, threads: int = 2, probes_file: Path | None = None) -> dict:
    """Build the world, pretrain the vision encoder and the base LM, run both LLaVA stages,
    save the pair under ``out`` (and the world's held-out probes at ``probes_file``, which belong
    to this pair: another seed holds other facts); returns the record also written to
    ``training.json``."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = random.Random(seed)
    start = time.perf_counter()
    times = {}
    world = make_world(seed, image_size=recipe.vision.image_size)
    out.mkdir(parents=True, exist_ok=True)

    base_curve = train_base(world, out / "base", recipe, rng, log)
    times["base_lm"] = time.perf_counter() - start
    tok = PreTrainedTokenizerFast.from_pretrained(out / "base")
    processor = make_processor(tok, recipe).image_processor
    control = vision_encoder.Contrastive(recipe.vision, tok).vision.eval()
    tower, vision_curve = vision_encoder.pretrain(recipe.vision, tok, processor, rng, log)
    times["vision"] = time.perf_counter() - start - times["base_lm"]
    probes = vision_encoder.probe_report(tower, control, processor, recipe.vision, random.Random(seed + 1))
    log(f"vision linear probes: {probes}")
    curves = tune_llava(world, out / "base", tower, out / "llava", recipe, rng, log)
    times["llava"] = time.perf_counter() - start - times["base_lm"] - times["vision"]
    record = {
        "command": f"python -m fusion.pocket train --out {out} --seed {seed}",
        "seed": seed,
        "threads": threads,
        "recipe": asdict(recipe),
        "seconds": round(time.perf_counter() - start, 1),
        "seconds_by_stage": {k: round(v, 1) for k, v in times.items()},
        "vision_linear_probe_accuracy": probes,
        "loss_every_100_steps": {"base": base_curve, "vision": vision_curve, **curves},
        "torch": torch.__version__,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    if probes_file is not None:
        probes_file.parent.mkdir(parents=True, exist_ok=True)
        probes_file.write_text(json.dumps(probes_json(world), indent=1) + "\n")
    return record


def _pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` with new rows (small random, seeded) up to ``rows``: the tuned model's added
    vocabulary, which the merge later copies from the tuned model as it is."""
    extra = torch.randn(rows - weight.shape[0], weight.shape[1], generator=torch.Generator().manual_seed(1)) * weight.std()
    return torch.cat([weight.detach(), extra])

