"""The stand-ins must load through the real loaders, exactly as the hub models would."""

from __future__ import annotations

import json

import clip
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import embedded_set
from utils import standins
from utils.embedded import EMBEDDED_ATTRIBUTES
from utils.standin_names import STANDINS_ENV, clip_standin_name


def test_clip_vit_standin_loads_through_clip_load(models_dir):
    path = standins.clip_archive("ViT-B/32", models_dir)
    model, preprocess = clip.load(str(path), device="cpu", jit=False)
    assert type(model).__name__ == "CLIP" and type(model.visual).__name__ == "VisionTransformer"
    assert model.visual.input_resolution == 64
    image = torch.rand(2, 3, 64, 64)
    assert model.encode_image(image).shape == (2, 64)
    assert model.encode_text(clip.tokenize(["a red circle", "a blue square"])).shape == (2, 64)
    assert clip_standin_name("ViT-B/32") == "standin:ViT"


def test_clip_resnet_standin_for_rn_backbones(models_dir):
    path = standins.clip_archive("RN50x4", models_dir)
    model, _ = clip.load(str(path), device="cpu", jit=False)
    assert type(model.visual).__name__ == "ModifiedResNet"
    assert model.encode_image(torch.rand(1, 3, 64, 64)).shape == (1, 64)


def test_clip_standin_is_built_once_and_deterministically(models_dir, tmp_path):
    first = standins.clip_archive("ViT-B/32", models_dir)
    stamp = first.stat().st_mtime_ns
    assert standins.clip_archive("ViT-B/32", models_dir).stat().st_mtime_ns == stamp  # reused
    again = standins.clip_archive("ViT-B/32", tmp_path)
    a = clip.load(str(first), device="cpu", jit=False)[0].state_dict()
    b = clip.load(str(again), device="cpu", jit=False)[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def course_set(tmp_path_factory):
    """The embedded set exactly as the course generates it (seed 0), never seen by the stand-in's training."""
    folder = tmp_path_factory.mktemp("course") / "embedded"
    return folder, embedded_set(folder, n_images=1200, seed=0)


def test_clip_vit_standin_is_trained_on_private_drawings_only(models_dir):
    standins.clip_archive("ViT-B/32", models_dir)
    meta = json.loads((models_dir / standins.CLIP_DATA / "meta.json").read_text())
    assert meta["seed"] == standins._CLIP_FIT["seed"] != 0  # the course's set is seed 0


def test_clip_vit_standin_embeddings_carry_the_attributes_of_unseen_images(models_dir, course_set):
    """Through clip.load and its preprocess, as the course encodes images: on the course's own images
    (never trained on), each image's nearest neighbour (cosine, itself excluded) shares its colour,
    position, size and background at least 85% of the time (random weights: colour 0.91, shape 0.67,
    position 0.22, size 0.46); shape is learned only partly in the stand-in's short training. And each
    image finds its own caption among all 1200 first captions far above chance."""
    folder, captions = course_set
    model, preprocess = clip.load(str(standins.clip_archive("ViT-B/32", models_dir)), device="cpu", jit=False)
    names = sorted(captions)
    keys = [standins._caption_key(captions[n]) for n in names]
    assert None not in keys
    with torch.no_grad():
        images = F.normalize(model.encode_image(torch.stack([preprocess(Image.open(folder / "images" / n))
                                                             for n in names])), dim=-1)
        texts = F.normalize(model.encode_text(clip.tokenize([captions[n][0] for n in names])), dim=-1)
    similarity = images @ images.T
    similarity.fill_diagonal_(-2.0)
    nearest = similarity.argmax(1).tolist()
    agreement = {attr: float(np.mean([keys[i][a] == keys[j][a] for i, j in enumerate(nearest)]))
                 for a, attr in enumerate(EMBEDDED_ATTRIBUTES)}
    found = (images @ texts.T).argmax(1).tolist()
    top1 = float(np.mean([j == i for i, j in enumerate(found)]))
    same_meaning = float(np.mean([keys[j] == keys[i] for i, j in enumerate(found)]))
    report = f"nearest-neighbour agreement {agreement}, image->text top-1 {top1:.3f}, same attributes {same_meaning:.3f}"
    print(report)
    for attr in ("colour", "position", "size", "background"):
        assert agreement[attr] >= 0.85, report
    assert agreement["shape"] >= 0.4, report  # chance is 0.2
    assert top1 >= 0.1 and same_meaning >= 0.4, report  # chance: 1/1200 and about 1/600


def test_gpt2_standin_and_tokenizer_load_with_from_pretrained(models_dir):
    folder = standins.gpt2_dir(models_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert tokenizer.eos_token == standins.EOS and model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.vocab_size == len(tokenizer)
    assert json.loads((folder / "standin.json").read_text())["standin"] is True
    ids = tokenizer("a small red circle on the left.")["input_ids"]
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer))


def test_standin_tokenizer_round_trips_any_text(models_dir):
    tokenizer = AutoTokenizer.from_pretrained(standins.gpt2_dir(models_dir))
    for text in ["A dog runs across the grass .", "Crème brûlée, 寿司 and 🍣!", "tabs\tand\nnewlines  ", "!!!"]:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    # common caption words are single tokens or few pieces, not bytes
    assert len(tokenizer(" circle")["input_ids"]) <= 2


def test_standins_live_in_one_folder_per_machine(monkeypatch, tmp_path, models_dir):
    """CLIPCAP_STANDINS, else $XDG_CACHE_HOME/clipcap-course, else ~/.cache/clipcap-course; this session's
    tests point it at a temporary folder (conftest), and every data folder's loaders read from there."""
    from utils.sources import language_model_source

    assert models_dir == standins.standins_home() and str(models_dir).startswith(str(models_dir.parent))
    assert language_model_source("gpt2", True)[0] == str(models_dir / "standin-gpt2")
    monkeypatch.delenv(STANDINS_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert standins.standins_home().parent == tmp_path / "xdg" / "clipcap-course"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert standins.standins_home().parent == tmp_path / "home" / ".cache" / "clipcap-course"


def test_gpt2_standin_has_gpt2s_twelve_blocks_and_is_prefitted_on_captions(models_dir):
    """Twelve blocks, as GPT-2 has, so frozen / partial / full mean what they mean for it; pre-fitted on
    caption text: after an end-of-text token it writes a caption whose five facts can be read back, and after
    a caption it restates that caption's facts (the in-context use of the text before it that a soft prompt
    needs) far above the chance of about 0.34."""
    folder = standins.gpt2_dir(models_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.config.n_layer == 12 and model.config.n_embd == 64
    first, last = json.loads((folder / "standin.json").read_text())["loss_first_last"]
    assert first > 5 and last < 0.6, (first, last)
    eos = tokenizer.eos_token_id
    from utils.embedded import embedded_attributes

    def continue_after(text: str) -> str:
        ids = torch.tensor([[eos, *tokenizer(text)["input_ids"], eos] if text else [eos]])
        out = model.generate(ids, max_new_tokens=30, do_sample=False, pad_token_id=eos, eos_token_id=eos)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    assert None not in embedded_attributes(continue_after("")).values(), continue_after("")
    captions = [c for cs in embedded_set(models_dir.parent / "pairs", n_images=30, seed=0).values() for c in cs[:1]]
    agree = np.mean([[embedded_attributes(continue_after(c))[a] == embedded_attributes(c)[a] for a in EMBEDDED_ATTRIBUTES]
                     for c in captions])
    assert agree >= 0.55, agree
