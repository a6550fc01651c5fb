"""The pocket world: a small synthetic world, generated from a seed, from which the pocket pair
is trained and probed. Its language side is ``language`` (facts in nine skills, chats), its
visual side ``scenes`` (shapes on a grid); this module draws both for a seed and writes the
held-out probe set.

Held out: one question template per fact (the text probes ask known facts in new words) and
new scenes with the same number of questions for each visual skill.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from .language import Chat, TextItem, all_facts, long_answers, make_chats, make_long_chats, split_questions
from .scenes import DECLINE, VISUAL_SKILLS, VisualItem, caption_item, describe_item, described_item, random_scene, scene_to_json, visual_item


@dataclass(frozen=True)
class World:
    seed: int
    statements: tuple[str, ...]  # every fact as a sentence
    text_train: tuple[TextItem, ...]
    text_heldout: tuple[TextItem, ...]
    chats: tuple[Chat, ...]  # multi-turn conversations from the trained questions
    long_chats: tuple[Chat, ...]  # open-ended requests answered at length, and small talk
    described: tuple[VisualItem, ...]  # text-only questions about scenes told in words (the base's reading)
    captions: tuple[VisualItem, ...]  # stage 1 (and the vision encoder's captions)
    visual_train: tuple[VisualItem, ...]  # stage 2: questions of every skill, descriptions, off-image declines
    visual_heldout: tuple[VisualItem, ...]


def make_world(
    seed: int = 0,
    *,
    n_chats: int = 3000,
    n_long_chats: int = 1500,
    n_described: int = 6000,
    n_captions: int = 4000,
    n_visual_train: int = 6000,
    n_visual_heldout: int = 240,
    image_size: int = 72,
    describe_share: float = 0.1,
    off_image_share: float = 0.1,
) -> World:
    """The whole world for a seed: same seed, same world, same images.

    The visual training set is ``n_visual_train`` questions spread evenly over the visual
    skills, plus ``describe_share`` of that many descriptions and ``off_image_share`` of that
    many language questions (training templates) asked about an unrelated picture and answered
    with the decline, as LLaVA-1.5's VizWiz-style data teaches: when the image does not hold
    the answer, say so. It is how the tuned model learns to decline what its base knew."""
    rng = random.Random(seed)
    facts = all_facts(rng)
    train, heldout = split_questions(facts, rng)
    chats = make_chats(rng, train, n_chats)
    long_chats = make_long_chats(rng, long_answers(facts), n_long_chats)
    described = tuple(described_item(rng, (*VISUAL_SKILLS, "retell")[i % (len(VISUAL_SKILLS) + 1)], image_size) for i in range(n_described))
    captions = tuple(caption_item(rng, image_size) for _ in range(n_captions))
    visual = [visual_item(rng, VISUAL_SKILLS[i % len(VISUAL_SKILLS)], image_size) for i in range(n_visual_train)]
    visual += [describe_item(rng, image_size) for _ in range(round(describe_share * n_visual_train))]
    visual += [VisualItem(random_scene(rng, image_size), rng.choice(train).question, DECLINE, "", "off_image") for _ in range(round(off_image_share * n_visual_train))]
    rng.shuffle(visual)
    visual_heldout = tuple(visual_item(rng, VISUAL_SKILLS[i % len(VISUAL_SKILLS)], image_size) for i in range(n_visual_heldout))
    return World(seed, tuple(f.statement for f in facts), tuple(train), tuple(heldout), tuple(chats), tuple(long_chats), described, captions, tuple(visual), visual_heldout)


def probes_json(world: World) -> dict[str, Any]:
    """The held-out probes as a probe set (the format ``fusion.evaluate`` reads); images are
    stored as scene specs and redrawn on load."""
    return {
        "name": "pocket",
        "description": (
            f"Held-out probes of the pocket world (seed {world.seed}): text questions in templates never trained on, "
            "image questions on new scenes, the same number for each visual skill."
        ),
        "text": [{"question": t.question, "answers": [t.answer], "skill": t.skill} for t in world.text_heldout],
        "visual": [
            {"question": v.question, "answers": [v.answer] if v.answer else [], "skill": v.skill, "image": scene_to_json(v.scene)}
            for v in world.visual_heldout
        ],
    }
