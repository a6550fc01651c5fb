"""What the page shows, as plain data: column titles, behaviour badges, progress lines, the
method controls' parameters, the examples, the recipe card. No Gradio here: ``app.py`` turns
these into components."""

from __future__ import annotations

import functools
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from fusion.detectors import detect, highlight
from fusion.merge import Progress
from fusion.presets import Preset, get_preset
from fusion.probes import Probe, Probes, is_correct, preset_probes, probe_image
from fusion.registry import BASELINES, METHOD_NAMES, Param, resolve, schema
from fusion.report import LABEL_NAMES

from .chat import IMAGE_FORMATS

if TYPE_CHECKING:
    from .variants import Pair, Variant

# An absolute server path (not part of a URL): visitors see only its last component.
_SERVER_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s'\"(),;/]+/)+([^\s'\"(),;:/]*)")


def public(text: str) -> str:
    """``text`` fit for a visitor: the library's messages name files by their full path, which
    helps on a command line but tells strangers how the server is laid out."""
    return _SERVER_PATH.sub(lambda m: m.group(1) or "(a folder)", text)


BADGE_TEXT = LABEL_NAMES  # the badges spell each label as the bench's tables do


def changed_settings(method: str, params: Mapping[str, Any] | None = None) -> list[str]:
    """The settings of ``method`` with ``params`` (a recipe's full parameters, or some) that
    differ from its defaults, as a visitor reads them: ['density 0.5']."""
    chosen, defaults = resolve(method, dict(params or {})).params, resolve(method).params
    return [f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in chosen.items() if defaults.get(k) != v]


def recipe_label(method: str, params: Mapping[str, Any] | None = None) -> str:
    """The method as chosen and the settings that differ from its defaults: 'neu-p-taska',
    'ties · density 0.5'."""
    return " · ".join([method, *changed_settings(method, params)])


def fused_title(preset: Preset, method: str, params: Mapping[str, Any] | None = None) -> str:
    """A fused column's heading, naming its recipe: 'Pocket-LLaVA + Neuron-Fusion (neu-p-taska ·
    suppress 0.3)', 'Pocket-LLaVA + ties · density 0.5'."""
    label = recipe_label(method, params)
    return f"{preset.label} + Neuron-Fusion ({label})" if resolve(method).spec.locates_neurons else f"{preset.label} + {label}"


def titles(preset: Preset, method: str, params: Mapping[str, Any] | None = None) -> tuple[str, str, str]:
    """Column headings: original MLLM, fused MLLM (with its recipe), base LLM."""
    return f"{preset.label} (original)", fused_title(preset, method, params), f"{preset.base_label} (base LLM)"


def behaviour(answer: str, *, prompt_has_image: bool, object_present: bool | None = None) -> dict[str, Any]:
    """An answer with its detector labels, JSON-able (the API's per-model record).
    Context-Hallucination is only looked for when the prompt had no image, Object-Hallucination
    only when the asked-about object's presence is known (a probe's, ``matching_probe``)."""
    matches = detect(answer, prompt_has_image=prompt_has_image, object_present=object_present)
    return {"answer": answer, "labels": [m.label for m in matches], "matches": [vars(m) for m in matches]}


def highlighted(answer: str, *, prompt_has_image: bool, object_present: bool | None = None) -> list[tuple[str, str | None]]:
    """The answer in segments, each matched one labelled as its badge spells it
    ("Context-Hallucination", not the detector's context_hallucination)."""
    segments = highlight(answer, detect(answer, prompt_has_image=prompt_has_image, object_present=object_present))
    return [(text, BADGE_TEXT.get(label, label) if label else None) for text, label in segments]


def badges_html(labels: Sequence[str], probe: Probe | None = None, answer: str = "") -> str:
    """Badges for a highlighted answer. Where the question is one of the preset's probes (the
    examples are), a first badge says whether the answer is right; a decline that is the right
    answer (an unanswerable image question) is a correct decline, not Not-Known. Only fixed
    label names go into this HTML, never model output (that is shown as text)."""
    known = [label for label in labels if label in BADGE_TEXT]
    verdict = []
    if probe is not None:
        right = is_correct(answer, probe)
        if right and not probe.answers:
            known = [label for label in known if label != "not_known"]
            verdict = ['<span class="nf-badge nf-right">✓ correct decline</span>']
        else:
            verdict = ['<span class="nf-badge nf-right">✓ right</span>' if right else '<span class="nf-badge nf-wrong">✗ wrong</span>']
    if not known:
        return " ".join([*verdict, '<span class="nf-badge nf-clean">no flagged behaviour</span>'])
    return " ".join([*verdict, *(f'<span class="nf-badge nf-{label}">{BADGE_TEXT[label]}</span>' for label in known)])


def _clock(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def format_progress(p: Progress) -> str:
    """One line: stage, layer, percentage, elapsed and time left."""
    parts = [p.stage]
    if p.layer is not None:
        parts.append(f"layer {p.layer}")
    parts.append(f"{100 * p.fraction:.0f}%")
    parts.append(f"{_clock(p.elapsed)} elapsed")
    if p.eta is not None and p.stage == "merging":
        parts.append(f"~{_clock(p.eta)} left")
    return " · ".join(parts)


class ConsoleProgress:
    """Prints fusion progress to the console at most every ``every`` seconds (and at each new
    stage), so a long merge shows it is alive without flooding the log."""

    def __init__(self, log: Callable[[str], None], every: float = 2.0) -> None:
        self.log, self.every, self.last, self.stage = log, every, 0.0, ""

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        if p.stage != self.stage or now - self.last >= self.every:
            self.log(f"[fusion] {format_progress(p)}")
            self.last, self.stage = now, p.stage


def all_params() -> list[Param]:
    """Every parameter any method (with any inner method) takes, once by name: the app builds
    one control each and shows those the chosen method takes."""
    seen: dict[str, Param] = {}
    for method in METHOD_NAMES:
        for inner in BASELINES:
            for p in method_params(method, inner).values():
                seen.setdefault(p.name, p)
    return list(seen.values())


def method_params(method: str, inner: str | None = None) -> dict[str, Param]:
    """The chosen method's parameters by name (Neuron-Fusion's depend on its inner method)."""
    return {p.name: p for p in schema(method, inner if resolve(method).spec.locates_neurons else None)}


def start_values(method: str, inner: str | None, start: Variant) -> dict[str, Any]:
    """The values ``method``'s controls start from (with ``inner`` its inner method; None: the
    one it would use): the ``start`` variant's settings (the app's own recipe) where the
    visitor picks its method and inner method, each parameter's default elsewhere. So picking
    the app's method again, or pressing reset, brings its recipe back."""
    used = dict(start.recipe.params)
    inner = inner if inner is not None else (used.get("inner") if method == start.name else None)
    same = method == start.name and inner == used.get("inner")
    return {name: used[name] if same and name in used else p.default for name, p in method_params(method, inner).items()}


@functools.lru_cache(maxsize=8)
def _probes(preset_name: str) -> Probes:
    """The preset's probe set, read once: every chat message asks ``matching_probe``."""
    return preset_probes(get_preset(preset_name))


def example_prompts(preset: Preset) -> list[tuple[str, str]]:
    """(skill, question): a text-only question from the preset's probe set for each of its
    skills, the ones a tuned MLLM tends to answer with "In the image ..." or "I don't know"."""
    text, _, _ = _probes(preset.name)
    by_skill: dict[str, str] = {}
    for p in text:
        by_skill.setdefault(p.skill, p.question)
    return list(by_skill.items())


def example_images(preset: Preset, n: int = 4) -> list[tuple[str, str]]:
    """(image file, question) pairs from the preset's probe set, questions about absent objects
    (answer "no": where MLLMs hallucinate) first, one per image. Drawn scenes are saved as PNG."""
    _, visual, root = _probes(preset.name)
    ordered = sorted(visual, key=lambda p: p.answers != ("no",))
    out: dict[str, tuple[str, str]] = {}
    drawn = Path(tempfile.gettempdir()) / "neuron-fusion-examples" / preset.name
    for p in ordered:
        key = str(p.image)
        if key in out:
            continue
        if isinstance(p.image, str):
            path = (root / p.image).resolve()
        else:
            drawn.mkdir(parents=True, exist_ok=True)
            path = drawn / f"scene-{len(out)}.png"
            probe_image(p, root).save(path)
        out[key] = (str(path), p.question)
        if len(out) == n:
            break
    return list(out.values())


def _words(text: str) -> str:
    return " ".join(str(text).split()).casefold()


def matching_probe(preset: Preset, image_path: str | Path | None, question: str) -> Probe | None:
    """The preset's probe that is this (image, question), if any (the bundled examples are):
    its answers tell a right reply from a wrong one, and whether a yes/no question's object is
    there. A text probe matches by its words; an image probe also by the image's pixels, not
    its name, since the app gets a copy under another path and anyone may upload a file called
    ``cat.jpg``; only an image the size of a probe's is decoded."""
    asked = _words(question)
    text, visual, root = _probes(preset.name)
    if not image_path:
        return next((p for p in text if _words(p.question) == asked), None)
    known = [p for p in visual if _words(p.question) == asked]
    if not known:
        return None
    try:
        with Image.open(image_path, formats=IMAGE_FORMATS) as given:
            same_size = [(p, image) for p in known if (image := probe_image(p, root)).size == given.size]
            pixels = given.convert("RGB").tobytes() if same_size else None
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return next((p for p, image in same_size if image.tobytes() == pixels), None)


def object_presence(preset: Preset, image_path: str | Path | None, question: str) -> bool | None:
    """Whether the object a yes/no question asks about is in the image, when the (image,
    question) pair is one of the preset's probes: Object-Hallucination needs the truth, which
    only the probe set knows. None when unknown."""
    probe = matching_probe(preset, image_path, question) if image_path else None
    return probe.object_present if probe is not None else None


def fuse_note(variant: Variant, default: bool) -> str:
    """What the Fuse button says it made: the recipe, how long it took, and which settings
    differ from the method's defaults."""
    if default:
        return f"This is the app's own fused model, **{recipe_label(variant.name, variant.recipe.params)}**: your fused columns use it."
    changed = changed_settings(variant.name, variant.recipe.params)
    differs = f"Settings that differ from the defaults: {', '.join(changed)}." if changed else "Every setting is at its default."
    return f"Fused with **{variant.name}** in memory in {variant.seconds:.1f} s; your fused columns now use it. {differs}"


def recipe_card(pair: Pair, variant: Variant) -> dict[str, Any]:
    """What the Fusion tab shows about a fused variant (no server paths: visitors see it)."""
    located = sum(r["located"] for r in variant.report)
    total = sum(r["neurons"] for r in variant.report)
    return {
        "preset": pair.preset.name,
        "method": variant.name,
        "recipe": {k: variant.record.get(k) for k in ("method", "params", "seed")},
        "neurons_located": f"{located} of {total}" if total else None,
        "built_in_memory_seconds": round(variant.seconds, 2),
        "memory_mib": round(variant.nbytes / 2**20, 1),
        "default": variant is pair.default,
        "shared_with_original": pair.shared,
    }
