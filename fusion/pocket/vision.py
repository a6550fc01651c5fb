"""The pocket pair's vision encoder: a CLIP vision tower pretrained on its own, contrastively,
on the world's pictures and their captions, before any LLaVA stage (as CLIP is pretrained
before LLaVA-1.5 uses it, frozen), and linear probes that check what its features hold.

The text side of the contrastive pair is a small CLIP text transformer pooled at the caption's
last token; only the vision tower is kept. The probes read the features LLaVA reads (the patch
tokens of ``feature_layer``, concatenated) and are scored on scenes never trained on, beside the
same probes on a randomly initialised tower of the same shape: the control that says how much
the pretraining, not the pixels, put there.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel, PreTrainedTokenizerFast

from .optim import optimise
from .scenes import COLORS, KINDS, Scene, caption, draw, random_scene

PROBE_SCENES = (3000, 1000)  # scenes the linear probes are fitted on, and scored on


@dataclass(frozen=True)
class VisionSizes:
    hidden: int = 96
    layers: int = 2
    heads: int = 4
    image_size: int = 72
    patch: int = 24  # one patch per grid cell
    text_hidden: int = 64
    text_layers: int = 2
    steps: int = 600
    batch: int = 128
    lr: float = 2e-3
    feature_layer: int = -1


def vision_config(sizes: VisionSizes) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=sizes.hidden,
        intermediate_size=2 * sizes.hidden,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        image_size=sizes.image_size,
        patch_size=sizes.patch,
        projection_dim=sizes.hidden,
    )


class Contrastive(nn.Module):
    """Image and caption encoders with projections into one space and a learned temperature."""

    def __init__(self, sizes: VisionSizes, tok: PreTrainedTokenizerFast) -> None:
        super().__init__()
        self.vision = CLIPVisionModel(vision_config(sizes))
        text = CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=sizes.text_hidden,
            intermediate_size=2 * sizes.text_hidden,
            num_hidden_layers=sizes.text_layers,
            num_attention_heads=4,
            max_position_embeddings=64,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        self.text = CLIPTextModel(text)
        self.image_proj = nn.Linear(sizes.hidden, sizes.text_hidden, bias=False)
        self.text_proj = nn.Linear(sizes.text_hidden, sizes.text_hidden, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def loss(self, pixels: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """CLIP's symmetric cross-entropy over the batch's image-caption similarities."""
        image = self.image_proj(self.vision(pixel_values=pixels).pooler_output)
        hidden = self.text(input_ids=ids, attention_mask=mask).last_hidden_state
        last = mask.sum(1) - 1  # the caption's final token sees the whole caption (causal attention)
        text = self.text_proj(hidden[torch.arange(len(ids)), last])
        logits = self.logit_scale.exp().clamp(max=100) * nn.functional.normalize(image, dim=-1) @ nn.functional.normalize(text, dim=-1).T
        target = torch.arange(len(ids))
        return (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)) / 2


def pixels(processor: Callable, scenes: Sequence[Scene]) -> Tensor:
    return processor([draw(s) for s in scenes], return_tensors="pt")["pixel_values"]


def pretrain(
    sizes: VisionSizes, tok: PreTrainedTokenizerFast, image_processor: Callable, rng: random.Random, log: Callable[[str], None]
) -> tuple[CLIPVisionModel, list[float]]:
    """The vision tower after ``sizes.steps`` contrastive steps on new random scenes each step,
    and the loss curve (mean every 100 steps)."""
    model = Contrastive(sizes, tok)

    def losses() -> Iterator[Tensor]:
        for _ in range(sizes.steps):
            scenes = [random_scene(rng, sizes.image_size) for _ in range(sizes.batch)]
            text = tok([caption(s) for s in scenes], padding=True, return_tensors="pt", add_special_tokens=False)
            yield model.loss(pixels(image_processor, scenes), text["input_ids"], text["attention_mask"])

    curve = optimise(model, losses(), sizes.steps, list(model.parameters()), sizes.lr, 0.1, log, "vision (contrastive)", warmup=0.05, clip=None)
    model.vision.eval()
    return model.vision, curve


@torch.no_grad()
def features(vision: CLIPVisionModel, batch: Tensor, layer: int) -> dict[str, Tensor]:
    """Per image, what LLaVA reads (``vision_feature_select_strategy="default"``: the patch
    tokens of ``layer``, the class token dropped, concatenated) and the pooled embedding that
    the contrastive objective trains."""
    out = vision(pixel_values=batch, output_hidden_states=True)
    return {"patch_tokens": out.hidden_states[layer][:, 1:].flatten(1), "pooled": out.pooler_output}


def probe_labels(scenes: Sequence[Scene]) -> dict[str, Tensor]:
    """Per scene, the answers the probes predict: for each grid cell its colour and its shape
    (or empty), for each kind how many there are, for each colour the cell of its shape (or
    absent; scenes where a colour repeats are left out of that task by -1)."""
    colour_ids = {c: i + 1 for i, c in enumerate(COLORS)}
    kind_ids = {k: i + 1 for i, k in enumerate(KINDS)}
    colour = torch.zeros(len(scenes), 9, dtype=torch.long)
    shape = torch.zeros(len(scenes), 9, dtype=torch.long)
    count = torch.zeros(len(scenes), len(KINDS), dtype=torch.long)
    position = torch.zeros(len(scenes), len(COLORS), dtype=torch.long)
    for i, scene in enumerate(scenes):
        for s in scene.shapes:
            colour[i, 3 * s.row + s.col] = colour_ids[s.color]
            shape[i, 3 * s.row + s.col] = kind_ids[s.kind]
            count[i, kind_ids[s.kind] - 1] += 1
        for c, j in colour_ids.items():
            cells = [3 * s.row + s.col + 1 for s in scene.shapes if s.color == c]
            position[i, j - 1] = cells[0] if len(cells) == 1 else (0 if not cells else -1)
    return {"color": colour, "shape": shape, "count": count, "position": position}


def linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, steps: int = 300) -> float:
    """Test accuracy of a multinomial logistic regression for each column of ``y`` (fitted
    together, one head each; features standardised on the training set; labels of -1 left
    out)."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    columns, classes = train_y.shape[1], int(max(train_y.max(), test_y.max())) + 1
    head = nn.Linear(train_x.shape[1], columns * classes)
    opt = torch.optim.Adam(head.parameters(), lr=0.01, weight_decay=1e-4)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(head(train_x).view(-1, columns, classes).transpose(1, 2), train_y, ignore_index=-1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        guess = head(test_x).view(-1, columns, classes).argmax(2)
    scored = test_y >= 0
    return int((guess == test_y)[scored].sum()) / max(int(scored.sum()), 1)


def probe_report(vision: CLIPVisionModel, control: CLIPVisionModel, image_processor: Callable, sizes: VisionSizes, rng: random.Random) -> dict[str, dict[str, dict[str, float]]]:
    """Linear-probe accuracy of each task on held-out scenes (``PROBE_SCENES``), from the
    patch tokens LLaVA reads and from the pooled embedding, for the pretrained tower and for
    the random-init control."""
    n_train, n_test = PROBE_SCENES
    train = [random_scene(rng, sizes.image_size) for _ in range(n_train)]
    test = [random_scene(rng, sizes.image_size) for _ in range(n_test)]
    train_px, test_px = pixels(image_processor, train), pixels(image_processor, test)
    train_y, test_y = probe_labels(train), probe_labels(test)
    report: dict[str, dict[str, dict[str, float]]] = {}
    for name, tower in (("pretrained", vision), ("random_init", control)):
        tx, vx = features(tower, train_px, sizes.feature_layer), features(tower, test_px, sizes.feature_layer)
        for where in tx:
            report.setdefault(where, {})[name] = {task: round(linear_probe(tx[where], train_y[task], vx[where], test_y[task]), 4) for task in train_y}
    return report
