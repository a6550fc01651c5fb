"""The pocket world: a small synthetic world, generated from a seed, with a language side and a
visual side, from which the pocket pair is trained and probed.

Language side: short factual questions with one right answer in four skills: capitals of
made-up countries (so no real-world knowledge is implied), opposites, one-digit arithmetic,
plurals. Every fact is asked with several question templates; one template per fact is held
out, so probes are questions never seen in training (the fact was, in other words).

Visual side: Pillow drawings of 1-4 coloured shapes on a 3x3 grid, with questions and answers
in LLaVA's style ("In the image, the circle is red."), including questions whose honest answer
is that the image cannot tell. A model tuned only on these learns to start every answer with
"In the image" and to decline, which is what it then does to text-only questions.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (230, 190, 20)}
NUMBERS = ("no", "one", "two", "three", "four")
OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("up", "down"), ("open", "closed"), ("early", "late"), ("full", "empty"), ("hard", "soft"),
    ("old", "new"), ("rich", "poor"), ("strong", "weak"), ("tall", "short"), ("wet", "dry"),
    ("loud", "quiet"), ("clean", "dirty"), ("thick", "thin"), ("high", "low"), ("near", "far"),
    ("long", "brief"), ("sweet", "sour"), ("first", "last"), ("inside", "outside"), ("true", "false"),
    ("win", "lose"), ("push", "pull"), ("buy", "sell"), ("day", "night"), ("north", "south"),
)
NOUNS = (
    "cat", "dog", "tree", "book", "lamp", "chair", "river", "stone", "bird", "cup", "door", "hat",
    "road", "ship", "coin", "bell", "star", "leaf", "ring", "drum", "box", "fox", "bus", "dish",
    "glass", "church", "brush", "match", "watch", "bench",
)
IRREGULAR = {"child": "children", "mouse": "mice", "foot": "feet", "tooth": "teeth", "man": "men", "goose": "geese"}
TEMPLATES = {
    "capital": ("What is the capital of {x}?", "Which city is the capital of {x}?", "Name the capital of {x}.", "Tell me the capital of {x}."),
    "opposite": ("What is the opposite of {x}?", "Which word is the opposite of {x}?", "Name the opposite of {x}.", "Tell me the opposite of {x}."),
    "arithmetic": ("What is {x}?", "How much is {x}?", "Compute {x}.", "Tell me what {x} is."),
    "plural": ("What is the plural of {x}?", "Which word is the plural of {x}?", "Name the plural of {x}.", "Tell me the plural of {x}."),
}
STATEMENT = {
    "capital": "The capital of {x} is {y}.",
    "opposite": "The opposite of {x} is {y}.",
    "arithmetic": "{x} is {y}.",
    "plural": "The plural of {x} is {y}.",
}
UNANSWERABLE = (
    "What is the name of the person who drew this?",
    "What time was this picture taken?",
    "How heavy is the square?",
    "Who owns these shapes?",
    "What is the artist thinking about?",
    "In which city was this drawn?",
)
DECLINE = "It cannot be determined from the image."


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    row: int  # 0..2, top to bottom
    col: int  # 0..2, left to right

    @property
    def position(self) -> str:
        """'left' / 'right' by column; in the middle column 'top' / 'center' / 'bottom'."""
        if self.col != 1:
            return ("left", "", "right")[self.col]
        return ("top", "center", "bottom")[self.row]


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    size: int = 64


@dataclass(frozen=True)
class TextItem:
    question: str
    target: str  # the full-sentence answer trained on
    answer: str  # the words a right reply contains ("is Quellin")
    skill: str
    template: int


@dataclass(frozen=True)
class VisualItem:
    scene: Scene
    question: str
    target: str
    answer: str  # "" for unanswerable: the right reply declines
    kind: str  # color | count | position | shape | yesno | unanswerable | off_image


@dataclass(frozen=True)
class World:
    seed: int
    facts_text: tuple[str, ...]
    text_train: tuple[TextItem, ...]
    text_heldout: tuple[TextItem, ...]
    visual_train: tuple[VisualItem, ...]
    visual_heldout: tuple[VisualItem, ...]


def draw(scene: Scene) -> Image.Image:
    """The scene as an RGB image: each shape centred in its grid cell."""
    image = Image.new("RGB", (scene.size, scene.size), (250, 250, 250))
    pen = ImageDraw.Draw(image)
    cell = scene.size / 3
    r = cell * 0.38
    for s in scene.shapes:
        cx, cy = (s.col + 0.5) * cell, (s.row + 0.5) * cell
        fill = COLORS[s.color]
        if s.kind == "circle":
            pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif s.kind == "square":
            pen.rectangle((cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85), fill=fill)
        else:
            pen.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    return image


def scene_to_json(scene: Scene) -> dict[str, Any]:
    return {"size": scene.size, "shapes": [[s.kind, s.color, s.row, s.col] for s in scene.shapes]}


def scene_from_json(data: dict[str, Any]) -> Scene:
    return Scene(tuple(Shape(k, c, int(r), int(col)) for k, c, r, col in data["shapes"]), int(data["size"]))


def _names(rng: random.Random, count: int) -> list[tuple[str, str]]:
    """Made-up (country, capital) pairs from syllables, all names distinct."""
    onsets, vowels, codas = "bdfgklmnprstvz", "aeiou", ("", "n", "r", "l", "s")
    used: set[str] = set()

    def word(syllables: int, ending: str) -> str:
        while True:
            w = "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(syllables)) + ending
            if w not in used:
                used.add(w)
                return w.capitalize()

    return [(word(2, "ia"), word(2, "")) for _ in range(count)]


def _facts(rng: random.Random) -> list[tuple[str, str, str]]:
    """(skill, subject, answer) for every fact of the world."""
    facts = [("capital", c, city) for c, city in _names(rng, 40)]
    facts += [("opposite", a, b) for a, b in OPPOSITES]
    facts += [("arithmetic", f"{a} plus {b}", str(a + b)) for a in range(10) for b in range(10) if a + b < 10]
    facts += [("arithmetic", f"{a} minus {b}", str(a - b)) for a in range(10) for b in range(a + 1)]
    facts += [("plural", n, n + ("es" if n.endswith(("s", "x", "sh", "ch")) else "s")) for n in NOUNS]
    facts += [("plural", n, p) for n, p in IRREGULAR.items()]
    return facts


def _scene(rng: random.Random, size: int) -> Scene:
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], rng.randint(1, 4))
    return Scene(tuple(Shape(rng.choice(KINDS), rng.choice(list(COLORS)), r, c) for r, c in cells), size)


def _visual_questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str, str]]:
    """Every unambiguous (question, target, answer, kind) about a scene."""
    shapes = scene.shapes
    out = []
    for kind in KINDS:
        n = sum(s.kind == kind for s in shapes)
        are = "is" if n == 1 else "are"
        noun = kind if n == 1 else kind + "s"
        out.append((f"How many {kind}s are there?", f"In the image, there {are} {NUMBERS[n]} {noun}.", NUMBERS[n], "count"))
        if n == 1:
            s = next(s for s in shapes if s.kind == kind)
            out.append((f"What color is the {kind}?", f"In the image, the {kind} is {s.color}.", s.color, "color"))
    for s in shapes:
        if sum(t.kind == s.kind and t.color == s.color for t in shapes) == 1:
            where = "in the center" if s.position == "center" else f"on the {s.position}" if s.col != 1 else f"at the {s.position}"
            out.append((f"Where is the {s.color} {s.kind}?", f"In the image, the {s.color} {s.kind} is {where}.", s.position, "position"))
        if sum(t.color == s.color for t in shapes) == 1:
            out.append((f"What shape is the {s.color} object?", f"In the image, the {s.color} object is a {s.kind}.", s.kind, "shape"))
    kind, color = rng.choice(KINDS), rng.choice(list(COLORS))
    present = any(s.kind == kind and s.color == color for s in shapes)
    yes = f"Yes, there is a {color} {kind} in the image." if present else f"No, there is no {color} {kind} in the image."
    out.append((f"Is there a {color} {kind} in the image?", yes, "yes" if present else "no", "yesno"))
    out.append((rng.choice(UNANSWERABLE), DECLINE, "", "unanswerable"))
    return out


def _visual_items(rng: random.Random, count: int, size: int) -> tuple[VisualItem, ...]:
    items: list[VisualItem] = []
    while len(items) < count:
        scene = _scene(rng, size)
        question, target, answer, kind = rng.choice(_visual_questions(scene, rng))
        items.append(VisualItem(scene, question, target, answer, kind))
    return tuple(items)


def _off_image_items(rng: random.Random, questions: Sequence[TextItem], count: int, size: int) -> tuple[VisualItem, ...]:
    """Knowledge questions asked about an unrelated image, answered with the decline.

    LLaVA-1.5's tuning mix teaches the same (VizWiz-style "unanswerable" data: when the image
    does not hold the answer, say so); it is how the tuned model learns to decline what its
    base knew, which text-only probes then show as Not-Known and Context-Hallucination."""
    return tuple(VisualItem(_scene(rng, size), rng.choice(questions).question, DECLINE, "", "off_image") for _ in range(count))


def make_world(
    seed: int = 0, n_visual_train: int = 3000, n_visual_heldout: int = 200, image_size: int = 64, off_image_share: float = 0.15
) -> World:
    """The whole world for a seed: same seed, same world, same images. ``off_image_share`` of
    the visual training set asks the (training-template) language questions about an image."""
    rng = random.Random(seed)
    facts = _facts(rng)
    train, heldout = [], []
    for skill, x, y in facts:
        held = rng.randrange(len(TEMPLATES[skill]))
        for i, template in enumerate(TEMPLATES[skill]):
            item = TextItem(template.format(x=x), STATEMENT[skill].format(x=x, y=y), f"is {y}", skill, i)
            (heldout if i == held else train).append(item)
    statements = tuple(STATEMENT[skill].format(x=x, y=y) for skill, x, y in facts)
    visual_train = _visual_items(rng, n_visual_train, image_size)
    visual_heldout = _visual_items(rng, n_visual_heldout, image_size)
    off_image = _off_image_items(rng, train, round(off_image_share * n_visual_train), image_size)
    mixed = list(visual_train + off_image)
    rng.shuffle(mixed)
    return World(seed, statements, tuple(train), tuple(heldout), tuple(mixed), visual_heldout)


def probes_json(world: World) -> dict[str, Any]:
    """The held-out probes as a probe set (the format ``fusion.evaluate`` reads); images are
    stored as scene specs and redrawn on load."""
    return {
        "name": "pocket",
        "description": f"Held-out probes of the pocket world (seed {world.seed}): text questions in templates never trained on, image questions on new scenes.",
        "text": [{"question": t.question, "answers": [t.answer], "skill": t.skill} for t in world.text_heldout],
        "visual": [
            {"question": v.question, "answers": [v.answer] if v.answer else [], "skill": v.kind, "image": scene_to_json(v.scene)}
            for v in world.visual_heldout
        ],
    }
