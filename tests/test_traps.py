"""The traps ClipCap's users fell into (issues of rmokady/CLIP_prefix_caption): each test would fail on
ClipCap's behaviour and passes on ours. Traps already tested elsewhere are listed, not tested twice.

trap (ClipCap issue): what ClipCap does        test
"!" is not trained on (#41): pads with         test_training.py::test_loss_is_on_caption_tokens_and_eos_only
  token 0, which is "!", and ignores 0
mask / labels change after an epoch:           test_mask_and_labels_of_an_item_are_the_same_on_every_access
  reading an item rewrites its tokens
a long caption crashes training (#48):         test_a_1000_token_caption_is_cut_counted_and_trains,
  prefix + tokens pass GPT-2's positions       test_training.py::test_captions_are_cut_to_fit_the_lm_positions
an edited captions file goes unnoticed         test_editing_the_captions_file_is_noticed_by_everything_made_from_it;
  (PR #88): token cache keyed by file name     images: test_features.py::test_cache_from_another_backbone_is_refused
normalisation, CLIP width, prefix length       test_normalisation_and_clip_width_travel_with_the_bundle;
  differ at inference (#26, #33, #45, #53,     a checkpoint resumed with others:
  #55): flags given again by hand              test_training.py::test_resume_refuses_other_settings_and_pickled_code
temperature and top-p change nothing:          test_temperature_top_p_and_samples_change_what_is_drawn
  argmax after the top-p filter
captions never stop (#43): no EOS trained      test_a_trained_model_ends_its_captions_at_eos
beam search: hand-written, token 0 as filler   test_beam_search_finds_captions_the_model_rates_no_lower_than_greedy
one caption for every image, seen only after   test_training.py::test_watched_captions_and_early_stopping
  training (#19, #20, #59)
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from utils.captioner import Captioner
from utils.model import CaptionerError, generate_kwargs
from utils.sources import load_language_model
from utils.config import (DataConfig, DecodeConfig, FeatureConfig, ModelConfig, RuntimeConfig, TrainConfig,
                          standin_preset)
from utils.readers import load_records
from utils.features import FeatureCacheError, cache_features, load_cache
from utils.errors import TrainingError
from utils.schedule import epoch_order
from utils.training import train
from utils.training_run import build_captioner, make_split

OFFLINE = RuntimeConfig(offline=True, device="cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(small_cache):
    return load_cache(small_cache)


@pytest.fixture(scope="module")
def trained(small_cache, data_dir, tmp_path_factory) -> Captioner:
    """The stand-in preset trained long enough to end its captions on its own (about 40 s on 2 CPU cores)."""
    model_cfg, train_cfg = standin_preset()
    train_cfg = dataclasses.replace(train_cfg, max_steps=150, warmup_steps=10, watch_images=0,
                                    out_dir=str(tmp_path_factory.mktemp("run")))
    result = train(small_cache, dataclasses.replace(model_cfg, mapper="mlp"), train_cfg, OFFLINE, data_dir)
    return Captioner.from_pretrained(result.bundle)


def _held_out(cache) -> torch.Tensor:
    rows = cache.images.loc[cache.images["split"] != "train", "feature_row"].to_numpy()
    return torch.tensor(np.asarray(cache.features[rows]), dtype=torch.float32)  # (N, clip_dim)


# ---- training data -----------------------------------------------------------------------------------


def test_mask_and_labels_of_an_item_are_the_same_on_every_access(cache, models_dir):
    captioner = build_captioner(standin_preset()[0], cache, OFFLINE)
    split = make_split(cache, "train", captioner)
    stored = copy.deepcopy(split.tokens)
    seen = {}
    for epoch in range(3):  # each epoch batches the items differently, so each is padded to another length
        order = epoch_order(len(split), seed=0, epoch=epoch)
        for batch in order.split(16):
            ids, mask, labels = captioner.pad([split.tokens[i] for i in batch.tolist()])
            for row, item in enumerate(batch.tolist()):
                n = len(split.tokens[item])
                assert mask[row, n:].eq(0).all() and labels[row, n:].eq(-100).all(), "padding is never trained on"
                mine = (ids[row, :n].tolist(), mask[row, :n].tolist(), labels[row, :n].tolist())
                assert seen.setdefault(item, mine) == mine, f"item {item} changed in epoch {epoch}"
    assert split.tokens == stored, "reading an item never changes it"


def test_a_1000_token_caption_is_cut_counted_and_trains(cache, models_dir, capsys):
    captions = cache.captions.copy()
    first = captions.index[captions["split"] == "train"][0]
    captions.loc[first, "caption"] = "a very long caption " * 250  # 1000 words, over 1000 tokens
    lm, tokenizer, _ = load_language_model("gpt2", offline=True)
    config = ModelConfig(mapper="mlp", clip_dim=cache.features.shape[1], freeze="full",
                         max_caption_tokens=5000)  # asks for too many
    captioner = Captioner(config, lm, tokenizer)
    positions = lm.config.n_positions
    assert captioner.max_caption_tokens == positions - config.prefix_length
    split = make_split(dataclasses.replace(cache, captions=captions), "train", captioner)
    assert f"train: 1 of {len(split)} captions cut to {captioner.max_caption_tokens} tokens" in capsys.readouterr().out
    ids, mask, labels = captioner.pad(split.tokens[:4])
    assert config.prefix_length + ids.shape[1] == positions
    loss = captioner(torch.tensor(np.asarray(cache.features[split.rows[:4].numpy()]), dtype=torch.float32), ids, mask,
                     labels)
    loss.backward()
    assert torch.isfinite(loss)


def test_editing_the_captions_file_is_noticed_by_everything_made_from_it(data_dir, tmp_path):
    """Whatever was derived from the captions file (the cache's captions, a training run) is refreshed
    or refused after the file changes; no image is encoded again for a caption edit."""
    (tmp_path / "imgs").mkdir()
    rows = []
    for i, colour in enumerate(["red", "green", "blue", "yellow", "purple", "orange"]):
        Image.new("RGB", (64, 64), colour).save(tmp_path / "imgs" / f"{i}.png")
        rows += [f"{i}.png,a {colour} picture", f"{i}.png,all {colour}"]
    captions_file = tmp_path / "captions.csv"
    captions_file.write_text("image,caption\n" + "\n".join(rows) + "\n")
    data = DataConfig(dataset="csv", path=str(captions_file), images_dir=str(tmp_path / "imgs"), data_dir=str(data_dir),
                      val_fraction=0.0, test_fraction=0.0)
    features = FeatureConfig(num_workers=0, cache_dir=str(tmp_path / "cache"))
    out = cache_features(load_records(data), features, data, OFFLINE)
    before = load_cache(out)
    run = TrainConfig(max_steps=1, batch_size=4, warmup_steps=1, watch_images=0, out_dir=str(tmp_path / "run"))
    train(out, dataclasses.replace(standin_preset()[0], mapper="mlp"), run, OFFLINE, data_dir)

    captions_file.write_text(captions_file.read_text().replace("a red picture", "a scarlet square"))
    with pytest.raises(FeatureCacheError, match=r"captions.csv changed after the feature cache .* rerun "
                                                r"`python -m utils features`"):
        load_cache(out)
    features_mtime = (out / "features.npy").stat().st_mtime_ns
    cache_features(load_records(data), features, data, OFFLINE)  # what `features` does when rerun
    after = load_cache(out)
    assert "a scarlet square" in after.captions["caption"].tolist()
    assert after.meta["captions_fingerprint"] != before.meta["captions_fingerprint"]
    assert (out / "features.npy").stat().st_mtime_ns == features_mtime, "no image was encoded again"
    with pytest.raises(TrainingError, match="features.captions_fingerprint: checkpoint has"):
        train(out, dataclasses.replace(standin_preset()[0], mapper="mlp"), dataclasses.replace(run, resume=True),
              OFFLINE, data_dir)


# ---- what the bundle carries -------------------------------------------------------------------------


def test_normalisation_and_clip_width_travel_with_the_bundle(models_dir, tmp_path):
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    for normalize in (True, False):
        lm, tokenizer, _ = load_language_model("gpt2", offline=True)
        torch.manual_seed(0)
        config = ModelConfig(mapper="mlp", clip_dim=64, backbone="standin:ViT", normalize_prefix=normalize,
                             max_caption_tokens=12)
        Captioner(config, lm, tokenizer).save_pretrained(tmp_path / f"norm-{normalize}")
        loaded = Captioner.from_pretrained(tmp_path / f"norm-{normalize}")
        assert loaded.config.normalize_prefix is normalize and loaded.config.clip_dim == 64
        scaled_alike = loaded.generate(4 * x) == loaded.generate(x)  # x4: exact in floating point
        assert scaled_alike is normalize, "the bundle itself normalises: nobody has to remember to"
    with pytest.raises(CaptionerError, match=r"these CLIP embeddings are 512-d, but this captioner reads the "
                                             r"64-d embeddings of standin:ViT: make the features with --backbone "
                                             r"standin:ViT"):
        loaded.generate(torch.randn(2, 512))


# ---- decoding ----------------------------------------------------------------------------------------


def test_temperature_top_p_and_samples_change_what_is_drawn(trained, cache):
    x = _held_out(cache)[:6]

    def sample(**settings):
        return trained.generate(x, method="sample", seed=0, **settings)

    assert sample(temperature=1.5) != sample(temperature=1.0) != sample(temperature=0.3)
    assert sample(temperature=1.5, top_p=0.5) != sample(temperature=1.5)
    drawn = trained.generate(x, method="sample", temperature=1.5, num_return_sequences=5, seed=0)
    assert any(len(set(captions)) > 1 for captions in drawn), "N samples of one image differ"


def test_a_trained_model_ends_its_captions_at_eos(trained, cache):
    x = _held_out(cache)
    limit, eos = trained.max_caption_tokens, trained.tokenizer.eos_token_id
    with torch.no_grad():
        prefix = trained.prefix(x)  # (N, P, D)
        out = trained.lm.generate(inputs_embeds=prefix, attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long),
                                  max_new_tokens=limit, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    assert all(eos in row.tolist() for row in out), "every caption ends at EOS, none at the length limit"


def _decode(captioner: Captioner, x: torch.Tensor, decode: DecodeConfig) -> tuple:
    """What `captioner.generate` runs, returning the token ids themselves (each cut after its stop token) and
    generate()'s own score of each (beam: its objective, below; greedy: none)."""
    with torch.no_grad():
        prefix = captioner.eval().prefix(x)  # (N, P, D)
        out = captioner.lm.generate(inputs_embeds=prefix, attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long),
                                    eos_token_id=captioner.stop_ids, pad_token_id=captioner.tokenizer.eos_token_id,
                                    output_scores=True, return_dict_in_generate=True,
                                    **generate_kwargs(decode, captioner.max_caption_tokens))
    stops = [[i for i, t in enumerate(row.tolist()) if t in captioner.stop_ids] for row in out.sequences]
    ids = [row[: s[0] + 1] if s else row for row, s in zip(out.sequences, stops)]
    return prefix, ids, getattr(out, "sequences_scores", None)  # (N, P, D), N x (T,), (N,) or None


def _beam_objective(captioner: Captioner, prefix: torch.Tensor, ids: list, penalty: float) -> torch.Tensor:
    """Per image, what beam search ranks captions by: the model's sum of log-probs of the token ids (stop token
    included) after the prefix, over length**penalty."""
    scores = []
    with torch.no_grad():
        for p, row in zip(prefix, ids):
            embeds = torch.cat([p, captioner.lm.get_input_embeddings()(row)])[None]  # (1, P + T, D)
            log_probs = captioner.lm(inputs_embeds=embeds).logits[0, len(p) - 1:-1].log_softmax(-1)  # (T, vocab)
            scores.append(log_probs.gather(1, row[:, None]).sum() / len(row) ** penalty)
    return torch.stack(scores)


def test_beam_search_finds_captions_the_model_rates_no_lower_than_greedy(trained, cache):
    """Beam search's objective (sum of log-probs / length**length_penalty), computed on the token ids each
    method returned, is on average over the held-out images at least greedy's. Beam search does not guarantee
    it, nor per image (it can prune greedy's path, and stops on a heuristic): on this model beam scores higher
    on 25 of 33 images and on average (-0.339 against -0.359), a measured property. Scoring the returned ids,
    not captions re-tokenised, adds no noise. (On the stand-in's few held-out images beam does not promise
    better BLEU or CIDEr: it prefers the commonest phrasing.)"""
    x, beam = _held_out(cache), DecodeConfig(method="beam", num_beams=5)
    prefix, greedy_ids, _ = _decode(trained, x, DecodeConfig())
    _, beam_ids, reported = _decode(trained, x, beam)
    assert any(g.tolist() != b.tolist() for g, b in zip(greedy_ids, beam_ids))
    beam_scores = _beam_objective(trained, prefix, beam_ids, beam.length_penalty)
    torch.testing.assert_close(beam_scores, reported, atol=1e-4, rtol=1e-4)  # the score beam search ranked by
    assert beam_scores.mean() >= _beam_objective(trained, prefix, greedy_ids, beam.length_penalty).mean()
