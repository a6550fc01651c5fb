"""The behaviour detectors on real LLaVA-1.5 phrasings, pocket-world phrasings, and plain
answers that must not fire."""

import pytest

from fusion.detectors import LABELS, context_hallucination, detect, highlight, not_known

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
]


@pytest.mark.parametrize("reply, words", HALLUCINATING)
def test_context_hallucination_fires_with_span(reply, words):
    m = context_hallucination(reply)
    assert m is not None and m.label == "context_hallucination"
    assert m.text == words and reply[m.start : m.end] == words


@pytest.mark.parametrize("reply, words", DECLINING)
def test_not_known_fires_with_span(reply, words):
    m = not_known(reply)
    assert m is not None and m.label == "not_known"
    assert m.text == words and reply[m.start : m.end] == words


@pytest.mark.parametrize("reply", PLAIN)
def test_plain_answers_do_not_fire(reply):
    assert detect(reply) == []


def test_both_labels_in_label_order_and_highlight_covers_the_reply():
    reply = "Based on the image, it cannot be determined what the capital is."
    matches = detect(reply)
    assert [m.label for m in matches] == list(LABELS)
    segments = highlight(reply, matches)
    assert "".join(text for text, _ in segments) == reply
    assert [label for _, label in segments] == ["context_hallucination", None, "not_known", None]


def test_highlight_of_a_plain_reply_is_one_segment():
    assert highlight("Paris.", []) == [("Paris.", None)]
