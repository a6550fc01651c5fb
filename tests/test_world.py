"""The pocket world: deterministic from its seed, held-out questions really held out, visual
answers consistent with the drawn scenes."""

import json

from fusion.pocket.world import COLORS, DECLINE, NUMBERS, draw, make_world, probes_json, scene_from_json, scene_to_json

WORLD = make_world(0, n_visual_train=300, n_visual_heldout=50)


def test_same_seed_same_world_and_pixels_other_seed_differs():
    again = make_world(0, n_visual_train=300, n_visual_heldout=50)
    assert again == WORLD
    assert draw(again.visual_train[7].scene).tobytes() == draw(WORLD.visual_train[7].scene).tobytes()
    other = make_world(1, n_visual_train=300, n_visual_heldout=50)
    assert other.text_heldout != WORLD.text_heldout and other.visual_train != WORLD.visual_train


def test_heldout_questions_never_trained_but_their_facts_are():
    trained_questions = {t.question for t in WORLD.text_train}
    trained_targets = {t.target for t in WORLD.text_train}
    assert WORLD.text_heldout and not trained_questions & {t.question for t in WORLD.text_heldout}
    assert all(t.target in trained_targets and t.target in WORLD.facts_text for t in WORLD.text_heldout)
    assert {t.skill for t in WORLD.text_heldout} == {"capital", "opposite", "arithmetic", "plural"}
    assert len({t.template for t in WORLD.text_heldout}) == 4  # every template is held out for some fact


def test_off_image_questions_use_training_templates_and_decline():
    off = [v for v in WORLD.visual_train if v.kind == "off_image"]
    assert len(off) == round(0.15 * 300)
    trained = {t.question for t in WORLD.text_train}
    assert all(v.question in trained and v.target == DECLINE and v.answer == "" for v in off)
    assert {v.question for v in WORLD.visual_heldout}.isdisjoint({t.question for t in WORLD.text_heldout})


def test_arithmetic_and_plural_answers_are_right():
    for t in WORLD.text_heldout:
        if t.skill == "arithmetic":
            a, op, b = t.target.split()[:3]
            assert t.answer == f"is {int(a) + int(b) if op == 'plus' else int(a) - int(b)}"
    assert any(t.answer == "is mice" for t in WORLD.text_train + WORLD.text_heldout)


def test_visual_answers_match_scenes_and_pixels():
    for item in WORLD.visual_train:
        shapes = item.scene.shapes
        assert item.target.startswith(("In the image", "Yes", "No", "It cannot"))
        if item.kind == "count":
            kind = item.question.split()[2][:-1]
            assert item.answer == NUMBERS[sum(s.kind == kind for s in shapes)]
        if item.kind == "color":
            kind = item.question.split()[-1].rstrip("?")
            matching = [s for s in shapes if s.kind == kind]
            assert len(matching) == 1 and matching[0].color == item.answer
        if item.kind == "unanswerable":
            assert item.answer == ""
    image = draw(WORLD.visual_train[0].scene)
    assert image.mode == "RGB" and image.size == (64, 64)
    for s in WORLD.visual_train[0].scene.shapes:
        centre = (int((s.col + 0.5) * 64 / 3), int((s.row + 0.5) * 64 / 3))
        assert image.getpixel(centre) == COLORS[s.color]


def test_probe_set_round_trips_and_redraws_the_same_image():
    probes = json.loads(json.dumps(probes_json(WORLD)))
    assert len(probes["text"]) == len(WORLD.text_heldout) and len(probes["visual"]) == len(WORLD.visual_heldout)
    first = probes["visual"][0]
    assert scene_from_json(first["image"]) == WORLD.visual_heldout[0].scene
    assert draw(scene_from_json(first["image"])).tobytes() == draw(WORLD.visual_heldout[0].scene).tobytes()
    assert scene_to_json(scene_from_json(first["image"])) == first["image"]
