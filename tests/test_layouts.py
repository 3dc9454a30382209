"""The real downloads' layouts (tests/layouts.py copies them), read and cached as a user runs the course:
`python -m utils features --offline` on the Kaggle food set, img2dataset shards, and the messages people
get for a latin-1 CSV, two CSV sets in one data folder, and a wrong --images-dir."""

from __future__ import annotations

import dataclasses

import io
from pathlib import Path

import pytest
from PIL import Image

from conftest import cli_in_process
from layouts import (FOOD_EMPTY, FOOD_MULTILINE, FOOD_NON_ASCII_ROWS, FOOD_ROWS, food_caption, write_food_set,
                     write_img2dataset)
from utils.config import DataConfig
from utils.csvtext import MAX_RECORD_LINES
from utils.features import load_cache
from utils.paths import default_cache_dir
from utils.images import MAX_IMAGE_PIXELS, UnreadableImage, decode_image, open_image
from utils.readers import load_records
from utils.shards import expand_braces


@pytest.fixture(scope="module")
def food(tmp_path_factory) -> Path:
    return write_food_set(tmp_path_factory.mktemp("food")).parent


def _check_food_records(caps, root: Path) -> None:
    assert caps.skipped == len(FOOD_EMPTY) and caps.repaired == 0
    assert len(caps.records) == FOOD_ROWS - len(FOOD_EMPTY) and len(caps.images()) == len(caps.records)
    by_id = {r.image_id: r for r in caps.records}
    assert by_id["0"].image_path == str(root / "dataset" / "0.jpg")
    for i, caption in FOOD_MULTILINE.items():  # kept whole: one caption, its newline a space
        assert by_id[str(i)].caption == " ".join(caption.split())
    assert by_id["40"].caption == "Easy crêpes in a frying pan"
    assert sum(any(ord(c) > 127 for c in r.caption) for r in caps.records) == len(FOOD_NON_ASCII_ROWS) == 34
    lines = (root / "Captions.csv").read_text(encoding="utf-8").split("\n")
    assert caps.problems == [f"Captions.csv line {lines.index(f'{i},{i},') + 1}: empty caption; skipped"
                             for i in FOOD_EMPTY]


def test_food_set_as_kaggle_unpacks_it(food):
    text = (food / "Captions.csv").read_text(encoding="utf-8")
    assert text.startswith(",Index,Captions\n0,0,A plate of food number 0 on a table\n")
    assert '5,5,"Chocolate cake with raspberries on a white plate\nCanon EOS 5D Mark III"\n' in text
    assert "\n17,17,\n" in text and (food / "dataset" / "1999.jpg").is_file()
    _check_food_records(load_records(DataConfig(dataset="food", data_dir=str(food.parent)), food), food)


def test_food_set_through_csv_and_its_index_column(food):
    cfg = DataConfig(dataset="csv", path=str(food / "Captions.csv"), image_column="Index", caption_column="Captions")
    _check_food_records(load_records(cfg), food)  # dataset/ found beside the file, 0 -> dataset/0.jpg
    _check_food_records(load_records(dataclasses.replace(cfg, images_dir=str(food / "dataset"))), food)


def test_food_set_features_offline(food, data_dir):
    proc = cli_in_process("features", "--dataset", "food", "--path", str(food), "--num-workers", "0", "--batch-size", "128",
                   "--device", "cpu", data_dir=data_dir)
    assert f"{FOOD_ROWS - 4} captions of {FOOD_ROWS - 4} images" in proc.stdout and "4 rows skipped" in proc.stdout
    out = default_cache_dir(DataConfig(dataset="food", path=str(food), data_dir=str(data_dir)), "standin:ViT")
    cache = load_cache(out)
    assert cache.meta["num_images"] == FOOD_ROWS - 4 and cache.meta["num_skipped"] == 0
    assert cache.meta["images_dir"] == str(food / "dataset")
    captions = dict(zip(cache.captions["image_id"], cache.captions["caption"]))
    assert captions["40"] == "Easy crêpes in a frying pan" and captions["388"] == food_caption(388).replace("\n", " ")


def test_a_stray_quote_costs_one_line_and_long_quoted_captions_are_bounded(tmp_path):
    rows = ["image,caption", 'a.jpg,"a quote never closed', "b.jpg,the row after it",
            'c.jpg,"two', 'lines"', 'd.jpg,"' + "\n".join(["x"] * (MAX_RECORD_LINES + 1)) + '"', "e.jpg,last"]
    (tmp_path / "caps.csv").write_text("\n".join(rows) + "\n")
    caps = load_records(DataConfig(dataset="csv", path=str(tmp_path / "caps.csv")))
    assert [r.caption for r in caps.records] == ["the row after it", "two lines", "last"]
    assert caps.problems[0].startswith("caps.csv line 2: ") and "a quote opened and not closed" in caps.problems[0]
    assert caps.problems[1].startswith(f"caps.csv line 6: unexpected end of data (a quote opened and not closed? "
                                       f"a quoted caption may span at most {MAX_RECORD_LINES} lines); skipped")
    assert caps.problems[2].startswith("caps.csv line 7: 1 fields where the header has 2")  # the lines after it
    assert caps.skipped == 2 + MAX_RECORD_LINES  # lines 2 and 6, then the 20 lines after 6, each alone


def test_img2dataset_shards_by_brace_pattern_features_offline(tmp_path, data_dir):
    expected = write_img2dataset(tmp_path / "shards", shards=2, per_shard=5)
    assert expand_braces(str(tmp_path / "shards" / "{00000..00001}.tar")) == [
        str(tmp_path / "shards" / "00000.tar"), str(tmp_path / "shards" / "00001.tar")]
    assert expand_braces("s-{a,b}-{8..10}") == ["s-a-8", "s-a-9", "s-a-10", "s-b-8", "s-b-9", "s-b-10"]
    proc = cli_in_process("features", "--dataset", "webdataset", "--path", str(tmp_path / "shards" / "{00000..00002}.tar"),
                   "--num-workers", "0", "--device", "cpu", data_dir=data_dir)
    assert "9 captions of 9 images" in proc.stdout and "2 rows skipped" in proc.stdout
    assert "note: 1 of 3 shards named by {00000..00002}.tar are not there (first: 00002.tar); skipped" in proc.stdout
    assert "note: 00000.tar 000000001.txt: empty caption; skipped" in proc.stdout
    cache = load_cache(proc.stdout.split("feature cache ready at ")[1].split(":")[0])
    got = dict(zip(cache.captions["image_id"], cache.captions["caption"]))
    assert got == {f"{key[:5]}/{key}": c for key, c in expected.items() if c}
    assert got["00000/000000002"] == "a long caption that goes on"  # one caption, newline and all


def test_latin1_csv_says_which_encoding_reads_it(tmp_path, data_dir):
    Image.new("RGB", (20, 20), "red").save(tmp_path / "a.jpg")
    rows = ["image,caption"] + [f"a.jpg,café number {i} with crème brûlée" for i in range(49)]
    (tmp_path / "caps.csv").write_bytes(("\n".join(rows) + "\n").encode("latin-1"))
    proc = cli_in_process("features", "--dataset", "csv", "--path", str(tmp_path / "caps.csv"), "--num-workers", "0",
                   "--device", "cpu", data_dir=data_dir)
    assert ("note: caps.csv is not UTF-8: 49 line(s) hold bytes it cannot read (first on line 2), replaced by "
            "'\ufffd'. The whole file reads as cp1252 (line 2 would be 'a.jpg,café number 0 with crème brûlée'): "
            "if that is right, rerun with --encoding cp1252") in proc.stdout
    proc = cli_in_process("features", "--dataset", "csv", "--path", str(tmp_path / "caps.csv"), "--encoding", "cp1252",
                   "--num-workers", "0", "--device", "cpu", data_dir=data_dir)
    assert "0 rows skipped, 0 repaired" in proc.stdout and "note:" not in proc.stdout
    out = proc.stdout.split("feature cache ready at ")[1].split(":")[0]
    assert load_cache(out).captions["caption"][0] == "café number 0 with crème brûlée"


def test_a_mostly_utf8_file_is_not_sent_to_another_encoding(tmp_path):
    (tmp_path / "caps.csv").write_bytes("image,caption\na.jpg,crêpe\nb.jpg,caf\xe9\n".encode("utf-8")
                                        .replace(b"caf\xc3\xa9", b"caf\xe9"))
    caps = load_records(DataConfig(dataset="csv", path=str(tmp_path / "caps.csv")))
    assert caps.problems[0] == ("caps.csv is not UTF-8: 1 line(s) hold bytes it cannot read (first on line 3), "
                                "replaced by '\ufffd'; the rest is UTF-8, so fix those lines in the file")


def _two_csv_sets(root: Path) -> tuple[Path, Path]:
    for name, colour in (("cats", "red"), ("dogs", "blue")):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 20), colour).save(root / name / f"{i}.jpg")
        rows = "".join(f"{i}.jpg,{name} {i}\n" for i in range(3))
        (root / name / "captions.csv").write_text("image,caption\n" + rows)
    return root / "cats" / "captions.csv", root / "dogs" / "captions.csv"


def test_two_csv_sets_in_one_data_folder_get_their_own_caches(tmp_path, data_dir):
    cats, dogs = _two_csv_sets(tmp_path)
    outs = []
    for path in (cats, dogs):
        proc = cli_in_process("features", "--dataset", "csv", "--path", str(path), "--num-workers", "0", "--device", "cpu",
                       data_dir=data_dir)
        outs.append(Path(proc.stdout.split("feature cache ready at ")[1].split(":")[0]))
    assert outs[0] != outs[1] and outs[0].parent == outs[1].parent == data_dir / "features"
    assert outs[0].name.startswith("csv-captions-") and outs[0].name.endswith("-standin-ViT")
    assert [load_cache(o).captions["caption"][0] for o in outs] == ["cats 0", "dogs 0"]

    # one cache folder given for both: refused in words, and the valid cache is never offered for deletion
    proc = cli_in_process("features", "--dataset", "csv", "--path", str(dogs), "--cache-dir", str(outs[0]),
                   "--num-workers", "0", "--device", "cpu", data_dir=data_dir, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"captions file: the cache was made from {cats}, you asked for {dogs}" in proc.stderr
    assert (f"images folder: the cache's images are in {cats.parent}, these captions name images in "
            f"{dogs.parent}") in proc.stderr
    assert "delete" not in proc.stderr.lower() and "--cache-dir DIR" in proc.stderr
    assert load_cache(outs[0]).meta["complete"]


def test_wrong_images_dir_says_every_image_is_missing(tmp_path, data_dir):
    cats, _ = _two_csv_sets(tmp_path)
    cli_in_process("features", "--dataset", "csv", "--path", str(cats), "--num-workers", "0", "--device", "cpu",
            data_dir=data_dir)
    (tmp_path / "empty").mkdir()
    proc = cli_in_process("features", "--dataset", "csv", "--path", str(cats), "--images-dir", str(tmp_path / "empty"),
                   "--num-workers", "0", "--device", "cpu", data_dir=data_dir, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (f"error: none of the 3 images could be read: every one is missing on disk ({tmp_path / 'empty' / '0.jpg'}"
            ": missing file;") in proc.stderr
    assert f"looked for in the folder {tmp_path / 'empty'}: is --images-dir right (the folder holding 0.jpg)?" \
        in proc.stderr
    assert "fingerprint" not in proc.stderr


# ------------------------------------------------------------------------------ one image policy

def _phone_jpeg(orientation: int = 6) -> bytes:
    """A landscape-stored JPEG whose EXIF says "rotate 90" (how phones save an upright photo)."""
    img = Image.new("RGB", (2400, 1200), (200, 30, 30))
    img.paste((30, 30, 200), (0, 0, 1200, 1200))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


def test_exif_orientation_is_applied_with_and_without_draft(tmp_path):
    (tmp_path / "phone.jpg").write_bytes(_phone_jpeg())
    full = open_image(tmp_path / "phone.jpg")
    small = open_image(tmp_path / "phone.jpg", draft=448)
    assert full.size == (1200, 2400) and small.size[0] < small.size[1]  # upright
    assert full.getpixel((600, 100))[2] > 150 and full.getpixel((600, 2300))[0] > 150  # blue on top now
    from utils.images import prepare_image
    assert prepare_image(Image.open(tmp_path / "phone.jpg"), draft=448).size == small.size


def test_one_size_limit_with_a_clear_message():
    buf = io.BytesIO()
    Image.new("1", (16000, 15000)).save(buf, format="PNG")  # 240 MP, a few KB on disk
    with pytest.raises(UnreadableImage, match=r"too large: 16000x15000 pixels, over the limit "
                                              rf"of {MAX_IMAGE_PIXELS / 1e6:g} megapixels; shrink it first"):
        decode_image(buf.getvalue())


def test_flickr30k_copy_on_disk_is_read_without_a_download(tmp_path, data_dir):
    from layouts import write_flickr30k

    results = write_flickr30k(tmp_path / "my copy")
    for path in (results, tmp_path / "my copy"):  # the captions file, or the folder of the copy
        proc = cli_in_process("features", "--dataset", "flickr30k", "--path", str(path), "--num-workers", "0",
                       "--device", "cpu", data_dir=data_dir)
        assert "30 captions of 6 images" in proc.stdout and "download" not in proc.stdout + proc.stderr


def test_utf16_with_a_byte_order_mark_is_read_as_such(tmp_path):
    """Excel's "Unicode Text" export: UTF-16 with a BOM, tab separated."""
    (tmp_path / "caps.tsv").write_bytes("image\tcaption\r\na.jpg\tEasy crêpes in a frying pan\r\n".encode("utf-16"))
    caps = load_records(DataConfig(dataset="csv", path=str(tmp_path / "caps.tsv")))
    assert [r.caption for r in caps.records] == ["Easy crêpes in a frying pan"] and caps.repaired == 0
