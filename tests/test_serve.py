"""The web demo: its app driven through Flask's test client, then `python -m utils serve` driven through a
real headless Chromium, each caption shown checked against the captioner's own for the same settings."""

from __future__ import annotations

import dataclasses
import html
import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from conftest import ROOT, cli_env, post, run_cli, stop
from utils.captioner import Captioner
from utils.config import DecodeConfig, RuntimeConfig, standin_preset
from utils.controls import KNOBS, table_json
from utils.features import load_cache
from utils.plots import figures_dir
from utils.records import DatasetError
from utils.serve import MAX_BYTES, bundle_title, create_app, folder_examples, validation_examples
from utils.training import train
from utils.translate import LANGUAGES, STANDIN_LABEL, TranslationError, Translators

CHROMIUM = Path("/usr/bin/chromium")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bundle(small_cache, data_dir, tmp_path_factory) -> Path:
    """A stand-in captioner trained for 150 steps (10 s): few enough, yet its captions read as sentences,
    which the screenshot should show. Its bundle names the small cache, whose validation split is the gallery."""
    model_cfg, train_cfg = standin_preset()
    out = tmp_path_factory.mktemp("serve") / "embedded-mlp"
    return train(small_cache, dataclasses.replace(model_cfg, mapper="mlp"),
                 dataclasses.replace(train_cfg, max_steps=150, out_dir=str(out)),
                 RuntimeConfig(offline=True, device="cpu"), data_dir).bundle


@pytest.fixture(scope="module")
def captioner(bundle, models_dir):
    captioner = Captioner.from_pretrained(bundle)
    captioner.image_encoder(models_dir)  # its stand-in CLIP, from this session's models
    return captioner


@pytest.fixture(scope="module")
def translators(models_dir):
    return Translators(offline=True, models_dir=models_dir)


@pytest.fixture(scope="module")
def client(captioner, bundle, translators):
    return create_app(captioner, validation_examples(captioner), title=bundle_title(bundle),
                      translators=translators).test_client()


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def photo() -> Image.Image:
    image = Image.new("RGB", (300, 200), (40, 90, 230))
    image.paste((236, 236, 230), (0, 0, 150, 200))
    return image


def expected(captioner, image, decode: DecodeConfig) -> list[str]:
    captions = captioner.caption([image], decode)[0]
    return [captions] if isinstance(captions, str) else captions


# ------------------------------------------------------------------------------ the app, test client


def test_the_page_is_one_self_contained_file(client):
    page = client.get("/").get_data(as_text=True)
    for control in ('id="upload"', 'type="file"', 'value="greedy"', 'value="beam"', 'value="sample"',
                    'id="temperature"', 'id="top_p"', 'id="num_beams"', 'id="num_return_sequences"', 'id="seed"'):
        assert control in page
    assert page.count('<img src="data:image/png;base64,') == 12, "the gallery: 12 validation images, inline"
    assert "http://" not in page and "https://" not in page, "no asset from elsewhere: the demo works offline"
    assert "Stand-in model" in page and "embedded-mlp" in page


def test_the_pages_knobs_and_its_javascript_come_from_the_table_of_controls(client):
    page = client.get("/").get_data(as_text=True)
    for field, c in KNOBS.items():
        assert f'id="{field}" name="{field}" min="{c.low}"' in page and f'max="{c.high}"' in page
    sent = json.loads(re.search(r"const page = (\{.*\});", page).group(1))
    assert sent["controls"] == table_json(), "the page's JavaScript greys knobs out by the table, sent as JSON"
    script = re.sub(r"const page = .*;", "", re.split(r"<script[^>]*>", page)[1])
    assert not re.search(r"""["'](greedy|beam|sample|top_p|num_beams)["']""", script), "no copy of the table in JS"
    for code, language in LANGUAGES.items():
        assert f'<option value="{code}">{language}</option>' in page


def test_captions_translated_by_the_standin_say_so(client, captioner, translators):
    status, reply = post(client, (png(photo()), "mine.png"), method="beam", num_beams=3, num_return_sequences=2,
                         translate="de")
    assert status == 200 and len(reply["translations"]) == 2
    assert reply["translations"] == translators["de"](reply["captions"])
    assert all(t.startswith(STANDIN_LABEL) for t in reply["translations"])
    assert "not a translation" in reply["translated_by"]
    token = reply["token"]
    status, reply = post(client, token=token, translate=" DE")  # a code as the page sends it, in any case
    assert status == 200 and reply["translations"] == translators["de"](reply["captions"])
    assert set(translators._loaded) <= set(LANGUAGES), "one model per language offered, whatever its case"
    status, reply = post(client, token=token, translate="german!")  # the page offers no such choice
    assert status == 400 and "does not translate to 'german!': choose one of de (German), fr (French)" \
        in reply["error"]


def test_a_language_whose_model_cannot_load_still_gets_its_captions(captioner):
    class NoModels(Translators):  # as where sentencepiece is missing or the hub cannot be reached
        def __getitem__(self, lang):
            raise TranslationError(f"no translation model for {LANGUAGES[lang]}")

    client = create_app(captioner, translators=NoModels()).test_client()
    status, reply = post(client, (png(photo()), "mine.png"), translate="fr")
    assert status == 200 and reply["captions"] and "translations" not in reply
    assert reply["translate_error"] == "no translation model for French"


def test_an_upload_gets_the_captioners_own_captions_for_each_setting(client, captioner):
    status, reply = post(client, (png(photo()), "mine.png"), method="beam", num_beams=3, num_return_sequences=2)
    assert status == 200 and reply["name"] == "mine.png" and reply["preview"].startswith("data:image/png;base64,")
    assert reply["captions"] == expected(captioner, photo(), DecodeConfig(method="beam", num_beams=3,
                                                                          num_return_sequences=2))
    assert reply["call"] == "captioner.caption([image], method='beam', num_beams=3, num_return_sequences=2)"
    token = reply["token"]  # the same image under other settings: only the LM runs again
    status, reply = post(client, token=token, method="sample", temperature=0.7, top_p=0.9, num_return_sequences=4,
                         seed=5, num_beams=99)  # a knob the method does not read is not read
    decode = DecodeConfig(method="sample", temperature=0.7, top_p=0.9, num_return_sequences=4, seed=5)
    assert status == 200 and DecodeConfig(**reply["decode"]) == decode
    assert reply["captions"] == expected(captioner, photo(), decode) and len(reply["captions"]) == 4
    status, reply = post(client, token=token, method="beam", num_beams=2, num_return_sequences=5)
    assert len(reply["captions"]) == 2, "beam search returns at most num_beams captions"
    status, reply = post(client, token=token, method="greedy", num_return_sequences=4)
    assert reply["captions"] == expected(captioner, photo(), DecodeConfig())
    assert reply["call"] == "captioner.caption([image], method='greedy')"


def test_a_large_jpeg_gets_the_same_captions_from_its_file_the_demo_and_the_explorer(client, captioner, translators,
                                                                                       tmp_path):
    from utils.widgets import DecodingExplorer

    big = photo().resize((2400, 1600))
    big.paste((230, 60, 40), (1500, 300, 2100, 900))
    path = tmp_path / "phone.jpg"
    big.save(path, quality=92)
    beam = DecodeConfig(method="beam", num_beams=3, num_return_sequences=3)
    from_file = expected(captioner, path, beam)
    status, reply = post(client, (path.read_bytes(), "phone.jpg"), method="beam", num_beams=3, num_return_sequences=3)
    assert status == 200 and reply["captions"] == from_file
    explorer = DecodingExplorer(captioner, {"phone": str(path)}, translators=translators)
    explorer.method.value = "beam"
    explorer.num_beams.value = 3
    assert explorer.calls[-1] == ("phone", beam)
    assert re.findall(r"<li>(.*?)</li>", explorer.output.value) == [html.escape(c) for c in from_file]


def test_a_gallery_image_is_captioned_as_its_file(client, captioner):
    name, path = next(iter(validation_examples(captioner).items()))
    status, reply = post(client, example=0)
    assert status == 200 and reply["name"] == name
    assert reply["captions"] == expected(captioner, path, DecodeConfig())


@pytest.mark.parametrize("content, reason", [(b"these are not pixels", "not an image"), (b"", "zero bytes"),
                                             (png(photo())[:300], "truncated PNG")])
def test_a_bad_upload_gets_a_clear_message_and_the_server_goes_on(client, captioner, content, reason):
    _, good = post(client, (png(photo()), "mine.png"))
    status, reply = post(client, (content, "notes.png"))
    assert status == 400 and f"notes.png cannot be captioned: {reason}" in reply["error"]
    assert "Upload a photo (JPEG, PNG" in reply["error"] and "10 MB" in reply["error"]
    status, again = post(client, token=good["token"])
    assert status == 200 and again["captions"] == good["captions"]


def test_too_large_uploads_are_refused_before_they_are_decoded(captioner):
    client = create_app(captioner, max_bytes=20_000, max_pixels=100 * 100).test_client()
    status, reply = post(client, (os.urandom(30_000), "huge.jpg"))
    assert status == 413 and "MB limit: shrink the photo" in reply["error"]
    status, reply = post(client, (png(photo()), "wide.png"))  # small file, too many pixels
    assert status == 400 and "300x200 pixels, over the limit of 0.01 megapixels" in reply["error"]
    status, reply = post(client, (png(photo().resize((60, 40))), "small.png"))
    assert status == 200 and reply["captions"] == expected(captioner, photo().resize((60, 40)), DecodeConfig())


@pytest.mark.parametrize("fields, message", [
    ({"method": "sample", "temperature": "warm"}, "temperature must be a number, not 'warm'"),
    ({"method": "beam", "num_beams": 50}, "beams must be between 1 and 10, not 50"),
    ({"method": "sample", "top_p": 0}, "top-p must be between 0.05 and 1, not 0"),
    ({"method": "magic"}, "method must be one of greedy, beam, sample"),
    ({}, "Upload a photo or pick an example first"),
    ({"token": "0123456789abcdef"}, "no longer holds that image"),
    ({"example": 99}, "There is no example '99'"),
    ({"example": "²"}, "There is no example '²'"),  # a digit, but not a decimal one: int() refuses it
])
def test_requests_the_page_cannot_make_are_refused_saying_what_to_do(client, fields, message):
    status, reply = post(client, **fields)
    assert status == 400 and message in reply["error"]


def test_the_gallery_says_where_its_images_come_from(client, captioner, tmp_path):
    assert "12 validation images of the training data." in client.get("/").get_data(as_text=True)
    for colour in ("red", "navy"):
        Image.new("RGB", (64, 64), colour).save(tmp_path / f"{colour}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    examples = folder_examples(tmp_path)
    assert examples == {"navy.png": str(tmp_path / "navy.png"), "red.png": str(tmp_path / "red.png")}
    page = create_app(captioner, examples, examples_are=f"images of the folder {tmp_path}").test_client().get("/")
    assert f"2 images of the folder {tmp_path}." in page.get_data(as_text=True)


def test_a_bundle_naming_no_feature_cache_has_no_gallery(small_cache, monkeypatch):
    monkeypatch.chdir(small_cache)  # a cache in the current folder is not the bundle's
    assert validation_examples(SimpleNamespace(summary={})) == {}


def test_an_examples_folder_that_cannot_be_shown_is_refused_in_one_line(bundle, data_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"these are not pixels")
    for folder, message in [("missing", "no such folder"), ("empty", "it holds no image files (.jpg"),
                            ("broken", "none of its image files can be read (a.png: not an image")]:
        with pytest.raises(DatasetError, match=re.escape(f"--examples {tmp_path / folder}: {message}")):
            folder_examples(tmp_path / folder)
    proc = run_cli("serve", "--model", str(bundle), "--examples", str(tmp_path / "missing"), "--port", "0",
                   data_dir=data_dir, check=False, timeout=120)
    assert proc.returncode != 0 and proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"error: --examples {tmp_path / 'missing'}: no such folder")


# ------------------------------------------------------------------------- the server, a real browser


@pytest.fixture
def server(bundle, data_dir, tmp_path):
    """`python -m utils serve --port 0` on 127.0.0.1, as a user starts it: it binds a free port itself and
    prints its address (no port picked here that another program could take first); killed at the end."""
    log_path = tmp_path / "serve.log"
    env = cli_env(data_dir)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "utils", "serve", "--model", str(bundle), "--port", "0"],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    local = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        deadline = time.monotonic() + 180
        while not (printed := re.search(r"open (http://127\.0\.0\.1:\d+/)", log_path.read_text())):
            assert proc.poll() is None, f"serve exited ({proc.returncode}):\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"serve did not start in 180 s:\n{log_path.read_text()}"
            time.sleep(0.5)
        url = printed.group(1)
        local.open(url, timeout=60).close()  # it listens before it prints the address
        yield url
        assert proc.poll() is None, f"serve stopped during the test:\n{log_path.read_text()}"
    finally:
        stop(proc)


def shown(page, name: str, call: str) -> list[str]:
    """The captions on the page once it shows `name` captioned by `call`."""
    page.wait_for_function("([name, call]) => document.getElementById('name').textContent === name && "
                           "document.getElementById('call').textContent === call && "
                           "document.getElementById('captions').getAttribute('aria-busy') === 'false'",
                           arg=[name, call])
    return page.locator("#captions li .caption").all_inner_texts()


@pytest.mark.slow
def test_the_demo_in_a_real_browser(server, captioner, small_cache):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (see requirements.txt)")
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (course.sh does, where it may)")
    images = load_cache(small_cache).images
    upload = Path(images.loc[images["split"] == "test", "image_path"].iloc[0])
    first_name, first_path = next(iter(validation_examples(captioner).items()))
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"], timeout=60_000)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 820})
            page.set_default_timeout(60_000)
            page.goto(server)
            greedy = "captioner.caption([image], method='greedy')"  # the first example is captioned on load
            assert shown(page, first_name, greedy) == expected(captioner, first_path, DecodeConfig())

            page.set_input_files("#upload", upload)
            assert shown(page, upload.name, greedy) == expected(captioner, upload, DecodeConfig())
            assert page.is_disabled("#num_beams") and page.is_disabled("#temperature")

            page.check("input[name=method][value=beam]")
            page.fill("#num_beams", "3")
            beam = DecodeConfig(method="beam", num_beams=3, num_return_sequences=3)
            call = "captioner.caption([image], method='beam', num_beams=3, num_return_sequences=3)"
            assert shown(page, upload.name, call) == expected(captioner, upload, beam)
            assert page.is_enabled("#num_beams") and page.is_disabled("#temperature")

            page.check("input[name=method][value=sample]")
            page.fill("#temperature", "0.7")
            page.click("#again")  # seed 0 -> 1: a new draw
            sample = DecodeConfig(method="sample", temperature=0.7, num_return_sequences=3, seed=1)
            call = ("captioner.caption([image], method='sample', temperature=0.7, top_p=1.0, "
                    "num_return_sequences=3, seed=1)")
            captions = shown(page, upload.name, call)
            assert captions == expected(captioner, upload, sample) and len(captions) == 3

            page.select_option("#translate", "de")  # the same captions, each with the stand-in's words below
            page.wait_for_selector("#captions li .translation")
            assert shown(page, upload.name, call) == captions
            lines = page.locator("#captions li .translation").all_inner_texts()
            assert len(lines) == 3 and all(line.startswith(STANDIN_LABEL) for line in lines)
            assert "not a translation" in page.inner_text("#translated")

            page.set_input_files("#upload", files=[{"name": "huge.jpg", "mimeType": "image/jpeg",
                                                    "buffer": b"\xff" * (MAX_BYTES + 1)}])
            page.wait_for_selector("#message:has-text('huge.jpg is larger than the limit')")
            page.set_input_files("#upload", files=[{"name": "notes.txt", "mimeType": "text/plain",
                                                    "buffer": b"these are not pixels"}])
            page.wait_for_selector("#message:has-text('notes.txt cannot be captioned: not an image')")
            assert page.locator("#captions li .caption").all_inner_texts() == captions, "the last captions stay"
            out = figures_dir() / "web_demo.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)

            page.click("#again")  # the server is still there after the bad uploads
            call = call.replace("seed=1", "seed=2")
            assert shown(page, upload.name, call) == expected(captioner, upload, DecodeConfig(
                method="sample", temperature=0.7, num_return_sequences=3, seed=2))
            assert page.is_hidden("#message")
        finally:
            browser.close()
