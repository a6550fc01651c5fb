"""Making the pocket pair: training sees the tokens inference sees, the loss falls on the
assistant's replies only, batches cover every example, the vision probes read what they
should, and a whole (tiny) run is repeatable for a seed."""

import json
import random

import torch

from fusion.pocket import train as pocket_train
from fusion.pocket.data import batches, build_tokenizer, chat_example, render, text_example
from fusion.pocket.language import SKILLS
from fusion.pocket.scenes import Scene, Shape
from fusion.pocket.vision import VisionSizes, linear_probe, probe_labels
from fusion.probes import load_probes

CORPUS = ["USER: What is the opposite of hot? ASSISTANT: The opposite of hot is cold.</s>", "A red circle in the center."] * 20
TURNS = [("What is the opposite of hot?", "The opposite of hot is cold."), ("And big?", "The opposite of big is small.")]


def test_training_text_is_what_the_chat_template_renders():
    tok = build_tokenizer(CORPUS, 200)
    messages = [{"role": r, "content": c} for q, a in TURNS for r, c in (("user", q), ("assistant", a))]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert render(TURNS)[0] == rendered
    prompt = tok.apply_chat_template(messages[:3], add_generation_prompt=True, tokenize=False)
    assert chat_example(tok, TURNS).ids[: len(tok(prompt)["input_ids"])] == tok(prompt)["input_ids"]  # the prompt a model is asked


def test_the_loss_falls_on_the_replies_and_their_end_token_only():
    tok = build_tokenizer(CORPUS, 200)
    example = chat_example(tok, TURNS)
    runs, run = [], []
    for label in [*example.labels, -100]:
        if label != -100:
            run.append(label)
        elif run:
            runs, run = [*runs, tok.decode(run).strip()], []
    assert runs == [f"{reply}</s>" for _, reply in TURNS]  # each reply and its end token, nothing of the questions
    assert example.labels[: example.ids.index(tok.convert_tokens_to_ids("▁The"))] == [-100] * example.ids.index(tok.convert_tokens_to_ids("▁The"))
    statement = text_example(tok, "A red circle.")
    assert statement.labels == statement.ids and statement.ids[0] == tok.bos_token_id and statement.ids[-1] == tok.eos_token_id
    with_image = chat_example(tok, [("Describe it.", "A red circle.")], image_tokens=3)
    assert tok.decode([t for t in with_image.labels if t != -100]) == "A red circle.</s>"


def test_batches_cover_every_example_each_epoch_grouped_by_length():
    tok = build_tokenizer(CORPUS, 200)
    examples = [text_example(tok, " ".join(["red"] * n)) for n in range(1, 65)]
    for i, e in enumerate(examples):
        e.image = torch.full((3, 2, 2), float(i)) if i % 2 else None
    seen = []
    for ids, mask, labels, images in batches(examples, 8, 8, tok.pad_token_id, random.Random(0)):
        rows = [int(m.sum()) for m in mask]
        seen += rows
        assert ids.shape == (8, max(rows)) and (labels[mask == 0] == -100).all()
        assert max(rows) - min(rows) < 20  # grouped by length, not padded to the longest of all
        with_image = [examples[[len(e.ids) for e in examples].index(n)] for n in rows]
        assert images is None or [float(im[0, 0, 0]) for im in images] == [float(e.image[0, 0, 0]) for e in with_image if e.image is not None]
    assert sorted(seen) == sorted(len(e.ids) for e in examples)  # one epoch: every example once


def test_probe_labels_of_a_known_scene():
    scene = Scene((Shape("circle", "red", 0, 0), Shape("square", "blue", 1, 1), Shape("circle", "blue", 2, 2)))
    labels = probe_labels([scene])
    assert labels["color"][0].tolist() == [1, 0, 0, 0, 3, 0, 0, 0, 3]  # red=1, green=2, blue=3, yellow=4, empty=0
    assert labels["shape"][0].tolist() == [1, 0, 0, 0, 2, 0, 0, 0, 1]
    assert labels["count"][0].tolist() == [2, 1, 0]  # circles, squares, triangles
    assert labels["position"][0].tolist() == [1, 0, -1, 0]  # the red shape is in cell 0 (+1); blue repeats; no green or yellow


def test_linear_probe_scores_separable_and_random_labels():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=gen)
    separable = (x[:, :1] > 0).long()
    x[:, 0] += 2 * separable[:, 0] - 1  # a margin between the two classes
    assert linear_probe(x[:400], separable[:400], x[400:], separable[400:]) == 1.0
    noise = torch.randint(0, 4, (600, 1), generator=gen)
    assert linear_probe(x[:400], noise[:400], x[400:], noise[400:]) < 0.45


TINY = pocket_train.Recipe(
    hidden=32, intermediate=64, layers=1, heads=2, vocab=300, base_steps=3, base_batch=4, align_steps=2, tune_steps=3, tune_batch=4,
    vision=VisionSizes(hidden=16, layers=1, heads=2, text_hidden=16, text_layers=1, steps=2, batch=8),
)


def test_a_tiny_training_run_is_repeatable_and_recorded(tmp_path, monkeypatch):
    """Every stage runs and saves, and the same seed gives the same bytes (a small world and
    two probe scenes keep it to seconds)."""
    from fusion.pocket import vision, world

    small = {"n_chats": 20, "n_long_chats": 10, "n_described": 20, "n_captions": 20, "n_visual_train": 30, "n_visual_heldout": 6}
    monkeypatch.setattr(pocket_train, "make_world", lambda seed, **kw: world.make_world(seed, **kw, **small))
    monkeypatch.setattr(vision, "PROBE_SCENES", (40, 20))
    first = pocket_train.train_pocket(tmp_path / "a", seed=3, recipe=TINY, log=lambda line: None, probes_file=tmp_path / "probes.json")
    pocket_train.train_pocket(tmp_path / "b", seed=3, recipe=TINY, log=lambda line: None)
    for model in ("base", "llava"):
        assert (tmp_path / "a" / model / "model.safetensors").read_bytes() == (tmp_path / "b" / model / "model.safetensors").read_bytes()
    record = json.loads((tmp_path / "a" / "training.json").read_text())
    assert record == first and record["seed"] == 3 and record["recipe"]["hidden"] == 32
    assert set(record["vision_linear_probe_accuracy"]["patch_tokens"]) == {"pretrained", "random_init"}
    assert set(record["loss_every_100_steps"]) == {"base", "vision", "stage1", "stage2"}
    assert json.loads((tmp_path / "a" / "llava" / "config.json").read_text())["image_seq_length"] == 9
    text, visual = load_probes(tmp_path / "probes.json")  # the held-out probes of the same world, in the bench's format
    assert len(visual) == 6 and {p.skill for p in text} == set(SKILLS)
