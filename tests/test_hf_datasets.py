"""`--dataset hf` and `--dataset flickr8k` as users reach them: tables the tests build with `datasets` itself (an
`Image` feature holding real PNG bytes, list captions, caption_0..caption_4, a split column with Karpathy's
values, parquet shards, a glob, a save_to_disk folder), opened by the real `load_dataset` / `load_from_disk`,
through the CLI and through the calls notebooks 01 and 02 make; and Kaggle's Flickr8k layout (tests/layouts.py)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from conftest import serve_folder
from layouts import FLICKR8K_FIRST, flickr8k_caption, flickr8k_name, write_flickr8k
from utils.__main__ import main
from utils.config import DataConfig, FeatureConfig, RuntimeConfig
from utils.download import dataset_root, find_attached
from utils.features import FeatureCacheError, cache_features, default_cache_dir, load_cache
from utils.readers import load_records
from utils.records import DatasetError

datasets = pytest.importorskip("datasets")

KARPATHY = ["train", "restval", "val", "test", "train", "test", "restval", "val"]  # Karpathy's split values


def png(k: int, side: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (37 * k % 256, 90, 200 - 20 * k % 200)).save(buf, format="PNG")
    return buf.getvalue()


def flickr30k_table(n: int = 8) -> "datasets.Dataset":
    """nlphuji/flickr30k's shape: image (decoded bytes), caption (a list of 5), sentids, split, img_id, filename."""
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.List(datasets.Value("string")),
                                  "sentids": datasets.List(datasets.Value("string")), "split": datasets.Value("string"),
                                  "img_id": datasets.Value("string"), "filename": datasets.Value("string")})
    rows = {"image": [{"bytes": png(k), "path": None} for k in range(n)],
            "caption": [[f"photo {k} seen for the {j} time" for j in range(5)] for k in range(n)],
            "sentids": [[str(5 * k + j) for j in range(5)] for k in range(n)],
            "split": [KARPATHY[k % len(KARPATHY)] for k in range(n)],
            "img_id": [str(k) for k in range(n)], "filename": [f"{1000092795 + k}.jpg" for k in range(n)]}
    return datasets.Dataset.from_dict(rows, features=features)


def flickr8k_table(n: int, start: int = 0) -> "datasets.Dataset":
    """jxie/flickr8k's shape: image and caption_0..caption_4, one row per image."""
    features = datasets.Features({"image": datasets.Image(),
                                  **{f"caption_{j}": datasets.Value("string") for j in range(5)}})
    rows = {"image": [{"bytes": png(k), "path": f"img{k}.jpg"} for k in range(start, start + n)],
            **{f"caption_{j}": [f"picture {k} caption {j}" for k in range(start, start + n)] for j in range(5)}}
    return datasets.Dataset.from_dict(rows, features=features)


def cfg(path, data_dir, **given) -> DataConfig:
    return DataConfig(dataset="hf", path=str(path), data_dir=str(data_dir), **given)


@pytest.fixture(autouse=True)
def quiet_datasets(monkeypatch, tmp_path):
    """`datasets` keeps its cache in the test's data folder, and no test reaches the Hub."""
    for name in ("HF_HOME", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLIPCAP_OFFLINE", "1")
    datasets.disable_progress_bars()


# ---- records and splits ------------------------------------------------------------------------------------


def test_save_to_disk_table_with_an_image_feature_keeps_karpathy_splits(tmp_path):
    folder = tmp_path / "flickr30k-hf"
    flickr30k_table().save_to_disk(str(folder))
    data = cfg(folder, tmp_path / "data")
    assert dataset_root(data, offline=True) is None  # notebooks 01/02: nothing to download, read in place
    caps = load_records(data, dataset_root(data, offline=True))
    assert len(caps.records) == 40 and len(caps.images()) == 8 and caps.skipped == 0 and caps.problems == []
    split_of = {image_id: split for image_id, _, split in caps.images()}
    assert split_of == {str(1000092795 + k): {"restval": "train"}.get(s, s) for k, s in enumerate(KARPATHY)}
    first = caps.records[0]
    assert first.image_id == "1000092795" and first.caption == "photo 0 seen for the 0 time"
    # the bytes as stored, written once as files under data/hf-images: every later stage reads files
    assert Path(first.image_path).read_bytes() == png(0) and Path(first.image_path).suffix == ".png"
    assert Path(first.image_path).name.startswith("1000092795.")  # its id, then its bytes' digest
    assert caps.images_dir == str(Path(first.image_path).parent)
    assert Path(caps.images_dir).parent == (tmp_path / "data" / "hf-images").resolve()
    assert caps.stamp["path"] == str(folder) and caps.stamp["table_files"] >= 2  # the .arrow shard and state.json

    # notebook 02: the feature cache of the first 4 images (only theirs were written)
    data = cfg(folder, tmp_path / "data", max_images=4)
    caps = load_records(data, dataset_root(data, offline=True))
    assert len(caps.images()) == 4 and len(list(Path(caps.images_dir).iterdir())) == 8  # 8 from the first read
    out = cache_features(caps, FeatureConfig(num_workers=0, cache_dir=str(tmp_path / "cache")), data,
                         RuntimeConfig(offline=True, device="cpu"))
    cache = load_cache(out)
    assert cache.meta["num_images"] == 4 and cache.meta["source"] == str(folder)
    assert sorted(cache.captions["split"].unique()) == ["test", "train", "val"]
    small = load_records(cfg(folder, tmp_path / "small", max_images=2))
    assert len(list(Path(small.images_dir).iterdir())) == 2  # a fresh data folder: only the 2 kept are written


def test_caption_columns_table_splits_parquet_shards_and_a_glob(tmp_path):
    """jxie/flickr8k as parquet shards in the Hub's layout (data/<split>-0000k-of-0000n.parquet): the folder gives
    the table's own splits; a glob of one split's shards is one table, split by image."""
    tables = {"train": flickr8k_table(10), "validation": flickr8k_table(3, 10), "test": flickr8k_table(3, 13)}
    (tmp_path / "jxie" / "data").mkdir(parents=True)
    for split, table in tables.items():
        for k in range(2):
            table.shard(2, k).to_parquet(str(tmp_path / "jxie" / "data" / f"{split}-{k:05d}-of-00002.parquet"))
    caps = load_records(cfg(tmp_path / "jxie", tmp_path / "data"))
    assert len(caps.records) == 16 * 5 and caps.skipped == 0
    split_of = {image_id: split for image_id, _, split in caps.images()}
    assert [split_of[f"img{k}"] for k in (0, 9, 10, 12, 13, 15)] == ["train", "train", "val", "val", "test", "test"]
    assert [r.caption for r in caps.records[:5]] == [f"picture 0 caption {j}" for j in range(5)]

    picked = load_records(cfg(tmp_path / "jxie", tmp_path / "data", hf_split="train+test"))
    assert {split for _, _, split in picked.images()} == {"train", "test"} and len(picked.images()) == 13
    with pytest.raises(DatasetError, match="Unknown split"):
        load_records(cfg(tmp_path / "jxie", tmp_path / "data", hf_split="dev"))

    glob = tmp_path / "jxie" / "data" / "train-*.parquet"
    caps = load_records(cfg(glob, tmp_path / "data", val_fraction=0.3, test_fraction=0.3))
    assert len(caps.images()) == 10 and len(caps.records) == 50
    from utils.records import split_for

    assert all(split == split_for(i, 0.3, 0.3) for i, _, split in caps.images())  # by image, as every set
    # two of the five columns, by name or by pattern
    two = load_records(cfg(glob, tmp_path / "data", caption_column="caption_0,caption_3"))
    assert [r.caption for r in two.records[:2]] == ["picture 0 caption 0", "picture 0 caption 3"]
    assert len(load_records(cfg(glob, tmp_path / "data", caption_column="caption_[12]")).records) == 20


def test_bad_rows_are_skipped_and_counted_and_a_missing_column_lists_the_columns(tmp_path, capsys):
    table = flickr30k_table(6).to_dict()
    table["image"][1] = None  # no image
    table["caption"][2] = []  # no caption
    table["caption"][3] = ["a caption", "   ", None]  # one empty text in the list
    table["split"][4] = "holdout"  # a split --split-values does not map
    features = flickr30k_table(1).features
    path = tmp_path / "t.parquet"
    datasets.Dataset.from_dict(table, features=features).to_parquet(str(path))
    caps = load_records(cfg(path, tmp_path / "data"))
    assert caps.skipped == 3 and len(caps.images()) == 4
    assert "t.parquet [train] row 1: no image (an empty cell) in column 'image'; skipped" in caps.problems
    assert "t.parquet [train] row 2: no caption in 'caption'; skipped" in caps.problems
    assert "t.parquet [train] row 3: empty caption; skipped" in caps.problems
    assert any("have the split 'holdout' in column 'split', which --split-values does not map" in p
               for p in caps.problems)

    with pytest.raises(SystemExit) as exit_:
        main(["features", "--dataset", "hf", "--path", str(path), "--caption-column", "sentences",
              "--data-dir", str(tmp_path / "data"), "--offline", "--device", "cpu"])
    message = str(exit_.value)
    assert message.startswith("error: ") and "has no caption column 'sentences'" in message
    assert "its columns are ['image', 'caption', 'sentids', 'split', 'img_id', 'filename']" in message
    assert "--caption-column COLUMN" in message
    with pytest.raises(DatasetError, match=r"no split column 'part'; its columns are \['image', 'caption'"):
        load_records(cfg(path, tmp_path / "data", split_column="part"))
    with pytest.raises(DatasetError, match="--split-values 'train=training'"):
        load_records(cfg(path, tmp_path / "data", split_values="train=training"))


def test_streaming_reads_rows_without_storing_the_table_and_stops_at_max_images(tmp_path):
    flickr30k_table(8).to_parquet(str(tmp_path / "t.parquet"))
    caps = load_records(cfg(tmp_path / "t.parquet", tmp_path / "data", streaming=True, max_images=3))
    assert len(caps.images()) == 3 and len(caps.records) == 15
    assert any("--streaming with --max-images 3: read the first 3 rows" in p for p in caps.problems)
    assert len(list(Path(caps.images_dir).iterdir())) == 3  # only the images kept are written
    assert not list((tmp_path / "data").rglob("*.arrow"))  # streamed: no Arrow copy of the table


def test_a_hub_name_offline_says_what_to_do_at_once(tmp_path):
    with pytest.raises(DatasetError, match=r"cannot reach the Hugging Face Hub for 'nlphuji/flickr30k'.*"
                                           r"save_to_disk\(FOLDER\)"):
        load_records(cfg("nlphuji/flickr30k", tmp_path / "data"))
    assert default_cache_dir(cfg("nlphuji/flickr30k", tmp_path), "ViT-B/32").name.startswith("hf-flickr30k-")


# ---- images by path and by URL -----------------------------------------------------------------------------


def test_a_path_column_is_read_beside_the_table(tmp_path):
    (tmp_path / "set" / "pics").mkdir(parents=True)
    for k in range(3):
        (tmp_path / "set" / "pics" / f"{k}.png").write_bytes(png(k))
    table = datasets.Dataset.from_dict({"file_path": [f"pics/{k}.png" for k in (0, 1, 2, 7)],
                                        "sentences": [[{"raw": f"raw {k} a"}, {"raw": f"raw {k} b"}] for k in range(4)]})
    table.to_json(str(tmp_path / "set" / "captions.jsonl"))
    caps = load_records(cfg(tmp_path / "set" / "captions.jsonl", tmp_path / "data"))  # columns found by their names
    assert [r.caption for r in caps.records[:2]] == ["raw 0 a", "raw 0 b"] and len(caps.images()) == 4
    assert caps.records[0].image_path == str(tmp_path / "set" / "pics" / "0.png")
    assert caps.images_dir == str(tmp_path / "set")
    assert any("1 of 4 images named in captions.jsonl are missing on disk (first: 7.png)" in p for p in caps.problems)


@pytest.fixture()
def image_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    for k in range(4):
        (served / f"{k}.png").write_bytes(png(k))
    (served / "4.png").write_bytes(b"<html>rate limited</html>")
    with serve_folder(served) as (base, requested):
        yield base, served, requested


def test_a_url_column_is_fetched_in_parallel_resumably_with_failures_listed(tmp_path, image_server, capsys):
    """A COCO-Karpathy table (yerevann/coco-karpathy's columns: filepath, sentences, cocoid, filename, url, split),
    read with no column flags; the local server stands for images.cocodataset.org."""
    base, served, requested = image_server
    names = [f"COCO_train2014_{k:012d}.jpg" for k in range(6)]
    table = datasets.Dataset.from_dict({"filepath": ["train2014"] * 6,
                                        "sentences": [[f"picture {k} a", f"picture {k} b"] for k in range(6)],
                                        "cocoid": list(range(6)), "filename": names,
                                        "url": [f"{base}/{k}.png" for k in range(6)],  # 4: no image; 5: a 404
                                        "split": ["train", "test", "restval", "val", "train", "train"]})
    table.to_parquet(str(tmp_path / "coco-karpathy.parquet"))
    data = cfg(tmp_path / "coco-karpathy.parquet", tmp_path / "data")
    caps = load_records(data)
    out = capsys.readouterr().out
    assert "6 images named by URL, 0 already here, 6 to download" in out and "6/6 tried, 2 failed" in out
    assert caps.skipped == 2 and [r.image_id for r in caps.records[::2]] == [n[:-4] for n in names[:4]]
    assert [r.caption for r in caps.records[:2]] == ["picture 0 a", "picture 0 b"]
    assert [split for _, _, split in caps.images()] == ["train", "test", "train", "val"]
    assert any("row 4: its image could not be fetched (the bytes received are not an image" in p for p in caps.problems)
    assert any("row 5: its image could not be fetched (HTTP 404" in p for p in caps.problems)
    report = Path(caps.images_dir).parent / f"{Path(caps.images_dir).name}-failed.csv"
    assert report.read_text().splitlines()[0] == "file_name,url,reason" and len(report.read_text().splitlines()) == 3
    assert Path(caps.records[0].image_path).read_bytes() == png(0)

    (served / "5.png").write_bytes(png(5))  # the server has it now: a rerun fetches only the two that failed
    requested.clear()
    caps = load_records(data)
    assert sorted(requested) == ["GET /4.png HTTP/1.1", "GET /5.png HTTP/1.1"] and caps.skipped == 1 and len(caps.images()) == 5


# ---- the feature cache -------------------------------------------------------------------------------------


def test_the_feature_cache_refuses_a_changed_table_and_keeps_what_it_holds(tmp_path, data_dir):
    path = tmp_path / "t.parquet"
    flickr8k_table(6).to_parquet(str(path))
    args = ["features", "--dataset", "hf", "--path", str(path), "--data-dir", str(data_dir), "--offline",
            "--device", "cpu", "--num-workers", "0", "--cache-dir", str(tmp_path / "cache")]
    main(args)
    cache = load_cache(tmp_path / "cache")
    assert cache.meta["num_images"] == 6 and cache.meta["captions_file"]["path"] == str(path)

    edited = flickr8k_table(6).to_dict()
    edited["caption_0"][0] = "an edited caption"
    datasets.Dataset.from_dict(edited, features=flickr8k_table(1).features).to_parquet(str(path))
    with pytest.raises(FeatureCacheError, match=r"t.parquet changed after the feature cache"):
        load_cache(tmp_path / "cache")
    main(args)  # read again: the captions index follows the table, no image is encoded again
    assert "an edited caption" in set(load_cache(tmp_path / "cache").captions["caption"])

    flickr8k_table(6, start=20).to_parquet(str(path))  # other images
    with pytest.raises(SystemExit, match="made from other images"):
        main(args)
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())  # kept as it was: valid for what made it
    assert meta["num_images"] == 6 and meta["complete"] and (tmp_path / "cache" / "features.npy").is_file()


@pytest.mark.slow
def test_features_train_evaluate_on_a_table_with_an_image_column(tmp_path, data_dir, capsys, one_thread):
    """The walk on a `datasets` table offline: an Image column (one picture's bytes broken: skipped and
    counted by the feature cache as in every reader), features -> train -> evaluate in-process."""
    table = flickr30k_table(40).to_dict()
    table["image"][5] = {"bytes": png(5)[:30], "path": None}  # a PNG cut short
    table["split"] = ["test" if k % 5 == 0 else "val" if k % 5 == 1 else "train" for k in range(40)]
    folder = tmp_path / "table"
    datasets.Dataset.from_dict(table, features=flickr30k_table(1).features).save_to_disk(str(folder))
    common = ["--dataset", "hf", "--path", str(folder), "--data-dir", str(data_dir), "--offline", "--device", "cpu"]
    main(["features", *common, "--num-workers", "0"])
    out = capsys.readouterr().out
    assert "200 captions of 40 images (train 24 / val 8 / test 8)" in out and "1 unreadable image(s)" in out
    cache = load_cache(default_cache_dir(cfg(folder, data_dir), "standin:ViT", offline=False))
    assert cache.meta["num_images"] == 39 and "truncated PNG" in cache.skipped["reason"].iloc[0]
    run = tmp_path / "run"
    main(["train", *common, "--features", str(cache.path), "--out-dir", str(run), "--max-steps", "6",
          "--batch-size", "16", "--num-layers", "1", "--warmup-steps", "2"])
    main(["evaluate", "--model", str(run / "captioner"), "--features", str(cache.path), "--metrics", "BLEU",
          "--no-clip-score", "--json", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert '"BLEU-4"' in printed and '"images": 7' in printed  # 8 test images, the broken one unreadable


# ---- Flickr8k as Kaggle lays it out ------------------------------------------------------------------------


def test_flickr8k_as_kaggle_unpacks_it(tmp_path):
    root = tmp_path / "flickr8k"
    write_flickr8k(root)
    text = (root / "captions.txt").read_text(encoding="utf-8")
    assert text.startswith("image,caption\n1000268201_693b08cb0e.jpg,A child in a pink dress is climbing up a set "
                           "of stairs in an entry way .\n")
    assert f'{flickr8k_name(1)},"A dog , brown and white , runs on the grass near photo 1 ."\n' in text
    caps = load_records(DataConfig(dataset="flickr8k", data_dir=str(tmp_path)), root)
    assert len(caps.records) == 30 and len(caps.images()) == 6 and caps.skipped == 0 and caps.problems == []
    assert [r.caption for r in caps.records[:5]] == list(FLICKR8K_FIRST)
    assert caps.records[6].caption == flickr8k_caption(1, 1)  # the quoted caption, its commas kept
    assert caps.records[0].image_id == "1000268201_693b08cb0e"
    assert caps.records[0].image_path == str(root / "Images" / "1000268201_693b08cb0e.jpg")


@pytest.mark.parametrize("mount", ["flickr8k", "datasets/adityajn105/flickr8k"])
def test_flickr8k_attached_in_both_mount_layouts_then_features(tmp_path, data_dir, mount, monkeypatch, capsys):
    inputs = tmp_path / "input"
    write_flickr8k(inputs / mount)
    monkeypatch.setenv("CLIPCAP_KAGGLE_INPUT", str(inputs))
    assert find_attached("flickr8k") == inputs / mount
    main(["features", "--dataset", "flickr8k", "--data-dir", str(tmp_path / "data"), "--offline", "--device", "cpu",
          "--num-workers", "0", "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert f"using the attached Kaggle input at {inputs / mount}" in out and "30 captions of 6 images" in out
    assert load_cache(tmp_path / "cache").meta["images_dir"] == str(inputs / mount / "Images")


def test_flickr8k_copy_elsewhere_and_renamed_input(tmp_path, monkeypatch):
    copy = tmp_path / "my copy"
    write_flickr8k(copy)
    caps = load_records(DataConfig(dataset="flickr8k", path=str(copy), data_dir=str(tmp_path)))
    assert len(caps.records) == 30
    renamed = tmp_path / "input" / "datasets" / "someone" / "flickr-8k-images"
    shutil.copytree(copy, renamed)
    monkeypatch.setenv("CLIPCAP_KAGGLE_INPUT", str(tmp_path / "input"))
    assert find_attached("flickr8k") == renamed  # found by its captions.txt
