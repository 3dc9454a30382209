"""Fixture generators that copy the file layouts of real downloads exactly, with small generated images.

Each writes what the real download holds, byte for byte where it matters (headers, quoting, the unnamed
pandas index column, file names, folder nesting); only the pictures are small solid colours.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

from PIL import Image

# Kaggle zeynaloy/food-related-pictures-dataset-with-captions: Captions.csv, written by pandas with its
# index (header ",Index,Captions"), 2000 rows; the images are dataset/<Index>.jpg beside it.
FOOD_ROWS = 2000
FOOD_EMPTY = (17, 402, 1250, 1999)  # rows whose caption is empty (pandas writes NaN as nothing)
FOOD_MULTILINE = {  # quoted captions spanning lines: a camera name on the second line
    5: "Chocolate cake with raspberries on a white plate\nCanon EOS 5D Mark III",
    388: "A bowl of ramen with a soft boiled egg\nNikon D750",
    1024: "Fresh bread rolls on a wooden board\nSony A7 III\n",
    1600: "Grilled salmon with lemon and dill\nFujifilm X-T3",
}
FOOD_NON_ASCII = ("Easy crêpes in a frying pan", "Crème brûlée with a caramel crust", "Jalapeño poppers on a tray",
                  "Açaí bowl with banana", "Smörgåsbord of cold dishes", "Phở with fresh herbs",
                  "Käsespätzle with fried onions")
FOOD_NON_ASCII_ROWS = tuple(range(40, 40 + 34 * 50, 50))  # 34 rows


def food_caption(i: int) -> str:
    if i in FOOD_EMPTY:
        return ""
    if i in FOOD_MULTILINE:
        return FOOD_MULTILINE[i]
    if i in FOOD_NON_ASCII_ROWS:
        return FOOD_NON_ASCII[FOOD_NON_ASCII_ROWS.index(i) % len(FOOD_NON_ASCII)]
    return f"A plate of food number {i} on a table"


def write_food_set(root: Path, rows: int = FOOD_ROWS, side: int = 16) -> Path:
    """The food set as Kaggle unpacks it into `root`: root/Captions.csv and root/dataset/<Index>.jpg."""
    (root / "dataset").mkdir(parents=True, exist_ok=True)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")  # pandas' to_csv: minimal quoting, "\n" line ends
    writer.writerow(["", "Index", "Captions"])
    for i in range(rows):
        writer.writerow([i, i, food_caption(i)])
        Image.new("RGB", (side, side), ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256)).save(
            root / "dataset" / f"{i}.jpg", quality=90)
    (root / "Captions.csv").write_bytes(out.getvalue().encode("utf-8"))
    return root / "Captions.csv"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _jpeg(colour, side: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buf, format="JPEG")
    return buf.getvalue()


def write_img2dataset(folder: Path, shards: int = 2, per_shard: int = 5) -> dict[str, str | None]:
    """img2dataset's webdataset output: 00000.tar, 00001.tar, ... each with 000000000.jpg/.txt/.json per sample
    (key = shard number and sample index, 9 digits), plus the .parquet-free stats files it writes beside them.
    In shard 0 sample 1 has an empty .txt, sample 2 a caption with a newline. Returns key -> caption or None."""
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str | None] = {}
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for j in range(per_shard):
                key = f"{s:05d}{j:04d}"
                caption = f"photo {j} of shard {s}"
                if s == 0 and j == 1:
                    caption = ""
                elif s == 0 and j == 2:
                    caption = "a long caption\nthat goes on"
                _add(tar, f"{key}.jpg", _jpeg((40 * j % 256, 30 * s % 256, 90)))
                _add(tar, f"{key}.txt", caption.encode())
                _add(tar, f"{key}.json", json.dumps({"url": f"https://example.com/{key}.jpg", "key": key,
                                                      "caption": caption, "status": "success",
                                                      "width": 16, "height": 16}).encode())
                expected[key] = " ".join(caption.split()) or None
        (folder / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
    return expected


def write_flickr30k(root: Path, images: int = 6) -> Path:
    """Kaggle hsankesara/flickr-image-dataset as it unpacks: flickr30k_images/results.csv (`|` separated,
    5 comments per image, a space after each `|`) and flickr30k_images/flickr30k_images/<name>.jpg."""
    folder = root / "flickr30k_images" / "flickr30k_images"
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["image_name| comment_number| comment"]
    for k in range(images):
        name = f"{1000092795 + 7 * k}.jpg"
        Image.new("RGB", (20, 16), (30 * k % 256, 120, 60)).save(folder / name)
        lines += [f"{name}| {j}| Picture {k} , described for the {j} time ." for j in range(5)]
    path = root / "flickr30k_images" / "results.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# Kaggle adityajn105/flickr8k: captions.txt (a CSV whatever its name: header `image,caption`, 5 rows per image,
# "\n" line ends, captions holding a comma in double quotes, the tokenised " ." ending kept) and Images/<name>.jpg
# beside it. The captions of its first image, as the file has them:
FLICKR8K_FIRST = ("A child in a pink dress is climbing up a set of stairs in an entry way .",
                  "A girl going into a wooden building .",
                  "A little girl climbing into a wooden playhouse .",
                  "A little girl climbing the stairs to her playhouse .",
                  "A little girl in a pink dress going into a wooden cabin .")


def flickr8k_name(k: int) -> str:
    return "1000268201_693b08cb0e.jpg" if k == 0 else f"{1001773457 + 97 * k}_{(0x577c3a7d70 + k):010x}.jpg"


def flickr8k_caption(k: int, j: int) -> str:
    if k == 0:
        return FLICKR8K_FIRST[j]
    if j == 1:
        return f"A dog , brown and white , runs on the grass near photo {k} ."  # commas: quoted in the file
    return f"Photo {k} shows something for the {j} time ."


def write_flickr8k(root: Path, images: int = 6) -> Path:
    """The Flickr8k download as it unpacks into `root`: root/captions.txt and root/Images/<name>.jpg."""
    (root / "Images").mkdir(parents=True, exist_ok=True)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")  # minimal quoting: only captions with a comma are quoted
    writer.writerow(["image", "caption"])
    for k in range(images):
        Image.new("RGB", (24, 18), (40 * k % 256, 160, 90)).save(root / "Images" / flickr8k_name(k), quality=90)
        for j in range(5):
            writer.writerow([flickr8k_name(k), flickr8k_caption(k, j)])
    (root / "captions.txt").write_bytes(out.getvalue().encode("utf-8"))
    return root / "captions.txt"
