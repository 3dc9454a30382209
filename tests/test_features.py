"""The CLIP feature cache, driven through the real code with the stand-in CLIP."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import ROOT, cli_env, run_cli
from utils.config import DataConfig, FeatureConfig, RuntimeConfig
from utils.readers import load_records
from utils.features import FeatureCacheError, cache_features, load_cache
from utils.paths import default_cache_dir
from utils.standin_names import STANDIN_CLIP_DIM

OFFLINE = RuntimeConfig(offline=True, device="cpu")


def _embedded(data_dir, **kw) -> DataConfig:
    return DataConfig(dataset="embedded", data_dir=str(data_dir), **kw)


def _cache(data: DataConfig, out, **kw):
    cfg = FeatureConfig(cache_dir=str(out), num_workers=0, **kw)
    return cache_features(load_records(data), cfg, data, OFFLINE)


def test_cache_holds_one_row_per_image_and_every_caption(data_dir, tmp_path):
    data = _embedded(data_dir, max_images=60)
    cache = load_cache(_cache(data, tmp_path / "c", batch_size=16, chunk_size=25))
    records = load_records(data)
    assert cache.meta["complete"] and cache.meta["standin"] and cache.meta["backbone"] == "standin:ViT"
    assert cache.features.shape == (60, STANDIN_CLIP_DIM) and cache.features.dtype == np.float16
    assert len(cache.captions) == len(records.records)
    assert cache.images["feature_row"].tolist() == list(range(60))
    assert set(cache.captions["image_id"]) == set(cache.images["image_id"])
    splits = cache.captions.groupby("image_id")["split"].nunique()
    assert (splits == 1).all(), "an image appears in two splits"
    assert not (tmp_path / "c" / "chunks").exists()


def test_feature_rows_match_encoding_each_image_alone(data_dir, tmp_path):
    import clip
    import torch

    from utils.standin_clip import clip_archive

    data = _embedded(data_dir, max_images=10)
    cache = load_cache(_cache(data, tmp_path / "c", batch_size=4, chunk_size=6))
    model, preprocess = clip.load(str(clip_archive("ViT-B/32")), device="cpu", jit=False)
    for row in cache.images.itertuples():
        with torch.no_grad():
            alone = model.encode_image(preprocess(Image.open(row.image_path)).unsqueeze(0))[0].numpy()
        np.testing.assert_allclose(cache.features[row.feature_row].astype(np.float32), alone, atol=2e-3, rtol=2e-3)


def _write_bad_images(folder):
    """One image of every awkward kind; returns {file name: expected to be cached?}."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.new("RGB", (40, 30), (200, 30, 30))
    rgb.save(folder / "good.jpg")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    rgb.convert("P").save(folder / "palette.png")
    Image.new("RGBA", (20, 20), (0, 0, 255, 90)).save(folder / "rgba.png")
    Image.fromarray(np.arange(0, 60000, 60, dtype=np.uint16).reshape(25, 40)).save(folder / "deep16.png")
    rgb.convert("L").save(folder / "grey.png")
    Image.new("RGB", (1, 1), (9, 9, 9)).save(folder / "tiny.png")
    (folder / "empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8)).save(buf, "JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "notes.jpg").write_text("this is not an image")
    return {"good.jpg": True, "cmyk.jpg": True, "palette.png": True, "rgba.png": True, "deep16.png": True,
            "grey.png": True, "tiny.png": True, "empty.jpg": False, "truncated.jpg": False,
            "notes.jpg": False, "missing.jpg": False}


@pytest.mark.fault
def test_unreadable_images_are_skipped_listed_and_counted(data_dir, tmp_path):
    expected = _write_bad_images(tmp_path / "imgs")
    rows = "".join(f"{name},a picture called {name}\n" for name in expected)
    (tmp_path / "caps.csv").write_text("image,caption\n" + rows)
    data = DataConfig(dataset="csv", path=str(tmp_path / "caps.csv"), images_dir=str(tmp_path / "imgs"),
                      data_dir=str(data_dir))
    cache = load_cache(_cache(data, tmp_path / "c", batch_size=4, chunk_size=5))
    cached = {os.path.basename(p) for p in cache.images["image_path"]}
    skipped = dict(zip(cache.skipped["image_path"].map(os.path.basename), cache.skipped["reason"]))
    assert cached == {n for n, ok in expected.items() if ok}
    assert set(skipped) == {n for n, ok in expected.items() if not ok}
    assert all(reason.strip() for reason in skipped.values())
    assert cache.meta["num_skipped"] == 4 and cache.meta["num_images"] == 7
    assert np.isfinite(cache.features.astype(np.float32)).all()


@pytest.mark.fault
def test_cache_from_another_backbone_is_refused(data_dir, tmp_path):
    data = _embedded(data_dir, max_images=12)
    out = _cache(data, tmp_path / "c", chunk_size=8)
    with pytest.raises(FeatureCacheError, match=r"backbone: cache has 'standin:ViT', you asked for 'standin:RN'"):
        _cache(data, out, chunk_size=8, backbone="RN50x4")
    with pytest.raises(FeatureCacheError, match="holds standin:ViT features, not standin:RN"):
        load_cache(out, backbone="standin:RN")
    with pytest.raises(FeatureCacheError, match=r"images: the cache holds the 12 images .*captions.csv listed when "
                                                r"it was made; now 13 images are asked for") as err:
        _cache(_embedded(data_dir, max_images=13), out, chunk_size=8)  # other images, same folder
    assert "delete" not in str(err.value).lower() and "--cache-dir DIR" in str(err.value)


@pytest.mark.fault
def test_incomplete_cache_is_refused_with_what_to_do(tmp_path):
    (tmp_path / "meta.json").write_text('{"format_version": 1, "complete": false}')
    with pytest.raises(FeatureCacheError, match="incomplete.*rerun"):
        load_cache(tmp_path)
    with pytest.raises(FeatureCacheError, match="No feature cache"):
        load_cache(tmp_path / "nothing")


@pytest.mark.fault
def test_kill_during_caching_then_rerun_equals_uninterrupted(data_dir, tmp_path):
    """kill -9 in the middle of a real `python -m utils features` run, rerun, compare with a clean run."""
    args = ["features", "--dataset", "embedded", "--max-images", "600", "--batch-size", "4",
            "--chunk-size", "40", "--num-workers", "0", "--device", "cpu"]
    run_cli(*args, "--cache-dir", str(tmp_path / "clean"), data_dir=data_dir)

    env = cli_env(data_dir)
    chunks = tmp_path / "killed" / "chunks"
    proc = subprocess.Popen([sys.executable, "-m", "utils", *args, "--cache-dir", str(tmp_path / "killed")],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(chunks.glob("*.npz"))) < 3 and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be interrupted"
    done = len(list(chunks.glob("*.npz")))
    assert 0 < done < 15 and not (tmp_path / "killed" / "features.npy").exists()

    resumed = run_cli(*args, "--cache-dir", str(tmp_path / "killed"), data_dir=data_dir)
    assert f"resuming: {done} chunk(s) already cached" in resumed.stdout
    clean, killed = load_cache(tmp_path / "clean"), load_cache(tmp_path / "killed")
    assert np.array_equal(np.asarray(clean.features), np.asarray(killed.features))
    pd.testing.assert_frame_equal(clean.images, killed.images)
    pd.testing.assert_frame_equal(clean.captions, killed.captions)


def test_features_cli_on_a_users_own_csv_and_folder(data_dir, tmp_path):
    folder = tmp_path / "my photos"
    folder.mkdir()
    for i, colour in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (80, 60), colour).save(folder / f"IMG_{i}.JPG")
    (tmp_path / "mine.csv").write_text("file;text\nIMG_0.JPG;a red wall\nIMG_1.JPG;green paint\n"
                                       "IMG_1.JPG;a green door\nIMG_2.JPG;the blue sea\n")
    proc = run_cli("features", "--dataset", "csv", "--path", str(tmp_path / "mine.csv"), "--images-dir",
                   str(folder), "--image-column", "file", "--caption-column", "text", "--separator", ";",
                   "--num-workers", "0", data_dir=data_dir)
    assert "OFFLINE MODE" in proc.stderr
    out = default_cache_dir(DataConfig(dataset="csv", path=str(tmp_path / "mine.csv"), images_dir=str(folder),
                                       data_dir=str(data_dir)), "standin:ViT")
    assert out.parent == data_dir / "features" and out.name.startswith("csv-mine-")  # named after its source
    assert f"feature cache ready at {out}: 3 images, 4 captions" in proc.stdout
    assert load_cache(out).captions["caption"].tolist() == ["a red wall", "green paint", "a green door",
                                                            "the blue sea"]
