"""Neuron-Fusion Studio: the Gradio app. UI wiring only; the logic is in the ``studio`` package.

    python app.py [--preset pocket] [--method neu-p-taska] [--4bit] [--device auto|cpu|cuda]

The models load (and fuse) in the background while the page already serves and shows the
progress. API (``gradio_client``): ``/compare_text`` (message), ``/compare_image`` (image,
message), ``/status``; see README.md, "The app".
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # readiness is timed from here, before the heavy imports

import functools  # noqa: E402
import html  # noqa: E402
import inspect  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable  # noqa: E402
from contextlib import closing  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gradio as gr  # noqa: E402
from gradio.data_classes import FileData  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402

from fusion.errors import FusionError  # noqa: E402
from fusion.plots import curve_figure, share_figure  # noqa: E402
from fusion.presets import ASSETS, PRESETS, Preset, get_preset  # noqa: E402
from fusion.probes import Probe  # noqa: E402
from fusion.registry import METHOD_NAMES, NEURON_FUSION_PARAMS, Param  # noqa: E402
from studio import StudioError  # noqa: E402
from studio.behaviour import probe_counts  # noqa: E402
from studio.chat import check_histories, check_image_file, check_inner, check_method, refuse_data_url  # noqa: E402
from studio.clients import UploadLedger, client_address, refusal  # noqa: E402
from studio.settings import FALLBACK_PRESET, parse_settings, start_recipe  # noqa: E402
from studio.state import Studio  # noqa: E402
from studio.variants import Variant  # noqa: E402
from studio.view import (  # noqa: E402
    BADGE_TEXT,
    all_params,
    badges_html,
    behaviour,
    example_images,
    example_prompts,
    format_progress,
    fuse_note,
    highlighted,
    matching_probe,
    method_params,
    public,
    recipe_card,
    recipe_label,
    start_values,
    titles,
)
from studio.zerogpu import bench_seconds, chat_seconds, gpu_task  # noqa: E402

COLOURS = {BADGE_TEXT[label]: colour for label, colour in {"context_hallucination": "#fca5a5", "not_known": "#fcd34d", "object_hallucination": "#c4b5fd"}.items()}
CSS = """
.nf-badge { display: inline-block; padding: 2px 10px; margin: 2px; border-radius: 999px; font-size: 0.85em; font-weight: 600; }
.nf-context_hallucination { background: #fca5a5; color: #7f1d1d; }
.nf-not_known { background: #fcd34d; color: #78350f; }
.nf-object_hallucination { background: #c4b5fd; color: #4c1d95; }
.nf-clean { background: #d1fae5; color: #065f46; }
.nf-right { background: #bbf7d0; color: #14532d; }
.nf-marked .label, .nf-marked .label-input { text-transform: none; }  /* a label reads as its badge does */
.nf-wrong { background: #fecaca; color: #7f1d1d; }
#nf-image img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }  /* a 64 px scene fills its box */
#nf-image-examples img { object-fit: contain; image-rendering: pixelated; }  /* whole in its thumbnail, sharp */
"""


def guarded(fn: Callable, refuse: Callable[[str], Any]) -> Callable:
    """``fn`` with a StudioError/FusionError turned into its own line and any other failure
    into one line that names nothing of the server (``said``), handed to ``refuse``: it raises
    (an API's error) or returns what the handler gives instead (a page's toast). Works for
    plain and generator handlers."""

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen(*args: Any, **kwargs: Any) -> Any:
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as err:
                yield refuse(said(err))

        return gen

    @functools.wraps(fn)
    def plain(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as err:
            return refuse(said(err))

    return plain


def api_errors(fn: Callable) -> Callable:
    """For the API's endpoints: a refusal is the call's error, which a client reads."""

    def refuse(line: str) -> Any:
        raise gr.Error(line, print_exception=False)

    return guarded(fn, refuse)


def page_errors(fn: Callable) -> Callable:
    """For the page's handlers: a refusal is one toast, and every output stays as it was
    (a raised error would also put a red "Error" pill over each output of the event)."""

    def refuse(line: str) -> Any:
        gr.Warning(line)
        return gr.skip()

    return guarded(fn, refuse)


def said(err: Exception) -> str:
    """What a visitor is told about ``err``: the project's own message, or ``unexpected``'s line."""
    if isinstance(err, (StudioError, FusionError)):
        return public(str(err))
    return unexpected(err)


def unexpected(err: Exception) -> str:
    """A failure the project has no words for: the details (which may name server paths or
    library internals) go to the server log, the visitor gets one line. With
    ``launch(show_error=False)`` Gradio likewise hides the text of errors raised before a
    handler runs (an input it cannot preprocess)."""
    print(f"[studio] unexpected error: {type(err).__name__}: {err}", flush=True)
    return "The server could not do this; the problem is in its log. Try again, or another input."


@dataclass(frozen=True)
class Refused:
    """An upload the image input's preprocessing refused, with why: the handler says it (one
    toast), since an error raised in preprocessing would mark every output of the event."""

    why: str


def preprocess_upload(payload: Any) -> str | Refused | None:
    """The chat image input's preprocessing, in place of Gradio's: the upload is handed over
    as a path without opening it (Gradio's own ``Image.open`` would decode what an ICO holds
    before any check). The file's size, format and shape are checked from its header
    (``studio.chat.check_image_file``); the handler decodes it once. A ``data:`` URL, which
    Gradio would decode, is refused."""
    if payload is None:
        return None
    try:
        refuse_data_url(getattr(payload, "url", None))
        return str(check_image_file(getattr(payload, "path", None)))
    except StudioError as err:
        return Refused(public(str(err)))


def checked_image(**kwargs: Any) -> gr.Image:
    """A ``gr.Image`` (its own front end) whose uploads go through ``preprocess_upload``. The
    instance's method is replaced rather than the class subclassed: Gradio writes a ``.pyi``
    stub beside any module that defines a component class."""
    image = gr.Image(type="filepath", **kwargs)
    image.preprocess = preprocess_upload  # type: ignore[method-assign]
    return image


def as_messages(turns: list[tuple[str, str]]) -> list[dict[str, str]]:
    """Chat turns for gr.Chatbot. It renders HTML, so text is escaped: model output is shown
    as text."""
    return [m for q, a in turns for m in ({"role": "user", "content": html.escape(q)}, {"role": "assistant", "content": html.escape(a)})]


class ChatTab:
    """One chat tab: a column per model (chat, behaviour badges, the latest answer with the
    matched words highlighted), a message box, per-session histories."""

    def __init__(self, studio: Studio, names: tuple[str, ...], image: gr.Image | None, with_base: gr.Checkbox | None, variant: gr.State) -> None:
        """``variant``: this browser session's fused variant (its key; None: the default)."""
        self.studio, self.image, self.with_base = studio, image, with_base
        self.chats, self.badges, self.marked, self.columns = [], [], [], []
        with gr.Row(equal_height=False):
            for i, name in enumerate(names):
                with gr.Column(visible=i < 2, elem_classes=["nf-column"]) as column:
                    self.chats.append(gr.Chatbot(label=name, render_markdown=False, height=340, buttons=["copy_all"], elem_classes=["nf-chat"]))
                    self.badges.append(gr.HTML("", elem_classes=["nf-badges"]))
                    self.marked.append(gr.HighlightedText(label="Latest answer (behaviour highlighted)", color_map=COLOURS, combine_adjacent=True, elem_classes=["nf-marked"]))
                self.columns.append(column)
        self.history = gr.State([[] for _ in names])
        with gr.Row():
            self.message = gr.Textbox(label="Question", placeholder="Ask both models…", show_label=False, scale=5, max_lines=6, elem_classes=["nf-message"])
            self.send = gr.Button("Send", variant="primary", scale=1, elem_classes=["nf-send"])
            self.clear = gr.Button("Clear", scale=1)
        self.outputs = [*self.chats, *self.badges, *self.marked, self.history, self.message]
        inputs = [self.message, self.history, variant] + ([self.image] if image else []) + ([self.with_base] if with_base else [])
        # spaces.GPU sends a call's arguments to its GPU worker pickled (the function itself it
        # inherits): so the decorated handler is this bound method, and its arguments plain values
        models = (lambda extra: 3 if extra and extra[-1] is True else 2) if with_base is not None else (lambda extra: 2)
        handler = gpu_task(lambda message, histories, variant, *extra: chat_seconds(studio.settings.max_new_tokens, models(extra)))(page_errors(self.respond))
        for trigger in (self.send.click, self.message.submit):
            trigger(handler, inputs, self.outputs, concurrency_id="models", api_visibility="private")
        self.clear.click(self.reset, None, self.outputs, queue=False, api_visibility="private")
        for chat in self.chats:  # a chat's own trash icon (Gradio offers no way to hide it) starts a new conversation too
            chat.clear(self.reset_chats, None, self.outputs[:-1], queue=False, api_visibility="private")
        if image is not None:
            # a new image starts a new conversation, but keeps the question (an example sets both)
            image.change(self.reset_chats, None, self.outputs[:-1], queue=False, api_visibility="private")

    def view(self, histories: list[list[tuple[str, str]]], latest: list[str | None], probe: Probe | None = None) -> list[Any]:
        """``probe``: the preset's probe the latest question is (the examples are; None for
        others): whether each answer is right, and whether the object a yes/no question asks
        about is in the image, for the Object-Hallucination badge."""
        answers = [a if a is not None else "" for a in latest]
        seen = self.image is not None  # every turn of the image tab is about its image
        present = probe.object_present if probe is not None else None
        return [
            *(as_messages(h) for h in histories),
            *(badges_html(behaviour(a, prompt_has_image=seen, object_present=present)["labels"], probe, a) if a else "" for a in answers),
            *(highlighted(a, prompt_has_image=seen, object_present=present) if a else None for a in answers),
        ]

    def reset_chats(self) -> list[Any]:
        empty = [[] for _ in self.chats]
        return [*self.view(empty, [None] * len(self.chats)), empty]

    def reset(self) -> list[Any]:
        return [*self.reset_chats(), ""]

    def respond(self, message: str, histories: list[list[tuple[str, str]]], variant: str | None, *extra: Any) -> Any:
        image = extra[0] if self.image is not None else None
        if isinstance(image, Refused):
            raise StudioError(image.why)
        with_base = bool(extra[-1]) if self.with_base is not None else False
        histories = check_histories(histories, len(self.chats))
        text, stream = self.studio.chat(message, histories, image, image_required=self.image is not None, with_base=with_base, variant=variant)
        probe = matching_probe(self.studio.ready().preset, image, text)
        n = 3 if with_base else 2
        answers: list[str] = [""] * n
        with closing(stream):  # a visitor who leaves closes this generator: generation stops with it
            for answers in stream:
                live = [h + [(text, a)] for h, a in zip(histories, answers)] + histories[n:]
                yield [*self.view(live, answers + [None] * (len(histories) - n), probe), histories, ""]
        done = [h + [(text, a)] for h, a in zip(histories, answers)] + histories[n:]
        yield [*self.view(done, answers + [None] * (len(histories) - n), probe), done, ""]


def control(p: Param) -> gr.components.Component:
    """A UI control for one registry parameter."""
    common = {"label": p.name, "info": f"{p.help} · range {p.range_text()}", "visible": False, "elem_classes": ["nf-param"]}
    if p.kind is bool:
        return gr.Checkbox(value=p.default, **common)
    if p.choices:
        return gr.Dropdown(list(p.choices), value=p.default, **common)
    if p.low is not None and p.high is not None:
        return gr.Slider(p.low, p.high, value=p.default, step=0.001, **common)
    return gr.Number(value=p.default, **common)


class FusionTab:
    """The Fusion tab: a method and its settings, which start from the app's own recipe (and
    come back to it when its method is picked again, or on reset); Fuse builds this visitor's
    own variant; the recipe card and where visual tuning changed the pair show what it is."""

    def __init__(self, studio: Studio, method: str, visitor: gr.State, fused_chats: list[gr.Chatbot]) -> None:
        self.studio, self.params, self.fused_columns = studio, all_params(), len(fused_chats)
        with gr.Row():
            with gr.Column(scale=1):
                self.chosen = gr.Dropdown(list(METHOD_NAMES), value=method, label="method", elem_id="nf-method")
                self.controls = [control(p) for p in self.params]
                with gr.Row():
                    fuse = gr.Button("Fuse", variant="primary", elem_id="nf-fuse")
                    back = gr.Button("Back to the app's recipe", elem_id="nf-reset")
                self.note = gr.Markdown(elem_id="nf-fuse-note")
            with gr.Column(scale=2):
                self.card = gr.JSON(label="Recipe card")
                # the figures carry their own titles (a label would sit over them)
                self.curve = gr.Plot(label="change curves", show_label=False, elem_id="nf-curve")
                self.share = gr.Plot(label="located share per layer and kind", show_label=False, elem_id="nf-share")
        self.views = [self.card, self.curve, self.share]
        inner = self.controls[[p.name for p in self.params].index("inner")]
        self.chosen.input(self.show_method, self.chosen, self.controls, queue=False, api_visibility="private")
        inner.input(self.show_inner, [self.chosen, inner], self.controls, queue=False, api_visibility="private")
        back.click(self.reset, None, [self.chosen, *self.controls, self.note], queue=False, api_visibility="private")
        fuse.click(
            self.refuse,
            [self.chosen, *self.controls],
            [*self.views, self.note, *fused_chats, visitor],
            concurrency_limit=1,
            concurrency_id="fuse",
            api_visibility="private",
        )

    def view(self, variant: Variant | None) -> list[Any]:
        """Recipe card, change curves with the cut-off, and the located share per layer and kind."""
        if self.studio.pair is None or variant is None:
            return [None, None, None]
        report, top_ratio, note = self.studio.change(variant)
        return [recipe_card(self.studio.pair, variant), curve_figure(report, top_ratio, note), share_figure(report)]

    def loaded(self) -> list[Any]:
        """For ``demo.load``: the views, the method and controls, at the app's recipe once ready."""
        if self.studio.pair is None:
            return [*self.view(None), gr.update(), *self.show_method(self.chosen.value)]
        default = self.studio.pair.default
        return [*self.view(default), gr.Dropdown(value=default.name), *self.show_method(default.name)]

    def _start(self, name: str, inner: str | None) -> dict[str, Any]:
        if self.studio.pair is None:
            return {p.name: p.default for p in method_params(name, inner).values()}
        return start_values(name, inner, self.studio.pair.default)

    @page_errors
    def show_method(self, name: Any) -> list[Any]:
        """The chosen method's controls, at the app's recipe if it is its method, else the defaults."""
        values = self._start(check_method(name), None)
        return [gr.update(visible=p.name in values, **({"value": values[p.name]} if p.name in values else {})) for p in self.params]

    @page_errors
    def show_inner(self, name: Any, inner: Any) -> list[Any]:
        """Another inner method: its own parameters appear; the visitor's Neuron-Fusion settings stay."""
        values = self._start(check_method(name), check_inner(inner))
        kept = {p.name for p in NEURON_FUSION_PARAMS}
        return [gr.update(visible=p.name in values, **({"value": values[p.name]} if p.name in values and p.name not in kept else {})) for p in self.params]

    @page_errors
    def reset(self) -> list[Any]:
        default = self.studio.ready().default
        line = f"Settings back to the app's recipe, **{recipe_label(default.name, default.recipe.params)}**; press Fuse to use it."
        return [gr.Dropdown(value=default.name), *self.show_method(default.name), line]

    @page_errors  # no GPU asked for: merges run where the studio's merge_device says (the CPU on ZeroGPU)
    def refuse(self, request: gr.Request, name: str, *values: Any, progress: gr.Progress = gr.Progress()) -> list[Any]:
        """This visitor's own fused variant; everyone else keeps theirs (values are checked by
        the library: a name from the list, finite numbers in range, choices from their lists)."""
        by_name = dict(zip((p.name for p in self.params), values))
        name = check_method(name)
        wanted = method_params(name, check_inner(by_name.get("inner")))
        owner = f"{client_address(getattr(request.client, 'host', None), request.headers)}/{request.session_hash or ''}"  # whose variant it is
        variant = self.studio.fuse_variant(name, {k: by_name.get(k) for k in wanted}, lambda p: progress(p.fraction, desc=format_progress(p)), owner=owner)
        default = variant is self.studio.ready().default
        return [*self.view(variant), fuse_note(variant, default), *(gr.Chatbot(label=variant.model.name) for _ in range(self.fused_columns)), None if default else variant.key]


class BehaviourTab:
    """The Behaviour tab: the preset's probes, drawn across the skills, asked to the base LLM,
    the original and the visitor's fused model; the rates, a chart, where the fused model sits
    among the baselines' sweeps, and every reply."""

    def __init__(self, studio: Studio, preset: Preset, names: tuple[str, str, str], visitor: gr.State) -> None:
        self.studio = studio
        gr.Markdown(
            "The preset's probes, drawn across every skill (the same ones each run), asked to the base LLM, the original and the "
            "fused model: language accuracy; visual accuracy, and the same questions asked again with a blank image and with another "
            "probe's image, so that a model that does not look cannot pass (*image-grounded*: right with its own image, not with the "
            "blank or the other one); on text-only probes the Context-Hallucination and Not-Known rates; on yes/no questions about "
            "objects that are not in the image the Object-Hallucination rate. Per-skill rates are under the table."
        )
        self.counts = texts, images = probe_counts(preset)
        with gr.Row():
            self.texts = gr.Slider(1, texts, value=min(8, texts), step=1, label=f"text probes (of {texts}; fewer is faster)", elem_id="nf-bench-text")
            self.images = gr.Slider(1, images, value=min(8, images), step=1, label=f"image probes (of {images})", elem_id="nf-bench-image")
            run = gr.Button("Run probes", variant="primary", elem_id="nf-bench-run")
        self.table = gr.Markdown("*No run yet: choose how many probes of each kind and press **Run probes**.*", elem_id="nf-bench-table")
        chart = gr.Plot(label="rates", show_label=False, elem_id="nf-bench-chart")  # the figures carry their own titles
        tradeoff = gr.Plot(label="trade-off", show_label=False, elem_id="nf-bench-tradeoff")
        per_probe = gr.Dataframe(
            headers=["image", "skill", "question", "expected", names[2], names[0], names[1]],  # the empty table's too
            label="Every probe: each model's reply (✓ right, ✗ wrong) with its behaviour labels, and for image probes its replies with a blank and with another image",
            interactive=False,
            wrap=True,
            max_height=600,
            column_widths=["11%", "7%", "14%", "8%", "20%", "20%", "20%"],  # image, skill, question, expected, then the three models' replies
            elem_id="nf-bench-probes",
        )
        replies = gr.File(label="The replies, one JSON object a line", elem_id="nf-bench-replies")
        # one Behaviour run at a time, in a slot of its own: long runs never hold the chats' model slots
        run.click(
            gpu_task(lambda texts, images, *rest, **named: bench_seconds(texts, images))(page_errors(self.bench)),  # see ChatTab: plain arguments
            [self.texts, self.images, visitor],
            [self.table, chart, tradeoff, per_probe, replies],
            concurrency_limit=1,
            concurrency_id="behaviour",
            api_visibility="private",
            show_progress_on=[self.table],  # one progress bar, not one per output
        )

    def loaded(self) -> list[Any]:
        """For ``demo.load``: the sliders' bounds for the preset that did load, where it is not
        the one the page was built for (a fallback); else nothing, so that a value the visitor
        set before this answer arrived stays."""
        if self.studio.pair is None or (counts := probe_counts(self.studio.pair.preset)) == self.counts:
            return [gr.update(), gr.update()]
        texts, images = counts
        return [
            gr.Slider(maximum=texts, value=min(8, texts), label=f"text probes (of {texts}; fewer is faster)"),
            gr.Slider(maximum=images, value=min(8, images), label=f"image probes (of {images})"),
        ]

    def bench(self, texts: Any, images: Any, variant: str | None, progress: gr.Progress = gr.Progress()) -> list[Any]:
        """The probes for base, original and fused; the bar moves per batch of probes ("probes
        12/40 · LLaVA-1.5 (original)"). The counts are checked by the studio: a client sends anything."""
        result = self.studio.bench(texts, images, lambda share, line: progress(share, desc=line), variant=variant)
        return [result.table, result.chart, result.tradeoff, result.probes, str(result.replies)]


def build(studio: Studio) -> gr.Blocks:
    preset = get_preset(studio.settings.preset if studio.settings.preset in PRESETS else FALLBACK_PRESET)
    method, params = start_recipe(studio.settings, preset)  # the titles before the models are ready (refresh names the loaded ones)
    names = titles(preset, method, params)

    # uploads older than an hour are removed every hour, and all of them at shutdown
    with gr.Blocks(title="Neuron-Fusion Studio", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "# Neuron-Fusion Studio\nVisual instruction tuning makes a multimodal LLM forget some of its base LLM's language skills; "
            "Neuron-Fusion (Locate-then-Merge) gives them back without training. Ask the tuned model and its fused version, and compare."
        )
        status = gr.Markdown(elem_id="nf-status")
        timer = gr.Timer(1.0)
        visitor = gr.State(None)  # this session's fused variant: the key of its recipe (None: the default)

        with gr.Tab("Image chat"):
            with gr.Row():
                image = checked_image(image_mode=None, label="Image", height=260, sources=["upload", "clipboard"], elem_id="nf-image")
            image_tab = ChatTab(studio, names[:2], image, None, visitor)
            gr.Examples([list(e) for e in example_images(preset)], [image, image_tab.message], elem_id="nf-image-examples", label="Examples: questions about objects that are not there")

        with gr.Tab("Text chat"):
            with_base = gr.Checkbox(label=f"Also ask the base LLM ({preset.base_label})", value=False)
            text_tab = ChatTab(studio, names, None, with_base, visitor)
            with_base.change(lambda on: gr.Column(visible=on), with_base, text_tab.columns[2], queue=False, api_visibility="private")
            asked = example_prompts(preset)
            gr.Examples(
                [[q] for _, q in asked],
                [text_tab.message],
                example_labels=[f"{skill}: {q}" for skill, q in asked],
                elem_id="nf-text-examples",
                label="Examples, one per skill: text-only questions (tuned MLLMs answer 'In the image…' or decline)",
            )

        fused_chats = [image_tab.chats[1], text_tab.chats[1]]
        with gr.Tab("Fusion"):
            fusion = FusionTab(studio, method, visitor, fused_chats)
        with gr.Tab("Behaviour"):
            behaviour_tab = BehaviourTab(studio, preset, names, visitor)

        labelled = [image_tab.chats[0], *fused_chats, text_tab.chats[0], text_tab.chats[2]]

        def refresh() -> list[Any]:
            """The status line and, once ready, the loaded preset's column titles."""
            s = studio.status
            note = f"\n\n⚠️ {html.escape(public(s.notice))}" if s.notice else ""
            about = f"\n\n{html.escape(studio.pair.preset.note)}" if studio.pair is not None and studio.pair.preset.note else ""
            line = [f"**{s.state.capitalize()}** · {html.escape(public(s.message))}{note}{about}"]
            if studio.pair is None:
                return [*line, *(gr.update() for _ in labelled), gr.Timer(active=s.state == "loading")]
            original, fused, base = titles(studio.pair.preset, studio.pair.method, studio.pair.default.record.get("params"))
            return [*line, *(gr.Chatbot(label=t) for t in (original, fused, fused, original, base)), gr.Timer(active=False)]

        view_outputs = [status, *labelled, timer]
        timer.tick(refresh, None, view_outputs, queue=False, api_visibility="private", show_progress="hidden")

        def loaded() -> list[Any]:
            return [*refresh(), *fusion.loaded(), *behaviour_tab.loaded()]

        # off the queue: a page must load even while the queue is full
        demo.load(
            loaded, None, [*view_outputs, *fusion.views, fusion.chosen, *fusion.controls, behaviour_tab.texts, behaviour_tab.images], queue=False, api_visibility="private"
        )

        @api_errors
        def compare_text(message: str) -> dict:
            """Both models' answers to a text-only message, with behaviour labels."""
            return studio.compare(message)

        @api_errors
        def compare_image(image: FileData, message: str) -> dict:
            """Both models' answers to a message about an image, with behaviour labels."""
            field = image.get if isinstance(image, dict) else lambda name: getattr(image, name, None)
            refuse_data_url(field("url"))
            return studio.compare(message, field("path"), image_required=True)

        def status_api() -> dict:
            """Load state: {state: loading|ready|failed, message, notice, seconds}."""
            return {k: public(v) if isinstance(v, str) else v for k, v in studio.status.as_dict().items()}

        answer = gpu_task(lambda *inputs: chat_seconds(studio.settings.max_new_tokens, 2))  # both models, one message
        gr.api(answer(compare_text), api_name="compare_text", concurrency_id="models")
        gr.api(answer(compare_image), api_name="compare_image", concurrency_id="models")
        gr.api(status_api, api_name="status", queue=False)
    return demo


def fetched_file(data: Any) -> str | None:
    """Why a request is refused if any file in it is one that Gradio would fetch itself (a
    FileData whose path is a URL: downloaded whole, past the upload bounds, before any check)."""
    if isinstance(data, dict):
        path = data.get("path")
        if isinstance(path, str) and "://" in path:
            return "Files are accepted as uploads to this server, not as links to elsewhere."
        return next((why for value in data.values() if (why := fetched_file(value))), None)
    if isinstance(data, list):
        return next((why for value in data if (why := fetched_file(value))), None)
    return None


def bound_clients(demo: gr.Blocks) -> None:
    """Refuse a request at the door when its session or address already holds its share of the
    queue (``studio.clients``): Gradio's queue knows only its total size. Wraps the queue's
    ``push``, the one place every queued request passes before it takes a place."""
    queue = demo._queue
    push = queue.push

    def where(request: Any) -> tuple[str, str]:
        return client_address(getattr(request.client, "host", None), request.headers)

    async def bounded_push(body: Any, request: Any, username: str | None) -> Any:
        # every event until Gradio pops it (finished or dropped): a closed heartbeat leaves its
        # events queued and running, so they still count
        held = [(e.session_hash, where(e.request)) for e in list(queue.event_ids_to_events.values())]
        why = fetched_file(body.data) or refusal(held, body.session_hash or "", where(request))
        if why is not None:
            return False, why, "error"
        return await push(body, request, username)

    queue.push = bounded_push


class UploadBound:
    """ASGI middleware: a POST to Gradio's upload route is admitted by ``UploadLedger`` (bytes
    per address and in total) before its body is read; a refusal is one line, HTTP 413."""

    def __init__(self, app: Any, ledger: UploadLedger) -> None:
        self.app, self.ledger = app, ledger

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].rstrip("/").endswith("/upload"):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            length = headers.get("content-length", "")
            peer = scope["client"][0] if scope.get("client") else None
            # a chunked body would override its Content-Length: the size counted must be the size read
            declared = int(length) if length.isdigit() and "transfer-encoding" not in headers else None
            why = self.ledger.admit(client_address(peer, headers), declared)
            if why is not None:
                await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
                await send({"type": "http.response.body", "body": why.encode()})
                return
        await self.app(scope, receive, send)


def main() -> None:
    settings = parse_settings()
    studio = Studio(settings, log=lambda line: print(line, flush=True), started=STARTED)
    studio.start()
    demo = build(studio)
    demo.queue(default_concurrency_limit=settings.concurrency, max_size=settings.queue_size)
    bound_clients(demo)
    # GRADIO_SERVER_NAME / GRADIO_SERVER_PORT are read by launch() itself
    uploads = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")
    demo.launch(
        css=CSS,
        max_file_size="10mb",
        allowed_paths=[str(ASSETS / "examples")],
        show_error=False,
        app_kwargs={"middleware": [Middleware(UploadBound, ledger=UploadLedger(uploads))]},
    )


if __name__ == "__main__":
    main()
