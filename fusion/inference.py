"""Loading a base LLM or a LLaVA-style MLLM and asking it questions, the same way for the
behaviour bench and the app.

Prompts go through the model's own chat template (``apply_chat_template``); a base LLM whose
tokenizer has none (Vicuna v1.5 ships without one) gets Vicuna v1.1's format. Decoding is
greedy, so answers are repeatable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

VICUNA_SYSTEM = "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions."
VICUNA_TEMPLATE = (
    VICUNA_SYSTEM + " {% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {{ message['content'] if message['content'] is string "
    "else message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') }} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: {{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass
class ChatModel:
    """A model with its tokenizer (LLM) or processor (MLLM), ready to answer."""

    model: Any
    processor: Any  # a tokenizer for an LLM, a processor for an MLLM
    multimodal: bool
    name: str = ""

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer if self.multimodal else self.processor

    @classmethod
    def load(cls, path: str | Path, multimodal: bool, *, device: str = "cpu", dtype: torch.dtype | None = None, load_4bit: bool = False, name: str = "") -> ChatModel:
        """Load from a local directory (or hub id). ``load_4bit`` quantizes with bitsandbytes
        nf4 (CUDA only). Never runs remote code."""
        from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer, BitsAndBytesConfig, LlavaForConditionalGeneration

        kwargs: dict[str, Any] = {"dtype": dtype or "auto"}
        if load_4bit:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16)
            kwargs["device_map"] = {"": 0}
        loader = LlavaForConditionalGeneration if multimodal else AutoModelForCausalLM
        model = loader.from_pretrained(str(path), **kwargs).eval()
        if not load_4bit:
            model.to(device)
        processor = (AutoProcessor if multimodal else AutoTokenizer).from_pretrained(str(path))
        tokenizer = processor.tokenizer if multimodal else processor
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        if not multimodal and tokenizer.chat_template is None:
            tokenizer.chat_template = VICUNA_TEMPLATE
        return cls(model, processor, multimodal, name or str(path))

    def prompt(self, question: str, image: bool) -> str:
        content: Any = question
        if self.multimodal:
            content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @torch.inference_mode()
    def answer(self, questions: Sequence[str], images: Sequence[Image.Image | None] | None = None, *, max_new_tokens: int = 32, batch_size: int = 16) -> list[str]:
        """Greedy answers, one per question; ``images[i]`` (MLLM only) goes with question i."""
        images = list(images) if images is not None else [None] * len(questions)
        if any(images) and not self.multimodal:
            raise ValueError(f"{self.name} is a text-only model: it cannot take images")
        answers: list[str] = [""] * len(questions)
        # text-only and image questions go in separate batches (a processor call takes one or the other)
        for with_image in (False, True):
            rows = [i for i, im in enumerate(images) if (im is not None) == with_image]
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                texts = [self.prompt(questions[i], with_image) for i in chunk]
                if self.multimodal:
                    inputs = self.processor(text=texts, images=[images[i] for i in chunk] if with_image else None, padding=True, return_tensors="pt")
                else:
                    inputs = self.processor(texts, padding=True, return_tensors="pt")
                inputs = inputs.to(self.model.device)
                if "pixel_values" in inputs:
                    inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
                out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
                new = out[:, inputs["input_ids"].shape[1] :]
                for i, text in zip(chunk, self.tokenizer.batch_decode(new, skip_special_tokens=True)):
                    answers[i] = text.strip()
        return answers
