"""The pocket world: a small synthetic world, generated from a seed, from which the pocket pair
is trained and probed. Its language side is ``language`` (facts in nine skills, chats), its
visual side ``scenes`` (shapes on a grid); this module draws both for a seed and writes the
held-out probe set.

Held out: one question template per fact (the text probes ask known facts in new words) and
new scenes with the same number of questions for each visual skill.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .language import Chat, TextItem, all_facts, long_answers, make_chats, make_long_chats, split_questions
from .scenes import VISUAL_SKILLS, VisualChat, VisualItem, caption_item, described_item, scene_to_json, visual_chat, visual_item


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
    visual_train: tuple[VisualChat, ...]  # stage 2: conversations about a picture (questions of every skill, descriptions, declines)
    visual_heldout: tuple[VisualItem, ...]


def make_world(
    seed: int = 0,
    *,
    n_chats: int = 3000,
    n_long_chats: int = 1500,
    n_described: int = 12000,
    n_captions: int = 4000,
    n_visual_train: int = 8000,
    n_visual_heldout: int = 240,
    image_size: int = 72,
    turns: tuple[float, ...] = (0.5, 0.3, 0.2),
    describe_share: float = 0.1,
    off_image_share: float = 0.1,
) -> World:
    """The whole world for a seed: same seed, same world, same images.

    The visual training set is ``n_visual_train`` conversations about a picture, of one, two
    or three turns with the probabilities ``turns``, each turn a question of another visual
    skill or, with ``describe_share`` and ``off_image_share``, a request for a description or
    a language question (training templates) about the picture answered with the decline."""
    rng = random.Random(seed)
    facts = all_facts(rng)
    train, heldout = split_questions(facts, rng)
    chats = make_chats(rng, train, n_chats)
    long_chats = make_long_chats(rng, long_answers(facts), n_long_chats)
    described = tuple(described_item(rng, (*VISUAL_SKILLS, "retell")[i % (len(VISUAL_SKILLS) + 1)], image_size) for i in range(n_described))
    captions = tuple(caption_item(rng, image_size) for _ in range(n_captions))
    extras = {"describe": describe_share, "off_image": off_image_share}
    questions = [t.question for t in train]
    visual = tuple(visual_chat(rng, image_size, rng.choices(range(1, len(turns) + 1), turns)[0], extras, questions) for _ in range(n_visual_train))
    visual_heldout = tuple(visual_item(rng, VISUAL_SKILLS[i % len(VISUAL_SKILLS)], image_size) for i in range(n_visual_heldout))
    return World(seed, tuple(f.statement for f in facts), tuple(train), tuple(heldout), tuple(chats), tuple(long_chats), described, captions, visual, visual_heldout)


def round_robin(items: Sequence[TextItem]) -> list[TextItem]:
    """Items taken one skill at a time in turn, so that the first N of them (a quick look, the
    Behaviour tab's few) span every skill instead of the first skill's facts."""
    by_skill: dict[str, list[TextItem]] = {}
    for item in items:
        by_skill.setdefault(item.skill, []).append(item)
    queues = list(by_skill.values())
    return [q[i] for i in range(max(map(len, queues))) for q in queues if i < len(q)]


def probes_json(world: World) -> dict[str, Any]:
    """The held-out probes as a probe set (the format ``fusion.evaluate`` reads), every skill
    in turn; images are stored as scene specs and redrawn on load."""
    return {
        "name": "pocket",
        "description": (
            f"Held-out probes of the pocket world (seed {world.seed}): text questions in templates never trained on, "
            "image questions on new scenes, the same number for each visual skill."
        ),
        "text": [{"question": t.question, "answers": [t.answer], "skill": t.skill} for t in round_robin(world.text_heldout)],
        "visual": [
            {"question": v.question, "answers": [v.answer] if v.answer else [], "skill": v.skill, "image": scene_to_json(v.scene)}
            for v in world.visual_heldout
        ],
    }
