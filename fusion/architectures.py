"""What the library knows about model architectures, as data in one place.

Two kinds of knowledge meet in a merge:

- **Checkpoint layouts** (``LAYOUTS``): how a tuned checkpoint names its language-model tensors
  relative to the base LLM's names, and which of its modules are not part of the language model
  (a LLaVA's vision tower and projector: copied byte for byte, and shared in memory between the
  original and the fused model).
- **Language-model families** (``FAMILIES``): which config fields must agree between tuned and
  base, which tensors form a neuron, which tensors carry vocabulary rows, and which tensor
  stands in for a tied ``lm_head``.

Adding a model family or a checkpoint layout is one entry here; ``checkpoint``, ``neurons``,
``merge`` and the app read these tables instead of knowing names themselves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import FusionError


@dataclass(frozen=True)
class Layout:
    """How a tuned checkpoint names its tensors.

    ``marker``: a key prefix whose presence identifies the layout ('' matches any checkpoint).
    ``prefixes``: (tuned prefix, base prefix) pairs, first match wins; a tensor matching none is
    not part of the language model. ``shared``: prefixes of the modules copied unchanged.
    """

    name: str
    marker: str
    prefixes: tuple[tuple[str, str], ...]
    shared: tuple[str, ...] = ()

    def base_key(self, key: str) -> str | None:
        """The base LLM's name for a tuned tensor, or None if it is not a language-model tensor."""
        for tuned_prefix, base_prefix in self.prefixes:
            if key.startswith(tuned_prefix):
                return base_prefix + key[len(tuned_prefix) :]
        return None

    def tuned_key(self, base_key: str) -> str:
        """This layout's name for a base-LLM tensor name (``base_key``'s inverse)."""
        for tuned_prefix, base_prefix in self.prefixes:
            if base_key.startswith(base_prefix):
                return tuned_prefix + base_key[len(base_prefix) :]
        raise KeyError(base_key)


# Checked in order: the first whose marker starts some key is the layout.
LAYOUTS: tuple[Layout, ...] = (
    # llava-hf on-disk layout (transformers < 4.52, and what the llava-hf repos ship)
    Layout(
        "llava",
        "language_model.",
        (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")),
        ("vision_tower.", "multi_modal_projector."),
    ),
    # the newer layout (transformers >= 4.52 in memory, and on disk when saved by it)
    Layout(
        "llava-nested",
        "model.language_model.",
        (("model.language_model.", "model."), ("lm_head.", "lm_head.")),
        ("model.vision_tower.", "model.multi_modal_projector."),
    ),
    # a plain LLM fine-tuned from the base: every tensor maps to itself
    Layout("llm", "", (("", ""),)),
)

# How transformers names a loaded LLaVA's parameters, whatever layout its checkpoint has.
LLAVA_IN_MEMORY = "llava-nested"

# Attribute names (on ``LlavaForConditionalGeneration.model``) of the modules the merge copies
# unchanged: the app lets the fused model borrow the original's, and 4-bit loading leaves them
# in full precision so that both models hold the same values.
SHARED_MODULES: tuple[str, ...] = ("vision_tower", "multi_modal_projector")


# Tokens a vision tower adds before its patch tokens (CLIP's class token), by its config's
# model_type: a LLaVA processor needs it to expand <image> into the right number of tokens,
# and repos converted before processors recorded it (TinyLLaVA) leave it unset.
VISION_EXTRA_TOKENS: dict[str, int] = {"clip_vision_model": 1, "siglip_vision_model": 0}


def detect_layout(keys: list[str]) -> Layout:
    """The layout of a tuned checkpoint, from its tensor names."""
    for layout in LAYOUTS:
        if any(k.startswith(layout.marker) for k in keys):
            return layout
    raise AssertionError("the 'llm' layout matches every checkpoint")


def layout_named(name: str) -> Layout:
    return next(layout for layout in LAYOUTS if layout.name == name)


@dataclass(frozen=True)
class NeuronGroup:
    """A neuron kind of a decoder layer: neuron k is row k of every ``rows`` projection and
    column k of every ``cols`` projection (with the bias entries of the row projections).

    ``split``: when rows and columns do not have the same count (grouped-query attention's
    ``v_proj`` rows vs ``o_proj`` columns), the two sides become kinds of their own, named so.
    """

    kind: str
    rows: tuple[str, ...] = ()
    cols: tuple[str, ...] = ()
    split: tuple[str, str] | None = None


@dataclass(frozen=True)
class Family:
    """A language-model family the library can locate neurons in and merge.

    ``layer_tensor``: a regex over base-LLM names with groups (layer, projection, weight|bias).
    ``config_fields``: fields that must agree between tuned and base (an absent
    ``num_key_value_heads`` means ``num_attention_heads``). ``vocab_tensors``: tensors whose
    rows are the vocabulary (a tuned MLLM may add rows; those are copied from it).
    ``tied_head``: (head, embedding) names: with ``tie_word_embeddings`` the base has no head.
    """

    name: str
    model_types: tuple[str, ...]
    layer_tensor: re.Pattern[str]
    groups: tuple[NeuronGroup, ...]
    config_fields: tuple[str, ...]
    vocab_tensors: tuple[str, ...]
    tied_head: tuple[str, str]

    def config_value(self, config: dict, field: str) -> object:
        if field == "num_key_value_heads" and field not in config:
            return config.get("num_attention_heads")
        return config.get(field)


LLAMA = Family(
    name="llama",
    # Mistral and Qwen2 share Llama's tensor names; Qwen2 adds q/k/v biases (row members)
    model_types=("llama", "mistral", "qwen2"),
    layer_tensor=re.compile(r"^model\.layers\.(\d+)\.((?:self_attn|mlp)\.\w+_proj)\.(weight|bias)$"),
    groups=(
        NeuronGroup("ffn", rows=("mlp.gate_proj", "mlp.up_proj"), cols=("mlp.down_proj",)),
        NeuronGroup("attn_q", rows=("self_attn.q_proj",)),
        NeuronGroup("attn_k", rows=("self_attn.k_proj",)),
        NeuronGroup("attn_v", rows=("self_attn.v_proj",), cols=("self_attn.o_proj",), split=("attn_v", "attn_o")),
    ),
    config_fields=("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size"),
    vocab_tensors=("model.embed_tokens.weight", "lm_head.weight"),
    tied_head=("lm_head.weight", "model.embed_tokens.weight"),
)

FAMILIES: tuple[Family, ...] = (LLAMA,)
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for f in FAMILIES for t in f.model_types)


def family_for(model_type: str | None) -> Family:
    """The family of a language model's ``model_type`` (from its config); a config that names
    none is read as Llama, the family every supported preset belongs to."""
    for family in FAMILIES:
        if model_type is None or model_type in family.model_types:
            return family
    raise FusionError(f"the language model is '{model_type}'; this library supports {', '.join(SUPPORTED_MODEL_TYPES)} language models")
