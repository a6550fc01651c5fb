"""Behaviour detectors: plain, documented rules over a model's reply to a text-only prompt.

*Context-Hallucination*: the reply talks about an image, picture or photo that is not there.
It fires on phrases that point at a visual ("in the image", "this picture", "the photo
shows", "based on the image", "visible in the ...", "the scene depicts"), not on the mere word:
"image processing is a field of computer science" or "the picture of health" do not fire.

*Not-Known*: the reply declines or says the answer cannot be known: "I don't know",
"I'm not sure", "I cannot determine", "it cannot be determined", "there is no information",
"not enough information", "I'm sorry, but I can't", "as an AI, I do not have", "unclear".

Known limits: rules see words, not meaning. A reply that quotes such a phrase ("the phrase 'in
the image' means ...") fires; a hedge worded some other way ("hard to say") does not. The rules
are tuned on LLaVA-1.5's phrasings and the pocket world's, and tested on both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LABELS: tuple[str, ...] = ("context_hallucination", "not_known")

_VISUAL = r"(?:image|picture|photo|photograph|snapshot|scene|illustration)s?"
_CONTEXT_HALLUCINATION = re.compile(
    r"\b(?:"
    rf"(?:in|on|from|within|of|throughout)\s+(?:the|this|that|these|the\s+(?:given|provided|above|attached))\s+{_VISUAL}"
    rf"|(?:the|this|that)\s+{_VISUAL}\s+(?:shows?|showcases?|depicts?|features?|displays?|contains?|presents?|captures?|illustrates?|includes?)"
    rf"|(?:based\s+on|according\s+to|looking\s+at|judging\s+(?:by|from))\s+(?:the|this)\s+{_VISUAL}"
    rf"|(?:visible|seen|shown|depicted|pictured)\s+in\s+(?:the|this)\s+{_VISUAL}"
    r")\b",
    re.IGNORECASE,
)
_NOT_KNOWN = re.compile(
    r"\b(?:"
    r"i\s+(?:do\s+not|don't|dont)\s+know"
    r"|i\s*(?:am|'m)\s+(?:not\s+(?:sure|certain|able)|unable|sorry)"
    r"|i\s+(?:can\s*not|cannot|can't|could\s+not|couldn't)\s+(?:determine|tell|answer|say|know|provide|identify|be\s+sure)"
    r"|(?:can\s*not|cannot|can't|could\s+not)\s+be\s+(?:determined|known|told|answered|identified|inferred)"
    r"|(?:is|it's)\s+(?:not\s+possible|impossible)\s+to\s+(?:determine|tell|know|say|answer)"
    r"|(?:there\s+is|there's|i\s+have)\s+no\s+(?:information|way\s+to\s+(?:know|tell|determine)|data)"
    r"|not\s+enough\s+(?:information|context|details)"
    r"|(?:as\s+an\s+ai|i\s+(?:do\s+not|don't)\s+have\s+(?:access|information|the\s+ability))"
    r"|(?:is|remains)\s+(?:unknown|unclear|not\s+known|not\s+clear)"
    r")\b",
    re.IGNORECASE,
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


def _first(pattern: re.Pattern[str], label: str, reply: str) -> Match | None:
    m = pattern.search(_normalise(reply))
    return Match(label, m.start(), m.end(), reply[m.start() : m.end()]) if m else None


def context_hallucination(reply: str) -> Match | None:
    """The first phrase that talks about a (missing) image, or None."""
    return _first(_CONTEXT_HALLUCINATION, "context_hallucination", reply)


def not_known(reply: str) -> Match | None:
    """The first phrase that declines or calls the answer unknowable, or None."""
    return _first(_NOT_KNOWN, "not_known", reply)


def detect(reply: str) -> list[Match]:
    """Every label that fires (the first occurrence of each), in ``LABELS`` order."""
    return [m for m in (context_hallucination(reply), not_known(reply)) if m]


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
