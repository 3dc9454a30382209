"""The one table of decoding controls: METHOD_ONLY, the knobs' values -> DecodeConfig, and the call text."""

from __future__ import annotations

import ast

import pytest

from utils.config import DECODE_METHODS, METHOD_ONLY, DecodeConfig, DecodeConfigError, decode_config
from utils.controls import CONTROLS, KNOBS, METHODS, caption_call, decode_from_controls, start_values


def call_settings(text: str) -> dict:
    """The keyword arguments of a `captioner.caption([image], ...)` call text."""
    call = ast.parse(text, mode="eval").body
    assert ast.unparse(call.func) == "captioner.caption" and ast.unparse(call.args[0]) == "[image]"
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords}


def test_method_only_is_built_from_the_table():
    assert METHOD_ONLY == {"num_beams": "beam", "length_penalty": "beam", "temperature": "sample", "top_k": "sample",
                           "top_p": "sample"}
    assert tuple(METHODS) == DECODE_METHODS
    assert all(set(c.methods) <= set(DECODE_METHODS) for c in CONTROLS.values())
    with pytest.raises(DecodeConfigError, match="top_p only applies to method 'sample'"):
        decode_config(method="beam", top_p=0.9)


def test_every_knob_starts_within_its_range():
    for field, value in start_values().items():
        c = KNOBS[field]
        assert c.low <= value <= c.high and isinstance(value, c.kind), field
    assert start_values(DecodeConfig(method="beam", num_beams=4, num_return_sequences=2))["num_return_sequences"] == 2


@pytest.mark.parametrize("method, values, decode", [
    ("greedy", {"temperature": 0.5, "num_beams": 3, "num_return_sequences": 4}, DecodeConfig()),
    ("beam", {"num_beams": "3", "num_return_sequences": "5"}, DecodeConfig(method="beam", num_beams=3,
                                                                          num_return_sequences=3)),
    ("sample", {"temperature": "0.7", "top_p": 0.9, "num_return_sequences": 4, "seed": "5", "num_beams": 99},
     DecodeConfig(method="sample", temperature=0.7, top_p=0.9, num_return_sequences=4, seed=5)),
    ("sample", {"temperature": " ", "num_return_sequences": 2}, DecodeConfig(method="sample", num_return_sequences=2)),
])
def test_knob_values_make_the_decode_config_the_method_reads(method, values, decode):
    assert decode_from_controls(method, values) == decode


@pytest.mark.parametrize("method, values, message", [
    ("sample", {"temperature": "warm"}, "temperature must be a number, not 'warm'"),
    ("beam", {"num_beams": 50}, "beams must be between 1 and 10, not 50"),
    ("beam", {"num_beams": "2.5"}, "beams must be a whole number, not '2.5'"),
    ("sample", {"top_p": 0}, "top-p must be between 0.05 and 1, not 0"),
    ("magic", {}, "method must be one of greedy, beam, sample"),
])
def test_a_knob_value_out_of_the_table_is_refused_saying_why(method, values, message):
    with pytest.raises(DecodeConfigError, match=message):
        decode_from_controls(method, values)


@pytest.mark.parametrize("decode", [
    DecodeConfig(), DecodeConfig(method="beam", num_beams=3, num_return_sequences=2, length_penalty=1.5),
    DecodeConfig(method="sample", temperature=0.7, top_k=20, num_return_sequences=3, seed=1),
    DecodeConfig(method="sample", seed=None, max_new_tokens=12, repetition_penalty=1.3, stop_at_period=True),
    DecodeConfig(method="greedy", no_repeat_ngram_size=2),
])
def test_the_call_text_gives_the_same_decode_config(decode):
    text = caption_call(decode)
    assert decode_config(**call_settings(text)) == decode, text


def test_the_call_text_names_the_knobs_the_method_reads_and_nothing_it_ignores():
    assert caption_call(DecodeConfig()) == "captioner.caption([image], method='greedy')"
    assert caption_call(DecodeConfig(method="sample", temperature=0.7, num_return_sequences=3, seed=1)) == (
        "captioner.caption([image], method='sample', temperature=0.7, top_p=1.0, num_return_sequences=3, seed=1)")
    assert caption_call(DecodeConfig(method="beam", num_beams=3, num_return_sequences=3)) == (
        "captioner.caption([image], method='beam', num_beams=3, num_return_sequences=3)")
