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
    # What the llava-hf repos ship (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision; transformers < 4.52
    # saved this way): the language model under ``language_model.``, the vision modules at the top.
    Layout(
        "llava",
        "language_model.",
        (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")),
        ("vision_tower.", "multi_modal_projector.", "image_newline"),
    ),
    # How transformers 5 names every supported MLLM in memory (and on disk when a LLaVA is saved
    # by transformers >= 4.52): the language model under ``model.language_model.``.
    Layout(
        "nested",
        "model.language_model.",
        (("model.language_model.", "model."), ("lm_head.", "lm_head.")),
        ("model.vision_tower.", "model.multi_modal_projector.", "model.image_newline", "model.visual."),
    ),
    # What Qwen2-VL and Qwen2.5-VL repos ship (and transformers 5 still saves): the language model
    # under the base LLM's own names, the vision tower and its merger under ``visual.``.
    Layout("qwen-vl", "visual.", (("model.", "model."), ("lm_head.", "lm_head.")), ("visual.",)),
    # a plain LLM fine-tuned from the base: every tensor maps to itself
    Layout("llm", "", (("", ""),)),
)

# How transformers names a loaded MLLM's parameters, whatever layout its checkpoint has.
IN_MEMORY = "nested"

# Attribute names (on the loaded MLLM's ``.model``) of the modules the merge copies unchanged,
# across the supported MLLM classes (LLaVA, LLaVA-NeXT and LLaVA-OneVision: a vision tower and a
# projector; Qwen2.5-VL: ``visual``, its tower with the merger that projects it): the app lets a
# fused model borrow the original's, and 4-bit loading leaves them in full precision so that
# both hold the same values. LLaVA-NeXT's ``image_newline`` is one vector, copied with the rest.
SHARED_MODULES: tuple[str, ...] = ("vision_tower", "multi_modal_projector", "visual")

# Tokens a vision tower adds before its patch tokens (CLIP's class token), by its config's
# model_type: a LLaVA processor needs it to expand <image> into the right number of tokens,
# and repos converted before processors recorded it (TinyLLaVA) leave it unset.
VISION_EXTRA_TOKENS: dict[str, int] = {"clip_vision_model": 1, "siglip_vision_model": 0}

# A multimodal model whose language model is not named by a ``model_type`` the families know:
# Qwen2.5-VL's config keeps the language model's fields at its top level under its own
# ``model_type`` (and transformers 5 saves them as a ``text_config`` of type ``qwen2_5_vl_text``);
# its language model is a Qwen2 one, as is Qwen2-VL's.
LANGUAGE_MODEL_TYPES: dict[str, str] = {
    "qwen2_vl": "qwen2",
    "qwen2_vl_text": "qwen2",
    "qwen2_5_vl": "qwen2",
    "qwen2_5_vl_text": "qwen2",
}


def language_config(config: dict) -> dict:
    """The language model's fields of a model's config (``text_config`` of a multimodal model,
    else the config itself), its ``model_type`` the language model's family name."""
    text = config.get("text_config") or config
    kind = text.get("model_type")
    return {**text, "model_type": LANGUAGE_MODEL_TYPES[kind]} if kind in LANGUAGE_MODEL_TYPES else text


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
    ``config_fields``: fields that must agree between tuned and base, as they fix the shapes and
    meaning of the weights (an absent ``num_key_value_heads`` means ``num_attention_heads``).
    ``free_fields``: fields that legitimately differ between a family's MLLM and its base LLM
    (context length, sliding window, rope scaling: they change how positions are read, not the
    weights); a difference there is reported, not refused. ``vocab_tensors``: tensors whose rows
    are the vocabulary (a tuned MLLM may add rows; those are copied from it). ``tied_head``:
    (head, embedding) names: with ``tie_word_embeddings`` the base has no head.
    """

    name: str
    model_types: tuple[str, ...]
    layer_tensor: re.Pattern[str]
    groups: tuple[NeuronGroup, ...]
    config_fields: tuple[str, ...]
    free_fields: tuple[str, ...]
    vocab_tensors: tuple[str, ...]
    tied_head: tuple[str, str]

    def config_value(self, config: dict, field: str) -> object:
        if field == "num_key_value_heads" and field not in config:
            return config.get("num_attention_heads")
        return config.get(field)


# Llama, Mistral and Qwen2 decoder layers share their tensor names; Qwen2 adds q/k/v biases,
# which the regex takes as row members of their projections' neurons.
_DECODER_TENSOR = re.compile(r"^model\.layers\.(\d+)\.((?:self_attn|mlp)\.\w+_proj)\.(weight|bias)$")
_DECODER_GROUPS = (
    NeuronGroup("ffn", rows=("mlp.gate_proj", "mlp.up_proj"), cols=("mlp.down_proj",)),
    NeuronGroup("attn_q", rows=("self_attn.q_proj",)),
    NeuronGroup("attn_k", rows=("self_attn.k_proj",)),
    NeuronGroup("attn_v", rows=("self_attn.v_proj",), cols=("self_attn.o_proj",), split=("attn_v", "attn_o")),
)
_SHAPE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")


def _decoder_family(name: str, free_fields: tuple[str, ...], extra_shape_fields: tuple[str, ...] = ()) -> Family:
    """A family with Llama's decoder layers: the families differ only in their config fields."""
    return Family(
        name,
        (name,),
        _DECODER_TENSOR,
        _DECODER_GROUPS,
        (*_SHAPE_FIELDS, *extra_shape_fields),
        free_fields,
        ("model.embed_tokens.weight", "lm_head.weight"),
        ("lm_head.weight", "model.embed_tokens.weight"),
    )


LLAMA = _decoder_family("llama", ("max_position_embeddings", "rope_scaling"))
# LLaVA-NeXT-Mistral keeps its base's sliding window (none for Mistral-7B-Instruct-v0.2); one
# that differs changes which positions attend, not the weights.
MISTRAL = _decoder_family("mistral", ("max_position_embeddings", "sliding_window", "rope_theta"), ("head_dim",))
# Qwen2.5-VL differs from Qwen2.5-7B in its context length, sliding window and rope scaling
# (multimodal rope, "mrope"); LLaVA-OneVision drops its base's sliding-window fields.
QWEN2 = _decoder_family(
    "qwen2", ("max_position_embeddings", "sliding_window", "use_sliding_window", "max_window_layers", "rope_scaling", "rope_parameters")
)

FAMILIES: tuple[Family, ...] = (LLAMA, MISTRAL, QWEN2)
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for f in FAMILIES for t in f.model_types)


def family_for(model_type: str | None) -> Family:
    """The family of a language model's ``model_type`` (from its config); a config that names
    none is read as Llama (the oldest llava-hf configs leave it out)."""
    for family in FAMILIES:
        if model_type is None or model_type in family.model_types:
            return family
    raise FusionError(f"the language model is '{model_type}'; this library supports {', '.join(SUPPORTED_MODEL_TYPES)} language models")
