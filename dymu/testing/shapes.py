"""The tiny model's task: coloured shapes on a plain background, and what to ask about them.

Why: random weights answer with noise, so nothing could tell whether merging tokens kept what the
model knows. The embedded tiny model is trained on this task (`scripts/train_tiny.py`), which
needs the image (colour, shape and number of the objects), and every cell scores it on a fixed
test set, stock and DyMU, so an accuracy change shows up as a number.

Pictures use integer numpy arithmetic and `default_rng` draws only, so every numpy/Pillow stack
draws the same pixels. Objects sit in distinct cells of a 2 x 2 grid, so they never overlap and
the count is always visible.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 38, 38),
    "green": (34, 160, 60),
    "blue": (40, 72, 220),
    "yellow": (232, 204, 30),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = ("one", "two", "three")
IMAGE_SIZE = 112  # the tiny model's input size: no resize, so the pixels the tower sees are these
GRID = 2  # objects sit in distinct cells of a GRID x GRID grid: 17-24 px radius, 3-4 patches across

# question kind -> question; "describe" wants all three attributes in one phrase
QUESTIONS: dict[str, str] = {
    "color": "What color are the shapes?",
    "shape": "What shape are they?",
    "count": "How many shapes are there?",
    "describe": "What is shown in this image?",
}
ATTRIBUTE_OPTIONS: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "count": COUNT_WORDS,
}
# the multiple-choice (MMBench-format) questions, one per attribute; answered with the option letter
CHOICE_QUESTIONS: dict[str, str] = {
    "color": "What color are the objects?",
    "shape": "Which shape is shown?",
    "count": "How many objects are in the image?",
}


@dataclass(frozen=True)
class Scene:
    """What a picture shows: `count` objects of one colour and one shape."""

    color: str
    shape: str
    count: int

    def answer(self, kind: str) -> str:
        """The expected answer to `QUESTIONS[kind]` (lowercase words, no punctuation)."""
        if kind == "color":
            return self.color
        if kind == "shape":
            return self.shape
        if kind == "count":
            return COUNT_WORDS[self.count - 1]
        if kind == "describe":
            noun = self.shape + ("s" if self.count > 1 else "")
            return f"{COUNT_WORDS[self.count - 1]} {self.color} {noun}"
        raise ValueError(f"unknown question kind {kind!r}; expected one of {', '.join(QUESTIONS)}")


def _mask(shape: str, size: int, cy: int, cx: int, r: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    dy, dx = y - cy, x - cx
    if shape == "circle":
        return dy * dy + dx * dx <= r * r
    if shape == "square":
        half = (r * 4) // 5  # same area as the circle, roughly
        return (np.abs(dy) <= half) & (np.abs(dx) <= half)
    if shape == "triangle":  # apex up: width grows linearly from the apex to the base
        top, bottom = cy - r, cy + r
        return (y >= top) & (y <= bottom) & (2 * np.abs(dx) * (2 * r) <= (y - top) * (2 * r + 2))
    raise ValueError(f"unknown shape {shape!r}")


def draw(scene: Scene, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """One picture of `scene`: a light flat background, objects in distinct grid cells."""
    background = rng.integers(200, 256, size=3, dtype=np.int64)
    img = np.broadcast_to(background, (size, size, 3)).astype(np.int64).copy()
    cell = size // GRID
    cells = rng.permutation(GRID * GRID)[: scene.count]
    color = np.array(COLORS[scene.color], dtype=np.int64)
    for c in cells:
        row, col = divmod(int(c), GRID)
        r = int(rng.integers(cell // 4 + 3, cell // 2 - 3))
        jitter = cell // 2 - r - 1
        cy = row * cell + cell // 2 + int(rng.integers(-jitter, jitter + 1))
        cx = col * cell + cell // 2 + int(rng.integers(-jitter, jitter + 1))
        shade = color + rng.integers(-20, 21, size=3, dtype=np.int64)
        img[_mask(scene.shape, size, cy, cx, r)] = shade
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="RGB")


def choice_options(scene: Scene, kind: str, rng: np.random.Generator) -> tuple[dict[str, str], str]:
    """Shuffled options (3 or all of the attribute's values, the right one among them) and the
    right option's letter, for a multiple-choice question about `kind`."""
    values = list(ATTRIBUTE_OPTIONS[kind])
    right = scene.answer(kind)
    n = int(rng.integers(3, len(values) + 1))
    wrong = [v for v in values if v != right]
    picked = [right] + [wrong[i] for i in rng.permutation(len(wrong))[: n - 1]]
    picked = [picked[i] for i in rng.permutation(n)]
    options = {chr(ord("A") + i): v for i, v in enumerate(picked)}
    return options, next(k for k, v in options.items() if v == right)


def random_scene(rng: np.random.Generator) -> Scene:
    return Scene(
        color=list(COLORS)[int(rng.integers(len(COLORS)))],
        shape=SHAPES[int(rng.integers(len(SHAPES)))],
        count=int(rng.integers(1, len(COUNT_WORDS) + 1)),
    )


@dataclass(frozen=True)
class TaskItem:
    """One test question: picture, question kind and text, expected answer."""

    image: Image.Image
    scene: Scene
    kind: str
    question: str
    answer: str


def scenes(n: int, seed: int) -> Iterator[tuple[Scene, Image.Image]]:
    """`n` (scene, picture) pairs from one seeded stream."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        scene = random_scene(rng)
        yield scene, draw(scene, rng)


TEST_SEED = 20261129  # the training script draws from other seeds, so the test pictures are unseen


def test_set(
    n_images: int = 12, kinds: Sequence[str] = tuple(QUESTIONS), seed: int = TEST_SEED
) -> list[TaskItem]:
    """The fixed test set: every question kind about each of `n_images` unseen pictures."""
    return [
        TaskItem(image, scene, kind, QUESTIONS[kind], scene.answer(kind))
        for scene, image in scenes(n_images, seed)
        for kind in kinds
    ]


def normalize(text: str) -> str:
    """Lowercase words, punctuation dropped: how answers are compared."""
    kept = "".join(ch if ch.isalnum() or ch.isspace() else " " for ch in text.lower())
    return " ".join(kept.split())


def is_correct(answer: str, expected: str) -> bool:
    """Exact match after `normalize`: the model must say the answer and nothing else."""
    return normalize(answer) == normalize(expected)


def accuracy(answers: Sequence[str], items: Sequence[TaskItem]) -> float:
    """Share of `answers` that equal their item's expected answer."""
    if len(answers) != len(items):
        raise ValueError(f"{len(answers)} answers for {len(items)} items")
    if not items:
        raise ValueError("no items to score")
    return sum(is_correct(a, it.answer) for a, it in zip(answers, items, strict=True)) / len(items)


def accuracy_by_kind(answers: Sequence[str], items: Sequence[TaskItem]) -> dict[str, float]:
    """`accuracy` per question kind present in `items`, in `QUESTIONS` order."""
    if len(answers) != len(items):
        raise ValueError(f"{len(answers)} answers for {len(items)} items")
    pairs = list(zip(answers, items, strict=True))
    return {kind: accuracy([a for a, it in pairs if it.kind == kind], [it for _, it in pairs if it.kind == kind])
            for kind in QUESTIONS if any(it.kind == kind for it in items)}  # fmt: skip


SAMPLE_SCENES = (Scene("red", "circle", 2), Scene("blue", "square", 3), Scene("yellow", "triangle", 1))


def sample_pictures(n: int = len(SAMPLE_SCENES), seed: int = 7) -> list[tuple[Scene, Image.Image]]:
    """`dymu infer`'s default pictures: fixed scenes (then random ones past the first three)."""
    rng = np.random.default_rng(seed)
    chosen = [SAMPLE_SCENES[i] if i < len(SAMPLE_SCENES) else random_scene(rng) for i in range(n)]
    return [(scene, draw(scene, rng)) for scene in chosen]
