"""The behaviour bench: the scoring rules, the rates on hand-made replies (every rate known in
advance), a fast `python -m fusion eval` run on the shipped pocket pair (it shows the
forgetting that fusion undoes), the tables and the chart, and the sweep's outputs."""

import json

import pytest

from fusion.cli import main
from fusion.controls import blank_like, blind_guess, grounded, other_index
from fusion.errors import FusionError
from fusion.evaluate import SWEEPS, bench_model, parse_methods, run_sweep, spread
from fusion.plots import bench_figure
from fusion.presets import get_preset, probe_path
from fusion.probes import Probe, is_correct, load_probes, preset_probes, probe_image
from fusion.report import RATES, markdown_table, per_probe_table

POCKET = get_preset("pocket")
# Hand-made probes, each with the reply it gets and, in the comment, what the bench must make of it.
TEXT = [
    ("What is the capital of Zorvia?", ["is Blim"], "In the image, the capital is Blim."),  # right, Context-Hallucination
    ("What is the opposite of hot?", ["is cold"], "The opposite of hot is cold."),  # right
    ("Who wrote the letter?", [], "I don't know."),  # right (a decline), Not-Known
    ("What is 2 + 2?", ["is 4"], "In the picture there are four apples."),  # wrong, Context-Hallucination
]
VISUAL = [  # a reply to an image prompt is never Context-Hallucination
    ("Is there a dog in the image?", ["no"], "Yes, there is a dog."),  # wrong, Object-Hallucination
    ("Is there a cat in the image?", ["no"], "No, there is no cat."),  # right
    ("Is there a red square in the image?", ["yes"], "Yes."),  # right; the square is there: no label
    ("What colour is the square?", ["red"], "In the image, the square is blue."),  # wrong, no label
    ("How many circles are there?", ["no"], "There are two circles."),  # wrong, Object-Hallucination
]
# each image probe its own scene, so that "another probe's image" differs from its own
SCENES = [{"size": 72, "shapes": [["square", colour, 0, col]]} for colour, col in zip(("red", "blue", "green", "yellow", "red"), (0, 0, 0, 0, 2))]
BY_HAND = {
    "language_accuracy": 3 / 4,
    "visual_accuracy": 2 / 5,
    "visual_blank_accuracy": 2 / 5,  # a model that does not look: the same replies, the same marks
    "visual_other_accuracy": 2 / 5,
    "grounded_accuracy": 0.0,
    "context_hallucination_rate": 2 / 4,
    "not_known_rate": 1 / 4,
    "object_hallucination_rate": 2 / 3,  # of the three questions about absent objects
}
LABELS_BY_HAND = [["context_hallucination"], [], ["not_known"], ["context_hallucination"], ["object_hallucination"], [], [], [], ["object_hallucination"]]


class FixedReplies:
    """A model that answers each hand-made question with the reply written for it, whatever
    the image: it does not look."""

    def __init__(self, multimodal: bool) -> None:
        self.multimodal = multimodal
        self.replies = {q: r for q, _, r in TEXT + VISUAL}
        self.image_questions = {q for q, _, _ in VISUAL}

    def answer(self, questions, images=None, *, max_new_tokens=32):
        assert all((images is not None) == (q in self.image_questions) for q in questions), "images go with image questions only"
        return [self.replies[q] for q in questions]


class Seeing(FixedReplies):
    """Gives the written reply only with the probe's own image; with any other it sees nothing."""

    def answer(self, questions, images=None, *, max_new_tokens=32):
        if images is None:
            return super().answer(questions)
        own = {q: probe_image(Probe(q, (), "", scene), None).tobytes() for (q, _, _), scene in zip(VISUAL, SCENES)}
        return [self.replies[q] if im.tobytes() == own[q] else "Nothing there." for q, im in zip(questions, images)]


@pytest.fixture
def hand_made(tmp_path):
    path = tmp_path / "probes.json"
    text = [{"question": q, "answers": a} for q, a, _ in TEXT]
    path.write_text(json.dumps({"text": text, "visual": [{"question": q, "answers": a, "image": im} for (q, a, _), im in zip(VISUAL, SCENES)]}))
    return (*load_probes(path), tmp_path)


@pytest.mark.parametrize(
    ("reply", "answers", "right"),
    [
        ("The capital of Zorvia is Blim.", ("is Blim",), True),
        ("The capital of Zorvia is Blimton.", ("is Blim",), False),  # whole words only
        ("IS BLIM", ("is Blim",), True),
        ("", ("is Blim",), False),
        ("It cannot be determined from the image.", (), True),  # a decline is right when nothing can be told
        ("The artist is thinking about circles.", (), False),
    ],
)
def test_is_correct(reply, answers, right):
    assert is_correct(reply, Probe("q", answers, "skill")) is right


def test_object_questions_are_the_yes_no_image_probes():
    assert Probe("Is there a dog?", ("no",), "", "cat.jpg").object_present is False
    assert Probe("Is there a cat?", ("yes",), "", "cat.jpg").object_present is True
    assert Probe("Is there a cat?", ("yes",), "").object_present is None  # text only: no object to see
    assert Probe("What colour?", ("red",), "", "cat.jpg").object_present is None
    assert Probe("Is it red or blue?", ("yes", "no"), "", "cat.jpg").object_present is None


def test_rates_on_hand_made_replies_are_the_ones_worked_out_by_hand(hand_made):
    seen = []
    row, records = bench_model(FixedReplies(True), "tuned", "tuned", hand_made, progress=lambda done, total: seen.append((done, total)))
    assert {k: row[k] for k in RATES} == BY_HAND
    assert row["reads_images"] is False and row["visual_blind_guess"] == 3 / 5  # "no" is the most common answer
    assert [r["labels"] for r in records] == LABELS_BY_HAND
    assert [r["correct"] for r in records] == [True, True, True, False, False, True, True, False, False]
    assert [r["object_present"] for r in records] == [None] * 4 + [False, False, True, None, False]
    assert all(r["model"] == "tuned" and r["label"] == "tuned" for r in records)
    assert [r["other"]["image"] for r in records[4:]] == [SCENES[(i + 2) % 5] for i in range(5)]  # half the set further on
    assert seen == [(4, 19), (9, 19), (14, 19), (19, 19)]  # text; then images: own, blank, another's

    base, base_records = bench_model(FixedReplies(False), "base", "base", hand_made)
    assert len(base_records) == len(TEXT)  # a text-only LLM is not shown images
    assert {k: base[k] for k in RATES} == {**BY_HAND, **{k: None for k in RATES if k.startswith(("visual", "grounded", "object"))}}
    assert base["reads_images"] is None


def test_a_model_that_looks_is_grounded_where_its_answer_needs_the_image(hand_made):
    row, records = bench_model(Seeing(True), "tuned", "tuned", hand_made)
    assert row["visual_accuracy"] == 2 / 5 and row["visual_blank_accuracy"] == row["visual_other_accuracy"] == 0.0
    assert row["grounded_accuracy"] == 2 / 5 and row["reads_images"] is True
    assert [r["grounded"] for r in records[4:]] == [False, True, True, False, False]
    assert row["skills"]["visual"][""]["grounded_accuracy"] == 2 / 5 and row["skills"]["language"][""] == 3 / 4


def test_controls_other_image_blank_and_blind_guess():
    scene = [Probe("q", (), "", s) for s in ("a.jpg", "b.jpg", "a.jpg", "c.jpg")]
    assert [other_index(scene, i) for i in range(4)] == [3, 3, 1, 1]  # half the set on, past an image equal to its own
    assert other_index(scene[:1], 0) is None and other_index([scene[0], scene[2]], 0) is None  # nothing else to show
    white = blank_like(probe_image(Probe("q", (), "", SCENES[0]), None))
    assert white.size == (72, 72) and white.getcolors() == [(72 * 72, (255, 255, 255))]
    assert blind_guess([("count", ("there are no",)), ("count", ("there is one",)), ("count", ("there are no",)), ("unanswerable", ())]) == 3 / 4
    right = {"correct": True}
    assert grounded({"correct": True, "blank": right, "other": {"correct": False}}) is True
    assert grounded({"correct": True, "blank": right, "other": right}) is False  # right whatever it is shown
    assert grounded({"correct": True, "blank": {"correct": False}, "other": None}) is True
    assert grounded({"correct": False, "blank": {"correct": False}, "other": None}) is False


def test_tables_and_chart_of_hand_made_replies(hand_made):
    base, base_records = bench_model(FixedReplies(False), "base", "Vicuna", hand_made)
    tuned, tuned_records = bench_model(FixedReplies(True), "tuned", "LLaVA", hand_made)
    lines = markdown_table([base, tuned]).splitlines()
    assert lines[0] == (
        "| model | language accuracy | visual accuracy | visual, blank image | visual, other image | image-grounded "
        "| Context-Hallucination | Not-Known | Object-Hallucination |"
    )
    assert lines[2:4] == ["| Vicuna | 75.0% | — | — | — | — | 50.0% | 25.0% | — |", "| LLaVA | 75.0% | 40.0% | 40.0% | 40.0% | 0.0% | 50.0% | 25.0% | 66.7% |"]
    assert lines[5] == "A blind guess (each image question answered with its skill's most common answer) scores 60.0%."
    assert lines[6].startswith("**LLaVA does not read its images**: only 0.0% of its image answers")
    assert "| LLaVA | 40 / 40 / 0 |" in lines  # per skill: own image / blank image / image-grounded

    table = per_probe_table(base_records + tuned_records)
    assert table["headers"] == ["image", "skill", "question", "expected", "Vicuna", "LLaVA"]
    assert len(table["data"]) == len(TEXT) + len(VISUAL)  # each probe once, the models side by side
    flagged = f"✓ {TEXT[0][2]}  [Context-Hallucination]"
    assert table["data"][0] == ["text only", "", TEXT[0][0], "is Blim", flagged, flagged]
    assert table["data"][2][3] == "(a decline)"
    assert table["data"][4][:5] == ["drawn: red square", "", VISUAL[0][0], "no", "—"]
    reply = "Yes, there is a dog."
    assert table["data"][4][5] == f"✗ {reply}  [Object-Hallucination] · blank image: ✗ {reply} · other image: ✗ {reply} · not grounded"

    figure = bench_figure([base, tuned], "hand-made")
    axes = figure.axes[0]
    assert len(axes.patches) == 3 + 8  # no bar where a rate does not apply to the base
    assert sorted(round(p.get_height(), 1) for p in axes.patches) == sorted(round(100 * v, 1) for v in [0.75, 0.5, 0.25, *BY_HAND.values()])
    (guess,) = [line for line in axes.lines if line.get_label() == "blind guess"]
    assert set(guess.get_ydata()) == {60.0}


def test_probe_sets_load_and_bad_ones_are_named(tmp_path):
    for name in ("pocket.json", "llava-1.5.json"):
        text, visual = load_probes(probe_path(get_preset("pocket")).parent / name)
        assert text and visual and all(p.image is not None for p in visual)
        assert any(p.object_present is False for p in visual)  # both ask about absent objects
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(FusionError, match="bad.json"):
        load_probes(bad)
    with pytest.raises(FusionError, match="nope"):
        parse_methods("ties,nope")
    assert parse_methods("neu-p-taska:suppress=0.5, ties") == [("neu-p-taska", {"suppress": "0.5"}), ("ties", {})]
    with pytest.raises(FusionError, match="NAME=VALUE"):
        parse_methods("ties:density")
    with pytest.raises(FusionError, match="density"):
        parse_methods("ties:density=3")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("NEURON_FUSION_CACHE", str(tmp_path_factory.mktemp("cache")))
        assert main(["eval", "--preset", "pocket", "--methods", "neu-p-taska,task_arithmetic", "--limit", "40", "--out", str(out)]) == 0
    return out, {(r["model"], r["method"]): r for r in json.loads((out / "results.json").read_text())}


def test_eval_writes_rows_table_chart_and_replies(bench):
    out, rows = bench
    assert set(rows) == {("base", None), ("tuned", None), ("fused", "neu-p-taska"), ("fused", "task_arithmetic")}
    assert rows["base", None]["visual_accuracy"] is None  # a text-only LLM gets no image probes
    assert rows["base", None]["object_hallucination_rate"] is None
    assert rows["fused", "neu-p-taska"]["params"]["top_ratio"] == 0.05
    assert "| tuned |" in (out / "results.md").read_text() and "Object-Hallucination" in (out / "results.md").read_text()
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    replies = [json.loads(line) for line in (out / "replies.jsonl").read_text().splitlines()]
    assert len(replies) == 40 + 3 * 80  # base: text only; tuned and two fused: text and images
    # every rate is the share of its replies that carry its label: a wrong denominator shows here
    absent = sum(r["object_present"] is False for r in replies if r["model"] == "tuned")
    drawn = preset_probes(get_preset("pocket"), 40, 40)[1]  # the 40 image probes --limit draws across the skills
    assert absent == sum(p.object_present is False for p in drawn) > 0
    for (model, method), row in rows.items():
        mine = [r for r in replies if r["model"] == model and r["method"] == method]
        text = [r for r in mine if r["image"] is None]
        assert row["context_hallucination_rate"] == sum("context_hallucination" in r["labels"] for r in text) / 40
        assert row["language_accuracy"] == sum(r["correct"] for r in text) / 40
        if model != "base":
            assert isinstance(row["object_hallucination_rate"], float) and 0.0 <= row["object_hallucination_rate"] <= 1.0
            flagged = sum("object_hallucination" in r["labels"] for r in mine)
            assert row["object_hallucination_rate"] == flagged / absent
            assert not any("context_hallucination" in r["labels"] for r in mine if r["image"] is not None)


def test_shipped_pair_sees_forgets_and_fusion_at_defaults_gives_language_back(bench):
    """The pocket pair's point, on 40 held-out probes of each kind: the tuned model reads its
    images (it is right far more often with its own image than with a blank one), it lost
    language skills and declines or talks about images that are not there; Neuron-Fusion at
    the library's defaults (the preset overrides nothing) gives the language back and still
    answers from the image."""
    _, rows = bench
    base, tuned, fused = rows["base", None], rows["tuned", None], rows["fused", "neu-p-taska"]
    assert POCKET.params == {} and fused["params"]["suppress"] == 0.1 and fused["params"]["top_ratio"] == 0.05
    assert tuned["reads_images"] and tuned["visual_accuracy"] >= tuned["visual_blank_accuracy"] + 0.3
    assert tuned["grounded_accuracy"] >= 0.45
    assert base["language_accuracy"] >= 0.9
    assert tuned["language_accuracy"] <= base["language_accuracy"] - 0.25
    assert tuned["context_hallucination_rate"] >= 0.3 and base["context_hallucination_rate"] == 0.0
    assert tuned["not_known_rate"] >= 0.3 and base["not_known_rate"] == 0.0
    assert fused["language_accuracy"] >= 0.95 and fused["context_hallucination_rate"] == 0.0
    assert fused["reads_images"] and fused["grounded_accuracy"] >= 0.25


def test_sweep_walks_each_knob_and_plots(tmp_path, monkeypatch):
    """Three points of the knob (both ends and the middle), not all eight: each is a merge and a bench."""
    monkeypatch.setenv("NEURON_FUSION_CACHE", str(tmp_path / "cache"))
    rows = run_sweep(POCKET, ["task_arithmetic"], tmp_path / "sweep", limit=3, points=3, log=lambda *_: None)
    assert [r["model"] for r in rows] == ["base", "tuned", "fused", "fused", "fused"]
    fused = rows[2:]
    assert [r["value"] for r in fused] == [0.0, 0.5, 1.0]
    assert all(r["method"] == "task_arithmetic" and r["knob"] == "lambda" and r["params"]["lambda"] == r["value"] for r in fused)
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text()) == rows
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 0
    values = SWEEPS["task_arithmetic"][0][1]
    assert spread(values, None) == values  # by default, every value
    with pytest.raises(FusionError, match="at least 2 points"):
        run_sweep(POCKET, ["task_arithmetic"], tmp_path / "one", points=1)
    assert not (tmp_path / "one").exists()  # refused before any scoring
