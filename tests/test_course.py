"""The main job as one call: run twice it reuses what it made, continues what it left unfinished, and
starts anew when asked; a bundle finds its feature cache after the data folder moved, or says where it
looked."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from utils import bundle as bundles
from utils.__main__ import main
from utils.captioner import Captioner
from utils.config import DataConfig, FeatureConfig, RuntimeConfig, standin_preset
from utils.course import run_course
from utils.features import training_cache
from utils.model import CaptionerError
from utils.paths import CoursePaths, course_paths
from utils.standin_text import gpt2_dir

OFFLINE = RuntimeConfig(offline=True, device="cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(small_cache, models_dir):
    """This session's stand-in models, built once (small_cache builds CLIP), for data folders to link to."""
    gpt2_dir(models_dir)
    return models_dir


def settings(data_dir, models, max_steps: int = 6) -> dict:
    """The smallest course: 90 embedded images, a few steps; the data folder links this session's models."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if not (data_dir / "models").exists():
        (data_dir / "models").symlink_to(models, target_is_directory=True)
    model, train = standin_preset()
    return dict(data=DataConfig(data_dir=str(data_dir), embedded_images=90), features=FeatureConfig(num_workers=0),
                model=dataclasses.replace(model, mapper="mlp"),
                train=dataclasses.replace(train, max_steps=max_steps, checkpoint_every=3), runtime=OFFLINE)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, models):
    data_dir = tmp_path_factory.mktemp("course") / "data"
    said = []
    result = run_course(**settings(data_dir, models), say=said.append)
    return data_dir, result, said


def test_the_second_run_reuses_the_cache_and_the_finished_run_and_says_so(first_run, models):
    data_dir, first, said = first_run
    assert first.done == {"features": "made", "training": "made"}
    assert any(line.startswith("encoding every image once into") for line in said)
    assert first.cache == data_dir / "features" / "embedded-standin-ViT"
    assert first.run == data_dir / "runs" / "embedded-mlp" and first.bundle == first.run / "captioner"
    assert {"BLEU-4", "CIDEr", "CLIPScore"} <= set(first.scores) and len(first.captions) == 5
    checkpoint = (first.run / "checkpoint.pt").stat().st_mtime_ns

    again = []
    second = run_course(**settings(data_dir, models), say=again.append)
    assert second.done == {"features": "reused", "training": "reused"}
    text = "\n".join(again)
    assert f"reusing the finished feature cache at {first.cache}: no image is encoded again" in text
    assert f"reusing the finished training run at {first.run} (6 steps)" in text and "--fresh" in text
    assert (first.run / "checkpoint.pt").stat().st_mtime_ns == checkpoint  # nothing trained again
    assert (second.cache, second.run, second.bundle) == (first.cache, first.run, first.bundle)
    assert second.scores == first.scores and second.captions == first.captions
    assert again[-1] == "done: features reused, training reused"
    # the notebooks ask paths.py for the same folders
    assert course_paths(DataConfig(dataset="embedded", data_dir=str(data_dir), embedded_images=90), "ViT-B/32", "mlp",
                        offline=True) == \
        CoursePaths(data_dir, data_dir / "models", first.cache, first.run, first.bundle)


def test_an_unfinished_run_is_continued_and_fresh_keeps_the_old_run(tmp_path, models):
    data_dir = tmp_path / "data"
    short = run_course(**settings(data_dir, models, max_steps=3), say=lambda line: None)
    shutil.rmtree(short.bundle)  # as a session that stopped after its checkpoint at step 3, before the end
    said = []
    longer = run_course(**settings(data_dir, models, max_steps=6), say=said.append)
    assert longer.done == {"features": "reused", "training": "continued"}
    assert f"continuing the unfinished training run at {short.run} from its last checkpoint" in said
    assert json.loads((longer.bundle / "config.json").read_text())["summary"]["steps"] == 6

    said = []
    fresh = run_course(**settings(data_dir, models, max_steps=3), fresh=True, say=said.append)
    assert fresh.done["training"] == "made" and fresh.set_aside == short.run.with_name("embedded-mlp.1")
    assert f"--fresh: the earlier run is kept at {fresh.set_aside}; training a new one in {short.run}" in said
    kept = json.loads((fresh.set_aside / "captioner" / "config.json").read_text())["summary"]
    assert kept["steps"] == 6  # the earlier run, whole
    assert json.loads((fresh.bundle / "config.json").read_text())["summary"]["steps"] == 3


def test_course_flags_say_which_stage_they_set(monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr("utils.course.run_course", lambda *args, **kwargs: seen.update(args=args, kwargs=kwargs))
    main(["course", "--offline", "--batch-size", "128", "--feature-batch-size", "16", "--num-workers", "0",
          "--max-steps", "5"])
    data, features, model, train, runtime, decode = seen["args"]
    assert (train.batch_size, features.batch_size) == (128, 16)  # README: `course --batch-size 128` trains at 128
    assert features.num_workers == 0 and not hasattr(train, "num_workers")  # the feature stage's; training has none
    assert train.max_steps == 5 and seen["kwargs"] == {"fresh": False}
    with pytest.raises(SystemExit):
        main(["course", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--batch-size is the training batch" in text and "--fresh" in text and "--feature-batch-size" in text


def test_captioning_warns_when_it_cannot_encode_as_the_training_features_were(first_run):
    _, first, _ = first_run
    captioner = Captioner.from_pretrained(first.bundle)
    captioner.image_encoder(first.cache.parent.parent / "models")
    image = first.captions[0]["image"]
    assert captioner.encode_fp16() is False  # the cache was made in fp32: so are the files, on any device
    captioner.summary["clip_precision"] = "fp16"  # as a cache made on a GPU records it
    with pytest.warns(UserWarning, match="encoded by CLIP in fp16 on a GPU.*fp32 on the cpu"):
        captioner.caption([image])


def test_a_bundle_finds_its_cache_after_the_data_folder_moved(first_run, tmp_path, monkeypatch, capsys):
    data_dir, first, _ = first_run
    moved = tmp_path / "laptop" / "data"
    shutil.copytree(data_dir, moved, symlinks=True)  # Kaggle's /kaggle/working/data, downloaded to a laptop
    bundle = moved / "runs" / "embedded-mlp" / "captioner"
    summary = json.loads((bundle / "config.json").read_text())["summary"]
    assert summary["features"] == "features/embedded-standin-ViT" and summary["features_fingerprint"]
    assert summary["clip_precision"] == "fp32"  # the dtype rule the cache recorded (a CPU)
    for old_place in ("features", "embedded"):  # the old place is gone: its cache and its images
        shutil.rmtree(data_dir / old_place)

    # the data folder is told (CLIPCAP_DATA), or found from where the bundle sits
    assert bundles.find_training_cache(summary, bundle, moved) == moved / "features" / "embedded-standin-ViT"
    assert bundles.find_training_cache(summary, bundle, tmp_path / "elsewhere") == \
        moved / "features" / "embedded-standin-ViT"
    monkeypatch.setenv("CLIPCAP_DATA", str(moved))
    cache = training_cache(Captioner.from_pretrained(bundle))
    assert all(path.startswith(str(moved)) for path in cache.images["image_path"])  # its images moved too
    main(["evaluate", "--model", str(bundle), "--metrics", "BLEU", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["scores"]["CLIPScore"] > 0 and printed["images"] == 5

    # an older bundle, with the absolute path of its day, finds the cache under the same name
    old = summary | {"features": "/kaggle/working/data/features/embedded-standin-ViT"}
    del old["features_fingerprint"], old["data_dir"]
    assert bundles.find_training_cache(old, bundle) == moved / "features" / "embedded-standin-ViT"

    # another cache under that name, made of other images, is named as such, not used
    meta = moved / "features" / "embedded-standin-ViT" / "meta.json"
    meta.write_text(meta.read_text().replace(summary["features_fingerprint"], "0000000000000000"))
    with pytest.raises(CaptionerError, match="holds other images.*Pass --features"):
        bundles.find_training_cache(summary, bundle)

    # and none at all: evaluate says where it looked and what to do
    shutil.rmtree(moved / "features")
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--model", str(bundle), "--metrics", "BLEU"])
    message = str(exit_.value)
    assert "(features/embedded-standin-ViT) is not on this machine" in message
    assert str(moved / "features" / "embedded-standin-ViT") in message and "--features CACHE_DIR" in message
