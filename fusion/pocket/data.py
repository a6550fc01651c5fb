"""Text and images as training batches for the pocket pair: the tokenizer, the chat format,
token labels, padded batches.

A sequence is rendered as the chat template renders it at inference and tokenized whole, the
way ``ChatModel`` tokenizes a prompt, so training and inference see the same tokens; the loss
falls on the assistant's turns only (LLaVA's and Vicuna's rule), found by character offsets.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
IMAGE_TOKEN = "<image>"
EOS = "</s>"
# Vicuna v1.1's turn format. The chat template renders exactly what ``render`` builds, so
# training and ``apply_chat_template`` at inference see the same text; <s> comes from the
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

Turns = Sequence[tuple[str, str]]  # (user, assistant)


def build_tokenizer(corpus: Sequence[str], vocab: int) -> PreTrainedTokenizerFast:
    """A byte-free BPE with sentencepiece-style '▁' spaces (like Llama's), trained offline on
    the world's text; every printable ASCII character and the newline are in its alphabet, so a visitor's words
    outside the world still split into known pieces."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    alphabet = sorted({c for line in corpus for c in line} | set(string.printable.strip()) | {"\n"})
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(SPECIALS), initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token=EOS, pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def render(turns: Turns, image_tokens: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """A conversation as the chat template renders it, and the character spans of the
    assistant's replies (each with its end-of-sequence token). ``image_tokens`` > 0 puts that
    many <image> tokens before the first question, as LLaVA's processor expands them."""
    text, spans = "", []
    for i, (user, assistant) in enumerate(turns):
        image = IMAGE_TOKEN * image_tokens + "\n" if image_tokens and i == 0 else ""
        text += f"USER: {image}{user} ASSISTANT: "
        spans.append((len(text), len(text) + len(assistant) + len(EOS)))
        text += assistant + EOS
    return text, spans


@dataclass
class Example:
    """Token ids and labels (-100 where there is no loss) of one training sequence; image optional."""

    ids: list[int]
    labels: list[int]
    image: torch.Tensor | None = None


def chat_example(tok: PreTrainedTokenizerFast, turns: Turns, image_tokens: int = 0) -> Example:
    """<s> and the rendered chat, with the loss on the assistant's replies."""
    text, spans = render(turns, image_tokens)
    encoded = tok(text, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    labels = [
        token if any(start < hi and end > lo for lo, hi in spans) else -100  # "▁4" starts at the space before the reply
        for token, (start, end) in zip(ids, encoded["offset_mapping"])
    ]
    return Example(ids, labels)


def text_example(tok: PreTrainedTokenizerFast, sentence: str) -> Example:
    """Plain text with the loss on every token: pretraining on statements."""
    ids = tok(sentence + EOS)["input_ids"]
    return Example(ids, list(ids))


def batches(examples: Sequence[Example], size: int, steps: int, pad: int, rng: random.Random) -> Iterator[tuple[torch.Tensor, ...]]:
    """``steps`` right-padded batches (ids, attention mask, labels, the images of the rows that
    have one or None). Each epoch is reshuffled, then cut into pools of 50 batches whose
    examples are grouped by length, so that short questions are not padded to the length of
    long chats (a batch's cost is its longest row); the batches are shuffled again."""
    queue: list[list[int]] = []
    for _ in range(steps):
        if not queue:
            order = list(range(len(examples)))
            rng.shuffle(order)
            pool = size * 50
            for at in range(0, len(order) - size + 1, pool):
                ranked = sorted(order[at : at + pool], key=lambda i: len(examples[i].ids))
                queue += [ranked[b : b + size] for b in range(0, len(ranked) - size + 1, size)]
            rng.shuffle(queue)
        chosen = [examples[i] for i in queue.pop()]
        width = max(len(e.ids) for e in chosen)
        ids = torch.full((size, width), pad)
        labels = torch.full((size, width), -100)
        mask = torch.zeros((size, width), dtype=torch.long)
        for row, e in enumerate(chosen):
            ids[row, : len(e.ids)] = torch.tensor(e.ids)
            labels[row, : len(e.labels)] = torch.tensor(e.labels)
            mask[row, : len(e.ids)] = 1
        pictures = [e.image for e in chosen if e.image is not None]  # in row order, as LLaVA fills its <image> tokens
        yield ids, mask, labels, torch.stack(pictures) if pictures else None
