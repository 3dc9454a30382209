"""The decoding explorer, driven as a student's clicks drive it: set a widget's value, then check which
decoding was asked for (explorer.calls) and that the captions shown are the captioner's own for it."""

from __future__ import annotations

import html
import io
import re
from datetime import datetime, timezone

import pytest
from PIL import Image

from utils.config import DecodeConfig, ModelConfig, RuntimeConfig
from utils.controls import KNOBS
from utils.features import load_cache
from utils.training_run import build_captioner
from utils.translate import STANDIN_LABEL, Translators
from utils.widgets import UPLOAD_LIMIT, DecodingExplorer

OFFLINE = RuntimeConfig(offline=True, device="cpu")


@pytest.fixture(scope="module")
def captioner(small_cache, models_dir):
    """An untrained stand-in captioner: gibberish captions, but each image and setting gets its own.
    (The MLP mapper keeps random prefixes apart; an untrained transformer mapper maps all to one.)"""
    import torch

    torch.manual_seed(0)
    model_cfg = ModelConfig(mapper="mlp", prefix_length=4, freeze="full", max_caption_tokens=12)
    captioner = build_captioner(model_cfg, load_cache(small_cache), OFFLINE).eval()
    captioner.image_encoder(models_dir)  # its stand-in CLIP, from this session's models
    return captioner


@pytest.fixture(scope="module")
def images(small_cache) -> dict[str, str]:
    test = load_cache(small_cache).images
    test = test[test["split"] == "test"].head(3)
    return dict(zip(test["image_id"], test["image_path"]))


@pytest.fixture(scope="module")
def translators(models_dir):
    return Translators(offline=True, models_dir=models_dir)


@pytest.fixture
def explorer(captioner, images, translators):
    return DecodingExplorer(captioner, images, translators=translators)


def shown(explorer) -> list[str]:
    """The captions the explorer shows, as text."""
    return [html.unescape(item) for item in re.findall(r"<li>(.*?)</li>", explorer.output.value, re.S)]


def expected(captioner, image, decode: DecodeConfig) -> list[str]:
    captions = captioner.caption([image], decode)[0]
    return [captions] if isinstance(captions, str) else captions


def test_starts_greedy_on_the_first_image(explorer, captioner, images):
    first = next(iter(images))
    assert explorer.calls == [(first, DecodeConfig())]
    assert shown(explorer) == expected(captioner, images[first], DecodeConfig())
    assert explorer.temperature.disabled and explorer.top_p.disabled and explorer.num_beams.disabled
    assert explorer.samples.disabled and bytes(explorer.picture.value).startswith(b"\x89PNG")


def test_beam_search_asks_for_the_beams_and_shows_its_best_captions(explorer, captioner, images):
    explorer.method.value = "beam"
    explorer.num_beams.value = 3
    explorer.samples.value = 2
    decode = DecodeConfig(method="beam", num_beams=3, num_return_sequences=2)
    assert explorer.calls[-1] == (next(iter(images)), decode)
    assert shown(explorer) == expected(captioner, next(iter(images.values())), decode)
    assert len(shown(explorer)) == 2
    assert not explorer.num_beams.disabled and explorer.temperature.disabled
    explorer.samples.value = 5  # more captions than beams: beam search returns at most num_beams
    assert explorer.calls[-1][1].num_return_sequences == 3


def test_sampling_reads_temperature_top_p_samples_and_seed(explorer, captioner, images):
    explorer.method.value = "sample"
    explorer.temperature.value = 0.7
    explorer.top_p.value = 0.9
    explorer.samples.value = 4
    explorer.seed.value = 5
    decode = DecodeConfig(method="sample", temperature=0.7, top_p=0.9, num_return_sequences=4, seed=5)
    assert explorer.calls[-1] == (next(iter(images)), decode)
    assert shown(explorer) == expected(captioner, next(iter(images.values())), decode)
    assert not explorer.temperature.disabled and explorer.num_beams.disabled
    assert "temperature=0.7" in explorer.settings.value


def test_picking_another_image_captions_that_image(explorer, captioner, images):
    name, path = list(images.items())[1]
    explorer.image.value = name
    assert explorer.calls[-1] == (name, DecodeConfig())
    assert shown(explorer) == expected(captioner, path, DecodeConfig())


def _upload(name: str, content: bytes) -> tuple[dict, ...]:
    """What ipywidgets 8 puts in FileUpload.value after a browser upload."""
    return ({"name": name, "type": "image/png", "size": len(content), "content": memoryview(content),
             "last_modified": datetime(2026, 1, 1, tzinfo=timezone.utc)},)


def test_an_uploaded_photo_joins_the_picker_and_is_captioned(explorer, captioner):
    photo = Image.new("RGB", (300, 200), (40, 90, 230))
    photo.paste((236, 236, 230), (0, 0, 150, 200))
    buf = io.BytesIO()
    photo.save(buf, format="PNG")
    explorer.method.value = "beam"
    explorer.upload.value = _upload("mine.png", buf.getvalue())
    assert explorer.image.value == "upload: mine.png" and "upload: mine.png" in explorer.image.options
    decode = DecodeConfig(method="beam", num_beams=5, num_return_sequences=3)
    assert explorer.calls[-1] == ("upload: mine.png", decode)
    assert shown(explorer) == expected(captioner, photo, decode)


def test_an_upload_that_is_not_an_image_is_named_not_captioned(explorer):
    before = (list(explorer.image.options), len(explorer.calls))
    explorer.upload.value = _upload("notes.png", b"these are not pixels")
    assert "notes.png" in explorer.output.value and "not an image" in explorer.output.value
    assert (list(explorer.image.options), len(explorer.calls)) == before


def test_the_widget_holds_every_control(explorer):
    box = explorer.widget()
    knobs = box.children[0].children
    for control in (explorer.image, explorer.upload, explorer.method, explorer.temperature, explorer.num_beams,
                    explorer.top_p, explorer.samples, explorer.seed):
        assert control in knobs


def test_the_knobs_are_the_table_of_decoding_controls(explorer):
    for field, c in KNOBS.items():
        knob = explorer.knobs[field]
        assert (knob.description, knob.min, knob.max) == (c.label, c.low, c.high)
        if c.widget == "slider":
            assert knob.step == c.step
    assert explorer.settings.value == "<code>captioner.caption([image], method=&#x27;greedy&#x27;)</code>"


def test_captions_translated_by_the_standin_say_so(explorer, translators):
    explorer.method.value = "sample"
    explorer.translate.value = "de"
    captions = shown(explorer)
    translator = translators["de"]
    assert translator.about in html.unescape(explorer.translation.value)
    lines = [html.unescape(t) for t in re.findall(r"<li>(.*?)</li>", explorer.translation.value, re.S)]
    assert lines == translator(captions) and all(line.startswith(STANDIN_LABEL) for line in lines)
    explorer.translate.value = ""
    assert explorer.translation.value == ""


def test_a_photo_too_large_to_upload_is_said_so_and_taken_by_its_path(explorer, captioner, tmp_path):
    import numpy as np

    assert f"up to {UPLOAD_LIMIT // 2**20} MB" in explorer.upload_note.value
    assert explorer.upload_note in explorer.widget().children[0].children
    noise = np.random.default_rng(0).integers(0, 256, (2100, 2100, 3), dtype=np.uint8)
    big = tmp_path / "big.png"
    Image.fromarray(noise).save(big, compress_level=1)
    assert big.stat().st_size > UPLOAD_LIMIT, "over the limit of a widget message"
    explorer.path.value = str(big)
    assert explorer.image.value == "file: big.png"
    assert shown(explorer) == expected(captioner, big, DecodeConfig())
    explorer.path.value = str(tmp_path / "missing.jpg")
    assert "missing.jpg" in explorer.output.value and "missing file" in explorer.output.value
