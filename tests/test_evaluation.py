"""Caption metrics: our numbers are pycocoevalcap's, computed as COCO eval does; CLIPScore is the paper's."""

from __future__ import annotations

import json
import math
import warnings

import clip
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import embedded_set
from utils import metrics
from utils.clipscore import clip_score, ref_clip_score
from utils.evaluation import PAPER_REFERENCE, references_by_image, results_table, write_results
from utils.metrics import MetricSkipped, java_available, score_captions, simple_tokenize
from utils.standin_clip import clip_archive

@pytest.fixture(autouse=True)
def told_afresh(monkeypatch):
    """Each test hears the metrics' notes as a new session would: metrics.py says each once per process."""
    monkeypatch.setattr(metrics, "_TOLD", set())


needs_java = pytest.mark.skipif(not java_available(), reason="Java is not installed (pycocoevalcap's PTB "
                                "tokenizer and METEOR run on it)")

PREDICTIONS = {
    "img1": "A dog runs across the green grass.",
    "img2": "Two men are looking at their hands",
    "img3": "A red bicycle stands near a wall",
    "img4": "",  # a decoder can produce nothing: it must score, not crash
}
REFERENCES = {
    "img1": ["A brown dog is running through the grass.", "A dog runs on a lawn.",
             "The dog sprints across green grass!"],
    "img2": ["Two young men look at their hands in the yard.", "Two guys inspect their hands.",
             "Men, outdoors, looking at hands."],
    "img3": ["A man in a red shirt rides a bicycle down the street.", "A bicycle leans against a brick wall.",
             "A red bike parked by a wall."],
    "img4": ["A woman is cooking food in the kitchen.", "Someone cooks dinner.",
             "A person prepares food at a stove."],
}


def _coco_direct(predictions, references, scorers):
    """What COCO eval computes: PTB-tokenize references and predictions, then call each scorer."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = PTBTokenizer().tokenize({i: [{"caption": c} for c in refs] for i, refs in references.items()})
    res = PTBTokenizer().tokenize({i: [{"caption": predictions[i]}] for i in references})
    return {name: scorer.compute_score(gts, res) for name, scorer in scorers.items()}


@needs_java
def test_scores_equal_pycocoevalcap_called_directly():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    direct = _coco_direct(PREDICTIONS, REFERENCES, {"BLEU": Bleu(4), "ROUGE_L": Rouge(), "CIDEr": Cider()})
    ours, frame = score_captions(PREDICTIONS, REFERENCES, metrics=("BLEU", "ROUGE_L", "CIDEr"),
                                 per_image=True)

    for n in range(4):
        assert ours[f"BLEU-{n + 1}"] == pytest.approx(direct["BLEU"][0][n], rel=1e-12)
        assert frame[f"BLEU-{n + 1}"].tolist() == pytest.approx(direct["BLEU"][1][n], rel=1e-12)
    for name in ("ROUGE_L", "CIDEr"):
        assert ours[name] == pytest.approx(direct[name][0], rel=1e-12)
        assert frame[name].tolist() == pytest.approx(list(direct[name][1]), rel=1e-12)
    assert set(ours) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE_L", "CIDEr"}
    assert frame["image_id"].tolist() == list(PREDICTIONS)
    assert frame.loc[frame["image_id"] == "img4", ["BLEU-1", "ROUGE_L", "CIDEr"]].to_numpy().max() < 1e-9


@needs_java
@pytest.mark.slow
def test_meteor_equals_pycocoevalcap_called_directly():
    from pycocoevalcap.meteor.meteor import Meteor

    direct = _coco_direct(PREDICTIONS, REFERENCES, {"METEOR": Meteor()})["METEOR"]
    ours, frame = score_captions(PREDICTIONS, REFERENCES, metrics=("METEOR",), per_image=True)
    assert ours == {"METEOR": pytest.approx(direct[0], rel=1e-12)}
    assert frame["METEOR"].tolist() == pytest.approx(direct[1], rel=1e-12)
    # the JVM is kept for the next call (it takes ~15 s to start) and gives the same numbers
    assert score_captions(PREDICTIONS, REFERENCES, metrics=("METEOR",)) == ours
    metrics.close_meteor()


@needs_java
def test_a_meteor_that_dies_is_skipped_not_hung(monkeypatch):
    """A JVM that dies mid-call leaves pycocoevalcap's Meteor holding its lock; we must still let go."""
    from pycocoevalcap.meteor.meteor import Meteor

    metrics.close_meteor()
    scorer = metrics._METEOR["scorer"] = Meteor()

    def dies(gts, res):
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
        return Meteor.compute_score(scorer, gts, res)  # writes to the dead JVM with the lock held

    monkeypatch.setattr(scorer, "compute_score", dies)
    with pytest.warns(MetricSkipped, match="METEOR could not run and was skipped"):
        scores = score_captions(PREDICTIONS, REFERENCES, metrics=("METEOR", "BLEU"), tokenize=False)
    assert "METEOR" not in scores and "BLEU-4" in scores
    assert "scorer" not in metrics._METEOR and not scorer.lock.locked()
    scorer.__del__()  # what garbage collection will do: returns at once, raises nothing


# Three images whose captions share no n-gram, so every n-gram's IDF is log(3) > 0.
DISTINCT = {"a": "red square on the left side", "b": "small blue circle near bottom edge",
            "c": "green triangle at top right corner"}


def test_perfect_prediction_scores_the_maximum():
    references = {i: [s, s, s] for i, s in DISTINCT.items()}
    perfect = score_captions(DISTINCT, references, metrics=("BLEU", "ROUGE_L", "CIDEr"))
    assert perfect["BLEU-4"] == pytest.approx(1.0, abs=1e-8)
    assert perfect["ROUGE_L"] == pytest.approx(1.0, abs=1e-12)
    # CIDEr-D: mean over n=1..4 of cos = 1, averaged over references, times 10
    assert perfect["CIDEr"] == pytest.approx(10.0, abs=1e-9)

    shuffled = {"a": "left side red square on the", "b": "near bottom edge small blue circle",
                "c": "corner green triangle at top right"}
    imperfect = score_captions(shuffled, references, metrics=("BLEU", "ROUGE_L", "CIDEr"))
    assert all(imperfect[k] < perfect[k] - 0.1 for k in ("BLEU-4", "ROUGE_L", "CIDEr"))
    assert imperfect["BLEU-1"] == pytest.approx(1.0, abs=1e-8)  # same words, other order

    disjoint = score_captions({i: "purple cross" for i in DISTINCT}, references, metrics=("BLEU",))
    assert disjoint["BLEU-1"] < 1e-9


def test_cider_of_a_single_image_is_zero_even_when_perfect():
    """CIDEr weighs n-grams by IDF over the images scored: in a one-image corpus every weight is 0."""
    scores = score_captions({"a": DISTINCT["a"]}, {"a": [DISTINCT["a"]]}, metrics=("CIDEr", "BLEU"))
    assert scores["CIDEr"] == 0.0
    assert scores["BLEU-4"] == pytest.approx(1.0, abs=1e-8)


def test_bleu_textbook_example():
    """Papineni et al. 2002: 'the' x7 against two references has modified unigram precision 2/7,
    and its length 7 equals the closest reference length, so no brevity penalty."""
    scores = score_captions({"x": "the the the the the the the"},
                            {"x": ["the cat is on the mat", "there is a cat on the mat"]},
                            metrics=("BLEU",), tokenize=False)
    assert scores["BLEU-1"] == pytest.approx(2 / 7, abs=1e-8)


def test_cider_d_by_hand():
    """CIDEr-D as in pycocoevalcap: tf-idf cosine per n (clipped), mean over n=1..4, x10, and a
    Gaussian length penalty exp(-delta^2 / (2 * 6^2)). Two images, one reference each, so every
    n-gram has IDF log(2) and the weights cancel in the cosines."""
    predictions = {"a": "red square red square", "b": "blue square"}
    references = {"a": ["red square"], "b": ["blue circle"]}
    scores, frame = score_captions(predictions, references, metrics=("CIDEr",), tokenize=False,
                                   per_image=True)

    # a: unigram cos = (1*1 + 1*1) / (sqrt(8) * sqrt(2)) = 1/2 (counts 2 clipped to 1);
    #    bigram cos = 1 / sqrt(5) ("red square" x2 clipped to 1, "square red" x1); no 3-, 4-grams in
    #    the reference; 2 words longer than it.
    a = 10 * (0.5 + 1 / math.sqrt(5) + 0 + 0) / 4 * math.exp(-(2 ** 2) / (2 * 6 ** 2))
    # b: unigram cos = 1/2 ("blue"), nothing else in common, same length
    b = 10 * (0.5 + 0 + 0 + 0) / 4
    assert frame["CIDEr"].tolist() == pytest.approx([a, b], rel=1e-12)
    assert scores["CIDEr"] == pytest.approx((a + b) / 2, rel=1e-12)


def test_empty_predictions_score_zero_without_crashing():
    scores = score_captions({i: "" for i in REFERENCES}, REFERENCES, metrics=("BLEU", "ROUGE_L", "CIDEr"))
    assert max(scores.values()) < 1e-9


def test_without_java_meteor_is_skipped_with_one_message(monkeypatch, tmp_path):
    with_java = score_captions(PREDICTIONS, REFERENCES, metrics=("BLEU", "ROUGE_L", "CIDEr")) \
        if java_available() else None
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no `java` to find
    assert not java_available()

    with pytest.warns(MetricSkipped) as caught:
        scores = score_captions(PREDICTIONS, REFERENCES)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "METEOR and SPICE were skipped" in message
    assert "apt-get install -y default-jre-headless" in message and "conda install openjdk" in message
    assert set(scores) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE_L", "CIDEr"}
    if with_java is not None:  # the Python tokenizer reads these captions as PTBTokenizer does
        assert scores == pytest.approx(with_java, rel=1e-12)


def test_spice_is_skipped_with_one_message_when_its_models_are_missing(monkeypatch):
    monkeypatch.setattr(metrics, "java_available", lambda: True)
    monkeypatch.setattr(metrics, "spice_ready", lambda: False)
    with pytest.warns(MetricSkipped, match="SPICE needs to download Stanford CoreNLP models at run time: "
                                           "skipped") as caught:
        scores = score_captions(PREDICTIONS, REFERENCES, metrics=("BLEU", "SPICE"), tokenize=False)
    assert len(caught) == 1
    assert "SPICE" not in scores and "BLEU-4" in scores
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: a notebook scoring again hears nothing more
        score_captions(PREDICTIONS, REFERENCES, metrics=("BLEU", "SPICE"), tokenize=False)


@needs_java
def test_simple_tokenizer_reads_captions_as_ptb_does():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = ["A dog. A cat.", "Two dogs, one cat; and: a bird?", "50% off at 3:30 p.m. today",
                "It's the dogs' toys, isn't it", "He said 'hello' to `them`", "a man--running - fast",
                "well...okay", "A cat's #1 toy costs $5", "I'm we're they've you'll he'd", "a 1,000 dollars",
                "the U.S. flag.", "A man (smiling) [left] {x}", "\"quoted\"", "a white-and-black dog",
                "3.5 inches", "cannot", "A group of people standing around a table with food.",
                "a dog;cat", "a,b", "Don't."]
    ptb = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    assert [simple_tokenize(c) for c in captions] == [ptb[i][0] for i in range(len(captions))]


def test_mismatched_ids_are_named():
    with pytest.raises(ValueError, match=r"no reference captions: 'img9'.*no prediction: 'img4'"):
        score_captions({**{i: PREDICTIONS[i] for i in ("img1", "img2", "img3")}, "img9": "a cat"}, REFERENCES)
    with pytest.raises(ValueError, match="no reference captions: 'img1'"):
        score_captions(PREDICTIONS, {**REFERENCES, "img1": []})
    with pytest.raises(ValueError, match="Unknown metric 'BLUE'"):
        score_captions(PREDICTIONS, REFERENCES, metrics=("BLUE",))


# ------------------------------------------------------------------------------------ CLIPScore


@pytest.fixture(scope="module")
def standin_clip(models_dir):
    model, preprocess = clip.load(str(clip_archive("ViT-B/32", models_dir)), device="cpu", jit=False)
    return model.eval(), preprocess


@pytest.fixture(scope="module")
def drawings(tmp_path_factory):
    """Four embedded-set drawings, and the captions of a few more: the stand-in CLIP's own world."""
    folder = tmp_path_factory.mktemp("clipscore") / "embedded"
    captions = embedded_set(folder, n_images=20, seed=7)
    names = sorted(captions)
    return [Image.open(folder / "images" / n).convert("RGB") for n in names[:4]], [captions[n] for n in names]


@pytest.fixture(scope="module")
def case(standin_clip, drawings):
    """Images, candidates and references chosen so that max(cos, 0) bites on both sides: image 0 gets the
    caption of another drawing it fits worst (negative cosine), image 1 its own caption (positive), then
    an empty and an over-long caption."""
    model, preprocess = standin_clip
    images, captions = drawings
    pool = [c for caps in captions[1:] for c in caps]
    worst = pool[int(np.argmin(_image_text_cos(model, preprocess, images[:1] * len(pool), pool)))]
    candidates = [worst, captions[1][0], "", "a dog " * 60]
    references = [[worst], [captions[1][1], captions[1][0]], ["a green triangle", "a triangle", "x"], ["a dog"]]
    return images, candidates, references


PREFIX = "A photo depicts "


def _encode_texts(model, texts):
    with torch.no_grad():
        return model.encode_text(clip.tokenize(texts, truncate=True)).float()


def _image_text_cos(model, preprocess, images, texts):
    """Cosines straight from encode_image / encode_text, image k against text k."""
    with torch.no_grad():
        pixels = model.encode_image(torch.stack([preprocess(im) for im in images])).float()
    return torch.nn.functional.cosine_similarity(pixels, _encode_texts(model, texts), dim=-1).double().numpy()


def _text_text_cos(model, text, others):
    """Cosines of one text against each of `others`."""
    return torch.nn.functional.cosine_similarity(_encode_texts(model, [text]), _encode_texts(model, others),
                                                 dim=-1).double().numpy()


def test_clip_score_is_w_times_clipped_cosine(standin_clip, case):
    model, preprocess = standin_clip
    images, candidates, references = case
    cos = _image_text_cos(model, preprocess, images, candidates)
    assert cos[1] > 0.5 > 0 > cos[0], "the stand-in CLIP fits a drawing's own caption, not the worst one"
    scores = clip_score(model, preprocess, images, candidates, "cpu", prefix="")
    assert scores.shape == (4,)
    np.testing.assert_allclose(scores, 2.5 * np.maximum(cos, 0), atol=1e-6)
    np.testing.assert_allclose(clip_score(model, preprocess, images, candidates, "cpu", w=1.0, prefix=""),
                               scores / 2.5, atol=1e-6)
    # the default reads each caption as the paper's code does: "A photo depicts <caption>"
    np.testing.assert_allclose(clip_score(model, preprocess, images, candidates, "cpu"),
                               clip_score(model, preprocess, images, [PREFIX + c for c in candidates], "cpu",
                                          prefix=""), atol=1e-6)


def test_ref_clip_score_is_the_harmonic_mean(standin_clip, case):
    model, preprocess = standin_clip
    images, candidates, references = case
    clip_s = clip_score(model, preprocess, images, candidates, "cpu", prefix="")
    best = [max(0.0, *_text_text_cos(model, c, refs)) for c, refs in zip(candidates, references)]
    expected = [2 * c * t / (c + t) if c + t > 0 else 0.0 for c, t in zip(clip_s, best)]
    scores = ref_clip_score(model, preprocess, images, candidates, references, "cpu", prefix="")
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    assert clip_s[1] > 0 and best[1] == pytest.approx(1.0, abs=1e-5)  # the caption is one of its references
    assert scores[1] == pytest.approx(2 * clip_s[1] / (clip_s[1] + 1), abs=1e-5)
    assert clip_s[0] == 0 and best[0] > 0 and scores[0] == 0  # no fit to the image: references cannot save it
    np.testing.assert_allclose(  # the prefix goes before candidates and references alike
        ref_clip_score(model, preprocess, images, candidates, references, "cpu"),
        ref_clip_score(model, preprocess, images, [PREFIX + c for c in candidates],
                       [[PREFIX + r for r in refs] for refs in references], "cpu", prefix=""), atol=1e-6)


def test_clip_scores_do_not_depend_on_batching_or_order(standin_clip, case):
    model, preprocess = standin_clip
    images, candidates, references = case
    whole = clip_score(model, preprocess, images, candidates, "cpu", prefix="")
    one_by_one = clip_score(model, preprocess, images, candidates, "cpu", prefix="", batch_size=1)
    np.testing.assert_allclose(one_by_one, whole, atol=1e-6)
    alone = clip_score(model, preprocess, images[1:2], candidates[1:2], "cpu", prefix="")  # one pair alone
    np.testing.assert_allclose(alone, whole[1:2], atol=1e-6)
    order = [2, 0, 3, 1]
    np.testing.assert_allclose(clip_score(model, preprocess, [images[i] for i in order],
                                          [candidates[i] for i in order], "cpu", prefix="", batch_size=3),
                               whole[order], atol=1e-6)
    refs = ref_clip_score(model, preprocess, images, candidates, references, "cpu", prefix="")
    shuffled = ref_clip_score(model, preprocess, [images[i] for i in order], [candidates[i] for i in order],
                              [references[i] for i in order], "cpu", prefix="", batch_size=1)
    np.testing.assert_allclose(shuffled, refs[order], atol=1e-6)
    with pytest.raises(ValueError, match="one entry per image"):
        clip_score(model, preprocess, images, candidates[:3], "cpu")


# -------------------------------------------------------------------------------------- results


def test_results_table_prints_as_papers_do():
    table = results_table({"BLEU-4": 0.32149, "CIDEr": 1.08351}, compare=PAPER_REFERENCE)
    assert table.index.tolist() == ["BLEU-4", "CIDEr", "METEOR", "SPICE"]  # ours first, then the paper's
    assert table.loc["BLEU-4", "ours"] == 32.1 and table.loc["CIDEr", "ours"] == 108.4
    assert pd.isna(table.loc["METEOR", "ours"])
    assert table.loc["CIDEr", "ClipCap paper: Transformer, frozen GPT-2"] == 113.08
    assert table.loc["BLEU-4", "ClipCap paper: MLP + GPT-2 tuning"] == 32.15


def test_write_results_round_trips(tmp_path):
    scores, frame = score_captions(DISTINCT, {i: [s] for i, s in DISTINCT.items()}, metrics=("BLEU", "CIDEr"),
                                   tokenize=False, per_image=True)
    path = write_results(tmp_path / "eval" / "results.json", scores, frame.to_dict("records"))
    data = json.loads(path.read_text())
    assert data["scores"] == pytest.approx(scores)
    assert [row["image_id"] for row in data["captions"]] == list(DISTINCT)
    assert data["captions"][0]["CIDEr"] == pytest.approx(frame["CIDEr"][0])
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temporary file left


def test_references_by_image_groups_a_cache_split():
    frame = pd.DataFrame({"image_id": ["7", "3", "7"], "caption": ["a", "b", "c"]})
    assert references_by_image(frame) == {"7": ["a", "c"], "3": ["b"]}
