"""``export-lm``: an MLLM's language model as a plain causal LM of its base's architecture, whose
text-only logits are the MLLM's own."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import CliRun
from fusion.presets import ASSETS

POCKET = (str(ASSETS / "pocket" / "llava"), str(ASSETS / "pocket" / "base"))


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_the_exported_language_model_answers_text_as_the_mllm_does(tmp_path: Path, cli: Callable[..., CliRun]) -> None:
    """From a fused model (its base found in its recipe): the export loads as the base's class,
    has the base's vocabulary (the MLLM's added image-token rows dropped), the base's tokenizer
    and a chat template, and its logits on a text prompt equal the fused MLLM's on the base's
    vocabulary."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    fused = tmp_path / "fused"
    assert cli("merge", "--tuned", POCKET[0], "--base", POCKET[1], "--method", "neu-p-taska", "--out", str(fused)).returncode == 0
    run = cli("export-lm", "--model", str(fused), "--out", str(tmp_path / "lm"))
    assert run.returncode == 0, run.stderr
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "lm", dtype=torch.float32)
    base_config = json.loads((Path(POCKET[1]) / "config.json").read_text())
    assert type(lm).__name__ == base_config["architectures"][0] == "LlamaForCausalLM"
    assert lm.get_input_embeddings().weight.shape[0] == base_config["vocab_size"]
    mllm = AutoModelForImageTextToText.from_pretrained(fused, dtype=torch.float32)
    assert mllm.get_input_embeddings().weight.shape[0] > base_config["vocab_size"]  # the MLLM's image token, dropped
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "lm")
    assert (tmp_path / "lm" / "tokenizer.json").read_bytes() == (Path(POCKET[1]) / "tokenizer.json").read_bytes()
    assert tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of Zolbisia?"}], tokenize=False, add_generation_prompt=True)
    ids = tokenizer("USER: What is the capital of Zolbisia? ASSISTANT:", return_tensors="pt").input_ids
    ours, theirs = logits(lm, ids), logits(mllm, ids)[..., : base_config["vocab_size"]]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert not torch.equal(ours, logits(AutoModelForCausalLM.from_pretrained(POCKET[1], dtype=torch.float32), ids))  # not the base's
    tensors = load_file(tmp_path / "lm" / "model.safetensors")
    assert all(not k.startswith(("language_model.", "vision_tower", "multi_modal_projector", "model.vision")) for k in tensors)
    again = cli("export-lm", "--model", str(fused), "--out", str(tmp_path / "lm"))
    assert again.returncode == 0 and "already there" in again.stdout


def test_a_tuned_model_needs_its_base_named(tmp_path: Path, cli: Callable[..., CliRun]) -> None:
    run = cli("export-lm", "--model", POCKET[0], "--out", str(tmp_path / "lm"))
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "--base" in run.stderr and not (tmp_path / "lm").exists()
    assert cli("export-lm", "--model", POCKET[0], "--base", POCKET[1], "--out", str(tmp_path / "lm")).returncode == 0


def test_export_of_the_paper_pair_from_the_hub(tmp_path: Path, monkeypatch, cli: Callable[..., CliRun]) -> None:
    """LLaVA-1.5-7B as the Hub ships it (a replica, offline): the export has Vicuna's config,
    vocabulary (LLaVA's image and padding rows dropped) and tokenizer, and, since Vicuna has no
    chat template, LLaVA's; its logits are LLaVA's on a text prompt."""
    import huggingface_hub.constants
    from replicas import write_replica
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    replica = write_replica(tmp_path / "cache", "llava-1.5-7b", tmp_path / "work")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    run = cli("export-lm", "--model", replica.tuned.repo_id, "--base", replica.base.repo_id, "--out", str(tmp_path / "lm"))
    assert run.returncode == 0, run.stderr
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "lm", dtype=torch.float32)
    vocab = replica.base.config["vocab_size"]
    assert lm.get_input_embeddings().weight.shape[0] == vocab and lm.lm_head.weight.shape[0] == vocab
    assert replica.tuned.sidecars["chat_template.json"]["chat_template"] == (tmp_path / "lm" / "chat_template.jinja").read_text()
    snapshot = next((tmp_path / "cache" / "models--llava-hf--llava-1.5-7b-hf" / "snapshots").iterdir())
    mllm = AutoModelForImageTextToText.from_pretrained(snapshot, dtype=torch.float32)
    ids = torch.tensor([[1, 3148, 1001, 29901, 1724, 338, 278, 7483, 29973]]) % vocab
    torch.testing.assert_close(logits(lm, ids), logits(mllm, ids)[..., :vocab], rtol=0, atol=1e-5)
