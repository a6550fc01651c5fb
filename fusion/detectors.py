"""Behaviour detectors: plain, documented rules over a model's reply.

Three labels, each a few regular expressions (two of them with a short veto), so that a reader
can check by eye why a reply was labelled and the app can highlight the words that did it.

*Context-Hallucination* (``context_hallucination``): a reply to a TEXT-ONLY prompt that talks
about an image as if one were there. By the project's definition a reply to a prompt that did
carry an image is never one, so ``detect`` only looks for it when ``prompt_has_image`` is False.
What fires: a picture word tied to a pointing phrase, not the bare word.
  - a place in it: "in the image", "from this photo", "within the provided picture", "in this
    meme / painting / comic strip / collage / advertisement", "in the top corner of the photo";
  - a picture word as the subject of a describing verb: "The image features", "This painting
    depicts", "The meme is showing", "The scene captures", "The collage shows";
  - "The image is a / of ...", "This photo was taken ...";
  - "the image you provided", "based on the picture", "visible in the photo".
Core picture words (image, picture, photo, photograph, snapshot, screenshot) fire after "the";
the other media (painting, drawing, illustration, meme, comic strip, collage, advertisement,
poster) fire as the subject of a describing verb, or after a pointing word in a place phrase
("in this painting", "in the attached meme"), since "in the painting" is also how one talks
about a famous painting. "scene" fires only as the subject of a describing verb.
What does not fire: "image processing" and other compounds ("in the image recognition step"),
"the picture of health", "picture a world", a film's scene ("the final scene of the movie"),
"photo finish", "Photography Club", and any sentence that says the image is missing ("I can't
view the photo you sent", "no picture was attached", "please upload the photo").

*Not-Known* (``not_known``): the reply declines, or says the answer cannot be known, determined
or provided from what it has, with or without an image: "I don't know", "Unanswerable",
"I cannot give an exact count", "we cannot tell", "it is not possible to (reliably) identify",
"... cannot be determined", "the author's name is not stated", "the letter doesn't mention who",
"There is no photo attached", "I can't view pictures", "I'm sorry, but", "as an AI", "not
enough information", "is unknown / unclear". A reply that is only "Unknown"
counts too. What does not fire: hedges that still commit ("appears to be", "possibly", "it is
difficult to say, but"), "x represents an unknown value", "I'm sorry to hear that", and a
phrase inside a condition ("if the argument is not provided, the default is used").

*Object hallucination* (``object_hallucination``): for an image prompt that asks whether an
object is there, when the caller knows it is absent (``object_present=False``) and the reply
says it is there. ``yes_no`` reads the reply's first clear answer: "Yes" / "No" opening a
clause, "the answer is yes", "there is a / are two ..." against "there is no / are not / is
nothing", "I can see a" against "I don't see any", "is visible / present" against "is not".
"whether there is a dog" is a question, not an answer, and is skipped.

Known limits: rules see words, not meaning. A reply that quotes such a phrase ("the phrase 'in
the image' means ...") fires; a hedge worded some other way ("hard to say") does not; a text
answer about a named artwork or film in LLaVA's describing style ("The painting depicts a farmer
and his wife", "this scene shows their love") fires as Context-Hallucination, and so does a
sentence that states what a picture is in general ("the image is a grid of pixels"). The
idiom "keep me in the picture" fires. ``yes_no`` takes the first answer and does not check
which object it is about. The rules are tuned on real LLaVA-1.5 replies (benchmarks/detectors.py
measures them on a labelled set) and on the pocket world's phrasings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LABELS: tuple[str, ...] = ("context_hallucination", "not_known", "object_hallucination")

_FLAGS = re.IGNORECASE
# Picture words that point at an image after a plain "the"; other media need more (see above).
_CORE = r"(?:images?|pictures?|photos?|photographs?|snapshots?|screenshots?)"
_MEDIA = rf"(?:{_CORE}|paintings?|drawings?|illustrations?|memes?|comic\s+strips?|collages?|advertisements?|posters?)"
_GIVEN = r"(?:given|provided|attached|above|uploaded|shared|following)"
# Words that make "image" the first half of a compound noun ("image processing"), not a picture.
_COMPOUND = (
    r"(?!\s+(?:processing|recognition|classification|segmentation|generation|editing|editors?|files?|formats?|data|quality"
    r"|resolution|size|compression|sensors?|models?|encoders?|captions?|search|library|credits?|rights)\b)"
)
_DESCRIBING = (
    r"(?:shows?|features?|depicts?|displays?|captures?|portrays?|illustrates?|presents?|showcases?|contains?|includes?|highlights?"
    r"|reveals?|is\s+(?:parodying|showing|depicting|featuring|displaying)|featuring|showing|depicting)"
)
_CONTEXT_HALLUCINATION = re.compile(
    r"\b(?:"
    rf"(?:in|from|within|throughout|across)\s+(?:the|that|those|your)(?:\s+{_GIVEN})?\s+{_CORE}{_COMPOUND}"
    rf"|(?:in|from|within|throughout|across|of|about|on)\s+(?:this|these|the\s+{_GIVEN})\s+{_MEDIA}{_COMPOUND}"
    rf"|(?:side|corner|edge|cent(?:er|re)|middle|part|half|top|bottom|foreground|background)\s+of\s+(?:the|this)\s+{_CORE}"
    rf"|(?:the|this|that|these)\s+(?:{_GIVEN}\s+)?(?:{_MEDIA}|scenes?)\s+(?:(?:also|clearly|mainly)\s+)?{_DESCRIBING}"
    r"|(?:the|this)\s+(?:image|photo(?:graph)?|snapshot|screenshot)\s+(?:is|was)\s+(?:a|an|of|taken|set)"
    rf"|(?:the|this)\s+{_MEDIA}\s+is\s+(?:funny|humorous|amusing)"
    rf"|(?:the|this)\s+{_CORE}\s+(?:that\s+)?you(?:'ve|\s+have)?\s+(?:provided|shared|uploaded|sent|attached|posted)"
    rf"|(?:based\s+on|according\s+to|looking\s+at|judging\s+(?:by|from))\s+(?:the|this)\s+(?:{_GIVEN}\s+)?{_MEDIA}"
    rf"|(?:visible|seen|shown|depicted|pictured|captured|displayed|featured|mentioned|written)\s+in\s+(?:the|this)\s+{_MEDIA}"
    r")\b",
    _FLAGS,
)
# A reply saying the image is missing or unseen: Not-Known, and never Context-Hallucination.
_NO_IMAGE = (
    r"(?:can\s*not|can't|unable\s+to|not\s+able\s+to|do\s+not|don't)\s+(?:see|view|access|open|load|process|look\s+at)"
    r"\s+(?:the\s+|any\s+|an\s+|your\s+|this\s+|that\s+)?(?:images?|pictures?|photos?|photographs?|attachments?)"
    r"|(?:there\s+is|there's|there\s+was)\s+no\s+(?:image|picture|photo)"
    r"|no\s+(?:image|picture|photo)\s+(?:was|has\s+been|is)\s+(?:provided|attached|shared|uploaded|included)"
)
_IMAGE_MISSING = re.compile(
    rf"\b(?:{_NO_IMAGE}"
    r"|(?:share|provide|upload|send|attach)\s+(?:the|an?|your|that)\s+(?:image|picture|photo)"
    r"|(?:image|picture|photo)\s+(?:that\s+)?you(?:'re|\s+are|\s+were)\s+(?:referring|talking)"
    r")\b",
    _FLAGS,
)
_NK_VERB = (
    r"(?:determine|tell|answer|say|know|provide|give|identify|confirm|ascertain|establish|specify|predict|infer|judge|discern"
    r"|be\s+(?:sure|certain))"
)
_NOT_KNOWN = re.compile(
    r"\b(?:"
    r"i\s+(?:do\s+not|don't|dont)\s+know"
    r"|i\s*(?:am|'m)\s+(?:not\s+(?:sure|certain|able)|unable)"
    r"|i\s*(?:am|'m)\s+sorry(?=,?\s+(?:but|i\b))"
    rf"|(?:i|we)\s+(?:can\s*not|cannot|can't|could\s+not|couldn't|(?:am|are)\s+(?:unable|not\s+able)\s+to)\s+(?:\w+ly\s+)?{_NK_VERB}"
    r"|(?:can\s*not|cannot|can't|could\s+not)\s+be\s+(?:\w+ly\s+)?"
    r"(?:determined|known|told|answered|identified|inferred|confirmed|ascertained)"
    rf"|(?:is|it's)\s+(?:not\s+possible|impossible)\s+to\s+(?:\w+ly\s+)?{_NK_VERB}"
    r"|(?:is|are|was|were)\s*(?:not|n't)\s+(?:provided|specified|stated|mentioned|shown)"
    r"|(?:(?:does|do|did)\s+not|doesn't|don't|didn't)\s+(?:specify|mention|state)\s+(?:the|any|what|which|who|whom|how|when|where|whether)"
    r"|(?:there\s+is|there's|i\s+have)\s+no\s+(?:information|way\s+to\s+(?:know|tell|determine)|data)"
    r"|(?:not|isn't|aren't|doesn't|don't)\s+(?:\w+\s+)?(?:enough|sufficient)\s+(?:information|context|details)"
    r"|insufficient\s+(?:information|context|details)"
    r"|(?:as\s+an\s+ai|i\s+(?:do\s+not|don't)\s+have\s+(?:access|information|the\s+ability))"
    r"|(?:is|remains)\s+(?:unknown|unclear|uncertain|not\s+known|not\s+clear)"
    r"|unanswerable"
    rf"|{_NO_IMAGE}"
    r")\b"
    r"|\A\s*unknown\s*[.!]?\s*\Z",
    _FLAGS,
)
# A condition is not a claim: "if the value is not provided, ..." says nothing about this answer.
_CONDITION = re.compile(r"\b(?:if|when|unless)\b", _FLAGS)

_CLAUSE_START = r"(?:\A\s*|(?<=[.!?;:,(\n\"'*])\s*)"
_NOT_A_QUESTION = r"(?<!whether\s)(?<!if\s)"
_COUNT = r"(?:a|an|some|one|two|three|four|five|six|seven|eight|nine|ten|several|many|multiple|various|numerous|\d+)"
# "there is no dog" denies, but "there is no way to tell" is no answer; likewise "there is a chance".
_THERE_IS_NOT = (
    rf"{_NOT_A_QUESTION}\b(?P<w>there\s*(?:is|are|'s|was|were)\s+(?:no|not(?:\s+any)?|nothing|none)"
    r"|there\s+(?:isn't|aren't|wasn't|weren't))\b(?!(?:\s+(?:clear|definitive|certain))?\s+(?:way|information|telling)\b)"
)
_THERE_IS = (
    rf"{_NOT_A_QUESTION}\b(?P<w>there\s*(?:is|are|'s|was|were)\s+(?:(?:also|indeed|actually)\s+)?{_COUNT})\b"
    r"(?!\s+(?:possibility|chance|way|need)\b)"
)
# (pattern, what it answers); the earliest match in the reply is the answer.
_ANSWERS: tuple[tuple[re.Pattern[str], bool], ...] = tuple(
    (re.compile(pattern, _FLAGS), answer)
    for pattern, answer in (
        (rf"{_CLAUSE_START}(?P<w>yes)\b", True),
        (rf"{_CLAUSE_START}(?P<w>no)\b(?!\s+(?:matter|doubt|wonder|longer)\b)", False),
        (r"\bthe\s+answer\s+is\s+[\"']?(?P<w>yes)\b", True),
        (r"\bthe\s+answer\s+is\s+[\"']?(?P<w>no)\b", False),
        (_THERE_IS_NOT, False),
        (_THERE_IS, True),
        (r"\b(?P<w>i\s+(?:can\s*not|cannot|can't|do\s+not|don't)\s+see\s+(?:a|an|any))\b", False),
        (rf"\b(?P<w>i\s+(?:can\s+)?see\s+{_COUNT})\b", True),
        (r"\b(?P<w>(?:is|are)\s*(?:not|n't)\s+(?:present|visible))\b", False),
        (r"\b(?P<w>(?:is|are)\s+(?:clearly\s+)?(?:present|visible))\b", True),
    )
)


@dataclass(frozen=True)
class Match:
    """A behaviour found in a reply: ``reply[start:end] == text``."""

    label: str
    start: int
    end: int
    text: str


def _normalise(reply: str) -> str:
    """Curly apostrophes as straight ones; same length, so offsets stay valid."""
    return reply.replace("\u2019", "'").replace("\u2018", "'")


def _around(text: str, start: int, end: int, stops: str) -> tuple[str, str]:
    """The text from the last ``stops`` character before ``start`` up to ``start``, and the
    text of that stretch up to the next stop after ``end`` (a clause or a sentence)."""
    left = max(text.rfind(c, 0, start) for c in stops) + 1
    rights = [i for i in (text.find(c, end) for c in stops) if i >= 0]
    return text[left:start], text[left : min(rights, default=len(text))]


def _context_vetoed(text: str, m: re.Match[str]) -> bool:
    """A sentence that says the image is missing talks about no image, whatever else it says."""
    _, sentence = _around(text, m.start(), m.end(), ".!?\n")
    return _IMAGE_MISSING.search(sentence) is not None


def _not_known_vetoed(text: str, m: re.Match[str]) -> bool:
    before, _ = _around(text, m.start(), m.end(), ",.;:!?\n")
    return _CONDITION.search(before) is not None


def context_hallucination(reply: str) -> Match | None:
    """The first phrase that talks about a (missing) image, or None. It does not know the
    prompt: call it on replies to text-only prompts, or use ``detect``."""
    text = _normalise(reply)
    m = next((m for m in _CONTEXT_HALLUCINATION.finditer(text) if not _context_vetoed(text, m)), None)
    return Match("context_hallucination", m.start(), m.end(), reply[m.start() : m.end()]) if m else None


def not_known(reply: str) -> Match | None:
    """The first phrase that declines or calls the answer unknowable, or None."""
    text = _normalise(reply)
    m = next((m for m in _NOT_KNOWN.finditer(text) if not _not_known_vetoed(text, m)), None)
    return Match("not_known", m.start(), m.end(), reply[m.start() : m.end()]) if m else None


def _first_answer(reply: str) -> tuple[bool, int, int] | None:
    """(answer, start, end of its words) of the earliest yes/no answer in the reply."""
    text = _normalise(reply)
    found = [(m.start("w"), m.end("w"), answer) for pattern, answer in _ANSWERS if (m := pattern.search(text))]
    if not found:
        return None
    start, end, answer = min(found, key=lambda f: f[0])
    return answer, start, end


def yes_no(reply: str) -> bool | None:
    """Whether the reply affirms (True) or denies (False) that something is there, from its first
    clear answer; None when it gives neither."""
    first = _first_answer(reply)
    return first[0] if first else None


def object_hallucination(reply: str) -> Match | None:
    """The affirming words of a reply that says yes, or None. Only meaningful when the object
    asked about is known to be absent: ``detect`` calls it then."""
    first = _first_answer(reply)
    if not first or not first[0]:
        return None
    _, start, end = first
    return Match("object_hallucination", start, end, reply[start:end])


def detect(reply: str, *, prompt_has_image: bool = False, object_present: bool | None = None) -> list[Match]:
    """Every label that fires (the first occurrence of each), in ``LABELS`` order.

    ``prompt_has_image``: whether the prompt carried an image; a reply to one is never
    Context-Hallucination. ``object_present``: for an image prompt asking whether an object is
    there, whether it is (None: unknown, so no object label)."""
    found = {
        "context_hallucination": None if prompt_has_image else context_hallucination(reply),
        "not_known": not_known(reply),
        "object_hallucination": object_hallucination(reply) if prompt_has_image and object_present is False else None,
    }
    return [m for m in (found[label] for label in LABELS) if m]


def highlight(reply: str, matches: list[Match]) -> list[tuple[str, str | None]]:
    """Segments for a highlighted-text view: (text, label or None), covering the reply in order;
    where matches overlap, the earlier one wins."""
    segments: list[tuple[str, str | None]] = []
    pos = 0
    for m in sorted(matches, key=lambda m: m.start):
        if m.start < pos:
            continue
        if m.start > pos:
            segments.append((reply[pos : m.start], None))
        segments.append((m.text, m.label))
        pos = m.end
    if pos < len(reply):
        segments.append((reply[pos:], None))
    return segments
