"""The pocket world's pictures: one to four coloured shapes on a 3x3 grid, drawn with Pillow,
and everything that can be said about them.

Answers are in LLaVA's style ("In the image, the circle is red."), and each visual skill asks
for one thing that only the picture holds: a colour, a shape, a count, a place, whether an
object is there (half the time it is), or, for questions no picture can answer, the decline.
Captions name every shape and where it is; they train the vision encoder (contrastively) and
LLaVA's stage 1, and, as descriptions, its stage 2.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (230, 190, 20)}
NUMBERS = ("no", "one", "two", "three", "four")
# Where a shape is, by (row, col): the phrase a reply uses. Phrases are distinct as wholes, so
# a reply "in the top left corner" is not right for a shape "on the left".
PLACES = {
    (0, 0): "in the top left corner", (0, 1): "at the top", (0, 2): "in the top right corner",
    (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
    (2, 0): "in the bottom left corner", (2, 1): "at the bottom", (2, 2): "in the bottom right corner",
}
VISUAL_SKILLS = ("color", "shape", "count", "position", "yesno", "unanswerable")
UNANSWERABLE = (
    "What is the name of the person who drew this?",
    "What time was this picture taken?",
    "How heavy is the square?",
    "Who owns these shapes?",
    "What is the artist thinking about?",
    "In which city was this drawn?",
)
DECLINE = "It cannot be determined from the image."
# A described scene, for the base LM's reading: the scene in words, then a question about it.
DESCRIBED = ("A drawing shows {caption}.", "Picture this: {caption}.", "Imagine a picture with {caption}.")
RETELL = ("Describe it briefly.", "What is in it?", "Say it again.")
NOT_SAID = "The description does not say."
CAPTION_PROMPTS = ("Describe the image briefly.", "What is in the image?", "Give a short description of the picture.")
DESCRIBE_PROMPTS = ("Describe the image.", "Describe the image in detail.", "What do you see in this picture?")
BACKGROUND = (250, 250, 250)


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    row: int  # 0..2, top to bottom
    col: int  # 0..2, left to right

    @property
    def place(self) -> str:
        return PLACES[self.row, self.col]


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    size: int = 72


@dataclass(frozen=True)
class VisualItem:
    """One question about a scene: the reply trained on, the words a right reply contains
    ("" for a question whose right reply declines), and its skill (or ``off_image``: a
    language question asked about an unrelated picture; ``caption``/``describe``)."""

    scene: Scene
    question: str
    target: str
    answer: str
    skill: str


def draw(scene: Scene) -> Image.Image:
    """The scene as an RGB image: each shape centred in its grid cell."""
    image = Image.new("RGB", (scene.size, scene.size), BACKGROUND)
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


def random_scene(rng: random.Random, size: int = 72) -> Scene:
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], rng.randint(1, 4))
    return Scene(tuple(Shape(rng.choice(KINDS), rng.choice(list(COLORS)), r, c) for r, c in sorted(cells)), size)


def caption(scene: Scene) -> str:
    """Every shape and its place, top to bottom and left to right: "a red circle in the top
    left corner and a blue square in the center"."""
    parts = [f"a {s.color} {s.kind} {s.place}" for s in scene.shapes]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def description(scene: Scene) -> str:
    """The caption as LLaVA's stage 2 descriptions say it."""
    n = len(scene.shapes)
    return f"In the image, there {'is one shape' if n == 1 else f'are {NUMBERS[n]} shapes'}: {caption(scene)}."


def questions(scene: Scene, skill: str, rng: random.Random) -> list[tuple[str, str, str]]:
    """Every unambiguous (question, target, answer) of one skill about a scene; yes/no asks
    about an object that is there or one that is not, each half the time."""
    shapes = scene.shapes
    out = []
    if skill == "count":
        for kind in KINDS:
            n = sum(s.kind == kind for s in shapes)
            there = f"there is {NUMBERS[n]}" if n == 1 else f"there are {NUMBERS[n]}"
            out.append((f"How many {kind}s are there?", f"In the image, {there} {kind if n == 1 else kind + 's'}.", there))
    elif skill == "color":
        for kind in KINDS:
            matching = [s for s in shapes if s.kind == kind]
            if len(matching) == 1:
                out.append((f"What color is the {kind}?", f"In the image, the {kind} is {matching[0].color}.", f"is {matching[0].color}"))
    elif skill == "shape":
        for s in shapes:
            if sum(t.color == s.color for t in shapes) == 1:
                out.append((f"What shape is the {s.color} object?", f"In the image, the {s.color} object is a {s.kind}.", f"is a {s.kind}"))
    elif skill == "position":
        for s in shapes:
            if sum(t.kind == s.kind and t.color == s.color for t in shapes) == 1:
                out.append((f"Where is the {s.color} {s.kind}?", f"In the image, the {s.color} {s.kind} is {s.place}.", f"is {s.place}"))
    elif skill == "yesno":
        present = {(s.color, s.kind) for s in shapes}
        absent = [(c, k) for c in COLORS for k in KINDS if (c, k) not in present]
        color, kind = rng.choice(sorted(present)) if rng.random() < 0.5 or not absent else rng.choice(absent)
        if (color, kind) in present:
            out.append((f"Is there a {color} {kind} in the image?", f"Yes, there is a {color} {kind} in the image.", "yes"))
        else:
            out.append((f"Is there a {color} {kind} in the image?", f"No, there is no {color} {kind} in the image.", "no"))
    elif skill == "unanswerable":
        out.append((rng.choice(UNANSWERABLE), DECLINE, ""))
    else:
        raise ValueError(f"unknown visual skill {skill!r}")
    return out


def plain(target: str) -> str:
    """A visual answer without LLaVA's "In the image," and "in the image": how the base LM
    answers about a scene it is told about."""
    text = target.removeprefix("In the image, ").replace(" in the image", "")
    return text[:1].upper() + text[1:]


def described_item(rng: random.Random, skill: str, size: int) -> VisualItem:
    """A text-only question about a scene given in words (its caption): the base LM's reading
    skill, as a real LLM answers about a situation it is told. No image; the answer is the
    visual answer without the image's words, and a question nothing in the words can answer
    gets "The description does not say.". ``retell`` asks for the scene back: the caption."""
    if skill == "retell":
        scene = random_scene(rng, size)
        text = caption(scene)
        return VisualItem(scene, f"{rng.choice(DESCRIBED).format(caption=text)} {rng.choice(RETELL)}", text[:1].upper() + text[1:] + ".", "", "described_retell")
    item = visual_item(rng, skill, size)
    told = rng.choice(DESCRIBED).format(caption=caption(item.scene))
    question = f"{told} {item.question.replace(' in the image', '')}"
    if skill == "unanswerable":
        return VisualItem(item.scene, question, NOT_SAID, "", "described_unanswerable")
    return VisualItem(item.scene, question, plain(item.target), item.answer, f"described_{skill}")


@dataclass(frozen=True)
class VisualChat:
    """Questions about one scene in one conversation, the image with the first (LLaVA-1.5
    merges the questions of an image into one conversation); ``skills`` names each turn's."""

    scene: Scene
    turns: tuple[tuple[str, str], ...]
    skills: tuple[str, ...]


def visual_chat(rng: random.Random, size: int, turns: int, extras: dict[str, float], off_image: list[str]) -> VisualChat:
    """A new scene and ``turns`` questions about it of different skills; each turn is instead,
    with the probabilities in ``extras``, a request for a description (``describe``) or a
    language question about the picture answered with the decline (``off_image``: LLaVA-1.5's
    VizWiz-style data teaches that when the image does not hold the answer, it says so)."""
    scene = random_scene(rng, size)
    said: list[tuple[str, str]] = []
    skills: list[str] = []
    for skill in rng.sample(VISUAL_SKILLS, len(VISUAL_SKILLS)):
        if len(said) == turns:
            break
        draw_ = rng.random()
        if draw_ < extras["describe"]:
            said.append((rng.choice(DESCRIBE_PROMPTS), description(scene)))
            skills.append("describe")
        elif draw_ < extras["describe"] + extras["off_image"]:
            said.append((rng.choice(off_image), DECLINE))
            skills.append("off_image")
        elif found := questions(scene, skill, rng):
            question, target, _ = rng.choice(found)
            said.append((question, target))
            skills.append(skill)
    return VisualChat(scene, tuple(said), tuple(skills))


def visual_item(rng: random.Random, skill: str, size: int) -> VisualItem:
    """A new scene with one question of ``skill`` about it."""
    while True:
        scene = random_scene(rng, size)
        found = questions(scene, skill, rng)
        if found:
            question, target, answer = rng.choice(found)
            return VisualItem(scene, question, target, answer, skill)


def caption_item(rng: random.Random, size: int) -> VisualItem:
    scene = random_scene(rng, size)
    return VisualItem(scene, rng.choice(CAPTION_PROMPTS), caption(scene)[:1].upper() + caption(scene)[1:] + ".", "", "caption")

