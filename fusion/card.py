"""The model card a merge writes beside its weights: ``README.md`` with YAML front matter the Hub
reads (the two models it was merged from, the ``merge`` tag and the method, the library and
task, the license where the inputs' cards agree on one) and a body that says what
Locate-then-Merge did: the method and its settings, the neurons it located per kind and the
share of the change they hold, the command that makes it again, and the neuron-change plot
(``neuron-change.png``) beside it.

Deterministic like the rest of the output: the same merge writes the same bytes. Local input
paths are named by their last component only: a card is meant to be published.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCardData
from huggingface_hub.repocard import metadata_load
from yaml import YAMLError

from .checkpoint import is_hub_id
from .registry import resolve
from .report import located_share

CARD_FILE = "README.md"
PLOT_FILE = "neuron-change.png"
PAPER = "https://arxiv.org/abs/2505.16703"


def card_metadata(directory: Path) -> dict[str, Any]:
    """The front matter of the model card in ``directory`` (a snapshot's ``README.md``); empty
    when there is none or it cannot be read (a card is documentation: its absence is no error)."""
    path = directory / CARD_FILE
    try:
        return (metadata_load(path) or {}) if path.is_file() else {}
    except (OSError, ValueError, YAMLError):  # unreadable, not UTF-8, not YAML
        return {}


def _licence(metadata: Mapping[str, Any]) -> str | None:
    """A card's license id; ``other`` (a license the Hub does not list, named in
    ``license_name``) counts as none: the two cards' own texts would have to be compared."""
    value = metadata.get("license")
    return value if isinstance(value, str) and value and value != "other" else None


def merged_licence(tuned: Mapping[str, Any], base: Mapping[str, Any]) -> tuple[str | None, str]:
    """The license for the merge's front matter, and a sentence for its body. Only a license
    both inputs' cards name is written: a merge is bound by both, and this library cannot
    reconcile two different ones for the user."""
    mine, theirs = _licence(tuned), _licence(base)
    if mine and mine == theirs:
        return mine, f"Both inputs' cards name the license `{mine}`; it is set above."
    said = f"the tuned model's card says `{mine}`" if mine else "the tuned model's card names no license"
    said += f", the base's `{theirs}`" if theirs else ", the base's names none"
    return None, f"**License not set**: {said}. The merge is bound by both: set `license` in this card's front matter before publishing."


def hub_id(ref: str) -> str | None:
    """``ref`` if it names a Hub repository (``fusion.checkpoint.is_hub_id``), else None."""
    return ref if is_hub_id(ref) else None


def _shown(ref: str) -> str:
    """How the card names an input: its Hub id or relative path as given; an absolute path by
    its last component only (it would tell readers how the author's disk is laid out)."""
    return hub_id(ref) or (Path(ref).name if Path(ref).is_absolute() else ref)


def _value(value: Any) -> str:
    """A setting as the command line writes it: true/false, numbers and names as they are."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def changed_params(record: Mapping[str, Any]) -> dict[str, Any]:
    """The recorded recipe's parameters that differ from its method's defaults: what a command
    must set to make it again."""
    defaults = resolve(record["method"]).params
    return {k: v for k, v in record["params"].items() if defaults.get(k) != v}


def reproduce_command(record: Mapping[str, Any], out_name: str) -> str:
    """The ``neuron-fusion merge`` command that makes this merge again."""
    words = ["neuron-fusion", "merge", "--tuned", _shown(record["tuned"]), "--base", _shown(record["base"]), "--method", record["method"]]
    for key, value in changed_params(record).items():
        words += ["--set", f"{key}={_value(value)}"]
    if record.get("seed"):
        words += ["--seed", str(record["seed"])]
    return shlex.join([*words, "--out", out_name])


def _per_kind(report: Sequence[dict[str, Any]]) -> list[str]:
    """One Markdown row per neuron kind: neurons, located, and the share of change they hold."""
    rows = ["| kind | neurons | located | share of the kind's squared change they hold |", "|---|---:|---:|---:|"]
    for kind in dict.fromkeys(r["kind"] for r in report):
        mine = [r for r in report if r["kind"] == kind]
        rows.append(f"| {kind} | {sum(r['neurons'] for r in mine):,} | {sum(r['located'] for r in mine):,} | {100 * located_share(mine):.1f}% |")
    return rows


def card_text(record: Mapping[str, Any], report: Sequence[dict[str, Any]], *, multimodal: bool, licence: tuple[str | None, str], out_name: str) -> str:
    """The whole ``README.md``: front matter and body, for a merge recorded as ``record``
    (``fusion.merge.recipe_record``) with Neuron-Locate's ``report`` (empty for a method that
    locates nothing)."""
    sources = [s for s in (hub_id(record["tuned"]), hub_id(record["base"])) if s]
    both = len(sources) == 2  # with one alone the Hub would take the merge for a fine-tune of it
    method = record["method"]
    data = ModelCardData(
        base_model=sources if both else None,
        base_model_relation="merge" if both else None,
        library_name="transformers",
        pipeline_tag="image-text-to-text" if multimodal else "text-generation",
        license=licence[0],
        tags=["merge", "neuron-fusion", "locate-then-merge", method] if report else ["merge", "neuron-fusion", method],
    )
    tuned, base = _shown(record["tuned"]), _shown(record["base"])
    settings = changed_params(record)
    body = [
        f"# {tuned} merged toward {base} with {method}",
        "",
        f"This checkpoint is **{tuned}** with its language model pulled back toward the base LLM **{base}** it was tuned from, "
        f"made with Neuron-Fusion Studio (`neuron-fusion`, version {record.get('version', '?')}). "
        + (
            "Visual instruction tuning makes a multimodal model forget some of its base LLM's language skills; "
            if multimodal
            else "Fine-tuning makes a model forget some of its base LLM's skills; "
        )
        + f"Locate-then-Merge ([Yu & Ananiadou, 2025]({PAPER})) gives them back without training.",
        "",
        "## How it was made",
        "",
        f"- method: `{method}`, seed {record.get('seed', 0)}",
        f"- settings that differ from the method's defaults: {', '.join(f'`{k}={_value(v)}`' for k, v in settings.items()) or 'none'}",
        f"- every setting: {', '.join(f'`{k}={_value(v)}`' for k, v in record['params'].items())}",
    ]
    if report:
        layers = [r for r in report if r["layer"] is not None]
        located, total = sum(r["located"] for r in report), sum(r["neurons"] for r in report)
        body += [
            "",
            "## The located neurons",
            "",
            f"Neuron-Locate scored every neuron by how far tuning moved its weights and kept the top `top_ratio` "
            f"({record['params']['top_ratio']:g}) of each layer and kind exactly as tuned: {located:,} of {total:,} neurons. "
            f"They hold {100 * located_share(layers):.1f}% of the squared change inside the decoder layers "
            f"({100 * located_share(report):.1f}% overall); everything else was merged toward the base with `{record['params'].get('inner')}`, "
            f"keeping `suppress` ({record['params'].get('suppress')}) of its change.",
            "",
            *_per_kind(report),
            "",
            f"![Sorted per-neuron change scores, each layer and kind, with the cut-off]({PLOT_FILE})",
        ]
    else:
        body += ["", f"`{method}` locates no neurons; `neuron-fusion inspect --tuned {tuned} --base {base}` shows where the pair changed."]
    body += [
        "",
        "## Make it again",
        "",
        "```bash",
        reproduce_command(record, out_name),
        "```",
        "",
        "## License",
        "",
        licence[1],
        "",
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)


def write_card(folder: Path, record: Mapping[str, Any], report: Sequence[dict[str, Any]], inputs: tuple[Path, Path], *, multimodal: bool, out_name: str) -> str | None:
    """``README.md`` (and, where neurons were located, ``neuron-change.png``) into ``folder``, the
    merge's staging directory, so that they are published, listed and verified with the rest.
    ``inputs``: the tuned and base checkpoints' directories, whose cards give the license.
    Returns the license notice when no license could be set, for the CLI to repeat."""
    from .plots import curve_figure, save_figure

    licence = merged_licence(card_metadata(inputs[0]), card_metadata(inputs[1]))
    (folder / CARD_FILE).write_text(card_text(record, report, multimodal=multimodal, licence=licence, out_name=out_name))
    if report:
        save_figure(curve_figure(report, record["params"]["top_ratio"]), folder / PLOT_FILE)
    return None if licence[0] else licence[1]
