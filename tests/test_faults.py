"""The fault matrix: each row one fault or bad input, met the way a user meets it (the real
`python -m utils ...` commands in a subprocess wherever that is what a user runs), each asserting the
outcome: a clear message naming the file or row and what to do, or a counted skip, and nothing lost.

Every test marked `fault` is a row; the summary at the end of the test run counts them
(tests/conftest.py). Rows that live beside the code they exercise, also marked `fault`:
kill -9 during feature caching (test_features.py), kill -9 during training then --resume, resuming
with other settings, a checkpoint carrying pickled code (test_training.py), a cache from another
backbone or an unfinished one (test_features.py), missing / bad / refused Kaggle credentials and a
dataset that is not found (test_download.py).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TouchWhenUnpickled, quick_train_config, run_cli
from utils.captioner import Captioner
from utils.model import CaptionerError
from utils.config import ModelConfig, RuntimeConfig
from utils.images import UnreadableImage, decode_image
from utils.features import load_cache
from utils.files import DiskFull
from utils.training import train

pytestmark = pytest.mark.fault
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------- images and caption rows
# One folder holding every bad image and a caption file holding every bad row, cached by one real
# `python -m utils features` run; each case below is then one row of the matrix.

def _jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG")
    return out.getvalue()


def _write_images(folder: Path) -> None:
    folder.mkdir(parents=True)
    red = Image.new("RGB", (40, 30), (200, 30, 30))
    red.save(folder / "good.jpg")
    (folder / "zero.jpg").write_bytes(b"")
    noise = _jpeg(Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8)))
    (folder / "truncated.jpg").write_bytes(noise[: len(noise) // 2])
    (folder / "notes.jpg").write_text("this is not an image")
    (folder / "folder.jpg").mkdir()
    red.convert("P").save(folder / "palette.png")
    Image.new("RGBA", (20, 20), (0, 0, 255, 90)).save(folder / "rgba.png")
    Image.fromarray(np.arange(0, 60000, 60, dtype=np.uint16).reshape(25, 40)).save(folder / "deep16.png")
    red.convert("CMYK").save(folder / "cmyk.jpg")
    red.convert("L").save(folder / "grey.png")
    Image.new("RGB", (1, 1), (9, 9, 9)).save(folder / "onepixel.png")
    Image.new("RGB", (10000, 10000), (0, 128, 255)).save(folder / "huge.jpg", quality=50)
    red.save(folder / "locked.png")
    (folder / "locked.png").chmod(0)


# file -> the reason it is skipped for, or None when it must be cached (converted to RGB)
IMAGE_CASES = {
    "zero.jpg": "zero bytes",
    "truncated.jpg": "truncated JPEG",
    "notes.jpg": "not an image",
    "missing.jpg": "missing file",
    "folder.jpg": "a folder, not an image file",
    "locked.png": None if AS_ROOT else "permission denied",  # root reads a chmod 000 file
    "palette.png": None, "rgba.png": None, "deep16.png": None, "cmyk.jpg": None, "grey.png": None,
    "onepixel.png": None, "huge.jpg": None,
}

LONG = " ".join(["a very long caption"] * 750)  # 3000 words: kept here, cut to the LM's positions in training
# (row as written in the file, what must be printed about its line or None, the caption kept or None)
CAPTION_CASES = {
    "missing separator": (b"good.jpg a caption and no comma", b"1 fields where the header has 2", None),
    "extra separators": (b"good.jpg,a dog, a cat", b"3 fields where the header has 2", None),
    "quoted separator": (b'good.jpg,"a dog, a cat"', None, "a dog, a cat"),
    "doubled quotes": (b'good.jpg,"a ""quoted"" word"', None, 'a "quoted" word'),
    "unclosed quote": (b'good.jpg,"a quote never closed', b"a quote opened and not closed", None),
    "row after the unclosed quote": (b"good.jpg,the row after it", None, "the row after it"),
    "empty caption": (b"good.jpg,", b"empty caption; skipped", None),
    "blank caption": (b"good.jpg,   ", b"empty caption; skipped", None),
    "very long caption": (f"good.jpg,{LONG}".encode(), None, LONG),
    "non-UTF-8 bytes": (b"good.jpg,caf\xe9 au lait", b"bytes that are not UTF-8 replaced", "caf\ufffd au lait"),
    "no image name": (b",a caption of nothing", b"no image name in column 'image'", None),
}


@pytest.fixture(scope="module")
def bad_run(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    _write_images(root / "imgs")
    lines = [b"image,caption"] + [f"{name},a picture called {name}".encode() for name in IMAGE_CASES]
    line_of = {}
    for case, (row, _, _) in CAPTION_CASES.items():
        lines.append(row)
        line_of[case] = len(lines)
    (root / "caps.csv").write_bytes(b"\n".join(lines) + b"\n")
    proc = run_cli("features", "--dataset", "csv", "--path", str(root / "caps.csv"), "--images-dir",
                   str(root / "imgs"), "--cache-dir", str(root / "cache"), "--num-workers", "2", "--batch-size",
                   "4", "--device", "cpu", data_dir=data_dir)
    yield proc.stdout + proc.stderr, load_cache(root / "cache"), line_of
    (root / "imgs" / "locked.png").chmod(0o644)


@pytest.mark.parametrize("name", IMAGE_CASES)
def test_image(bad_run, name):
    output, cache, _ = bad_run
    reason = IMAGE_CASES[name]
    cached = {Path(p).name: row for p, row in zip(cache.images["image_path"], cache.images["feature_row"])}
    skipped = dict(zip(cache.skipped["image_path"].map(lambda p: Path(p).name), cache.skipped["reason"]))
    if reason is None:
        assert name in cached and name not in skipped
        assert np.isfinite(np.asarray(cache.features[cached[name]], dtype=np.float32)).all()
        assert f"a picture called {name}" in set(cache.captions["caption"])
    else:
        assert name not in cached and reason in skipped[name], skipped.get(name)
        assert f"skipped {cache.skipped.set_index('image_id').loc[Path(name).stem, 'image_path']}: {reason}" \
            in output, "the command names each skipped image and why"
    expected_skips = sum(r is not None for r in IMAGE_CASES.values())
    assert cache.meta["num_skipped"] == expected_skips and f"{expected_skips} unreadable image(s)" in output


@pytest.mark.parametrize("case", CAPTION_CASES)
def test_caption_row(bad_run, case):
    output, cache, line_of = bad_run
    _, message, kept = CAPTION_CASES[case]
    where = f"caps.csv line {line_of[case]}:"
    said = [line for line in output.splitlines() if where in line]
    if message is None:
        assert not said, said
    else:
        assert len(said) == 1 and message.decode() in said[0], said
    if kept is not None:
        assert kept in set(cache.captions["caption"]), "a usable row is never lost"


def test_every_usable_row_is_in_the_cache(bad_run):
    output, cache, _ = bad_run
    readable = [n for n, reason in IMAGE_CASES.items() if reason is None]
    kept = [k for _, _, k in CAPTION_CASES.values() if k is not None]
    assert sorted(cache.captions["caption"]) == sorted([f"a picture called {n}" for n in readable] + kept)
    skipped_rows = sum(m is not None and b"replaced" not in m for _, m, _ in CAPTION_CASES.values())
    assert f"{skipped_rows} rows skipped, 1 repaired" in output


def test_caption_file_naming_only_missing_images(data_dir, tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "notes.txt").write_text("the user's own file")
    (tmp_path / "caps.csv").write_text("image,caption\nnowhere.jpg,a dog\nelsewhere.jpg,a cat\n")
    proc = run_cli("features", "--dataset", "csv", "--path", str(tmp_path / "caps.csv"), "--images-dir",
                   str(tmp_path / "imgs"), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
                   data_dir=data_dir, check=False)
    _refused(proc, "none of the 2 images could be read", "nowhere.jpg: missing file", "--images-dir")
    assert "2 of 2 images named in caps.csv are missing on disk" in proc.stdout
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["notes.txt"], \
        "no empty cache is left to be mistaken for a finished one, and nothing else is removed"


@pytest.mark.parametrize("content", [b"", b"image,caption\n", b"\xff\xfe\x00garbage", b'"image,caption\na.jpg,x\n'],
                         ids=["empty", "header only", "binary", "broken header"])
def test_caption_file_with_nothing_usable(data_dir, tmp_path, content):
    (tmp_path / "caps.csv").write_bytes(content)
    proc = run_cli("features", "--dataset", "csv", "--path", str(tmp_path / "caps.csv"), "--cache-dir",
                   str(tmp_path / "cache"), "--device", "cpu", data_dir=data_dir, check=False)
    _refused(proc, "caps.csv")
    assert not (tmp_path / "cache").exists()


def test_old_mac_line_endings(data_dir, tmp_path):
    """Excel for Mac's "CSV (Macintosh)" ends lines with a bare CR."""
    Image.new("RGB", (40, 30), "red").save(tmp_path / "a.jpg")
    (tmp_path / "caps.csv").write_bytes(b"image,caption\ra.jpg,a red picture\ra.jpg,all red\r")
    run_cli("features", "--dataset", "csv", "--path", str(tmp_path / "caps.csv"), "--cache-dir",
            str(tmp_path / "cache"), "--device", "cpu", data_dir=data_dir)
    assert sorted(load_cache(tmp_path / "cache").captions["caption"]) == ["a red picture", "all red"]


# ---------------------------------------------------------------------------- checkpoints and bundles

def _train_args(cache: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--features", str(cache), "--max-steps", "4", "--batch-size", "8", "--num-layers", "1",
            "--warmup-steps", "2", "--checkpoint-every", "2", "--device", "cpu", "--out-dir", str(out), *extra]


@pytest.fixture(scope="module")
def trained(small_cache, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    run_cli(*_train_args(small_cache, out), data_dir=data_dir)
    return out


def _refused(proc, *fragments: str) -> None:
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    message = proc.stderr[proc.stderr.rfind("error: "):]
    assert message.startswith("error: ") and all(f in message for f in fragments), proc.stderr[-2000:]


def test_resume_with_another_config_via_cli(trained, small_cache, data_dir):
    before = _digest(trained / "checkpoint.pt")
    proc = run_cli(*_train_args(small_cache, trained, "--resume", "--prefix-length", "7"), data_dir=data_dir,
                   check=False)
    _refused(proc, "model.prefix_length: checkpoint has 10, now 7")
    assert _digest(trained / "checkpoint.pt") == before


def test_checkpoint_from_another_version_via_cli(trained, small_cache, data_dir, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    checkpoint = torch.load(trained / "checkpoint.pt", weights_only=True)
    torch.save({**checkpoint, "version": 0}, old / "checkpoint.pt")
    before = _digest(old / "checkpoint.pt")
    _refused(run_cli(*_train_args(small_cache, old, "--resume"), data_dir=data_dir, check=False),
             "version 0 checkpoint")
    assert _digest(old / "checkpoint.pt") == before


def test_checkpoint_carrying_code_via_cli(small_cache, data_dir, tmp_path):
    (tmp_path / "evil").mkdir()
    with open(tmp_path / "evil" / "checkpoint.pt", "wb") as f:
        pickle.dump({"version": 1, "payload": TouchWhenUnpickled(tmp_path / "pwned")}, f)
    _refused(run_cli(*_train_args(small_cache, tmp_path / "evil", "--resume"), data_dir=data_dir, check=False),
             "refused, not executed")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("damage", ["pickled code", "truncated", "another prefix length", "truncated LM",
                                    "broken config"])
def test_damaged_bundle_is_refused_by_caption(trained, data_dir, tmp_path, damage):
    bundle = shutil.copytree(trained / "captioner", tmp_path / "bundle")
    weights = bundle / "mapper.safetensors"
    if damage == "pickled code":
        with open(weights, "wb") as f:
            pickle.dump(TouchWhenUnpickled(tmp_path / "pwned"), f)
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "truncated LM":
        lm = bundle / "lm" / "model.safetensors"
        lm.write_bytes(lm.read_bytes()[:1000])
    elif damage == "broken config":
        (bundle / "config.json").write_text('{"bundle_version": 1, "model": {"mapper": ')
    else:
        config = (bundle / "config.json").read_text()
        (bundle / "config.json").write_text(config.replace('"prefix_length": 10', '"prefix_length": 12'))
    Image.new("RGB", (64, 64), "red").save(tmp_path / "photo.png")
    proc = run_cli("caption", "--model", str(bundle), str(tmp_path / "photo.png"), data_dir=data_dir, check=False)
    _refused(proc, str(bundle))
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------------------- diverging, disk full

def test_diverging_training_stops_with_the_checkpoint_intact(small_cache, data_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(*_train_args(small_cache, out, "--lr", "30", "--max-steps", "40", "--warmup-steps", "1"),
                   data_dir=data_dir, check=False)  # lr 30: a checkpoint at step 2, then the gradients overflow
    _refused(proc, "training diverged", "lower --lr")
    assert "checkpoint at step 2" in proc.stdout + proc.stderr
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in checkpoint["trainable"].values())


def test_disk_full_while_writing_a_checkpoint(small_cache, data_dir, tmp_path):
    """The kernel's own ENOSPC: the checkpoint's temporary file is made to point at /dev/full."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    offline, model = RuntimeConfig(offline=True, device="cpu"), ModelConfig(num_layers=1)
    train(small_cache, model, quick_train_config(tmp_path, max_steps=2), offline, data_dir)
    checkpoint = tmp_path / "checkpoint.pt"
    before = _digest(checkpoint)
    (tmp_path / f".checkpoint.pt.tmp-{os.getpid()}").symlink_to("/dev/full")
    with pytest.raises(DiskFull, match="no space left on device while writing .*checkpoint.pt; nothing was "
                                       "replaced") as info:
        train(small_cache, model, quick_train_config(tmp_path, max_steps=4, resume=True), offline, data_dir)
    assert "--resume" in str(info.value)
    assert _digest(checkpoint) == before
    assert not list(tmp_path.glob(".checkpoint.pt.tmp-*")), "no temporary file is left behind"
    resumed = train(small_cache, model, quick_train_config(tmp_path, max_steps=4, resume=True), offline, data_dir)
    assert torch.load(checkpoint, weights_only=True)["state"]["step"] == 4 and resumed.bundle.exists()


def test_a_bundle_never_replaces_a_folder_that_is_not_one(trained, tmp_path):
    """`import-clipcap --out ~/Downloads` must not swap the user's folder for a bundle."""
    folder = tmp_path / "Downloads"
    folder.mkdir()
    (folder / "photo.jpg").write_bytes(b"precious")
    captioner = Captioner.from_pretrained(trained / "captioner")
    with pytest.raises(CaptionerError, match="exists and is not a captioner bundle"):
        captioner.save_pretrained(folder)
    assert [p.name for p in tmp_path.iterdir()] == ["Downloads"] and (folder / "photo.jpg").read_bytes() == b"precious"
    captioner.save_pretrained(tmp_path / "bundle")
    captioner.save_pretrained(tmp_path / "bundle")  # a bundle does replace the bundle it updates
    assert Captioner.from_pretrained(tmp_path / "bundle").config == captioner.config


def test_postscript_is_never_handed_to_ghostscript():
    """Pillow opens EPS by running Ghostscript on it: an uploaded file must never get that far."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n"
    with pytest.raises(UnreadableImage, match=r"^not an image"):
        decode_image(eps)
