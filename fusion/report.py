"""The behaviour bench as text: the rates of each model as a Markdown table (and per skill),
every probe with each model's replies as a table people can scan, and the replies as JSON
lines; and how much of a pair's change its located neurons hold. The bench
(``fusion.evaluate``) measures, ``fusion.plots`` draws; the CLI and the app show these."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

# The detector labels as people read them (the app's badges say the same).
LABEL_NAMES = {"context_hallucination": "Context-Hallucination", "not_known": "Not-Known", "object_hallucination": "Object-Hallucination"}
# Every rate a bench row holds, in the order tables and charts show them.
RATES = {
    "language_accuracy": "language accuracy",
    "visual_accuracy": "visual accuracy",
    "visual_blank_accuracy": "visual, blank image",
    "visual_other_accuracy": "visual, other image",
    "grounded_accuracy": "image-grounded",
    **{f"{label}_rate": name for label, name in LABEL_NAMES.items()},
}
# The image controls' replies, as the per-probe table names them.
CONTROL_NAMES = {"blank": "blank image", "other": "other image"}


def located_share(kinds: Sequence[dict[str, Any]]) -> float:
    """The share of the squared change that the located neurons of ``kinds`` (Neuron-Locate's
    report, ``fusion.neurons.describe``) hold; 0 when nothing changed. The paper's heavy tail:
    a few neurons hold much of the change."""
    total = sum(k["sum_sq"] for k in kinds)
    return sum(k["located_sum_sq"] for k in kinds) / total if total else 0.0


def percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per model (its ``label``), one column per rate; "—" where a rate does not
    apply (a text-only LLM has no visual accuracy). Under it: what a blind guess scores on the
    image probes, every model that does not read its images said so in words, and the rates
    per skill."""
    lines = ["| model | " + " | ".join(RATES.values()) + " |", "|---|" + "---:|" * len(RATES)]
    lines += [f"| {r['label']} | " + " | ".join(percent(r[k]) for k in RATES) + " |" for r in rows]
    guess = next((r["visual_blind_guess"] for r in rows if r.get("visual_blind_guess") is not None), None)
    if guess is not None:
        lines += ["", f"A blind guess (each image question answered with its skill's most common answer) scores {percent(guess)}."]
    lines += [blind_warning(r) for r in rows if r.get("reads_images") is False]
    return "\n".join(lines + skills_tables(rows)) + "\n"


def blind_warning(row: dict[str, Any]) -> str:
    """A model that does not read its images, in words, with the figures that show it."""
    return (
        f"**{row['label']} does not read its images**: only {percent(row['grounded_accuracy'])} of its image answers are right "
        f"with their image and not with a blank or another one (visual accuracy {percent(row['visual_accuracy'])}, "
        f"{percent(row['visual_blank_accuracy'])} with a blank image)."
    )


def skills_tables(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown lines: language accuracy per skill, and per visual skill the accuracy with the
    real image / a blank one / image-grounded, one line per model."""
    out: list[str] = []
    language = list(dict.fromkeys(s for r in rows for s in r["skills"]["language"]))
    if language:
        out += ["", "Language accuracy per skill:", "", "| model | " + " | ".join(language) + " |", "|---|" + "---:|" * len(language)]
        out += [f"| {r['label']} | " + " | ".join(percent(r["skills"]["language"].get(s)) for s in language) + " |" for r in rows]
    visual = list(dict.fromkeys(s for r in rows for s in r["skills"]["visual"]))
    seeing = [r for r in rows if r["skills"]["visual"]]
    if visual and seeing:
        out += ["", "Visual accuracy per skill (own image / blank image / image-grounded):", ""]
        out += ["| model | " + " | ".join(visual) + " |", "|---|" + "---:|" * len(visual)]
        for r in seeing:
            cells = [r["skills"]["visual"].get(s) for s in visual]
            out.append(f"| {r['label']} | " + " | ".join(_triple(c) for c in cells) + " |")
    return out


def _triple(rates: dict[str, Any] | None) -> str:
    if rates is None:
        return "—"
    return " / ".join(f"{100 * rates[k]:.0f}" if rates[k] is not None else "—" for k in ("visual_accuracy", "visual_blank_accuracy", "grounded_accuracy"))


def image_text(image: str | dict | None) -> str:
    """What a probe shows, in a few words: "text only", an image's file name, or the shapes of
    a drawn pocket scene (so that a reader can check "Is there a red square?" by eye)."""
    if image is None:
        return "text only"
    if isinstance(image, dict):
        return "drawn: " + ", ".join(f"{colour} {kind}" for kind, colour, *_ in image["shapes"])
    return image.rsplit("/", 1)[-1]


def reply_text(record: dict[str, Any]) -> str:
    """A reply for the per-probe table: right (✓) or wrong (✗), the reply, its labels; for an
    image probe also the replies with a blank and with another image, and whether the answer
    is image-grounded."""
    labels = ", ".join(LABEL_NAMES[label] for label in record["labels"])
    text = f"{_mark(record)} {record['reply']}" + (f"  [{labels}]" if labels else "")
    if record["image"] is None:
        return text
    controls = [f"{name}: {_mark(record[c])} {record[c]['reply']}" for c, name in CONTROL_NAMES.items() if record.get(c)]
    return " · ".join([text, *controls, "image-grounded" if record["grounded"] else "not grounded"])


def _mark(reply: dict[str, Any]) -> str:
    return "✓" if reply["correct"] else "✗"


def per_probe_table(records: Sequence[dict[str, Any]]) -> dict[str, list]:
    """Every probe once, with each model's reply beside the others: ``{"headers", "data"}``,
    one row per probe, one reply column per model (its ``label``), "—" where a model was not
    asked (a text-only LLM and image probes). Replies stay plain text."""
    models = list(dict.fromkeys(r["label"] for r in records))
    probes: dict[str, dict[str, Any]] = {}
    for r in records:
        probes.setdefault(r["probe"], {"record": r, "replies": {}})["replies"][r["label"]] = reply_text(r)
    data = [
        [image_text(p["record"]["image"]), p["record"]["skill"], p["record"]["question"], " / ".join(p["record"]["answers"]) or "(a decline)"]
        + [p["replies"].get(model, "—") for model in models]
        for p in probes.values()
    ]
    return {"headers": ["image", "skill", "question", "expected", *models], "data": data}


def jsonl(records: Sequence[dict[str, Any]]) -> str:
    """Records as JSON lines: one reply a line, for reading or for other tools."""
    return "".join(json.dumps(r) + "\n" for r in records)
