"""The embedded dataset: generated, so the course runs with no download at all.

Each 64x64 image shows one shape whose shape, colour, position, size and background its three captions
state, so a model can be seen to learn them, and `embedded_attributes` reads those back from a caption.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .files import read_json, write_json, write_text


EMBEDDED_ATTRIBUTES: dict[str, list[str]] = {
    "shape": ["circle", "square", "triangle", "star", "cross"],
    "colour": ["red", "green", "blue", "yellow", "purple", "orange"],
    "position": ["left", "right", "top", "bottom", "centre"],
    "size": ["small", "large"],
    "background": ["light", "dark"],
}
_EMBEDDED_VERSION = 1  # bump when the drawing or the captions change, so old copies are regenerated
_SIDE, _SCALE = 64, 4  # drawn at 4x and reduced: smooth edges
_COLOUR_RGB = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 90, 230),
               "yellow": (240, 205, 30), "purple": (145, 60, 190), "orange": (250, 135, 20)}
_BACKGROUND_RGB = {"light": (236, 236, 230), "dark": (30, 30, 38)}
_CENTRE = {"left": (17, 32), "right": (47, 32), "top": (32, 17), "bottom": (32, 47), "centre": (32, 32)}
_RADIUS = {"small": 7, "large": 13}
_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_WHERE_WORDS = {
    "left": ("on the left", "at the left of the picture", "on the left side"),
    "right": ("on the right", "at the right of the picture", "on the right side"),
    "top": ("at the top", "at the top of the picture", "near the top edge"),
    "bottom": ("at the bottom", "at the bottom of the picture", "near the bottom edge"),
    "centre": ("in the centre", "in the middle of the picture", "right in the middle"),
}
_BACKGROUND_WORDS = {"light": ("on a light background", "against a pale background"),
                     "dark": ("on a dark background", "against a black background")}
_TEMPLATES = (
    "a {size} {colour} {shape} {where} {background}.",
    "A {colour} {shape}, {size}, sits {where} {background}.",
    "There is a {size} {colour} {shape} {where} {background}.",
    "A picture of a {size} {colour} {shape} {where}, {background}.",
    "The {shape} is {colour} and {size}; it is {where} {background}.",
    "One {size} {colour} {shape} {where} {background}.",
)


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + 0.95 * r, cy + 0.8 * r), (cx - 0.95 * r, cy + 0.8 * r)]
    if shape == "star":
        return [(cx + (r if k % 2 == 0 else 0.42 * r) * math.cos(math.pi * (k / 5 - 0.5)),
                 cy + (r if k % 2 == 0 else 0.42 * r) * math.sin(math.pi * (k / 5 - 0.5))) for k in range(10)]
    w = 0.33 * r  # cross: half the width of an arm
    return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
            (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
            (cx - r, cy - w), (cx - w, cy - w)]


def _draw_embedded(attrs: dict[str, str], dx: int, dy: int, dr: int) -> bytes:
    big = Image.new("RGB", (_SIDE * _SCALE,) * 2, _BACKGROUND_RGB[attrs["background"]])
    draw = ImageDraw.Draw(big)
    cx, cy = ((c + d) * _SCALE for c, d in zip(_CENTRE[attrs["position"]], (dx, dy)))
    r = (_RADIUS[attrs["size"]] + dr) * _SCALE
    fill = _COLOUR_RGB[attrs["colour"]]
    if attrs["shape"] == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif attrs["shape"] == "square":
        h = 0.85 * r
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    else:
        draw.polygon(_shape_points(attrs["shape"], cx, cy, r), fill=fill)
    out = io.BytesIO()
    big.resize((_SIDE, _SIDE), Image.Resampling.BOX).save(out, format="PNG")
    return out.getvalue()


def _embedded_caption(template: str, attrs: dict[str, str], rng: np.random.Generator) -> str:
    def pick(options: tuple[str, ...]) -> str:
        return options[int(rng.integers(len(options)))]

    text = template.format(size=pick(_SIZE_WORDS[attrs["size"]]), colour=attrs["colour"], shape=attrs["shape"],
                           where=pick(_WHERE_WORDS[attrs["position"]]),
                           background=pick(_BACKGROUND_WORDS[attrs["background"]]))
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)  # "a orange" -> "an orange"


def make_embedded(dest: str | Path, n_images: int = 1200, seed: int = 0) -> Path:
    """Generate the offline teaching set in `dest` (images/*.png, captions.csv, README.txt, meta.json).

    Each 64x64 image shows one shape whose shape, colour, position, size and background its three
    captions state, so a model can be seen to learn them. Deterministic in (n_images, seed); returns at
    once when `dest` already holds that set. meta.json is written last: it marks the set complete.
    """
    dest = Path(dest)
    meta = {"n_images": n_images, "seed": seed, "version": _EMBEDDED_VERSION}
    meta_path = dest / "meta.json"
    if (dest / "captions.csv").is_file() and meta_path.is_file() and read_json(meta_path) == meta:
        return dest
    meta_path.unlink(missing_ok=True)  # an interrupted regeneration must not look complete
    images = dest / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    writer.writerow(["image", "caption"])
    for i in range(n_images):
        attrs = {name: values[int(rng.integers(len(values)))] for name, values in EMBEDDED_ATTRIBUTES.items()}
        dx, dy = (int(v) for v in rng.integers(-2, 3, size=2))  # jitter: no two images alike
        dr = int(rng.integers(-1, 2))
        name = f"{i:05d}.png"
        tmp = images / f".{name}.tmp-{os.getpid()}"
        tmp.write_bytes(_draw_embedded(attrs, dx, dy, dr))
        os.replace(tmp, images / name)  # whole files only, even when two processes generate at once
        for t in rng.choice(len(_TEMPLATES), size=3, replace=False):
            writer.writerow([name, _embedded_caption(_TEMPLATES[t], attrs, rng)])
    write_text(dest / "README.txt",
               "A synthetic teaching set generated by utils.embedded.make_embedded: 64x64 images of one coloured\n"
               "shape, each with three captions naming its shape, colour, position, size and background.\n"
               "It lets the course run with no download; it is not a benchmark. Delete this folder to regenerate.\n")
    write_text(dest / "captions.csv", rows.getvalue())
    write_json(meta_path, meta)
    return dest


def embedded_attributes(caption: str) -> dict[str, str | None]:
    """Read back which shape, colour, position, size and background a caption of the embedded set states.

    The course uses it to score captions of the embedded set by meaning rather than wording: any of the
    templates and synonyms counts, a missing or wrong attribute does not.
    """
    text = " " + " ".join(re.sub(r"([,.;:!?])", r" \1 ", caption.lower()).split()) + " "
    phrases = {
        "shape": {v: (v,) for v in EMBEDDED_ATTRIBUTES["shape"]},
        "colour": {v: (v,) for v in EMBEDDED_ATTRIBUTES["colour"]},
        "size": _SIZE_WORDS,
        "position": _WHERE_WORDS,
        "background": {k: tuple(p.split(" ", 1)[1] for p in v) for k, v in _BACKGROUND_WORDS.items()},
    }
    found: dict[str, str | None] = {}
    for attribute, options in phrases.items():
        # longest phrase first: "right in the middle" is the centre, not the right
        candidates = sorted(((p, value) for value, ps in options.items() for p in ps), key=lambda x: -len(x[0]))
        found[attribute] = next((value for p, value in candidates if f" {p} " in text), None)
    return found
