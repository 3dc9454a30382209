"""The stand-ins must load through the real loaders, exactly as the hub models would."""

from __future__ import annotations

import json

import clip
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from utils import standins


def test_clip_vit_standin_loads_through_clip_load(models_dir):
    path = standins.clip_archive("ViT-B/32", models_dir)
    model, preprocess = clip.load(str(path), device="cpu", jit=False)
    assert type(model).__name__ == "CLIP" and type(model.visual).__name__ == "VisionTransformer"
    assert model.visual.input_resolution == 64
    image = torch.rand(2, 3, 64, 64)
    assert model.encode_image(image).shape == (2, 64)
    assert model.encode_text(clip.tokenize(["a red circle", "a blue square"])).shape == (2, 64)
    assert standins.clip_standin_name("ViT-B/32") == "standin:ViT"


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
