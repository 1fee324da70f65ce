"""The demo model's training data: scenes are deterministic, drawn as captioned, and tokenize word by word."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from sdgate.demo.scenes import COLOURS, POSITIONS, SHAPES, SIZES, Scene, Shape, caption_words, random_scene


def nearest_colour(rgb: np.ndarray) -> str:
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names], dtype=np.float64)
    return names[int(np.argmin(((palette - rgb) ** 2).sum(axis=1)))]


def test_same_seed_same_scene_and_pixels() -> None:
    a, b = Scene.from_seed(42), Scene.from_seed(42)
    assert a == b
    assert a.caption() == b.caption()
    assert np.array_equal(np.asarray(a.render()), np.asarray(b.render()))
    assert Scene.from_seed(43) != a


def test_scenes_cover_the_vocabulary() -> None:
    rng = random.Random(0)
    scenes = [random_scene(rng) for _ in range(2000)]
    shapes = [s for scene in scenes for s in scene.shapes]
    assert {s.kind for s in shapes} == set(SHAPES)
    assert {s.colour for s in shapes} == set(COLOURS)
    assert {s.size for s in shapes} == set(SIZES)
    assert {s.position for s in shapes} == set(POSITIONS)
    assert {scene.background for scene in scenes} == set(COLOURS)
    assert {len(scene.shapes) for scene in scenes} == {1, 2, 3}
    for scene in scenes:
        assert all(s.colour != scene.background for s in scene.shapes)  # every shape is visible
        assert len({s.position for s in scene.shapes}) == len(scene.shapes)


def test_caption_reads_as_plain_english() -> None:
    red = Shape("circle", "red", "large", "left", 0.25, 0.5, 0.2)
    blue = Shape("square", "blue", "small", "centre", 0.5, 0.5, 0.1)
    orange = Shape("triangle", "orange", "small", "top", 0.5, 0.25, 0.1)
    assert Scene("yellow", (red,)).caption() == "a large red circle on the left on a yellow background"
    assert (
        Scene("yellow", (red, blue)).caption()
        == "a large red circle on the left and a small blue square in the centre on a yellow background"
    )
    assert (
        Scene("orange", (red, blue, Shape("circle", "orange", "large", "top", 0.5, 0.25, 0.2))).caption()
        == "a large red circle on the left, a small blue square in the centre and a large orange circle "
        "at the top on an orange background"
    )
    # Attributes left out, for prompts that name fewer of them: always the colour and the shape.
    short = Scene("blue", (orange,)).caption(random.Random(0), omit=1.0)
    assert short == "an orange triangle"


def test_caption_words_are_exactly_the_words_captions_use() -> None:
    rng = random.Random(1)
    used: set[str] = set()
    for _ in range(3000):
        text = random_scene(rng).caption(rng, omit=0.25)
        used |= set(text.replace(",", " ,").split())
    assert used == set(caption_words())


@pytest.mark.parametrize("size", [64, 128])
def test_render_draws_each_shape_in_its_colour_at_its_place(size: int) -> None:
    scene = Scene(
        "blue",
        (
            Shape("circle", "red", "large", "left", 0.25, 0.5, 0.2),
            Shape("square", "white", "small", "right", 0.75, 0.5, 0.1),
            Shape("triangle", "yellow", "large", "bottom", 0.5, 0.75, 0.2),
        ),
    )
    img = np.asarray(scene.render(size), dtype=np.float64)
    assert img.shape == (size, size, 3)

    def at(x: float, y: float) -> str:
        return nearest_colour(img[int(y * size), int(x * size)])

    assert at(0.25, 0.5) == "red"
    assert at(0.75, 0.5) == "white"
    assert at(0.5, 0.75) == "yellow"
    assert at(0.02, 0.02) == at(0.5, 0.2) == "blue"
    # A large circle of radius 0.2 covers pi * 0.2^2 of the image: about 12.6%.
    red_share = np.mean([nearest_colour(px) == "red" for px in img.reshape(-1, 3)])
    assert red_share == pytest.approx(np.pi * 0.2**2, rel=0.1)


def test_tokenizer_spells_every_caption_word_as_one_token(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    from sdgate.demo.train import write_tokenizer_files

    write_tokenizer_files(tmp_path)
    tok = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    for word in caption_words():
        assert tok.tokenize(word) == [word + "</w>"]
    assert tok.tokenize("A Red Circle, in the center") == [
        "a</w>",
        "red</w>",
        "circle</w>",
        ",</w>",
        "in</w>",
        "the</w>",
        "center</w>",
    ]
    # Words it never saw still tokenize, in pieces, rather than as unknown.
    ids = tok("a red fox").input_ids
    assert tok.unk_token_id not in ids[1:-1]  # CLIP's unknown token is its end token
    assert tok.decode(ids, skip_special_tokens=True) == "a red fox"


def test_docstring_examples_hold() -> None:
    import doctest

    from sdgate.demo import scenes

    assert doctest.testmod(scenes).failed == 0
