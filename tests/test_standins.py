"""The stand-ins must load through the real loaders, exactly as the hub models would."""

from __future__ import annotations

import json

import clip
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import embedded_set
from utils.standin_clip import _CLIP_FIT, caption_key, clip_archive
from utils.standin_names import STANDINS_ENV, STANDIN_CLIP_DIM, clip_standin_name
from utils.standin_text import gpt2_dir
from utils.standins import CLIP_DATA, EOS, standins_home
from utils.embedded import EMBEDDED_ATTRIBUTES


def test_clip_vit_standin_loads_through_clip_load(models_dir):
    path = clip_archive("ViT-B/32", models_dir)
    model, preprocess = clip.load(str(path), device="cpu", jit=False)
    assert type(model).__name__ == "CLIP" and type(model.visual).__name__ == "VisionTransformer"
    assert model.visual.input_resolution == 64
    image = torch.rand(2, 3, 64, 64)
    assert model.encode_image(image).shape == (2, STANDIN_CLIP_DIM)
    assert model.encode_text(clip.tokenize(["a red circle", "a blue square"])).shape == (2, STANDIN_CLIP_DIM)
    assert clip_standin_name("ViT-B/32") == "standin:ViT"


def test_clip_resnet_standin_for_rn_backbones(models_dir):
    path = clip_archive("RN50x4", models_dir)
    model, _ = clip.load(str(path), device="cpu", jit=False)
    assert type(model.visual).__name__ == "ModifiedResNet"
    assert model.encode_image(torch.rand(1, 3, 64, 64)).shape == (1, STANDIN_CLIP_DIM)


def test_clip_standin_is_built_once_and_deterministically(models_dir, tmp_path):
    first = clip_archive("ViT-B/32", models_dir)
    stamp = first.stat().st_mtime_ns
    assert clip_archive("ViT-B/32", models_dir).stat().st_mtime_ns == stamp  # reused
    again = clip_archive("ViT-B/32", tmp_path)
    a = clip.load(str(first), device="cpu", jit=False)[0].state_dict()
    b = clip.load(str(again), device="cpu", jit=False)[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def course_set(tmp_path_factory):
    """The embedded set exactly as the course generates it (seed 0), never seen by the stand-in's training."""
    folder = tmp_path_factory.mktemp("course") / "embedded"
    return folder, embedded_set(folder, n_images=1200, seed=0)


def test_clip_vit_standin_is_trained_on_private_drawings_only(models_dir):
    clip_archive("ViT-B/32", models_dir)
    meta = json.loads((models_dir / CLIP_DATA / "meta.json").read_text())
    assert meta["seed"] == _CLIP_FIT["seed"] != 0  # the course's set is seed 0


def test_clip_vit_standin_embeddings_carry_the_attributes_of_unseen_images(models_dir, course_set):
    """Through clip.load and its preprocess, as the course encodes images: on the course's own images
    (never trained on), each image's nearest neighbour (cosine, itself excluded) shares its colour,
    position, size and background at least 85% of the time (random weights: colour 0.91, shape 0.67,
    position 0.22, size 0.46); shape is learned only partly in the stand-in's short training. And each
    image finds its own caption among all 1200 first captions far above chance. Measured (stand-ins v3,
    with the fixed colour grid): shape 0.58, colour 0.975, position 0.96, size 0.90, background 1.0;
    top-1 0.30, same attributes 0.66."""
    folder, captions = course_set
    model, preprocess = clip.load(str(clip_archive("ViT-B/32", models_dir)), device="cpu", jit=False)
    names = sorted(captions)
    keys = [caption_key(captions[n]) for n in names]
    assert None not in keys
    with torch.no_grad():
        images = F.normalize(model.encode_image(torch.stack([preprocess(Image.open(folder / "images" / n))
                                                             for n in names])), dim=-1)
        texts = F.normalize(model.encode_text(clip.tokenize([captions[n][0] for n in names])), dim=-1)
    similarity = images @ images.T
    similarity.fill_diagonal_(-2.0)
    nearest = similarity.argmax(1).tolist()
    agreement = {attr: float(np.mean([keys[i][a] == keys[j][a] for i, j in enumerate(nearest)]))
                 for a, attr in enumerate(EMBEDDED_ATTRIBUTES)}
    found = (images @ texts.T).argmax(1).tolist()
    top1 = float(np.mean([j == i for i, j in enumerate(found)]))
    same_meaning = float(np.mean([keys[j] == keys[i] for i, j in enumerate(found)]))
    report = f"nearest-neighbour agreement {agreement}, image->text top-1 {top1:.3f}, same attributes {same_meaning:.3f}"
    print(report)
    for attr in ("colour", "position", "size", "background"):
        assert agreement[attr] >= 0.85, report
    assert agreement["shape"] >= 0.4, report  # chance is 0.2
    assert top1 >= 0.1 and same_meaning >= 0.4, report  # chance: 1/1200 and about 1/600


def test_gpt2_standin_and_tokenizer_load_with_from_pretrained(models_dir):
    folder = gpt2_dir(models_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert tokenizer.eos_token == EOS and model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.vocab_size == len(tokenizer)
    assert json.loads((folder / "standin.json").read_text())["standin"] is True
    ids = tokenizer("a small red circle on the left.")["input_ids"]
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer))


def test_standin_tokenizer_round_trips_any_text(models_dir):
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir(models_dir))
    for text in ["A dog runs across the grass .", "Crème brûlée, 寿司 and 🍣!", "tabs\tand\nnewlines  ", "!!!"]:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    # common caption words are single tokens or few pieces, not bytes
    assert len(tokenizer(" circle")["input_ids"]) <= 2


def test_standins_live_in_one_folder_per_machine(monkeypatch, tmp_path, models_dir):
    """CLIPCAP_STANDINS, else $XDG_CACHE_HOME/clipcap-course, else ~/.cache/clipcap-course; this session's
    tests point it at a temporary folder (conftest), and every data folder's loaders read from there."""
    from utils.sources import language_model_source

    assert models_dir == standins_home() and str(models_dir).startswith(str(models_dir.parent))
    assert language_model_source("gpt2", True)[0] == str(models_dir / "standin-gpt2")
    monkeypatch.delenv(STANDINS_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert standins_home().parent == tmp_path / "xdg" / "clipcap-course"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert standins_home().parent == tmp_path / "home" / ".cache" / "clipcap-course"


def test_gpt2_standin_has_gpt2s_twelve_blocks_and_is_prefitted_on_captions(models_dir):
    """Twelve blocks, as GPT-2 has, so frozen / partial / full mean what they mean for it; pre-fitted on
    caption text: after an end-of-text token it writes a caption whose five facts can be read back, and after
    a caption it restates that caption's facts (the in-context use of the text before it that a soft prompt
    needs) far above the chance of about 0.34."""
    folder = gpt2_dir(models_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.config.n_layer == 12 and model.config.n_embd == 64
    first, last = json.loads((folder / "standin.json").read_text())["loss_first_last"]
    assert first > 3 and last < 0.6, (first, last)  # chance: ln(the about 60 tokens the captions use) = 4.1
    eos = tokenizer.eos_token_id
    from utils.embedded import embedded_attributes

    def continue_after(text: str) -> str:
        ids = torch.tensor([[eos, *tokenizer(text)["input_ids"], eos] if text else [eos]])
        out = model.generate(ids, max_new_tokens=30, do_sample=False, pad_token_id=eos, eos_token_id=eos)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    assert None not in embedded_attributes(continue_after("")).values(), continue_after("")
    captions = [c for cs in embedded_set(models_dir.parent / "pairs", n_images=30, seed=0).values() for c in cs[:1]]
    agree = np.mean([[embedded_attributes(continue_after(c))[a] == embedded_attributes(c)[a] for a in EMBEDDED_ATTRIBUTES]
                     for c in captions])
    assert agree >= 0.55, agree


# ---------------------------------------------------------------------------------------------
# On images and captions the course did not make: a stand-in is a test double for CLIP and GPT-2 on any
# data, so a newcomer's set, offline, must train on what its images show.

# Colours as a newcomer names them (not the embedded set's RGB values)
REGION_COLOURS = {"red": (200, 30, 40), "green": (30, 150, 50), "blue": (30, 60, 200), "yellow": (235, 220, 40),
                  "white": (245, 245, 245), "black": (15, 15, 15), "pink": (240, 130, 180), "brown": (120, 70, 30)}


def region_grid_images(n: int, grid: int, seed: int, side: int = 96) -> tuple[list, np.ndarray]:
    """`n` images of `grid` x `grid` regions, each a random one of REGION_COLOURS with per-region tint and
    pixel noise; and their (n, grid * grid) colour indices, row by row."""
    rng = np.random.default_rng(seed)
    palette = np.array(list(REGION_COLOURS.values()), dtype=float)
    labels = rng.integers(0, len(palette), size=(n, grid, grid))
    images = []
    for label in labels:
        cells = palette[label] + rng.normal(0, 12, size=(grid, grid, 3))
        cell = -(-side // grid)
        pixels = np.kron(cells, np.ones((cell, cell, 1)))[:side, :side]
        pixels = pixels + rng.normal(0, 10, size=pixels.shape)
        images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return images, labels.reshape(n, grid * grid)


def test_clip_vit_standin_embedding_keeps_the_region_colours_of_any_image(models_dir):
    """Images the course never makes (3x3 grids of eight random colours, with noise): a linear probe
    (least squares from the embedding to the 27 region R, G, B values) fitted on 400 images names the
    nearest colour of every region of 200 other images. Measured: 0.997 of regions right, R^2 0.97 (the
    fitted 64 dimensions alone: 0.39, R^2 0.36; the stand-in before the fixed colour grid: 0.44, R^2
    0.39; chance 0.125). Floor: 0.95 right, R^2 0.9."""
    model, preprocess = clip.load(str(clip_archive("ViT-B/32", models_dir)), device="cpu", jit=False)
    palette = np.array(list(REGION_COLOURS.values()), dtype=float) / 255

    def embed(images):
        with torch.no_grad():
            x = model.encode_image(torch.stack([preprocess(im) for im in images])).numpy()
        return np.c_[x, np.ones(len(x))]

    (fit_images, fit_labels), (test_images, test_labels) = region_grid_images(400, 3, 1), region_grid_images(200, 3, 2)
    probe = np.linalg.lstsq(embed(fit_images), palette[fit_labels].reshape(400, -1), rcond=None)[0]
    predicted = (embed(test_images) @ probe).reshape(200, 9, 3)
    named = ((predicted[:, :, None] - palette[None, None]) ** 2).sum(-1).argmin(-1)
    right = float((named == test_labels).mean())
    truth = palette[test_labels]
    r2 = 1 - float(((predicted - truth) ** 2).sum() / ((truth - truth.mean(0)) ** 2).sum())
    print(f"3x3 region colours named right {right:.3f}, R^2 {r2:.3f}")
    assert right >= 0.95 and r2 >= 0.9, (right, r2)


def write_region_set(folder, n: int, seed: int):
    """A newcomer's own set: `n` PNG pictures, left half one colour and right half another (with noise and a
    brightness gradient), and a captions.csv of three captions each that name which colour is where."""
    rng = np.random.default_rng(seed)
    names = list(REGION_COLOURS)
    templates = ("the left half is {a} and the right half is {b}.", "{a} on the left, {b} on the right.",
                 "A picture that is {a} on its left side and {b} on its right side.")
    (folder / "pictures").mkdir(parents=True)
    rows = ["image,caption"]
    for i in range(n):
        a, b = rng.choice(len(names), size=2, replace=False)
        pixels = np.empty((80, 80, 3))
        pixels[:, :40], pixels[:, 40:] = REGION_COLOURS[names[a]], REGION_COLOURS[names[b]]
        pixels *= np.linspace(0.85, 1.1, 80)[:, None, None]  # light from the top or the bottom
        pixels = pixels[::-1] if rng.random() < 0.5 else pixels
        pixels += rng.normal(0, 14, size=pixels.shape)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / "pictures" / f"pic{i:04d}.png")
        rows += [f'pic{i:04d}.png,"{t.format(a=names[a], b=names[b])}"' for t in templates]
    (folder / "captions.csv").write_text("\n".join(rows) + "\n")
    return folder / "captions.csv"


def left_right_colours(caption: str) -> tuple[str | None, str | None]:
    """The colours a caption names, in the order it names them (every template names the left one first)."""
    found = [w for w in caption.lower().replace(",", " ").replace(".", " ").split() if w in REGION_COLOURS]
    return tuple((found + [None, None])[:2])


@pytest.mark.slow
def test_a_newcomers_own_set_trains_offline_through_the_cli_on_what_its_images_show(tmp_path, monkeypatch, capsys):
    """300 pictures of two colour halves, captions naming which colour is where, through the CLI offline
    (`features` -> `train` -> `evaluate`), as a newcomer would: the held-out captions name both colours
    right far more often than the most frequent training caption would (1/56 of the colour pairs).
    Measured (30 epochs): 1.00 of the 47 test images both colours right, the most frequent caption 0.04;
    with 12 epochs the captions had the set's form and the colours wrong (0.00). The earlier stand-in,
    fitted on the course's drawings only, gave 0.07 on such a set. Floor: 0.5, and 0.4 above the baseline."""
    from utils.__main__ import main

    csv_path = write_region_set(tmp_path / "my-set", 300, seed=3)
    monkeypatch.setenv("CLIPCAP_DATA", str(tmp_path / "data"))
    data = ["--offline", "--dataset", "csv", "--path", str(csv_path), "--val-fraction", "0.1", "--test-fraction", "0.2"]
    main(["features", *data, "--num-workers", "0"])
    main(["train", *data, "--epochs", "30", "--out-dir", str(tmp_path / "run")])
    out = tmp_path / "scores.json"
    main(["evaluate", "--model", str(tmp_path / "run" / "captioner"), "--split", "test", "--out", str(out),
          "--metrics", "BLEU", "--no-clip-score"])
    captions = json.loads(out.read_text())["captions"]
    right = np.mean([left_right_colours(r["prediction"]) == left_right_colours(r["references"][0]) for r in captions])
    train_captions = [line.split(",", 1)[1].strip('"') for line in csv_path.read_text().splitlines()[1:]]
    most_frequent = max(set(train_captions), key=train_captions.count)
    baseline = np.mean([left_right_colours(most_frequent) == left_right_colours(r["references"][0]) for r in captions])
    print(f"newcomer's set: {len(captions)} test images, both colours right {right:.3f} "
          f"(most frequent caption: {baseline:.3f}); e.g. {captions[0]['prediction']!r}")
    assert len(captions) >= 40 and right >= 0.5 and right >= baseline + 0.4, (right, baseline)


# Written by hand in the style of Flickr30k's captions, after the stand-in's word lists and never tuned on:
# text the course did not generate.
FLICKR_STYLE = """A woman in a yellow raincoat holds an umbrella over her head.
Four kids splash around in a shallow creek on a summer afternoon.
A man with a gray beard plays an accordion on the subway platform.
A surfer in a black wetsuit rides a big wave.
A brown and white puppy chews on a shoe.
Two women are sitting at a cafe table drinking coffee.
A little boy wearing a cowboy hat rides a pony at the fair.
A crowd gathers to watch fireworks over the harbor.
A construction worker in an orange vest directs traffic.
An old man feeds pigeons in the park.
A girl with braided hair blows out the candles on her birthday cake.
The basketball player jumps to dunk the ball.
A dog leaps to catch a frisbee in midair.
People walk past a colorful mural painted on a brick wall.
A young couple poses for a picture in front of a waterfall.
A mountain biker speeds down a dirt trail in the woods.
A vendor sells fruit from a cart on a crowded street.
Two boys wrestle on the grass while their father watches.
A woman jogs along the river with her dog.
A band performs on stage under bright lights."""


def test_standin_tokenizer_reads_everyday_captions_about_as_gpt2_does(models_dir):
    """Tokens per word on FLICKR_STYLE: the real GPT-2 takes about 1.3 on such captions (punctuation
    included); measured 1.22 here (the earlier stand-in, which knew only the drawings' words: 3.01)."""
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir(models_dir))
    lines = FLICKR_STYLE.splitlines()
    per_word = sum(len(tokenizer(line)["input_ids"]) for line in lines) / sum(len(line.split()) for line in lines)
    assert per_word <= 1.4, per_word
    assert len(tokenizer(" glasses")["input_ids"]) == 1 and len(tokenizer(" skateboard")["input_ids"]) == 1
    assert len(tokenizer) >= 3000
