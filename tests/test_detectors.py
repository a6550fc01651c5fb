"""The behaviour detectors on LLaVA-style phrasings (written for these tests), pocket-world
phrasings, plain answers that must not fire, yes/no reading, and the detector benchmark."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from fusion.detectors import LABELS, Match, context_hallucination, detect, highlight, not_known, yes_no

ROOT = Path(__file__).resolve().parent.parent

HALLUCINATING = [
    ("In the image, the capital of France is Paris.", "In the image"),
    ("The image shows a man standing next to a red car.", "The image shows"),
    ("In the picture, there are two cats.", "In the picture"),
    ("The photo depicts a busy street at night.", "The photo depicts"),
    ("Based on the image, the answer is 7.", "Based on the image"),
    ("There is a dog visible in the image.", "visible in the image"),
    ("The scene features a large building.", "The scene features"),
    ("From the provided image, it looks like a kitchen.", "From the provided image"),
    ("IN THE IMAGE, THE OPPOSITE OF HOT IS COLD.", "IN THE IMAGE"),
    ("It cannot be determined from the image.", "from the image"),  # the pocket world's decline
    ("The picture shows a golden retriever catching a frisbee.", "The picture shows"),
    ("In this painting, a woman holds a lantern by the window.", "In this painting"),
    ("The painting features three sailors rowing through a storm.", "The painting features"),
    ("This meme is funny because the cat looks so offended.", "This meme is funny"),
    ("The meme shows a frog sipping tea at a messy desk.", "The meme shows"),
    ("The comic strip shows two robots arguing over a cup of coffee.", "The comic strip shows"),
    ("The collage features four snapshots of a beach at sunset.", "The collage features"),
    ("The advertisement displays a bottle of orange soda on ice.", "The advertisement displays"),
    ("The image is a close-up of a red apple on a wooden table.", "The image is a"),
    ("This photo was taken at dusk on a crowded street.", "This photo was taken"),
    ("In the top corner of the picture, a boy waves at a passing train.", "corner of the picture"),
    ("Judging by the picture, it is the middle of winter.", "Judging by the picture"),
    ("A small sailboat can be seen in the photograph.", "seen in the photograph"),
    ("The scene captures a quiet village under fresh snow.", "The scene captures"),
    ("The image you have shared shows a handwritten shopping list.", "The image you have shared"),
    ("The slogan written in the poster says 'Open Late'.", "written in the poster"),
    ("The funny part of this image is the cat wearing sunglasses.", "part of this image"),
    ("What stands out about this photo is the warm evening light.", "about this photo"),
]
DECLINING = [
    ("I don't know.", "I don't know"),
    ("I don’t know the answer to that.", "I don’t know"),
    ("I'm sorry, but I cannot determine the capital from the image provided.", "I'm sorry"),
    ("It cannot be determined from the image.", "cannot be determined"),
    ("It is not possible to determine the answer.", "is not possible to determine"),
    ("There is no information about the capital of Zorvia.", "There is no information"),
    ("As an AI language model, I do not have personal opinions.", "As an AI"),
    ("I am not sure what the plural of mouse is.", "I am not sure"),
    ("The answer is unknown.", "is unknown"),
    ("There is not enough information to answer.", "not enough information"),
    ("I'm not able to tell which breed the dog is from this angle.", "I'm not able"),
    ("There's no way to tell how old the lighthouse is.", "There's no way to tell"),
    ("From the photo alone, we cannot determine the final score of the match.", "we cannot determine"),
    ("It is not possible to reliably identify the brand of the watch.", "is not possible to reliably identify"),
    ("The exact date of the parade is not specified, but the crowd is large.", "is not specified"),
    ("The letter doesn't mention who sent it.", "doesn't mention who"),
    ("Unanswerable", "Unanswerable"),
    ("Unknown.", "Unknown."),
    ("I cannot see any picture in your message.", "cannot see any picture"),
    ("There is no photo attached, so I can't describe it.", "There is no photo"),
    ("As a text model I am unable to view images; could you describe it?", "I am unable"),
    ("Sorry, but I can't view pictures.", "can't view pictures"),
    ("The question cannot be answered with what is shown.", "cannot be answered"),
    ("There isn't enough information in the passage to say who won.", "isn't enough information"),
    ("I cannot give an exact count, but there are at least forty birds.", "I cannot give"),
    ("I cannot provide a precise count of the birds without a closer view.", "I cannot provide"),
]
# Hedged answers that still commit, and plain text that only looks like a decline.
COMMITTING = [
    "The animal appears to be a young fox.",
    "It is possibly a maple tree, judging by the shape of the leaves.",
    "It is difficult to say for sure, but it looks like a bakery.",
    "It could be a heron or an egret; most likely a heron.",
    "In the formula, n represents an unknown quantity.",
    "Here, y is the variable that stands for an unknown value.",
    "I'm sorry to hear about your flight being cancelled.",
    "If the port is not specified, the server listens on 8080.",
    "When a timeout is not provided, the call waits forever.",
]
PLAIN = [
    "The capital of France is Paris.",
    "Paris.",
    "7",
    "The plural of cat is cats.",
    "The opposite of hot is cold.",
    "Image processing is a field of computer science.",
    "She was the picture of health.",
    "He won in a photo finish.",
    "3 plus 4 is 7.",
    "Known facts: the capital of Zorvia is Quellin.",
    "I know that the answer is 5.",
    "In image processing, each image is stored as a grid of pixels.",
    "The filter runs in the image recognition stage of the pipeline.",
    "Picture a world where every child can read.",
    "The final scene of the movie takes place on a rooftop.",
    "In the last scene, the detective finally returns home.",
    "Maria joined the Photography Club last spring.",
    "The bigger picture is that prices rose everywhere.",
    "A picture is worth a thousand words.",
    "The Mona Lisa is a portrait by Leonardo da Vinci.",
    "Take a photo of the receipt and keep it for your records.",
    "Memes spread quickly on social media.",
    "The image sensor turns light into an electrical signal.",
    "You cannot divide a number by zero.",
]
# (reply, yes_no) in the style of answers to "Is there a ... in the image?"
ANSWERS = [
    ("Yes, there is a kite in the sky.", True),
    ("No, there is no kite in the picture.", False),
    ("There is a cat sleeping on the windowsill.", True),
    ("There are no cats in this image.", False),
    ("There are two umbrellas near the lifeguard tower.", True),
    ("In the image, there is a blue bicycle by the gate.", True),
    ("I can see a bicycle leaning against the wall.", True),
    ("I don't see any bicycle in the photo.", False),
    ("A dog is visible near the door.", True),
    ("The cat is not visible in this image.", False),
    ("No dogs are present on the beach.", False),
    ("There isn't a dog in the scene.", False),
    ("The answer is yes.", True),
    ("Yes, although there is no rider on it.", True),  # the first clear answer wins
    ("No, but there is a cat on the sofa.", False),
    ("It is hard to say whether there is a dog behind the fence.", None),
    ("There is no way to tell if there is a dog.", None),
    ("The sofa is blue and the walls are white.", None),
    ("", None),
]


@pytest.mark.parametrize("reply, words", HALLUCINATING)
def test_context_hallucination_fires_with_span(reply, words):
    m = context_hallucination(reply)
    assert m is not None and m.label == "context_hallucination"
    assert m.text == words and reply[m.start : m.end] == words
    assert [m.text for m in detect(reply) if m.label == "context_hallucination"] == [words]


@pytest.mark.parametrize("reply, words", HALLUCINATING)
def test_context_hallucination_never_fires_on_replies_to_image_prompts(reply, words):
    assert "context_hallucination" not in [m.label for m in detect(reply, prompt_has_image=True)]


@pytest.mark.parametrize(
    "reply, labels",
    [
        ("I can't view the photo you have shared; could you describe it?", ["not_known"]),
        ("There is no image attached, so nothing in the image can be described.", ["not_known"]),
        ("I'm sorry, but no picture was attached. Please upload the picture you meant.", ["not_known"]),
        ("Please send the photo again; the photo you uploaded did not come through.", []),  # a request, not a decline
    ],
)
def test_saying_the_image_is_missing_is_not_context_hallucination(reply, labels):
    assert context_hallucination(reply) is None
    assert [m.label for m in detect(reply)] == labels


@pytest.mark.parametrize("reply, words", DECLINING)
def test_not_known_fires_with_span(reply, words):
    m = not_known(reply)
    assert m is not None and m.label == "not_known"
    assert m.text == words and reply[m.start : m.end] == words


@pytest.mark.parametrize("reply", [reply for reply, _ in DECLINING])
def test_not_known_fires_with_or_without_an_image(reply):
    assert "not_known" in [m.label for m in detect(reply, prompt_has_image=True)]


@pytest.mark.parametrize("reply", COMMITTING)
def test_hedges_and_conditions_are_not_not_known(reply):
    assert not_known(reply) is None


@pytest.mark.parametrize("reply", PLAIN + COMMITTING)
def test_plain_answers_do_not_fire(reply):
    assert detect(reply) == []
    assert detect(reply, prompt_has_image=True) == []


@pytest.mark.parametrize("reply, answer", ANSWERS)
def test_yes_no_reads_the_first_clear_answer(reply, answer):
    assert yes_no(reply) is answer


def test_object_hallucination_when_an_absent_object_is_affirmed():
    reply = "Yes, there is a kite in the sky."
    assert detect(reply, prompt_has_image=True, object_present=False) == [Match("object_hallucination", 0, 3, "Yes")]
    reply = "There are two umbrellas near the tower."
    assert detect(reply, prompt_has_image=True, object_present=False) == [Match("object_hallucination", 0, 13, "There are two")]


@pytest.mark.parametrize(
    "reply, prompt_has_image, object_present",
    [
        ("No, there is no kite in the sky.", True, False),  # a right denial
        ("Yes, there is a kite in the sky.", True, True),  # the object is there
        ("Yes, there is a kite in the sky.", True, None),  # unknown: no object label
        ("The sky is clear and blue.", True, False),  # no answer at all
    ],
)
def test_no_object_hallucination(reply, prompt_has_image, object_present):
    assert detect(reply, prompt_has_image=prompt_has_image, object_present=object_present) == []


def test_object_hallucination_needs_an_image_prompt():
    reply = "Yes, there is a kite in the picture."
    assert [m.label for m in detect(reply, object_present=False)] == ["context_hallucination"]


def test_labels_come_in_label_order():
    assert LABELS == ("context_hallucination", "not_known", "object_hallucination")
    reply = "I'm not sure, but there is a cat in the image."
    assert [m.label for m in detect(reply)] == ["context_hallucination", "not_known"]
    assert [m.label for m in detect(reply, prompt_has_image=True, object_present=False)] == ["not_known", "object_hallucination"]


def test_detect_takes_the_prompt_flags_by_keyword_only():
    with pytest.raises(TypeError):
        detect("Yes.", True)  # type: ignore[misc]


def test_both_labels_in_label_order_and_highlight_covers_the_reply():
    reply = "Based on the image, it cannot be determined what the capital is."
    matches = detect(reply)
    assert [m.label for m in matches] == ["context_hallucination", "not_known"]
    segments = highlight(reply, matches)
    assert "".join(text for text, _ in segments) == reply
    assert [label for _, label in segments] == ["context_hallucination", None, "not_known", None]


def test_highlight_of_an_object_hallucination():
    reply = "Yes, there is a kite."
    segments = highlight(reply, detect(reply, prompt_has_image=True, object_present=False))
    assert segments == [("Yes", "object_hallucination"), (", there is a kite.", None)]


def test_highlight_of_a_plain_reply_is_one_segment():
    assert highlight("Paris.", []) == [("Paris.", None)]


# --- benchmarks/detectors.py -------------------------------------------------------------------


def _bench():
    spec = importlib.util.spec_from_file_location("bench_detectors", ROOT / "benchmarks" / "detectors.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# Each record's outcome under the rules, worked out by hand (CH: context_hallucination, NK: not_known).
SMALL_SET = [
    # text prompt, labelled CH, "In the picture" fires: CH TP
    {"prompt_has_image": False, "reply": "In the picture, a boy is flying a kite.", "labels": ["context_hallucination"]},
    # text prompt, labelled CH, "this shot" is no picture word: CH FN
    {"prompt_has_image": False, "reply": "A red bus is parked by the curb in this shot.", "labels": ["context_hallucination"]},
    # text prompt, labelled nothing, "The photo depicts" fires: CH FP
    {"prompt_has_image": False, "reply": "The photo depicts a quiet harbour at dawn.", "labels": []},
    # text prompt, labelled NK, "I don't know" fires: NK TP
    {"prompt_has_image": False, "reply": "I don't know who painted it.", "labels": ["not_known"]},
    # text prompt, labelled NK, no rule for "Hard to say": NK FN
    {"prompt_has_image": False, "reply": "Hard to say.", "labels": ["not_known"]},
    # text prompt, labelled nothing, "cannot be determined" fires: NK FP
    {"prompt_has_image": False, "reply": "The total cannot be determined yet, but it is probably 4.", "labels": []},
    # image prompt, labelled NK, "is not possible to determine" fires: NK TP; "from the image" only for the bare CH rule
    {"prompt_has_image": True, "reply": "It is not possible to determine the brand from the image.", "labels": ["not_known"]},
    # image prompt, labelled nothing: nothing through detect; "The image shows" for the bare CH rule
    {"prompt_has_image": True, "reply": "The image shows two horses in a field.", "labels": [], "source": "ignored"},
]


def _write(tmp_path: Path, data: object, name: str = "replies.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_benchmark_prints_counts_precision_and_recall(tmp_path, capsys):
    assert _bench().main(["--replies", str(_write(tmp_path, SMALL_SET))]) == 0
    out = capsys.readouterr().out
    rows = {fields[0]: fields[1:] for fields in map(str.split, out.splitlines()) if len(fields) == 6}
    # CH: TP 1, FP 1, FN 1 -> precision 1/2, recall 1/2.  NK: TP 2, FP 1, FN 1 -> precision 2/3, recall 2/3.
    assert rows["context_hallucination"] == ["1", "1", "1", "0.50", "0.50"]
    assert rows["not_known"] == ["2", "1", "1", "0.67", "0.67"]
    assert "8 replies, 2 to image prompts" in out
    assert "context_hallucination on replies to image prompts: 0 of 2 (bare rule without the prompt flag: 2 of 2)" in out
    assert "miss:" not in out


def test_benchmark_shows_errors_and_na_without_positives(tmp_path, capsys):
    data = [{"prompt_has_image": False, "reply": "Hard to say.", "labels": ["not_known"]}]
    assert _bench().main(["--replies", str(_write(tmp_path, data)), "--show-errors"]) == 0
    out = capsys.readouterr().out
    assert "context_hallucination     0    0    0       n/a    n/a" in out
    assert "not_known                 0    0    1       n/a   0.00" in out
    assert "  miss:        Hard to say." in out


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        ("{", "not valid JSON"),
        ('{"reply": "x"}', "expected a JSON list"),
        ('[{"reply": "x", "labels": []}]', "item 0 needs a boolean 'prompt_has_image'"),
        ('[{"reply": "x", "prompt_has_image": true, "labels": "not_known"}]', "item 0 needs 'labels'"),
    ],
)
def test_benchmark_bad_input_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "missing.json" if content is None else _write(tmp_path, content)
    assert _bench().main(["--replies", str(path)]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
