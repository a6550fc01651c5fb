"""Probe sets: the questions the behaviour bench asks, how they are read, shown and marked.

A probe set is a JSON file of text-only questions and image questions, each with the words a
right reply contains and a skill; ``assets/probes`` holds one per preset. Images are files
beside the set, or pocket-world scenes drawn on load.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .detectors import not_known
from .errors import FusionError
from .presets import Preset, probe_path


@dataclass(frozen=True)
class Probe:
    """One question. ``answers``: accepted answer words (a reply is right if it contains one as
    a whole word); empty means the honest reply is a decline. ``image``: None for text-only,
    a file name relative to the probe file, or a pocket-world scene (a dict)."""

    question: str
    answers: tuple[str, ...]
    skill: str
    image: str | dict | None = None

    @property
    def object_present(self) -> bool | None:
        """For an image question answered exactly "yes" or "no" (is there an X?), whether the
        object is in the image; None for every other probe. Probe sets ask these only about
        objects whose presence is known, which is what Object-Hallucination needs."""
        if self.image is None or self.answers not in (("yes",), ("no",)):
            return None
        return self.answers == ("yes",)


Probes = tuple[list[Probe], list[Probe], Path]  # text-only probes, image probes, the folder image files are relative to


def load_probes(path: Path) -> tuple[list[Probe], list[Probe]]:
    """(text-only probes, image probes) from a probe-set JSON file."""
    try:
        data = json.loads(path.read_text())
        text = [Probe(p["question"], tuple(p["answers"]), p.get("skill", "")) for p in data["text"]]
        visual = [Probe(p["question"], tuple(p["answers"]), p.get("skill", ""), p["image"]) for p in data.get("visual", [])]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise FusionError(f"{path}: not a readable probe set ({type(err).__name__}: {err})") from None
    return text, visual


def stratified(probes: Sequence[Probe], count: int | None, seed: int = 0) -> list[Probe]:
    """``count`` of ``probes`` drawn across their skills in turn (each skill's probes in an
    order shuffled by ``seed``, then one of each skill per round, skills in the order they
    first appear), so that a short run asks every skill rather than the file's first one.
    All of them, in the file's order, when ``count`` is None or not smaller. The same seed
    draws the same probes."""
    if count is None or count >= len(probes):
        return list(probes)
    if count < 0:
        raise FusionError(f"cannot draw {count} probes: the count must be at least 0")
    rng = random.Random(seed)
    by_skill: dict[str, list[Probe]] = {}
    for probe in probes:
        by_skill.setdefault(probe.skill, []).append(probe)
    for group in by_skill.values():
        rng.shuffle(group)
    rounds = itertools.zip_longest(*by_skill.values())
    return [probe for round_ in rounds for probe in round_ if probe is not None][:count]


def preset_probes(preset: Preset, text: int | None = None, visual: int | None = None, seed: int = 0) -> Probes:
    """A preset's probe set: ``text`` text-only and ``visual`` image probes drawn across the
    skills (``stratified``; all by default), and the folder its image files are relative to."""
    path = probe_path(preset)
    every_text, every_visual = load_probes(path)
    return stratified(every_text, text, seed), stratified(every_visual, visual, seed), path.parent


def probe_image(probe: Probe, root: Path) -> Image.Image:
    if isinstance(probe.image, dict):
        from .pocket.scenes import draw, scene_from_json

        return draw(scene_from_json(probe.image))
    return Image.open(root / str(probe.image)).convert("RGB")


def is_correct(reply: str, probe: Probe) -> bool:
    if not probe.answers:
        return not_known(reply) is not None
    return any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", reply, re.IGNORECASE) for a in probe.answers)
