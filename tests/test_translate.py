"""Translated captions: the stand-in Marian model loaded by transformers' own from_pretrained, labelled as no
translation wherever it shows (CLI, demo, explorer), and a clear message where a language has no model."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading

import pytest
from PIL import Image

from conftest import ROOT, cli_env, run_cli
from utils.captioner import Captioner
from utils.config import ModelConfig, RuntimeConfig
from utils.features import load_cache
from utils.standin_text import marian_dir
from utils.training_run import build_captioner
from utils.translate import STANDIN_LABEL, TranslationError, Translators, add_translations, load_translator

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def translator(models_dir):
    return load_translator("de", offline=True, models_dir=models_dir)


@pytest.fixture(scope="module")
def bundle(small_cache, models_dir, tmp_path_factory):
    """An untrained stand-in captioner's bundle: its captions are gibberish, which is all translation needs."""
    import torch

    torch.manual_seed(0)
    cfg = ModelConfig(mapper="mlp", prefix_length=4, freeze="full", max_caption_tokens=12)
    captioner = build_captioner(cfg, load_cache(small_cache), RuntimeConfig(offline=True, device="cpu"))
    return captioner.save_pretrained(tmp_path_factory.mktemp("translate") / "captioner")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    picture = Image.new("RGB", (120, 80), (40, 90, 230))
    picture.paste((236, 236, 230), (0, 0, 60, 80))
    picture.save(path)
    return path


def test_the_standin_is_a_real_marian_model_loaded_by_from_pretrained(translator, models_dir):
    from transformers import MarianConfig, MarianMTModel

    folder = marian_dir(models_dir)
    assert {"config.json", "model.safetensors", "tokenizer.json", "standin.json"} <= {p.name for p in folder.iterdir()}
    assert isinstance(translator.model, MarianMTModel) and isinstance(translator.model.config, MarianConfig)
    assert translator.standin and translator.name == "standin:marian"
    assert "stand-in" in translator.about and "not a translation" in translator.about


def test_standin_output_is_labelled_never_passed_off_as_a_translation(translator):
    texts = ["a red circle on the left", "a small blue square at the top", "a red circle on the left"]
    out = translator(texts)
    assert len(out) == 3 and all(line.startswith(STANDIN_LABEL + " ") for line in out)
    assert out[0] == out[2] and out[0] != out[1], "the same caption, the same output; another, another"


def test_a_language_code_that_is_no_code_is_refused_saying_what_to_give(models_dir):
    with pytest.raises(TranslationError, match=r"--translate 'german!': give a language code such as de or fr"):
        load_translator("german!", offline=True, models_dir=models_dir)


def test_add_translations_keeps_the_shape_of_each_caption(translator):
    results = [{"image": "a.png", "caption": "a red circle", "error": None},
               {"image": "b.png", "caption": ["a red circle", "a blue square"], "error": None},
               {"image": "c.png", "caption": None, "error": "truncated PNG"}]
    add_translations(results, translator)
    assert results[0]["translation"] == translator(["a red circle"])[0]
    assert results[1]["translation"] == translator(["a red circle", "a blue square"])
    assert "translation" not in results[2] and results[1]["translated_by"] == translator.about


def test_caption_translate_through_the_cli(bundle, image, data_dir, translator):
    caption = Captioner.from_pretrained(bundle)
    caption.image_encoder(data_dir / "models")
    expected = caption.caption([image])[0]
    proc = run_cli("caption", "--model", str(bundle), "--translate", "de", str(image), data_dir=data_dir)
    assert proc.stdout.splitlines() == [f"{image}\t{expected}\t{translator([expected])[0]}"]
    assert "OFFLINE MODE: translation to German by a tiny random stand-in Marian model" in proc.stderr
    proc = run_cli("caption", "--model", str(bundle), "--translate", "de", "--json", str(image), data_dir=data_dir)
    [result] = json.loads(proc.stdout)
    assert result["translation"].startswith(STANDIN_LABEL) and "not a translation" in result["translated_by"]


class _NoSuchRepo(http.server.BaseHTTPRequestHandler):
    """A model hub that holds nothing: every repository is 'not found', as the Hub answers."""

    def do_GET(self):
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("X-Error-Message", "Repository not found")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


def test_a_language_without_a_model_is_named_before_anything_is_captioned(bundle, image, data_dir):
    hub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NoSuchRepo)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    try:
        env = cli_env(data_dir) | {"CLIPCAP_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_port}",
                                   "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
        proc = subprocess.run([sys.executable, "-m", "utils", "caption", "--model", str(bundle), "--translate", "xx",
                               str(image)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        hub.shutdown()
    assert proc.returncode != 0 and proc.stdout == "", proc.stderr
    assert proc.stderr.startswith("error: no translation model for 'xx': Helsinki-NLP/opus-mt-en-xx cannot be "
                                  "loaded"), proc.stderr
    assert "Models exist for de, fr" in proc.stderr


def test_translators_load_each_language_once(models_dir):
    translators = Translators(offline=True, models_dir=models_dir)
    assert translators["de"] is translators["de"] and translators["fr"].lang == "fr"
