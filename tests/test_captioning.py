"""Captioning and evaluation: decoding through generate(), captions of image files, the bundle in a
fresh process, the caption / evaluate commands, temperature tables and split evaluation."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import ROOT, cli_env, run_cli
from utils.__main__ import main
from utils.captioner import Captioner
from utils.model import generate_kwargs
from utils.sources import load_language_model
from utils.config import (DecodeConfig, DecodeConfigError, ModelConfig, RuntimeConfig, decode_config,
                          standin_preset)
from utils.images import UnreadableImage
from utils.clipscore import clip_score
from utils.evaluation import (EvaluationError, evaluate_split, references_by_image, temperature_summary,
                              temperature_table)
from utils.features import load_cache
from utils.training import train

OFFLINE = RuntimeConfig(offline=True, device="cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def untrained(models_dir):
    """Random weights: its captions are gibberish, but each image gets its own, which is all decoding tests need.
    (The MLP mapper keeps random prefixes apart; an untrained transformer mapper maps all to one.)"""
    lm, tokenizer, _ = load_language_model("gpt2", offline=True)
    torch.manual_seed(0)
    return Captioner(ModelConfig(mapper="mlp", clip_dim=64, prefix_length=4, freeze="full", backbone="standin:ViT",
                                 max_caption_tokens=16), lm, tokenizer).eval()


@pytest.fixture(scope="module")
def trained(small_cache, data_dir, models_dir, tmp_path_factory):
    """A captioner trained for one short epoch on the small cache, and its bundle."""
    model_cfg, train_cfg = standin_preset()
    out = tmp_path_factory.mktemp("run")
    result = train(small_cache, dataclasses.replace(model_cfg, mapper="mlp"),
                   dataclasses.replace(train_cfg, max_steps=20, out_dir=str(out)), OFFLINE, data_dir)
    captioner = Captioner.from_pretrained(result.bundle)
    captioner.image_encoder(models_dir)  # its stand-in CLIP, from this session's models
    return captioner, result.bundle


@pytest.fixture(scope="module")
def cache(small_cache):
    return load_cache(small_cache)


def _embeds(n: int = 6, clip_dim: int = 64) -> torch.Tensor:
    return torch.randn(n, clip_dim, generator=torch.Generator().manual_seed(0))  # (n, clip_dim)


def _test_images(cache, n: int) -> pd.DataFrame:
    return cache.images[cache.images["split"] == "test"].head(n)


# ------------------------------------------------------------------------------------------ decoding


def _greedy_reference(captioner: Captioner, clip_embed: torch.Tensor, max_new_tokens: int) -> str:
    """Greedy decoding by hand: the full sequence through the LM at every step, argmax, no KV cache."""
    eos, embed_tokens = captioner.tokenizer.eos_token_id, captioner.lm.get_input_embeddings()
    ids = []
    with torch.no_grad():
        embeds = captioner.prefix(clip_embed[None])  # (1, P, D)
        for _ in range(max_new_tokens):
            logits = captioner.lm(inputs_embeds=embeds, use_cache=False).logits  # (1, P + t, vocab)
            token = int(logits[0, -1].argmax())
            if token == eos:
                break
            ids.append(token)
            embeds = torch.cat([embeds, embed_tokens(torch.tensor([[token]]))], dim=1)  # (1, P + t + 1, D)
    return " ".join(captioner.tokenizer.decode(ids, skip_special_tokens=True).split())


def test_greedy_generate_equals_a_step_by_step_reference(untrained, trained):
    x = _embeds()
    captions = untrained.generate(x)
    assert len(set(captions)) > 1, "the images should get different captions, or the test proves little"
    assert captions == [_greedy_reference(untrained, e, untrained.max_caption_tokens) for e in x]
    model, _ = trained  # trained on the stand-in CLIP's features: its own width
    x = _embeds(3, model.config.clip_dim)
    assert model.generate(x) == [_greedy_reference(model, e, model.max_caption_tokens) for e in x]


def test_beam_of_width_one_is_greedy_and_beams_rank_their_captions(untrained):
    x = _embeds()
    greedy = untrained.generate(x)
    assert untrained.generate(x, method="beam", num_beams=1) == greedy
    best = untrained.generate(x, method="beam", num_beams=4)
    top3 = untrained.generate(x, method="beam", num_beams=4, num_return_sequences=3)
    assert [len(c) for c in top3] == [3] * len(x) and [c[0] for c in top3] == best


def test_sampling_is_reproducible_by_seed_and_leaves_the_global_rng_alone(untrained):
    x = _embeds()
    state = torch.get_rng_state()
    a = untrained.generate(x, method="sample", seed=1, num_return_sequences=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert untrained.generate(x, method="sample", seed=1, num_return_sequences=2) == a
    assert untrained.generate(x, method="sample", seed=2, num_return_sequences=2) != a
    assert [len(c) for c in a] == [2] * len(x)


def test_temperature_towards_zero_is_greedy(untrained):
    x = _embeds()
    assert untrained.generate(x, method="sample", temperature=1e-4, seed=3) == untrained.generate(x)


@pytest.mark.parametrize("decode", [DecodeConfig(), DecodeConfig(method="beam", num_beams=3),
                                    DecodeConfig(method="greedy", no_repeat_ngram_size=2, repetition_penalty=1.3)])
def test_batched_captions_equal_one_by_one(untrained, decode):
    x = _embeds(7)
    one_by_one = [untrained.generate(e[None], decode)[0] for e in x]
    assert untrained.generate(x, decode) == one_by_one
    assert untrained.generate(x, decode, batch_size=3) == one_by_one


def test_no_repeat_ngram_size_and_max_new_tokens_bite(untrained, trained, cache):
    x = _embeds()
    repeated = untrained.generate(x)
    assert any(len(set(r.split())) < len(r.split()) for r in repeated), "gibberish repeats: the setting must bite"
    assert untrained.generate(x, no_repeat_ngram_size=1) != repeated
    model, _ = trained  # on real features its captions are words, so a cut one is a prefix of the whole
    features = cache.features[_test_images(cache, 4)["feature_row"].to_numpy()]
    whole, cut = model.generate(features), model.generate(features, max_new_tokens=3)
    assert all(w.startswith(c) and len(c) < len(w) for w, c in zip(whole, cut))


def test_stop_at_period_ends_each_caption_at_its_first_sentence(untrained):
    """Same seed, with and without the stop: every sampled caption is cut right after a '.' (or never had one)."""
    x = _embeds(8)
    decode = DecodeConfig(method="sample", temperature=1.5, seed=0, num_return_sequences=4, max_new_tokens=40)
    full = sum(untrained.generate(x, decode), [])
    cut = sum(untrained.generate(x, dataclasses.replace(decode, stop_at_period=True)), [])
    shortened = [(f, c) for f, c in zip(full, cut) if f != c]
    assert shortened, "no sampled caption contained a period: the test needs another seed"
    assert all(f.startswith(c) and c.endswith(".") for f, c in shortened)


def test_decode_settings_map_onto_generate_and_contradictions_are_refused():
    assert generate_kwargs(DecodeConfig(), 20) == dict(do_sample=False, num_beams=1, max_new_tokens=20,
                                                       num_return_sequences=1, repetition_penalty=1.0,
                                                       no_repeat_ngram_size=0)
    sample = generate_kwargs(DecodeConfig(method="sample", temperature=0.7, top_p=0.9, stop_at_period=True,
                                          max_new_tokens=9), 20)
    assert sample["do_sample"] and (sample["temperature"], sample["top_k"], sample["top_p"]) == (0.7, 0, 0.9)
    assert sample["stop_strings"] == ["."] and sample["max_new_tokens"] == 9
    beam = generate_kwargs(DecodeConfig(method="beam", num_beams=4, length_penalty=0.5), 20)
    assert (beam["num_beams"], beam["length_penalty"], beam["do_sample"]) == (4, 0.5, False)
    assert "temperature" not in beam

    with pytest.raises(DecodeConfigError, match=r"temperature only applies to method 'sample'.*--method sample"):
        decode_config(temperature=0.5)
    with pytest.raises(DecodeConfigError, match="num_beams only applies to method 'beam'"):
        decode_config(DecodeConfig(method="sample"), num_beams=3)
    with pytest.raises(DecodeConfigError, match="greedy decoding gives one caption per image"):
        DecodeConfig(num_return_sequences=2)
    with pytest.raises(DecodeConfigError, match="at most num_beams"):
        DecodeConfig(method="beam", num_beams=2, num_return_sequences=3)
    with pytest.raises(DecodeConfigError, match="method must be one of greedy, beam, sample"):
        DecodeConfig(method="nucleus")
    with pytest.raises(DecodeConfigError, match="unknown decoding setting.*do_sample"):
        decode_config(do_sample=True)


# -------------------------------------------------------------------------------------------- images


def test_captions_of_image_files_equal_captions_of_their_cached_features(trained, cache):
    model, _ = trained
    images = _test_images(cache, 4)
    from_cache = model.generate(cache.features[images["feature_row"].to_numpy()])
    paths = images["image_path"].to_list()
    assert model.caption(paths) == from_cache
    assert model.caption([Image.open(p) for p in paths]) == from_cache


def test_unreadable_images_are_named_and_the_rest_captioned(trained, cache, tmp_path):
    model, _ = trained
    good = _test_images(cache, 2)["image_path"].to_list()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    results = model.caption_files([good[0], str(broken), good[1], str(tmp_path / "gone.jpg")])
    assert [r["error"] for r in results] == [None, "truncated PNG", None, "missing file"]
    assert [r["caption"] for r in results if r["caption"] is not None] == model.caption(good)
    with pytest.raises(UnreadableImage, match=r"broken.png \(truncated PNG\).*caption_files"):
        model.caption([good[0], str(broken)])


# ------------------------------------------------------------------------------------------- bundle


def test_bundle_loaded_in_a_fresh_process_gives_the_same_captions(trained, cache, tmp_path, data_dir):
    model, _ = trained
    bundle = model.save_pretrained(tmp_path / "bundle", summary={"note": "round trip"})
    paths = _test_images(cache, 3)["image_path"].to_list()
    decode = dict(method="beam", num_beams=3)
    script = ("import json, sys; from utils.captioner import Captioner; "
              "c = Captioner.from_pretrained(sys.argv[1]); "
              "print(json.dumps([c.summary, c.caption(sys.argv[3:], **json.loads(sys.argv[2]))]))")
    env = cli_env(data_dir)
    proc = subprocess.run([sys.executable, "-c", script, str(bundle), json.dumps(decode), *paths], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary, captions = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary == {"note": "round trip"}
    assert captions == model.caption(paths, **decode)


# ---------------------------------------------------------------------------------------------- CLI


def test_caption_command_names_a_broken_image_and_captions_the_good_one(trained, cache, tmp_path, data_dir):
    model, bundle = trained
    folder = tmp_path / "photos"
    folder.mkdir()
    good = shutil.copy(_test_images(cache, 1)["image_path"].iloc[0], folder / "good.png")
    (folder / "broken.jpg").write_bytes(b"this is not a picture")
    (folder / "notes.txt").write_text("not an image file: not listed")
    proc = run_cli("caption", "--model", str(bundle), str(folder), "--json", data_dir=data_dir)
    results = json.loads(proc.stdout)
    assert [(os.path.basename(r["image"]), r["error"]) for r in results] == [
        ("broken.jpg", "not an image (cannot identify image file)"), ("good.png", None)]
    assert results[1]["caption"] == model.caption([good])[0]
    assert "broken.jpg: not an image (cannot identify image file)" in proc.stderr


def test_caption_command_prints_a_line_per_caption_and_refuses_with_reasons(trained, cache, data_dir, capsys,
                                                                            monkeypatch, tmp_path):
    """In this process, through the same entry point as `python -m utils`."""
    model, bundle = trained
    monkeypatch.setenv("CLIPCAP_DATA", str(data_dir))
    good = _test_images(cache, 1)["image_path"].iloc[0]
    main(["caption", "--model", str(bundle), good, "--method", "sample", "--seed", "4", "--num-return-sequences", "2"])
    expected = model.caption([good], method="sample", seed=4, num_return_sequences=2)[0]
    assert capsys.readouterr().out.splitlines() == [f"{good}\t{c}" for c in expected]

    for args, message in [([str(tmp_path / "gone.png")], f"{tmp_path / 'gone.png'} cannot be captioned: missing file."),
                          ([good, "--temperature", "0.5"], "temperature only applies to method 'sample'"),
                          ([good, "--method", "beam", "--num-return-sequences", "9"], "at most num_beams (5)")]:
        with pytest.raises(SystemExit, match=re.escape(message)):
            main(["caption", "--model", str(bundle), *args])
    with pytest.raises(SystemExit, match="is not a captioner bundle"):
        main(["caption", "--model", str(tmp_path), good])


def test_evaluate_command_writes_results_and_prints_the_metrics(trained, cache, tmp_path, data_dir):
    _, bundle = trained
    out = tmp_path / "results.json"
    proc = run_cli("evaluate", "--model", str(bundle), "--split", "test", "--out", str(out), data_dir=data_dir)
    assert "BLEU-4" in proc.stdout and "CIDEr" in proc.stdout and "CLIPScore" in proc.stdout
    data = json.loads(out.read_text())
    test_ids = references_by_image(cache.split("test"))
    assert [r["image_id"] for r in data["captions"]] == list(test_ids)
    assert {"BLEU-1", "BLEU-4", "ROUGE_L", "CIDEr", "CLIPScore", "RefCLIPScore"} <= set(data["scores"])
    assert data["info"]["features"] == str(cache.path) and data["info"]["decode"]["method"] == "greedy"



def test_evaluate_command_prints_json_and_takes_decoding_flags(trained, cache, data_dir, capsys, monkeypatch):
    model, bundle = trained
    monkeypatch.setenv("CLIPCAP_DATA", str(data_dir))
    main(["evaluate", "--model", str(bundle), "--features", str(cache.path), "--metrics", "BLEU", "--no-clip-score",
          "--method", "beam", "--num-beams", "2", "--json"])
    printed = json.loads(capsys.readouterr().out)
    expected, _ = evaluate_split(model, cache, decode=DecodeConfig(method="beam", num_beams=2), clip_score=False,
                                 metrics=("BLEU",))
    assert printed["scores"] == pytest.approx(expected) and set(expected) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"}


# --------------------------------------------------------------------------------------- evaluation


def test_evaluate_split_scores_against_all_references_and_counts_unreadable_images(trained, cache, tmp_path):
    model, _ = trained
    images = cache.images.copy()
    first = images.index[images["split"] == "test"][0]  # a test image moved away since the cache was made
    images.loc[first, "image_path"] = str(tmp_path / "moved.png")
    scores, frame = evaluate_split(model, dataclasses.replace(cache, images=images), "test",
                                   metrics=("BLEU", "CIDEr"), out=tmp_path / "r.json")

    references = references_by_image(cache.split("test"))
    assert frame["image_id"].tolist() == list(references)
    assert frame["references"].tolist() == list(references.values()) and all(len(r) == 3 for r in references.values())
    rows = images.set_index("image_id").loc[list(references), "feature_row"].to_numpy()
    assert frame["prediction"].tolist() == model.generate(cache.features[rows])
    readable = frame["image_id"] != images.loc[first, "image_id"]
    assert frame.loc[~readable, "CLIPScore"].isna().all() and frame.loc[readable, "CLIPScore"].notna().all()
    clip_model, preprocess = model.image_encoder()
    direct = clip_score(clip_model, preprocess, [Image.open(p) for p in frame.loc[readable, "image_path"]],
                        frame.loc[readable, "prediction"].to_list(), "cpu")
    np.testing.assert_allclose(frame.loc[readable, "CLIPScore"], direct, atol=1e-6)
    assert scores["CLIPScore"] == pytest.approx(direct.mean())
    assert {"BLEU-4", "CIDEr", "RefCLIPScore"} <= set(scores)
    info = json.loads((tmp_path / "r.json").read_text())["info"]
    assert info["clip_score_unreadable"] == [f"{tmp_path / 'moved.png'} (missing file)"]

    with pytest.raises(EvaluationError, match="no 'holdout' images"):
        evaluate_split(model, cache, "holdout")
    with pytest.raises(EvaluationError, match="one caption per image"):
        evaluate_split(model, cache, decode=DecodeConfig(method="sample", num_return_sequences=2))


def test_temperature_table_compares_methods_and_temperatures(untrained, trained, cache):
    x = _embeds(4)
    table = temperature_table(untrained, x, temperatures=(1e-4, 1.5), samples=3)
    assert table.columns.tolist() == ["image", "method", "temperature", "top_p", "sample", "caption"]
    assert len(table) == 4 * (2 + 2 * 3)
    assert table.equals(temperature_table(untrained, x, temperatures=(1e-4, 1.5), samples=3))
    greedy = table[table["method"] == "greedy"]["caption"].tolist()
    assert greedy == untrained.generate(x)

    summary = temperature_summary(table).set_index(["method", "temperature"])
    cold, hot = summary.loc[("sample", 1e-4)], summary.loc[("sample", 1.5)]
    assert cold["same_as_greedy"] == 1.0 and cold["distinct_share"] == pytest.approx(1 / 3)
    assert hot["distinct_share"] > cold["distinct_share"] and hot["captions"] == 12

    model, _ = trained
    paths = _test_images(cache, 2)["image_path"].to_list()
    from_files = temperature_table(model, paths, temperatures=(0.7,), samples=2, methods=("greedy",))
    assert from_files["image"].unique().tolist() == paths and len(from_files) == 2 * (1 + 2)
