"""Random captioned scenes of simple shapes: the world the ``demo`` model was trained on.

A scene is a flat background colour with one to three shapes (circle, square, triangle), each with
a named colour, a size (small or large) and a position (left, right, top, bottom or centre). Its
caption says so in plain English::

    >>> Scene.from_seed(4).caption()
    'a large red circle at the bottom on a yellow background'
    >>> Scene.from_seed(1).caption()
    'a small black square on the left and a small red square at the top on a blue background'

Everything is deterministic from a seed, so the data is unlimited and needs no download. Scenes
draw at any size; coordinates are fractions of the image side.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 220, 30),
    "orange": (245, 135, 20),
    "purple": (135, 45, 185),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")

# Centre of a shape at each position, as fractions of the image side.
_ANCHORS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "centre": (0.5, 0.5)}
# Radius range per size, as a fraction of the side: small is ~6 px, large ~12 px at 64x64.
_RADII = {"small": (0.085, 0.11), "large": (0.17, 0.21)}
_JITTER = 0.04  # how far a shape may wander from its anchor, so positions are regions, not points
_PHRASES = {
    "left": ("on the left",),
    "right": ("on the right",),
    "top": ("at the top",),
    "bottom": ("at the bottom",),
    # Both spellings are taught, so either works in a prompt.
    "centre": ("in the centre", "in the center"),
}
_SUPERSAMPLE = 4  # draw 4x larger and downsample: smooth edges, as a real image would have


@dataclass(frozen=True)
class Shape:
    """One shape: what it is, and where it is (centre and radius as fractions of the image side)."""

    kind: str
    colour: str
    size: str
    position: str
    x: float
    y: float
    radius: float

    def phrase(self, rng: random.Random | None = None, *, size: bool = True, position: bool = True) -> str:
        """'a large red circle on the left' (size and position words optional)."""
        words = [self.size] if size else []
        words += [self.colour, self.kind]
        text = " ".join([_article(words[0]), *words])
        if position:
            choices = _PHRASES[self.position]
            text += " " + (rng.choice(choices) if rng is not None else choices[0])
        return text


@dataclass(frozen=True)
class Scene:
    """A background colour and one to three shapes, drawn in order."""

    background: str
    shapes: tuple[Shape, ...]

    @classmethod
    def from_seed(cls, seed: int) -> Scene:
        """The scene of ``seed``: the same on every machine and Python version."""
        return random_scene(random.Random(seed))

    def caption(self, rng: random.Random | None = None, *, omit: float = 0.0) -> str:
        """The scene in words: every attribute, or with ``rng``, each of them left out with chance ``omit``.

        Captions that leave attributes out teach the model to fill them in itself, so that
        "a red circle" works as well as "a small red circle in the centre on a blue background".
        """

        def keep() -> bool:
            return rng is None or rng.random() >= omit

        parts = [s.phrase(rng, size=keep(), position=keep()) for s in self.shapes]
        text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        if keep():
            text += f" on {_article(self.background)} {self.background} background"
        return text

    def render(self, size: int = 64) -> Image.Image:
        """The scene as an RGB image of ``size`` x ``size`` pixels."""
        big = size * _SUPERSAMPLE
        image = Image.new("RGB", (big, big), COLOURS[self.background])
        draw = ImageDraw.Draw(image)
        for s in self.shapes:
            cx, cy, r = s.x * big, s.y * big, s.radius * big
            fill = COLOURS[s.colour]
            if s.kind == "circle":
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
            elif s.kind == "square":
                h = 0.886 * r  # the square's area equals the circle's
                draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
            else:
                # An upright equilateral triangle around (cx, cy), a little larger so its area is not tiny.
                R = 1.25 * r
                draw.polygon(
                    [(cx, cy - R), (cx + 0.866 * R, cy + 0.5 * R), (cx - 0.866 * R, cy + 0.5 * R)],
                    fill=fill,
                )
        return image.resize((size, size), Image.Resampling.BOX)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def random_scene(rng: random.Random) -> Scene:
    """A random scene: 1-3 shapes at distinct positions, each a colour other than the background's."""
    background = rng.choice(list(COLOURS))
    count = rng.choices((1, 2, 3), weights=(0.45, 0.35, 0.2))[0]
    positions = rng.sample(POSITIONS, count)
    shapes = []
    for position in positions:
        size = rng.choice(SIZES)
        ax, ay = _ANCHORS[position]
        shapes.append(
            Shape(
                kind=rng.choice(SHAPES),
                colour=rng.choice([c for c in COLOURS if c != background]),
                size=size,
                position=position,
                x=ax + rng.uniform(-_JITTER, _JITTER),
                y=ay + rng.uniform(-_JITTER, _JITTER),
                radius=rng.uniform(*_RADII[size]),
            )
        )
    return Scene(background, tuple(shapes))


def caption_words() -> list[str]:
    """Every word a caption can contain (and ``,``), for a word-level tokenizer."""
    words = {"a", "an", "and", "on", "background", ","}
    words |= set(COLOURS) | set(SHAPES) | set(SIZES)
    for phrases in _PHRASES.values():
        for phrase in phrases:
            words |= set(phrase.split())
    return sorted(words)
