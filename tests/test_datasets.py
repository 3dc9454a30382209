"""Every caption reader on a small fixture written here, image opening on broken and odd files, the embedded set."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from utils.config import DataConfig
from utils.embedded import EMBEDDED_ATTRIBUTES, make_embedded
from utils.images import UnreadableImage, open_image
from utils.readers import load_records
from utils.records import DatasetError, split_for


def _cfg(tmp_path: Path, **kw) -> DataConfig:
    return DataConfig(data_dir=str(tmp_path / "data"), **kw)


def _png(path: Path, colour=(10, 20, 30), size=(4, 4)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _png_bytes(colour=(10, 20, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(out, format="PNG")
    return out.getvalue()


# ------------------------------------------------------------------------------------------ readers

FLICKR = """image_name| comment_number| comment
1000092795.jpg| 0| Two young guys with shaggy hair look at their hands while hanging out in the yard .
1000092795.jpg| 1|  Two   young , White males are outside near many bushes .
10002456.jpg| 0| Several men in hard hats are operating a giant pulley system .
this row is garbage
2199200615.jpg| 4 A dog runs across the grass .
2199200615.jpg| 3| A "brown" dog , running .
10002456.jpg| 1|   
"""


def test_flickr30k_repairs_the_known_row_and_reports_bad_ones(tmp_path):
    root = tmp_path / "flickr"
    (root / "flickr30k_images").mkdir(parents=True)
    (root / "flickr30k_images" / "results.csv").write_text(FLICKR)
    images = root / "flickr30k_images" / "flickr30k_images"
    for name in ("1000092795.jpg", "10002456.jpg"):
        _png(images / name)

    caps = load_records(_cfg(tmp_path, dataset="flickr30k"), root)

    assert len(caps.records) == 5 and caps.skipped == 2 and caps.repaired == 1
    repaired = [r for r in caps.records if r.image_id == "2199200615"]
    assert [r.caption for r in repaired] == ["A dog runs across the grass .", 'A "brown" dog , running .']
    assert caps.records[1].caption == "Two young , White males are outside near many bushes ."
    assert caps.records[0].image_path == str(images / "1000092795.jpg")
    assert "results.csv line 6: missing '|' between comment number and caption; repaired" in caps.problems
    assert any(p.startswith("results.csv line 5:") and p.endswith("skipped") for p in caps.problems)
    assert any(p.startswith("results.csv line 8: empty caption") for p in caps.problems)
    assert caps.problems[-1].startswith("1 of 3 images named in results.csv are missing on disk (first: 2199200615.jpg")
    assert "5 captions of 3 images" in caps.summary() and "2 rows skipped, 1 repaired" in caps.summary()
    assert [i[0] for i in caps.images()] == ["1000092795", "10002456", "2199200615"]
    assert list(caps.to_frame().columns) == ["image_id", "image_path", "caption", "split"]


def test_flickr30k_missing_download_says_what_to_do(tmp_path):
    with pytest.raises(DatasetError, match="results.csv"):
        load_records(_cfg(tmp_path, dataset="flickr30k"), tmp_path / "nothing")


def test_coco(tmp_path):
    _png(tmp_path / "train2017" / "a.jpg")
    data = {"images": [{"id": 7, "file_name": "a.jpg"}, {"id": 8, "file_name": "b.jpg"}],
            "annotations": [{"image_id": 7, "caption": "A cat.\n"}, {"image_id": 8, "caption": "A dog."},
                            {"image_id": 7, "caption": "A  small cat."}, {"image_id": 99, "caption": "lost"}]}
    (tmp_path / "annotations").mkdir()
    path = tmp_path / "annotations" / "captions_train2017.json"
    path.write_text(json.dumps(data))

    caps = load_records(_cfg(tmp_path, dataset="coco", path=str(path)))

    assert [(r.image_id, r.caption) for r in caps.records] == [("7", "A cat."), ("8", "A dog."), ("7", "A small cat.")]
    assert caps.records[0].image_path == str(tmp_path / "train2017" / "a.jpg")  # found ../train2017
    assert caps.skipped == 1 and "captions_train2017.json annotation 3" in caps.problems[0]


def test_karpathy_takes_splits_from_the_file(tmp_path):
    images = [
        {"filepath": "val2014", "filename": "x.jpg", "split": "restval", "cocoid": 1,
         "sentences": [{"raw": "one"}, {"raw": "two"}]},
        {"filepath": "val2014", "filename": "y.jpg", "split": "test", "cocoid": 2, "sentences": [{"raw": "three"}]},
        {"filepath": "train2014", "filename": "z.jpg", "split": "val", "cocoid": 3, "sentences": [{"raw": "four"}]},
        {"filename": "broken.jpg", "split": "train", "sentences": []},
    ]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images}))
    _png(tmp_path / "coco" / "val2014" / "x.jpg")

    caps = load_records(_cfg(tmp_path, dataset="karpathy", images_dir=str(tmp_path / "coco")), tmp_path)

    assert [(r.image_id, r.split) for r in caps.records] == [("1", "train"), ("1", "train"), ("2", "test"),
                                                             ("3", "val")]
    assert caps.records[0].image_path == str(tmp_path / "coco" / "val2014" / "x.jpg")
    assert caps.skipped == 1


def test_csv_custom_columns_quotes_bad_rows_and_bytes(tmp_path):
    rows = [b"id;file;text", b'1;a.jpg;He said "hi" loudly', b'2;b.jpg;"quoted; with separator"',
            b"3;c.jpg;too;many", b"4;;no image", b"5;d.jpg;caf\xe9 latte", b'6;a.jpg;"a ""quoted"" word"']
    path = tmp_path / "caps.csv"
    path.write_bytes(b"\n".join(rows) + b"\n")

    caps = load_records(_cfg(tmp_path, dataset="csv", path=str(path), separator=";",
                             image_column="file", caption_column="text"))

    assert [r.caption for r in caps.records] == ['He said "hi" loudly', "quoted; with separator",
                                                 "caf\ufffd latte", 'a "quoted" word']
    assert caps.records[0].image_id == caps.records[3].image_id == "a"  # several captions per image
    assert caps.skipped == 2 and caps.repaired == 1
    assert any(p.startswith("caps.csv line 4: 4 fields") for p in caps.problems)
    assert any(p.startswith("caps.csv line 6: bytes that are not UTF-8") for p in caps.problems)
    assert caps.problems[-1].startswith("3 of 3 images named in caps.csv are missing on disk")


def test_csv_missing_column_lists_the_file_columns(tmp_path):
    path = tmp_path / "caps.csv"
    path.write_text("filename,description\na.jpg,x\n")
    with pytest.raises(DatasetError, match=r"\['filename', 'description'\].*--image-column"):
        load_records(_cfg(tmp_path, dataset="csv", path=str(path)))


def test_tsv_and_nothing_usable(tmp_path):
    path = tmp_path / "caps.tsv"
    path.write_text("image\tcaption\na.png\ta, b and c\n")
    caps = load_records(_cfg(tmp_path, dataset="csv", path=str(path)))
    assert caps.records[0].caption == "a, b and c"
    path.write_text("image\tcaption\na.png\t \n")
    with pytest.raises(DatasetError, match="no usable captions in .*caps.tsv"):
        load_records(_cfg(tmp_path, dataset="csv", path=str(path)))


def test_folder_of_images_with_txt(tmp_path):
    _png(tmp_path / "pics" / "a.jpg")
    (tmp_path / "pics" / "a.txt").write_text("first caption\n\n second caption \n")
    _png(tmp_path / "pics" / "sub" / "b.png")
    (tmp_path / "pics" / "sub" / "b.txt").write_text("third")
    _png(tmp_path / "pics" / "lonely.png")

    caps = load_records(_cfg(tmp_path, dataset="folder", path=str(tmp_path / "pics")))

    assert [(r.image_id, r.caption) for r in caps.records] == [("a", "first caption"), ("a", "second caption"),
                                                               ("sub/b", "third")]
    assert caps.skipped == 1 and "lonely.png: no caption file lonely.txt" in caps.problems[0]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_shard(tmp_path):
    shard = tmp_path / "shards" / "shard-000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        _add(tar, "s/000.jpg", _png_bytes((255, 0, 0)))
        _add(tar, "s/000.txt", b"a red square\nstill red\n")
        _add(tar, "s/001.png", _png_bytes())
        _add(tar, "s/001.json", json.dumps({"captions": ["x one", "x two"]}).encode())
        _add(tar, "s/002.webp", _png_bytes())
        _add(tar, "s/002.json", json.dumps({"caption": "single"}).encode())
        _add(tar, "s/003.txt", b"no image")

    caps = load_records(_cfg(tmp_path, dataset="webdataset", path=str(tmp_path / "shards" / "*.tar")))

    # img2dataset's .txt holds one caption, newlines and all
    assert [r.caption for r in caps.records] == ["a red square still red", "x one", "x two", "single"]
    assert caps.records[0].image_path == f"{shard}::s/000.jpg"
    assert caps.records[0].image_id == "shard-000/s/000"
    assert caps.skipped == 1 and "s/003" in caps.problems[0]
    assert open_image(caps.records[0].image_path).getpixel((0, 0)) == (255, 0, 0)


def test_food_autodetects_csv_columns_and_image_folder(tmp_path):
    root = tmp_path / "food"
    (root / "archive").mkdir(parents=True)
    (root / "archive" / "other.csv").write_text("a,b\n1,2\n")
    (root / "archive" / "recipes.csv").write_text(
        ",Title,Ingredients,Image_Name\n0,Miso chicken,\"salt, miso\",miso-chicken\n1,Tart,flour,tart.jpg\n")
    _png(root / "archive" / "Food Images" / "Food Images" / "miso-chicken.jpg")
    _png(root / "archive" / "Food Images" / "Food Images" / "tart.jpg")
    _png(root / "archive" / "thumbs" / "unrelated.jpg")

    caps = load_records(_cfg(tmp_path, dataset="food"), root)

    folder = root / "archive" / "Food Images" / "Food Images"
    assert [(r.caption, r.image_path) for r in caps.records] == [
        ("Miso chicken", str(folder / "miso-chicken.jpg")), ("Tart", str(folder / "tart.jpg"))]
    assert caps.problems == []

    (root / "copy.csv").write_text("image,caption\nx.jpg,y\n")
    with pytest.raises(DatasetError, match="--dataset csv --path FILE"):
        load_records(_cfg(tmp_path, dataset="food"), root)


def test_food_finds_a_semicolon_separated_csv(tmp_path):
    (tmp_path / "food" / "pics").mkdir(parents=True)
    (tmp_path / "food" / "labels.csv").write_text("File_Name;Description\npics/a.png;rice, beans and a lime\n")
    _png(tmp_path / "food" / "pics" / "a.png")
    caps = load_records(_cfg(tmp_path, dataset="food"), tmp_path / "food")
    assert [(r.caption, r.image_path) for r in caps.records] == [
        ("rice, beans and a lime", str(tmp_path / "food" / "pics" / "a.png"))]


def test_max_images_keeps_first_images_in_file_order(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("image,caption\nb.jpg,1\na.jpg,2\nb.jpg,3\nc.jpg,4\n")
    caps = load_records(_cfg(tmp_path, dataset="csv", path=str(path), max_images=2))
    assert [r.caption for r in caps.records] == ["1", "2", "3"]


# ------------------------------------------------------------------------------------------ splits

def test_split_is_by_image_and_stable_under_reordering(tmp_path):
    lines = [f"img{i % 300}.jpg,caption {i}" for i in range(900)]
    path = tmp_path / "c.csv"
    path.write_text("image,caption\n" + "\n".join(lines) + "\n")
    cfg = _cfg(tmp_path, dataset="csv", path=str(path), val_fraction=0.2, test_fraction=0.2)
    first = {r.image_id: r.split for r in load_records(cfg).records}
    per_image = {}
    for r in load_records(cfg).records:
        per_image.setdefault(r.image_id, set()).add(r.split)
    assert all(len(s) == 1 for s in per_image.values())

    path.write_text("image,caption\n" + "\n".join(reversed(lines)) + "\n")
    assert {r.image_id: r.split for r in load_records(cfg).records} == first


def test_split_fractions_roughly_as_asked():
    counts = Counter(split_for(f"image-{i}", 0.1, 0.05) for i in range(2000))
    assert abs(counts["val"] - 200) < 50 and abs(counts["test"] - 100) < 40
    assert split_for("image-1", 0.1, 0.05) == split_for("image-1", 0.1, 0.05)


# ------------------------------------------------------------------------------------------ images

def _jpeg_bytes(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG")
    return out.getvalue()


def test_broken_images_give_reasons(tmp_path):
    (tmp_path / "zero.jpg").write_bytes(b"")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = _jpeg_bytes(noise)
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.jpg").write_text("hello, I am not a picture")
    cases = {"zero.jpg": "zero bytes", "cut.jpg": "truncated JPEG", "missing.jpg": "missing file",
             "text.jpg": "not an image (cannot identify image file)"}
    for name, reason in cases.items():
        with pytest.raises(UnreadableImage) as info:
            open_image(str(tmp_path / name))
        assert str(info.value) == reason


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads chmod 000 files")
def test_unreadable_permissions(tmp_path):
    path = _png(tmp_path / "locked.png")
    path.chmod(0)
    with pytest.raises(UnreadableImage, match="permission denied"):
        open_image(str(path))


def _open_saved(tmp_path: Path, img: Image.Image, name: str, **save) -> Image.Image:
    img.save(tmp_path / name, **save)
    got = open_image(str(tmp_path / name))
    assert got.mode == "RGB" and got.size == img.size
    return got


def test_modes_become_rgb(tmp_path):
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 0), 1)
    assert _open_saved(tmp_path, palette, "p.png").getpixel((1, 0)) == (0, 0, 255)
    assert _open_saved(tmp_path, palette, "pt.png", transparency=0).getpixel((0, 0)) == (255, 255, 255)

    rgba = Image.new("RGBA", (3, 1), (0, 0, 255, 255))
    rgba.putpixel((0, 0), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    got = _open_saved(tmp_path, rgba, "rgba.png")
    assert got.getpixel((0, 0)) == (255, 255, 255) and got.getpixel((2, 0)) == (0, 0, 255)
    assert 120 <= got.getpixel((1, 0))[0] <= 135
    assert _open_saved(tmp_path, Image.new("LA", (1, 1), (0, 0)), "la.png").getpixel((0, 0)) == (255, 255, 255)

    deep = Image.fromarray(np.array([[1000, 2000, 3000]], dtype=np.uint16))
    assert [_open_saved(tmp_path, deep, "16.png").getpixel((x, 0)) for x in range(3)] == [
        (0, 0, 0), (128, 128, 128), (255, 255, 255)]

    red = _open_saved(tmp_path, Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "cmyk.jpg").getpixel((4, 4))
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    assert _open_saved(tmp_path, Image.new("L", (5, 3), 77), "grey.png").getpixel((0, 0)) == (77, 77, 77)
    assert _open_saved(tmp_path, Image.new("1", (5, 3), 1), "bit.png").getpixel((0, 0)) == (255, 255, 255)
    assert _open_saved(tmp_path, Image.new("RGB", (1, 1), (1, 2, 3)), "one.png").getpixel((0, 0)) == (1, 2, 3)


def test_huge_jpeg_loads_and_draft_is_fast(tmp_path):
    path = tmp_path / "huge.jpg"
    Image.new("RGB", (10000, 10000), (0, 128, 255)).save(path, quality=50)
    start = time.perf_counter()
    small = open_image(str(path), draft=448)
    assert time.perf_counter() - start < 1.0
    assert 448 <= min(small.size) <= 1250 and small.mode == "RGB"
    assert open_image(str(path)).size == (10000, 10000)


def test_tar_member_and_missing_member(tmp_path):
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        _add(tar, "k/1.png", _png_bytes((0, 255, 0)))
    assert open_image(f"{shard}::k/1.png").getpixel((1, 1)) == (0, 255, 0)
    with pytest.raises(UnreadableImage, match="missing file"):
        open_image(f"{shard}::k/2.png")


# ------------------------------------------------------------------------------------------ embedded set

def test_make_embedded_is_deterministic_and_idempotent(tmp_path):
    a = make_embedded(tmp_path / "a", n_images=40, seed=3)
    b = make_embedded(tmp_path / "b", n_images=40, seed=3)
    for name in ("captions.csv", "images/00000.png", "images/00039.png"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "README.txt").is_file()
    stamp = (a / "captions.csv").stat().st_mtime_ns
    make_embedded(a, n_images=40, seed=3)
    assert (a / "captions.csv").stat().st_mtime_ns == stamp
    make_embedded(a, n_images=41, seed=3)
    assert (a / "images" / "00040.png").is_file()


def test_embedded_captions_state_the_attributes(tmp_path):
    caps = load_records(_cfg(tmp_path, embedded_images=60))
    assert Path(caps.source) == tmp_path / "data" / "embedded" / "captions.csv"
    assert len(caps.records) == 180 and len(caps.images()) == 60 and caps.problems == []
    by_image: dict[str, list[str]] = {}
    for r in caps.records:
        by_image.setdefault(r.image_id, []).append(r.caption.lower())
    for captions in by_image.values():
        assert len(set(captions)) == 3
        for attribute in ("shape", "colour"):
            named = {v for v in EMBEDDED_ATTRIBUTES[attribute] for c in captions if v in c}
            assert len(named) == 1  # all three captions name the same one
    image = open_image(caps.records[0].image_path)
    assert image.size == (64, 64) and image.mode == "RGB"
