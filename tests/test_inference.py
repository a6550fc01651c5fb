"""How ``fusion.inference.ChatModel.load`` asks transformers to place and quantize a model on
each device (no GPU here: the loader is intercepted and its arguments checked)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from fusion.inference import ChatModel
from fusion.presets import ASSETS

POCKET = ASSETS / "pocket" / "llava"


@pytest.fixture
def loader_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    calls: list[dict] = []
    config = LlavaConfig.from_pretrained(POCKET)

    def fake(path: str, **kwargs: object) -> SimpleNamespace:
        calls.append(kwargs)
        return SimpleNamespace(config=config, eval=lambda: SimpleNamespace(config=config, to=lambda device: None, modules=lambda: []))

    monkeypatch.setattr(LlavaForConditionalGeneration, "from_pretrained", fake)
    return calls


@pytest.mark.parametrize(
    ("device", "four_bit", "device_map", "compute"),
    [("cuda", False, "auto", None), ("cuda", True, "auto", torch.float16), ("cpu", True, {"": "cpu"}, torch.bfloat16), ("cpu", False, None, None)],
)
def test_placement_and_quantization_per_device(loader_calls: list[dict], device: str, four_bit: bool, device_map: object, compute: object) -> None:
    ChatModel.load(POCKET, True, device=device, load_4bit=four_bit)
    kwargs = loader_calls[-1]
    assert kwargs.get("device_map") == device_map  # CUDA: spill to CPU memory when the GPU is too small
    quantization = kwargs.get("quantization_config")
    if four_bit:
        assert quantization.load_in_4bit and quantization.bnb_4bit_quant_type == "nf4"
        assert quantization.bnb_4bit_compute_dtype == compute and kwargs["dtype"] == compute
        assert set(quantization.llm_int8_skip_modules) >= {"model.vision_tower", "model.multi_modal_projector"}
    else:
        assert quantization is None
