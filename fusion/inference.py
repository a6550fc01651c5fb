"""Loading a base LLM or a LLaVA-style MLLM and asking it questions, the same way for the
behaviour bench and the app.

Prompts go through the model's own chat template (``apply_chat_template``); a base LLM whose
tokenizer has none (Vicuna v1.5 ships without one) gets Vicuna v1.1's format. Decoding is
greedy, so answers are repeatable.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from threading import Thread
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

    def prompt(self, question: str, image: bool, history: Sequence[tuple[str, str]] = ()) -> str:
        """The chat-templated prompt; ``history`` holds earlier (question, answer) turns, and the
        image (if any) goes with the first user turn, as LLaVA-1.5 was tuned."""
        messages: list[dict[str, Any]] = []
        for i, (q, a) in enumerate([*history, (question, None)]):
            messages.append({"role": "user", "content": self._content(q, image and i == 0)})
            if a is not None:
                messages.append({"role": "assistant", "content": a if not self.multimodal else [{"type": "text", "text": a}]})
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _content(self, text: str, image: bool) -> Any:
        if not self.multimodal:
            return text
        return ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]

    def _inputs(self, texts: list[str], images: list[Image.Image] | None) -> Any:
        """Tokenized prompts (and pixels) on the model's device, left-padded."""
        if self.multimodal:
            inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
        else:
            inputs = self.processor(texts, padding=True, return_tensors="pt")
        inputs = inputs.to(self.model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

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
                inputs = self._inputs(texts, [images[i] for i in chunk] if with_image else None)
                out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
                new = out[:, inputs["input_ids"].shape[1] :]
                for i, text in zip(chunk, self.tokenizer.batch_decode(new, skip_special_tokens=True)):
                    answers[i] = text.strip()
        return answers

    def stream(self, question: str, image: Image.Image | None = None, *, history: Sequence[tuple[str, str]] = (), max_new_tokens: int = 64) -> Iterator[str]:
        """The greedy answer to one question, yielded as it grows (the app shows it live).
        Generation runs in a thread feeding transformers' ``TextIteratorStreamer``; an error
        there ends the stream and is raised here."""
        from transformers import TextIteratorStreamer

        if image is not None and not self.multimodal:
            raise ValueError(f"{self.name} is a text-only model: it cannot take images")
        inputs = self._inputs([self.prompt(question, image is not None, history)], [image] if image is not None else None)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def generate() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(**inputs, streamer=streamer, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
            except BaseException as err:  # handed to the consumer below
                failure.append(err)
                streamer.end()

        Thread(target=generate, daemon=True).start()
        text = ""
        for piece in streamer:
            text += piece
            yield text.strip()
        if failure:
            raise failure[0]
