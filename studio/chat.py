"""What a visitor sends, checked on the server, and how answers stream back.

Every UI event is an API: anyone can call a handler with any values. So a message, an image
and a prompt's length are checked here before any model sees them, and every check fails with a
``StudioError`` whose message can be shown as it is.
"""

from __future__ import annotations

import logging
import queue
import threading
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from fusion.inference import JOIN_SECONDS, ChatModel
from fusion.registry import BASELINES, METHOD_NAMES

from . import StudioError
from .settings import DEFAULT_MAX_NEW_TOKENS

MAX_MESSAGE_CHARS = 2000
RAW_MESSAGE_CHARS = 4 * MAX_MESSAGE_CHARS  # before invisible characters are taken out
MAX_TURNS = 50  # chat turns kept per column
MAX_IMAGE_BYTES = 10 << 20
MAX_IMAGE_PIXELS = 36_000_000
MAX_ASPECT = 20  # long side / short side
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # what a chat needs; others are never opened


def check_method(name: object) -> str:
    """``name`` as one of the library's method names, or a StudioError: a client may send a
    list, None or a number where the dropdown sends a name."""
    if not isinstance(name, str) or name not in METHOD_NAMES:
        raise StudioError(f"Unknown method {str(name)[:40]!r}; choose one of {', '.join(METHOD_NAMES)}.")
    return name


def check_inner(name: object) -> str | None:
    """Neuron-Fusion's inner method as a client sent it: a baseline's name, else None (the
    method's own default)."""
    return name if isinstance(name, str) and name in BASELINES else None


def check_message(message: object) -> str:
    """The message without invisible characters (zero-width spaces, direction marks, control
    codes other than newlines and tabs), or a StudioError when it is not text, nothing visible
    is left or it is too long. The raw length is checked first: stripping a 100-million-
    character message of its invisibles would cost half a minute and gigabytes."""
    if not isinstance(message, str):
        raise StudioError("The message must be text.")
    if len(message) > RAW_MESSAGE_CHARS:
        raise StudioError(f"The message is {len(message)} characters long; the limit is {MAX_MESSAGE_CHARS}. Shorten it.")
    raw = message
    text = "".join(ch for ch in raw if ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Cn")).strip()
    if not any(unicodedata.category(ch)[0] not in "CZ" for ch in text):
        raise StudioError("The message is empty: type a question first.")
    if len(text) > MAX_MESSAGE_CHARS:
        raise StudioError(f"The message is {len(text)} characters long; the limit is {MAX_MESSAGE_CHARS}. Shorten it.")
    return text


def check_image_file(path: object) -> Path:
    """An upload's path once its size, format and shape are checked from the file and its
    header alone, or a StudioError saying why it cannot be used. No pixel is decoded: an ICO
    or ICNS may hold a 9000×9000 PNG behind a 16×16 header and is decoded when opened, so only
    the formats a chat needs are opened at all (``IMAGE_FORMATS``); a 1×100000 strip would
    become a huge square when the processor resizes its short side."""
    with _opened(path) as (checked, _):
        return checked


def refuse_data_url(url: object) -> None:
    """A StudioError for an image sent inline as a ``data:`` URL: it would be decoded before
    any check of its size; images come as uploaded files."""
    if isinstance(url, str) and url.startswith("data:"):
        raise StudioError("Images are accepted as uploaded files, not as data: URLs.")


def load_image(path: object) -> Image.Image:
    """An upload as an RGB image, decoded once and only after the checks of
    ``check_image_file`` (in the same opening), turned the way its EXIF orientation says (a
    phone photo is stored sideways; the browser shows it upright, and so must the model see it)."""
    with _opened(path) as (checked, image):
        try:
            return to_rgb(ImageOps.exif_transpose(image))
        except (Image.DecompressionBombError, OSError, SyntaxError, ValueError) as err:
            raise StudioError(_unreadable(checked, err)) from None


@contextmanager
def _opened(path: object) -> Iterator[tuple[Path, Image.Image]]:
    """The upload opened (header read, no pixels) after its size, format and shape checks."""
    if not path or not isinstance(path, (str, Path)):
        raise StudioError("This tab asks about an image: upload one (or pick an example) first. Text-only questions go to the Text chat tab.")
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise StudioError(f"The upload is {size / 2**20:.1f} MB; images up to {MAX_IMAGE_BYTES >> 20} MB are accepted.")
        image = Image.open(path, formats=IMAGE_FORMATS)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as err:
        raise StudioError(_unreadable(path, err)) from None
    with image:
        check_image_shape(image.width, image.height)
        yield path, image


def _unreadable(path: Path, err: BaseException) -> str:
    return f"The upload '{path.name[:60]}' is not an image this app can read ({type(err).__name__}); send a PNG, JPEG, WebP, GIF or BMP."


def check_image_shape(width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise StudioError(f"The image is {width}×{height} pixels; at most {MAX_IMAGE_PIXELS // 1_000_000} megapixels are accepted.")
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT * min(width, height):
        raise StudioError(f"The image is {width}×{height} pixels; its long side may be at most {MAX_ASPECT} times its short side. Crop it first.")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with 8 bits per channel. 16-bit and 32-bit greyscale images are scaled down, not
    clipped: PIL's own conversion would turn every value above 255 white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 255.0)
        scaled = np.clip(values * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    return image.convert("RGB")


def context_length(model: ChatModel) -> int:
    return int(model.model.config.get_text_config().max_position_embeddings)


def answer_budget(model: ChatModel, limit: int = DEFAULT_MAX_NEW_TOKENS) -> int:
    """New tokens per answer: a quarter of the context, at most ``limit`` (the app's setting)."""
    return min(limit, context_length(model) // 4)


def prompt_tokens(model: ChatModel, question: str, image: bool, history: Sequence[tuple[str, str]]) -> int:
    """Tokens the prompt will take, the image's placeholder expanded to its patch tokens."""
    n = len(model.tokenizer(model.prompt(question, image, history), add_special_tokens=False).input_ids)
    return n + (int(getattr(model.model.config, "image_seq_length", 1)) - 1 if image else 0)


def check_histories(histories: object, columns: int) -> list[list[tuple[str, str]]]:
    """A chat history as a client sent it (the session state, but callable by anyone), reduced
    to what it may be: one list per column of at most ``MAX_TURNS`` (question, answer) string
    pairs, the most recent, each string cut to ``RAW_MESSAGE_CHARS``. Older turns would not
    fit a model's context anyway, and a client may send a million."""
    if not isinstance(histories, list):
        return [[] for _ in range(columns)]
    out = []
    for turns in [*histories[:columns], *[[]] * columns][:columns]:
        recent = turns[-MAX_TURNS:] if isinstance(turns, list) else []
        pairs = [t for t in recent if isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(x, str) for x in t)]
        out.append([(q[:RAW_MESSAGE_CHARS], a[:RAW_MESSAGE_CHARS]) for q, a in pairs])
    return out


def fit_history(model: ChatModel, question: str, image: bool, history: Sequence[tuple[str, str]], budget: int) -> list[tuple[str, str]]:
    """The most recent turns that fit the context with room for a ``budget``-token answer; a
    question that does not fit alone raises StudioError. Found by bisection over how many
    turns to keep (a prompt's length grows with every turn kept): a few tokenizations, not one
    per turn dropped."""
    room = context_length(model) - budget
    turns = list(history)
    if prompt_tokens(model, question, image, []) > room:
        n = prompt_tokens(model, question, image, [])
        raise StudioError(f"The prompt is {n} tokens long; {model.name} reads at most {room} (plus {budget} for its answer). Shorten the message.")
    fits, too_many = 0, len(turns) + 1  # keeping ``fits`` turns fits; keeping ``too_many`` does not
    while too_many - fits > 1:
        middle = (fits + too_many) // 2
        if prompt_tokens(model, question, image, turns[len(turns) - middle :]) <= room:
            fits = middle
        else:
            too_many = middle
    return turns[len(turns) - fits :]


def merge_streams(streams: Sequence[Iterator[str]], stop: threading.Event) -> Iterator[list[str]]:
    """Drive several answer streams at once (each in its own thread); yield every stream's
    latest text whenever any of them moved. An error in one is raised here. ``stop`` is the
    event the streams' generation watches (``ChatModel.stream``): when this stream ends, fails
    or is closed because its visitor left, it is set, so that no model goes on generating for
    nobody, and the threads are joined without making the closer wait."""
    latest = [""] * len(streams)
    updates: queue.Queue[tuple[int, str | None, BaseException | None]] = queue.Queue()

    def pump(i: int, stream: Iterator[str]) -> None:
        try:
            for text in stream:
                updates.put((i, text, None))
            updates.put((i, None, None))
        except BaseException as err:  # handed to the consumer
            updates.put((i, None, err))

    pumps = [threading.Thread(target=pump, args=(i, stream), name=f"answer-{i}", daemon=True) for i, stream in enumerate(streams)]
    for thread in pumps:
        thread.start()
    try:
        running = len(streams)
        while running:
            batch = [updates.get()]
            while not updates.empty():
                batch.append(updates.get_nowait())
            for i, text, err in batch:
                if err is not None:
                    raise err
                if text is None:
                    running -= 1
                else:
                    latest[i] = text
            yield list(latest)
    finally:
        stop.set()
        # Joined in a thread of its own: Gradio closes an abandoned stream on its event loop,
        # which must not wait for a model's current step. Each pump ends within a token.
        threading.Thread(target=_join_all, args=(pumps,), name="reaper", daemon=True).start()


def _join_all(threads: Sequence[threading.Thread]) -> None:
    for thread in threads:
        thread.join(JOIN_SECONDS)


T = TypeVar("T")
log = logging.getLogger("studio")
MODEL_FAILED = "The model could not answer this input. Try a shorter message or another image; the server log has the details."


def _model_error(err: BaseException) -> StudioError:
    """The project's own words for a failure inside a model call (transformers' messages name
    internals, e.g. image-token counts, that mean nothing to a visitor); the original goes to
    the server log."""
    log.error("model call failed: %s: %s", type(err).__name__, err)
    if isinstance(err, torch.OutOfMemoryError):
        return StudioError("The server ran out of memory answering this. Try a shorter message or a smaller image.")
    return StudioError(MODEL_FAILED)


def ask(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``call(*args, **kwargs)``, a model call, with its failures in the project's words."""
    try:
        return call(*args, **kwargs)
    except (ValueError, RuntimeError, IndexError, TypeError) as err:
        raise _model_error(err) from None


def ask_stream(answers: Iterator[T]) -> Iterator[T]:
    """``answers`` as they come, with a failure in a model's stream in the project's words."""
    try:
        yield from answers
    except (ValueError, RuntimeError, IndexError, TypeError) as err:
        raise _model_error(err) from None
