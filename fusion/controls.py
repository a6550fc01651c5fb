"""The controls that keep the behaviour bench from being fooled by a model that does not look.

A visual score alone cannot tell sight from a good prior: a model that answers "no" to every
"Is there a ...?" and "It cannot be determined" to every odd question scores well without
reading a pixel. So every image probe is also asked with a **blank** image (white, the same
size) and with **another probe's** image, and each reply is scored against the probe's own
answers. From these (docs/methods.md, "The bench's image controls"):

- *image-grounded accuracy*: the share of image probes a model answers right with their own
  image and not right with the blank image or not right with the other image: its answer
  depends on the picture, and is right for it. A model whose replies do not depend on the image
  scores exactly 0, whatever its visual accuracy;
- *blind guess*: the accuracy of answering every probe with its skill's most common answer,
  the best a model can do from the question alone, and the level its blank-image accuracy is
  compared with.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from PIL import Image

from .probes import Probe

CONTROLS = ("blank", "other")
# Below this image-grounded accuracy a model is reported as not reading its images.
READS_IMAGES = 0.05


def blank_like(image: Image.Image) -> Image.Image:
    """A white RGB image of the same size: nothing to see."""
    return Image.new("RGB", image.size, (255, 255, 255))


def other_index(probes: Sequence[Probe], i: int) -> int | None:
    """The probe whose image probe ``i`` is also shown: half the set further on (wrapping),
    then onward to the first whose image differs; None when every image is the same."""
    n = len(probes)
    for step in range(n // 2 or 1, n // 2 + n):
        j = (i + step) % n
        if probes[j].image != probes[i].image:
            return j
    return None


def grounded(record: dict[str, Any]) -> bool:
    """Right with its own image, and not right with the blank or with the other image."""
    controls = [record[c]["correct"] for c in CONTROLS if record.get(c) is not None]
    return bool(record["correct"] and controls and not all(controls))


def blind_guess(probes: Sequence[tuple[str, tuple[str, ...]]]) -> float:
    """For (skill, accepted answers) pairs, the share whose answers are their skill's most
    common ones: what answering each question from its skill alone gets at best. A probe whose
    right reply is a decline (no answers) counts as answered by a decline."""
    by_skill: dict[str, Counter[tuple[str, ...]]] = {}
    for skill, answers in probes:
        by_skill.setdefault(skill, Counter())[answers] += 1
    return sum(counts.most_common(1)[0][1] for counts in by_skill.values()) / len(probes)
