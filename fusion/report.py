"""The behaviour bench as text: the rates of each model as a Markdown table, every probe with
each model's reply as a table people can scan, and the replies as JSON lines. The bench
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
    **{f"{label}_rate": name for label, name in LABEL_NAMES.items()},
}


def percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per model (its ``label``), one column per rate; "—" where a rate does not
    apply (a text-only LLM has no visual accuracy)."""
    lines = ["| model | " + " | ".join(RATES.values()) + " |", "|---|" + "---:|" * len(RATES)]
    lines += [f"| {r['label']} | " + " | ".join(percent(r[k]) for k in RATES) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def image_text(image: str | dict | None) -> str:
    """What a probe shows, in a few words: "text only", an image's file name, or the shapes of
    a drawn pocket scene (so that a reader can check "Is there a red square?" by eye)."""
    if image is None:
        return "text only"
    if isinstance(image, dict):
        return "drawn: " + ", ".join(f"{colour} {kind}" for kind, colour, *_ in image["shapes"])
    return image.rsplit("/", 1)[-1]


def reply_text(record: dict[str, Any]) -> str:
    """A reply for the per-probe table: right (✓) or wrong (✗), the reply, its labels."""
    labels = ", ".join(LABEL_NAMES[label] for label in record["labels"])
    return f"{'✓' if record['correct'] else '✗'} {record['reply']}" + (f"  [{labels}]" if labels else "")


def per_probe_table(records: Sequence[dict[str, Any]]) -> dict[str, list]:
    """Every probe once, with each model's reply beside the others: ``{"headers", "data"}``,
    one row per probe, one reply column per model (its ``label``), "—" where a model was not
    asked (a text-only LLM and image probes). Replies stay plain text."""
    models = list(dict.fromkeys(r["label"] for r in records))
    probes: dict[str, dict[str, Any]] = {}
    for r in records:
        probes.setdefault(r["probe"], {"record": r, "replies": {}})["replies"][r["label"]] = reply_text(r)
    data = [
        [image_text(p["record"]["image"]), p["record"]["question"], " / ".join(p["record"]["answers"]) or "(a decline)"]
        + [p["replies"].get(model, "—") for model in models]
        for p in probes.values()
    ]
    return {"headers": ["image", "question", "expected", *models], "data": data}


def jsonl(records: Sequence[dict[str, Any]]) -> str:
    """Records as JSON lines: one reply a line, for reading or for other tools."""
    return "".join(json.dumps(r) + "\n" for r in records)
