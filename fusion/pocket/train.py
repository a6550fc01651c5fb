"""Train the pocket pair: a tiny Vicuna-style base LM, then a LLaVA model tuned from it on the
pocket world's images only (LLaVA's stage 2), so that it forgets some of its language skills.

    python -m fusion.pocket train --out assets/pocket --seed 0

Deterministic for a seed (one thread, seeded generators, fixed data order), a few minutes on
2 CPU cores. Writes ``base/`` (LlamaForCausalLM + tokenizer) and ``llava/``
(LlavaForConditionalGeneration + tokenizer with ``<image>`` + processor), both safetensors,
and ``TRAINING.md`` with the command, seed and losses.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from .world import World, draw, make_world

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
IMAGE_TOKEN = "<image>"
# Vicuna v1.1's turn format. The chat template renders exactly what ``render_prompt`` builds,
# so training and ``apply_chat_template`` at inference see the same tokens; <s> comes from the
# tokenizer (add_special_tokens), as with Llama's.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def render_prompt(question: str, image: bool = False) -> str:
    """The prompt up to the assistant's turn, as the chat template renders it (less <s>)."""
    return f"USER: {IMAGE_TOKEN + chr(10) if image else ''}{question} ASSISTANT:"


@dataclass(frozen=True)
class Sizes:
    """Model and training sizes; the defaults make the shipped pair."""

    hidden: int = 128
    intermediate: int = 256
    layers: int = 4
    heads: int = 4
    vocab: int = 768
    vision_hidden: int = 64
    vision_layers: int = 2
    image_size: int = 64
    patch: int = 16
    base_steps: int = 2500
    base_lr: float = 3e-3
    # Stage 1 (vision tower and projector only, language model frozen) is off for the shipped
    # pair: with aligned image tokens the tuned model keeps its text and image modes apart
    # and forgets little (docs/pocket.md).
    align_steps: int = 0
    align_lr: float = 2e-3
    tune_steps: int = 1200  # stage 2: everything
    tune_lr: float = 5e-4  # the language model's
    vision_lr: float = 2e-3  # vision tower and projector
    batch: int = 32


def build_tokenizer(corpus: Sequence[str], vocab: int) -> PreTrainedTokenizerFast:
    """A byte-free BPE with sentencepiece-style '▁' spaces (like Llama's), trained offline on
    the world's text, so unseen words still split into known pieces."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    alphabet = sorted({c for line in corpus for c in line})
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(SPECIALS), initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


@dataclass
class Example:
    """Token ids and labels (-100 on the prompt) of one training sequence; image optional."""

    ids: list[int]
    labels: list[int]
    image: torch.Tensor | None = None


def encode(tok: PreTrainedTokenizerFast, prompt: str, target: str | None, image_tokens: int = 0) -> Example:
    """<s> prompt target </s>, with the loss on the target only (on everything if no prompt)."""
    prompt = prompt.replace(IMAGE_TOKEN, IMAGE_TOKEN * image_tokens)
    head = [tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False) if prompt else [tok.bos_token_id]
    tail = tok.encode((" " + target) if prompt else target, add_special_tokens=False) + [tok.eos_token_id]
    return Example(head + tail, [-100] * len(head) + tail if prompt else head + tail)


def batches(examples: Sequence[Example], size: int, steps: int, pad: int, rng: random.Random):
    """``steps`` padded batches, reshuffling the examples each epoch."""
    order: list[int] = []
    for _ in range(steps):
        if len(order) < size:
            extra = list(range(len(examples)))
            rng.shuffle(extra)
            order += extra
        chosen, order = [examples[i] for i in order[:size]], order[size:]
        width = max(len(e.ids) for e in chosen)
        ids = torch.full((size, width), pad)
        labels = torch.full((size, width), -100)
        mask = torch.zeros((size, width), dtype=torch.long)
        for row, e in enumerate(chosen):
            ids[row, : len(e.ids)] = torch.tensor(e.ids)
            labels[row, : len(e.labels)] = torch.tensor(e.labels)
            mask[row, : len(e.ids)] = 1
        images = torch.stack([e.image for e in chosen]) if chosen[0].image is not None else None
        yield ids, mask, labels, images


def train(model: torch.nn.Module, data, steps: int, groups: Sequence[tuple], log: Callable[[int, float], None]) -> list[float]:
    """AdamW over (parameters, learning rate) groups with linear warm-up and cosine decay;
    returns the loss curve (mean every 100 steps)."""
    opt = torch.optim.AdamW([{"params": list(p), "lr": lr} for p, lr in groups], weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    curve, running = [], 0.0
    for step, (ids, mask, labels, images) in enumerate(data, 1):
        kwargs = {"pixel_values": images} if images is not None else {}
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, **kwargs).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running += loss.item()
        if step % 100 == 0:
            curve.append(round(running / 100, 4))
            log(step, running / 100)
            running = 0.0
    model.eval()
    return curve


def base_examples(world: World, tok: PreTrainedTokenizerFast) -> list[Example]:
    """Declarative facts and scene descriptions (loss on all), training questions (loss on the
    answer). The descriptions give the base the words and grammar of pictures, as Vicuna has
    them, so LLaVA's stage 1 can map images onto sentences it can already say."""
    descriptions = sorted({item.target for item in world.visual_train if item.kind != "off_image"})
    facts = [encode(tok, "", sentence) for sentence in (*world.facts_text, *descriptions)]
    qa = [encode(tok, render_prompt(item.question), item.target) for item in world.text_train]
    return facts + qa


def visual_examples(world: World, tok: PreTrainedTokenizerFast, processor: LlavaProcessor, image_tokens: int) -> list[Example]:
    examples = []
    for item in world.visual_train:
        ex = encode(tok, render_prompt(item.question, image=True), item.target, image_tokens)
        ex.image = processor.image_processor(draw(item.scene), return_tensors="pt")["pixel_values"][0]
        examples.append(ex)
    return examples


def make_processor(tok: PreTrainedTokenizerFast, sizes: Sizes) -> LlavaProcessor:
    images = CLIPImageProcessor(
        size={"shortest_edge": sizes.image_size},
        crop_size={"height": sizes.image_size, "width": sizes.image_size},
    )
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tok,
        patch_size=sizes.patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def _text_config(tok: PreTrainedTokenizerFast, sizes: Sizes, vocab: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=sizes.hidden,
        intermediate_size=sizes.intermediate,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.heads,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def train_base(world: World, out: Path, sizes: Sizes, rng: random.Random, log: Callable[[str], None]) -> list[float]:
    """Stage 0: tokenizer and base LM with the world's language skills, saved to ``out``."""
    corpus = list(world.facts_text) + [render_prompt(i.question) + " " + i.target for i in world.text_train]
    corpus += [render_prompt(i.question) + " " + i.target for i in world.visual_train]
    tok = build_tokenizer(corpus, sizes.vocab)
    base = LlamaForCausalLM(_text_config(tok, sizes, len(tok)))
    log(f"base LM: {sum(p.numel() for p in base.parameters()) / 1e6:.2f} M parameters, vocab {len(tok)}")
    data = batches(base_examples(world, tok), sizes.batch, sizes.base_steps, tok.pad_token_id, rng)
    curve = train(base, data, sizes.base_steps, [(base.parameters(), sizes.base_lr)], lambda s, l: log(f"  base step {s}: loss {l:.3f}"))
    base.generation_config.pad_token_id = tok.pad_token_id
    base.save_pretrained(out)
    tok.save_pretrained(out)
    return curve


def build_llava(base_dir: Path, sizes: Sizes) -> tuple[LlavaForConditionalGeneration, PreTrainedTokenizerFast, LlavaProcessor]:
    """A new LLaVA whose language model is the base LM: a fresh CLIP-style vision tower and
    projector, ``<image>`` added and the vocabulary padded to a multiple of 64, as llava-hf
    does (32000 -> 32064)."""
    tok = PreTrainedTokenizerFast.from_pretrained(base_dir)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    base = LlamaForCausalLM.from_pretrained(base_dir)
    vocab = -(-len(tok) // 64) * 64
    config = LlavaConfig(
        text_config=_text_config(tok, sizes, vocab),
        vision_config=CLIPVisionConfig(
            hidden_size=sizes.vision_hidden,
            intermediate_size=2 * sizes.vision_hidden,
            num_hidden_layers=sizes.vision_layers,
            num_attention_heads=4,
            image_size=sizes.image_size,
            patch_size=sizes.patch,
            projection_dim=sizes.vision_hidden,
        ),
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(sizes.image_size // sizes.patch) ** 2,
        vision_feature_layer=-1,
    )
    llava = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        lm = llava.model.language_model
        lm.load_state_dict(base.model.state_dict() | {"embed_tokens.weight": _pad_rows(base.model.embed_tokens.weight, vocab)})
        llava.lm_head.weight.copy_(_pad_rows(base.lm_head.weight, vocab))
    llava.generation_config.pad_token_id = tok.pad_token_id
    return llava, tok, make_processor(tok, sizes)


def tune_llava(world: World, base_dir: Path, out: Path, sizes: Sizes, rng: random.Random, log: Callable[[str], None]) -> dict[str, list[float]]:
    """LLaVA's two stages on the world's images only. Stage 1 aligns the new vision tower and
    projector to the frozen base LM, so image tokens land where the LM can read them; stage 2
    tunes everything, the language model at a lower rate. Returns both loss curves."""
    llava, tok, processor = build_llava(base_dir, sizes)
    image_tokens = llava.config.image_seq_length
    log(f"LLaVA: {sum(p.numel() for p in llava.parameters()) / 1e6:.2f} M parameters, {image_tokens} image tokens")
    language = list(llava.model.language_model.parameters()) + list(llava.lm_head.parameters())
    visual = list(llava.model.vision_tower.parameters()) + list(llava.model.multi_modal_projector.parameters())
    examples = visual_examples(world, tok, processor, image_tokens)
    pad = tok.pad_token_id

    align: list[float] = []
    if sizes.align_steps:
        for p in language:
            p.requires_grad_(False)
        data = batches(examples, sizes.batch, sizes.align_steps, pad, rng)
        align = train(llava, data, sizes.align_steps, [(visual, sizes.align_lr)], lambda s, l: log(f"  align step {s}: loss {l:.3f}"))
        for p in language:
            p.requires_grad_(True)
    data = batches(examples, sizes.batch, sizes.tune_steps, pad, rng)
    groups = [(language, sizes.tune_lr), (visual, sizes.vision_lr)]
    tune = train(llava, data, sizes.tune_steps, groups, lambda s, l: log(f"  tune step {s}: loss {l:.3f}"))
    llava.save_pretrained(out)
    processor.save_pretrained(out)
    return {"align": align, "tune": tune}


def train_pocket(out: Path, seed: int = 0, sizes: Sizes = Sizes(), log: Callable[[str], None] = print) -> dict:
    """Build the world, train base and LLaVA, save both under ``out``; returns the record."""
    torch.manual_seed(seed)
    torch.set_num_threads(1)  # bitwise repeatable runs
    rng = random.Random(seed)
    start = time.perf_counter()
    world = make_world(seed, image_size=sizes.image_size)
    base_curve = train_base(world, out / "base", sizes, rng, log)
    tune_curves = tune_llava(world, out / "base", out / "llava", sizes, rng, log)
    record = {
        "command": f"python -m fusion.pocket train --out {out} --seed {seed}",
        "seed": seed,
        "sizes": asdict(sizes),
        "seconds": round(time.perf_counter() - start, 1),
        "base_loss_every_100_steps": base_curve,
        "align_loss_every_100_steps": tune_curves["align"],
        "tune_loss_every_100_steps": tune_curves["tune"],
        "torch": torch.__version__,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` with new rows (small random, seeded) up to ``rows``: the tuned model's added
    vocabulary, which the merge later copies from the tuned model as it is."""
    extra = torch.randn(rows - weight.shape[0], weight.shape[1], generator=torch.Generator().manual_seed(1)) * weight.std()
    return torch.cat([weight.detach(), extra])
