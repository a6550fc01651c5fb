"""Loading a base LLM or a LLaVA-style MLLM and asking it questions, the same way for the
behaviour bench and the app.

Models are found the way the merge finds them (``fusion.checkpoint.resolve_directory``: a local
directory, or a hub repo in the cache or downloaded), so a model the merge can read, the app can
load. Prompts go through the model's own chat template (``apply_chat_template``); a base LLM
whose tokenizer has none (Vicuna v1.5 ships without one) gets Vicuna v1.1's format, a LLaVA
whose processor has none gets LLaVA-1.5's (TinyLLaVA) or, with a Llama 3 vocabulary, Llama 3's
(XTuner's LLaVA-Llama-3). Decoding is greedy, so answers are repeatable. Any MLLM class that
transformers maps from its config (LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL) loads the same
way; their processors are asked for images only (``load_processor``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from threading import Event, Thread
from typing import Any

import torch
from PIL import Image

from .architectures import SHARED_MODULES, VISION_EXTRA_TOKENS
from .checkpoint import read_json_object, resolve_directory
from .errors import FusionError

# How long a closed stream waits for its generation thread: one forward pass, even of a 7B
# model on a CPU, ends well within it; a thread still running after it is left to finish alone.
JOIN_SECONDS = 120.0
VICUNA_SYSTEM = "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions."
VICUNA_TEMPLATE = (
    VICUNA_SYSTEM + " {% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {{ message['content'] if message['content'] is string "
    "else message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') }} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: {{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT:"), for a LLaVA repo without a
# chat template of its own.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ part['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# Llama 3's conversation format with LLaVA's "<image>" first in the turn: what XTuner's
# LLaVA-Llama-3 was tuned on (its repo ships no chat template).
LLAMA3_TEMPLATE = (
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ part['text'] }}{% endfor %}{% endif %}"
    "{{ '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Image tokens one picture may cost where a processor sizes them by its pixels (Qwen2.5-VL's
# default allows 16,384, minutes of compute on a CPU): 1,280 is a 1000x1000 picture's worth.
MAX_IMAGE_TOKENS = 1280
# Python packages that tokenizer files need, by file: a Llama tokenizer shipped only as a
# SentencePiece model is read (and converted) with these.
_TOKENIZER_PACKAGES = {"tokenizer.model": ("sentencepiece", "google.protobuf")}


def check_tokenizer_packages(directory: Path) -> None:
    """Name the missing package before transformers tries a reader that cannot work (without
    sentencepiece it falls back to tiktoken and fails with an unrelated message)."""
    import importlib.util

    if (directory / "tokenizer.json").is_file():
        return
    for file, packages in _TOKENIZER_PACKAGES.items():
        if not (directory / file).is_file():
            continue
        missing = [p for p in packages if importlib.util.find_spec(p.split(".")[0]) is None]
        if missing:
            names = " ".join("protobuf" if p == "google.protobuf" else p for p in missing)
            raise FusionError(f"{directory / file}: reading this tokenizer needs the Python package(s) {names}: pip install {names}")


def quantization(device: torch.device) -> Any:
    """bitsandbytes nf4 for the language model's linear layers, computing in float16 on CUDA and
    bfloat16 on a CPU. The vision tower and projector stay in full precision, so that the
    original and the fused model (which copies them unchanged) can share one copy. On a CPU the
    weights are quantized by ``fusion.quantize``."""
    from transformers import BitsAndBytesConfig

    from .quantize import install

    install()  # the same bytes as bitsandbytes' CPU path, about four times faster (see fusion/quantize.py)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype(device),
        llm_int8_skip_modules=[f"model.{name}" for name in SHARED_MODULES] + ["lm_head"],
    )


def fallback_template(tokenizer: Any, multimodal: bool) -> str:
    """The chat format for a model whose files carry none (see the module's docstring)."""
    if "<|start_header_id|>" in tokenizer.get_vocab():
        return LLAMA3_TEMPLATE
    return LLAVA_TEMPLATE if multimodal else VICUNA_TEMPLATE


def load_processor(directory: Path) -> Any:
    """The MLLM's processor. LLaVA-OneVision's and Qwen2.5-VL's come with a video processor,
    which needs torchvision; where it is missing, the processor is loaded without one (this
    library asks about images and text only) rather than not at all."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(directory))
    except ImportError as err:
        if "video" not in str(err).lower():
            raise
    from transformers.models.auto.processing_auto import processor_class_from_name

    files = [directory / f for f in ("processor_config.json", "preprocessor_config.json") if (directory / f).is_file()]
    name = next((n for f in files if isinstance(n := read_json_object(f, "processor config").get("processor_class"), str)), None)
    cls = processor_class_from_name(name) if name else None
    if cls is None:
        raise FusionError(f"{directory}: its processor files name no processor class this transformers knows ({name!r})")
    attributes = [a for a in cls.get_attributes() if a != "video_processor"]
    image_only = type(cls.__name__, (cls,), {"get_attributes": classmethod(lambda _: attributes)})
    return image_only.from_pretrained(str(directory))


def bound_image_tokens(processor: Any) -> None:
    """Cap the image tokens of a processor that sizes them by pixels (``MAX_IMAGE_TOKENS``);
    tiling processors (LLaVA-NeXT, LLaVA-OneVision) are bounded by their grids already."""
    image = getattr(processor, "image_processor", None)
    merge, size = getattr(image, "merge_size", None), getattr(image, "size", None)
    longest = getattr(size, "longest_edge", None)
    if merge and longest:
        cap = MAX_IMAGE_TOKENS * (image.patch_size * merge) ** 2
        image.size = {"shortest_edge": size.shortest_edge, "longest_edge": min(longest, cap)}


def complete_processor(processor: Any, config: Any) -> None:
    """Fill in what a LLaVA processor needs to count image tokens from the model's config, for
    repos without a processor_config.json (TinyLLaVA's): without them every image fails.
    Processors that count tokens otherwise (Qwen2.5-VL's, by pixels) need nothing."""
    if not hasattr(config, "vision_feature_select_strategy"):
        return
    if getattr(processor, "patch_size", None) is None:
        processor.patch_size = config.vision_config.patch_size
    if getattr(processor, "vision_feature_select_strategy", None) is None:
        processor.vision_feature_select_strategy = config.vision_feature_select_strategy
    if getattr(processor, "num_additional_image_tokens", None) in (None, 0):
        processor.num_additional_image_tokens = VISION_EXTRA_TOKENS.get(config.vision_config.model_type, 0)


def compute_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.bfloat16


class _Halt:
    """A stopping criterion (transformers calls it after every token) that ends generation
    once either event is set: the stream's own (closed by its consumer) or the caller's."""

    def __init__(self, closed: Event, stop: Event | None) -> None:
        self.events = [e for e in (closed, stop) if e is not None]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        done = any(e.is_set() for e in self.events)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


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
    def load(cls, ref: str | Path, multimodal: bool, *, device: str = "cpu", dtype: torch.dtype | None = None, load_4bit: bool = False, name: str = "") -> ChatModel:
        """Load from a local directory or hub repo id. ``load_4bit`` quantizes the language
        model to nf4 (bitsandbytes, on CUDA or a CPU). On CUDA the weights are placed with
        ``device_map="auto"``: a model too large for the GPU spills to CPU memory instead of
        failing. Never runs remote code."""
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

        directory = resolve_directory(str(ref))
        check_tokenizer_packages(directory)
        target = torch.device(device)
        kwargs: dict[str, Any] = {"dtype": dtype or "auto"}
        if load_4bit:
            kwargs["quantization_config"] = quantization(target)
            kwargs["dtype"] = compute_dtype(target)
        if target.type == "cuda":
            kwargs["device_map"] = "auto"
        elif load_4bit:
            kwargs["device_map"] = {"": "cpu"}
        loader = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
        model = loader.from_pretrained(str(directory), **kwargs).eval()
        if "device_map" not in kwargs:
            model.to(target)
        if load_4bit and target.type == "cpu":
            from .quantize import ready_for_cpu

            ready_for_cpu(model)
        processor = load_processor(directory) if multimodal else AutoTokenizer.from_pretrained(str(directory))
        tokenizer = processor.tokenizer if multimodal else processor
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        if processor.chat_template is None:
            processor.chat_template = fallback_template(tokenizer, multimodal)
        if multimodal:
            complete_processor(processor, model.config)
            bound_image_tokens(processor)
        return cls(model, processor, multimodal, name or str(ref))

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

    def stream(
        self,
        question: str,
        image: Image.Image | None = None,
        *,
        history: Sequence[tuple[str, str]] = (),
        max_new_tokens: int = 64,
        stop: Event | None = None,
    ) -> Iterator[str]:
        """The greedy answer to one question, yielded as it grows (the app shows it live).
        Generation runs in a thread feeding transformers' ``TextIteratorStreamer``; an error
        there ends the stream and is raised here. Generation stops at the next token once
        ``stop`` is set or once this stream is closed (its consumer went away), and the thread
        is joined before the stream ends: an abandoned answer costs no more compute."""
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        if image is not None and not self.multimodal:
            raise ValueError(f"{self.name} is a text-only model: it cannot take images")
        inputs = self._inputs([self.prompt(question, image is not None, history)], [image] if image is not None else None)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        closed = Event()
        halt = StoppingCriteriaList([_Halt(closed, stop)])
        failure: list[BaseException] = []

        def generate() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(
                        **inputs, streamer=streamer, stopping_criteria=halt, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
                    )
            except BaseException as err:  # handed to the consumer below
                failure.append(err)
                streamer.end()

        worker = Thread(target=generate, name=f"generate-{self.name}", daemon=True)
        worker.start()
        try:
            text = ""
            for piece in streamer:
                text += piece
                yield text.strip()
        finally:
            closed.set()
            worker.join(JOIN_SECONDS)
        if failure:
            raise failure[0]
