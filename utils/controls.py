"""The one table of decoding controls, and the two rules every front end shares.

The notebook explorer (`widgets.py`) and the web demo (`serve.py` and its page) are built from `CONTROLS`:
each knob's label, range, step and first value are stated here only; which decoding methods read a setting is
DecodeConfig's to say (`config.READ_BY`). The page's JavaScript receives the table as JSON from the server.

- `decode_from_controls(method, values, base)`: the values a front end's knobs hold -> a `DecodeConfig`;
- `caption_call(decode)`: a `DecodeConfig` -> the `captioner.caption(...)` call that gives the same captions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

from .config import READ_BY, DecodeConfig, DecodeConfigError, decode_config, reads

METHODS = {"greedy": "the likeliest word at each step", "beam": "keeps the best few captions so far",
           "sample": "draws each word at random"}


@dataclass(frozen=True)
class Control:
    """One decoding setting (a `DecodeConfig` field) that depends on the method."""

    field: str  # the DecodeConfig field it sets
    label: str  # what the page and the explorer call it
    kind: type  # int | float: a value is read as this
    low: float  # a knob, and a request to the demo, stay within [low, high]
    high: float
    step: float
    default: float | None = None  # the knob's first value where the settings it starts from hold DecodeConfig's
    # default (None: that default itself)
    knob: bool = True  # shown on the page and in the explorer (False: set in code or with its CLI flag)
    widget: str = "slider"  # slider | number (a box to type in: the seed)

    @property
    def methods(self) -> tuple[str, ...]:
        """The decoding methods that read it (DecodeConfig says); the others grey it out and never pass it."""
        return READ_BY[self.field]


CONTROLS: dict[str, Control] = {c.field: c for c in (
    Control("temperature", "temperature", float, 0.05, 2.0, 0.05),
    Control("top_p", "top-p", float, 0.05, 1.0, 0.05),
    Control("num_beams", "beams", int, 1, 10, 1),
    Control("num_return_sequences", "captions", int, 1, 10, 1, default=3),
    Control("seed", "seed", int, 0, 2**31 - 1, 1, default=0, widget="number"),
    Control("length_penalty", "length penalty", float, -2.0, 2.0, 0.1, knob=False),
    Control("top_k", "top-k", int, 0, 200, 1, knob=False),
)}
KNOBS = {field: c for field, c in CONTROLS.items() if c.knob}  # the controls the page and the explorer show


def start_values(base: DecodeConfig | None = None) -> dict:
    """Each knob's first value: `base`'s setting, or the table's default where `base` keeps DecodeConfig's."""
    default = DecodeConfig()
    base = base or default
    values = {}
    for field, c in KNOBS.items():
        value = getattr(base, field)
        if value == getattr(default, field) and c.default is not None:
            value = c.default
        values[field] = value
    return values


def table_json() -> dict:
    """The table as plain data, for the page's JavaScript: methods, and per knob its label, range and methods."""
    return {"methods": METHODS,
            "knobs": {field: {"label": c.label, "kind": c.kind.__name__, "low": c.low, "high": c.high,
                              "step": c.step, "methods": list(c.methods), "widget": c.widget}
                      for field, c in KNOBS.items()}}


def parse_value(control: Control, value) -> float | int:
    """A knob's value (a number, or the text a form sent) as its kind, within its range; DecodeConfigError
    saying what is wrong otherwise."""
    try:
        number = control.kind(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise DecodeConfigError(f"{control.label} must be a{' whole' if control.kind is int else ''} number, "
                                f"not {value!r}") from None
    if not control.low <= number <= control.high:
        raise DecodeConfigError(f"{control.label} must be between {control.low:g} and {control.high:g}, "
                                f"not {number:g}")
    return number


def decode_from_controls(method: str, values: Mapping, base: DecodeConfig | None = None) -> DecodeConfig:
    """The DecodeConfig that knobs holding `values` (field -> number or text) ask for on top of `base`.

    Only the knobs `method` reads are read (the others are greyed out); a knob left empty or absent keeps
    `base`'s setting. Beam search returns at most num_beams captions, and greedy decoding one, so the
    captions knob is cut to that. DecodeConfigError says what is wrong with a value.
    """
    base = base or DecodeConfig()
    given = {"method": method}
    for field, c in KNOBS.items():
        if method not in c.methods:
            continue
        value = values.get(field)
        if value is None or (isinstance(value, str) and not value.strip()):
            value = getattr(base, field)
        given[field] = value if value is None else parse_value(c, value)
    if method == "beam":
        given["num_return_sequences"] = min(given["num_return_sequences"], given["num_beams"])
    given.setdefault("num_return_sequences", 1)
    return decode_config(base, **given)


def caption_call(decode: DecodeConfig, images: str = "[image]") -> str:
    """The Python call that gives the same captions as `decode`: the method, the knobs it reads, and every
    other setting it reads that is not DecodeConfig's default (max_new_tokens, repetition_penalty, ...)."""
    default = DecodeConfig()
    settings = {"method": decode.method}
    for f in dataclasses.fields(DecodeConfig):
        value = getattr(decode, f.name)
        if f.name == "method" or not reads(decode.method, f.name):
            continue
        if f.name in KNOBS or value != getattr(default, f.name):
            settings[f.name] = value
    return f"captioner.caption({images}, " + ", ".join(f"{k}={v!r}" for k, v in settings.items()) + ")"
