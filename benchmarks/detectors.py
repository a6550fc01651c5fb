"""How well the behaviour detectors agree with hand labels on a set of model replies.

    python benchmarks/detectors.py --replies FILE [--show-errors]

FILE is a JSON list of {"prompt_has_image": bool, "reply": str, "labels": [label, ...]} (other
keys, such as "source" or "prompt", are ignored). Each reply goes through
``fusion.detectors.detect(reply, prompt_has_image=...)``; per label (context_hallucination,
not_known) it prints true positives, false positives, false negatives, precision and recall
("n/a" where the count under it is zero), then how often Context-Hallucination fired on replies
to image prompts: through ``detect`` (which never labels those) and through the bare rule
``context_hallucination(reply)``, which does not know the prompt and is what a caller that
passes no prompt flag gets. ``--show-errors`` lists each miss and false alarm.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusion.detectors import context_hallucination, detect  # noqa: E402

SCORED = ("context_hallucination", "not_known")
SHOWN_CHARS = 100


@dataclass(frozen=True)
class Reply:
    prompt_has_image: bool
    text: str
    labels: frozenset[str]


@dataclass
class Tally:
    """Counts for one label, with the replies behind the errors."""

    tp: int = 0
    misses: list[str] = field(default_factory=list)
    false_alarms: list[tuple[str, str]] = field(default_factory=list)  # (reply, the words that fired)

    @property
    def precision(self) -> float | None:
        fired = self.tp + len(self.false_alarms)
        return self.tp / fired if fired else None

    @property
    def recall(self) -> float | None:
        labelled = self.tp + len(self.misses)
        return self.tp / labelled if labelled else None


class InputError(Exception):
    """The replies file cannot be used; the message says why, in one line."""


def load_replies(path: Path) -> list[Reply]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read it ({err})") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of replies, got {type(data).__name__}")
    return [_reply(item, i, path) for i, item in enumerate(data)]


def _reply(item: object, index: int, path: Path) -> Reply:
    """One record, checked: a wrong type here would otherwise surface as a traceback mid-count."""
    if not isinstance(item, dict):
        raise InputError(f"{path}: item {index} is not an object")
    has_image, text, labels = item.get("prompt_has_image"), item.get("reply"), item.get("labels")
    if not isinstance(has_image, bool) or not isinstance(text, str):
        raise InputError(f"{path}: item {index} needs a boolean 'prompt_has_image' and a string 'reply'")
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise InputError(f"{path}: item {index} needs 'labels', a list of label names")
    return Reply(has_image, text, frozenset(labels))


def score(replies: Sequence[Reply]) -> dict[str, Tally]:
    tallies = {label: Tally() for label in SCORED}
    for reply in replies:
        fired = {m.label: m.text for m in detect(reply.text, prompt_has_image=reply.prompt_has_image)}
        for label, tally in tallies.items():
            if label in fired and label in reply.labels:
                tally.tp += 1
            elif label in fired:
                tally.false_alarms.append((reply.text, fired[label]))
            elif label in reply.labels:
                tally.misses.append(reply.text)
    return tallies


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _shown(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= SHOWN_CHARS else flat[: SHOWN_CHARS - 3] + "..."


def report(replies: Sequence[Reply], show_errors: bool) -> str:
    tallies = score(replies)
    lines = [f"{len(replies)} replies, {sum(r.prompt_has_image for r in replies)} to image prompts", ""]
    lines.append(f"{'label':<22} {'TP':>4} {'FP':>4} {'FN':>4} {'precision':>9} {'recall':>6}")
    for label, t in tallies.items():
        lines.append(f"{label:<22} {t.tp:>4} {len(t.false_alarms):>4} {len(t.misses):>4} {_ratio(t.precision):>9} {_ratio(t.recall):>6}")
    image_replies = [r.text for r in replies if r.prompt_has_image]
    through_detect = sum(any(m.label == "context_hallucination" for m in detect(r, prompt_has_image=True)) for r in image_replies)
    bare = sum(context_hallucination(r) is not None for r in image_replies)
    lines += [
        "",
        (
            f"context_hallucination on replies to image prompts: {through_detect} of {len(image_replies)} "
            f"(bare rule without the prompt flag: {bare} of {len(image_replies)})"
        ),
    ]
    if show_errors:
        for label, t in tallies.items():
            lines += ["", f"{label}: {len(t.misses)} missed, {len(t.false_alarms)} false alarms"]
            lines += [f"  miss:        {_shown(text)}" for text in t.misses]
            lines += [f"  false alarm: [{words}] {_shown(text)}" for text, words in t.false_alarms]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replies", type=Path, required=True, help="labelled replies, a JSON list (see the module docstring)")
    parser.add_argument("--show-errors", action="store_true", help="also list each missed reply and each false alarm")
    args = parser.parse_args(argv)
    try:
        replies = load_replies(args.replies)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(report(replies, args.show_errors))
    return 0


if __name__ == "__main__":
    sys.exit(main())
