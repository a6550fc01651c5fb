"""The pocket world: deterministic from its seed, held-out questions really held out, visual
answers consistent with the drawn scenes, chats whose follow-ups stay in their skill."""

import json
import random
from collections import Counter

from fusion.pocket.language import FOLLOW_UPS, SKILLS
from fusion.pocket.scenes import (
    COLORS,
    DECLINE,
    KINDS,
    NUMBERS,
    PLACES,
    VISUAL_SKILLS,
    caption,
    draw,
    questions,
    random_scene,
    scene_from_json,
    scene_to_json,
)
from fusion.pocket.world import make_world, probes_json

SMALL = {"n_chats": 200, "n_captions": 50, "n_visual_train": 300, "n_visual_heldout": 60}
WORLD = make_world(0, **SMALL)


def test_same_seed_same_world_and_pixels_other_seed_differs():
    again = make_world(0, **SMALL)
    assert again == WORLD
    assert draw(again.visual_train[7].scene).tobytes() == draw(WORLD.visual_train[7].scene).tobytes()
    other = make_world(1, **SMALL)
    assert other.text_heldout != WORLD.text_heldout and other.visual_train != WORLD.visual_train


def test_heldout_questions_never_trained_but_their_facts_are():
    trained_questions = {t.question for t in WORLD.text_train}
    trained_targets = {t.target for t in WORLD.text_train}
    assert WORLD.text_heldout and not trained_questions & {t.question for t in WORLD.text_heldout}
    assert all(t.target in trained_targets and t.target in WORLD.statements for t in WORLD.text_heldout)
    assert {t.skill for t in WORLD.text_heldout} == set(SKILLS)
    assert len({t.template for t in WORLD.text_heldout}) == 4  # every template is held out for some fact
    assert all(t.answer in t.target for t in WORLD.text_train + WORLD.text_heldout)


def test_off_image_questions_use_training_templates_and_decline():
    off = [turn for chat in WORLD.visual_train for turn, skill in zip(chat.turns, chat.skills) if skill == "off_image"]
    turns = sum(len(chat.turns) for chat in WORLD.visual_train)
    assert 0.05 * turns < len(off) < 0.2 * turns
    trained = {t.question for t in WORLD.text_train}
    assert all(question in trained and reply == DECLINE for question, reply in off)
    assert {v.question for v in WORLD.visual_heldout}.isdisjoint({t.question for t in WORLD.text_heldout})


def test_visual_conversations_ask_about_one_scene_in_up_to_three_turns():
    lengths = Counter(len(chat.turns) for chat in WORLD.visual_train)
    assert set(lengths) == {1, 2, 3} and lengths[1] > lengths[2] > lengths[3]
    for chat in WORLD.visual_train:
        asked = [s for s in chat.skills if s in VISUAL_SKILLS]
        assert len(asked) == len(set(asked)) and len(chat.skills) == len(chat.turns)  # one question of each skill at most
        for (question, target), skill in zip(chat.turns, chat.skills):
            if skill in VISUAL_SKILLS:
                assert (question, target) in {(q, t) for q, t, _ in questions(chat.scene, skill, random.Random(0))} or skill in ("yesno", "unanswerable")


def test_arithmetic_plural_and_successor_answers_are_right():
    for t in WORLD.text_heldout:
        if t.skill == "arithmetic":
            a, op, b = t.target.split()[:3]
            assert t.answer == f"is {int(a) + int(b) if op == 'plus' else int(a) - int(b)}"
    assert any(t.answer == "is mice" for t in WORLD.text_train + WORLD.text_heldout)
    assert "The day after Sunday is Monday." in WORLD.statements and "The month after December is January." in WORLD.statements


def test_heldout_image_questions_are_balanced_over_skills_and_yes_no_over_answers():
    assert Counter(v.skill for v in WORLD.visual_heldout) == {skill: 10 for skill in VISUAL_SKILLS}
    rng = random.Random(1)
    answers = Counter(questions(random_scene(rng), "yesno", rng)[0][2] for _ in range(400))
    assert abs(answers["yes"] - answers["no"]) <= 60  # about half the objects asked about are there


def test_visual_answers_match_scenes_and_pixels():
    for item in WORLD.visual_heldout:
        shapes = item.scene.shapes
        assert item.answer.lower() in item.target.lower()
        if item.skill == "count":
            kind = item.question.split()[2][:-1]
            n = sum(s.kind == kind for s in shapes)
            assert item.answer == (f"there is {NUMBERS[n]}" if n == 1 else f"there are {NUMBERS[n]}")
        if item.skill == "color":
            kind = item.question.split()[-1].rstrip("?")
            matching = [s for s in shapes if s.kind == kind]
            assert len(matching) == 1 and item.answer == f"is {matching[0].color}"
        if item.skill == "position":
            _, _, _, colour, kind = item.question.rstrip("?").split()
            (shape,) = [s for s in shapes if s.color == colour and s.kind == kind]
            assert item.answer == f"is {PLACES[shape.row, shape.col]}"
        if item.skill == "yesno":
            colour, kind = item.question.split()[3:5]
            assert item.answer == ("yes" if any(s.color == colour and s.kind == kind for s in shapes) else "no")
        if item.skill == "unanswerable":
            assert item.answer == "" and item.target == DECLINE
    image = draw(WORLD.visual_heldout[0].scene)
    assert image.mode == "RGB" and image.size == (72, 72)
    for s in WORLD.visual_heldout[0].scene.shapes:
        centre = (int((s.col + 0.5) * 24), int((s.row + 0.5) * 24))
        assert image.getpixel(centre) == COLORS[s.color]


def test_place_phrases_are_distinct_as_whole_words():
    """No place phrase is inside another, so a reply naming one place is not right for another."""
    phrases = list(PLACES.values())
    assert all(a == b or f" {a} " not in f" {b} " for a in phrases for b in phrases)


def test_captions_name_every_shape_and_where_it_is():
    rng = random.Random(3)
    for _ in range(50):
        scene = random_scene(rng)
        text = caption(scene)
        assert all(f"a {s.color} {s.kind} {s.place}" in text for s in scene.shapes)
        assert sum(text.count(k) for k in KINDS) == len(scene.shapes)
    assert questions(random_scene(rng), "unanswerable", rng)[0][1] == DECLINE


def test_chats_follow_ups_stay_in_the_skill_of_the_turn_before():
    skill_of = {t.target: t.skill for t in WORLD.text_train}
    starts = tuple(f.split("{x}")[0] for f in FOLLOW_UPS)
    follow_ups = 0
    for chat in WORLD.chats:
        for (_, before), (question, reply) in zip(chat.turns, chat.turns[1:]):
            if question.startswith(starts):
                follow_ups += 1
                subject = question.removesuffix("?").split(" ", 1 if question.startswith("And ") and not question.startswith("And for") else 2)[-1]
                assert skill_of[reply] == skill_of[before] and subject.lower() in reply.lower()
    assert follow_ups > 50


def test_probe_set_round_trips_and_redraws_the_same_image():
    probes = json.loads(json.dumps(probes_json(WORLD)))
    assert len(probes["text"]) == len(WORLD.text_heldout) and len(probes["visual"]) == len(WORLD.visual_heldout)
    first = probes["visual"][0]
    assert scene_from_json(first["image"]) == WORLD.visual_heldout[0].scene
    assert draw(scene_from_json(first["image"])).tobytes() == draw(WORLD.visual_heldout[0].scene).tobytes()
    assert scene_to_json(scene_from_json(first["image"])) == first["image"]
    assert {p["skill"] for p in probes["visual"]} == set(VISUAL_SKILLS)
