"""The fault matrix, files part: bundles, `.clipcap` files, ClipCap weights, shards and the feature cache
crafted to break the course (a "trained captioner" from a forum, a classmate's file), each met through the
real command a user runs. Each row: one message naming the file and what is wrong, no traceback, a
non-zero exit, nothing written, and (where the file carries code) the canary absent.

The files are generated here from the stand-in models; a real full disk is a small tmpfs (skipped, with
the reason, where mounting is not permitted).
"""

from __future__ import annotations

import contextlib
import json
import runpy
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import ROOT, cli_env, run_cli
from utils.__main__ import main
from utils.bundle_files import MANIFEST, sha256
from utils.captioner import Captioner
from utils.config import ModelConfig
from utils.features import load_cache
from utils.files import DiskFull
from utils.share import export_file
from utils.sources import load_language_model

pytestmark = [pytest.mark.fault, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(autouse=True)
def offline_data(data_dir, tmp_path, monkeypatch):
    """As `run_cli` runs a command: offline, data under the session's folder, the user cache in tmp_path."""
    monkeypatch.setenv("CLIPCAP_OFFLINE", "1")
    monkeypatch.setenv("CLIPCAP_DATA", str(data_dir))
    monkeypatch.setenv("CLIPCAP_CACHE", str(tmp_path / "user-cache"))


def refused(capsys, *argv: str) -> str:
    """Run `python -m utils ARGV` in this process; it must exit non-zero with one `error: ` message."""
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    message = str(exit_.value.code)
    assert exit_.value.code not in (0, None) and message.startswith("error: "), message
    assert "Traceback" not in message and "\n" not in message.strip(), message
    assert "Traceback" not in capsys.readouterr().err
    return message


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture(scope="module")
def bundle(models_dir, tmp_path_factory) -> Path:
    """A small captioner bundle made by the real save code from the stand-in GPT-2."""
    lm, tokenizer, _ = load_language_model("gpt2", offline=True)
    torch.manual_seed(0)
    captioner = Captioner(ModelConfig(mapper="mlp", clip_dim=64, prefix_length=4, freeze="full",
                                      backbone="standin:ViT", max_caption_tokens=12), lm, tokenizer).eval()
    return captioner.save_pretrained(tmp_path_factory.mktemp("bundle") / "captioner", summary={"steps": 0})


@pytest.fixture
def photo(tmp_path) -> Path:
    Image.new("RGB", (64, 64), "red").save(tmp_path / "photo.png")
    return tmp_path / "photo.png"


def copy_of(bundle: Path, tmp_path: Path) -> Path:
    return shutil.copytree(bundle, tmp_path / "shared-captioner")


def edit_json(file: Path, change) -> None:
    obj = json.loads(file.read_text())
    file.write_text(json.dumps(change(obj) if callable(change) else {**obj, **change}))


# ---------------------------------------------------------------------------- code in a bundle

CANARY = "import pathlib\npathlib.Path({marker!r}).touch()\n"


def test_bundle_asking_to_run_its_code_is_refused_though_stdin_says_yes(bundle, photo, data_dir, tmp_path):
    """lm/config.json's auto_map names Python files shipped in lm/; transformers would ask "run the custom
    code? [y/N]" and a user answering y would run them. Through a real process, stdin answering y."""
    shared = copy_of(bundle, tmp_path)
    marker = tmp_path / "pwned"
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (shared / "lm" / name).write_text(CANARY.format(marker=str(marker)))
    edit_json(shared / "lm" / "config.json", {"auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                                                           "AutoModelForCausalLM": "modeling_evil.EvilModel"}})
    proc = subprocess.run([sys.executable, "-m", "utils", "caption", "--model", str(shared), str(photo)], cwd=ROOT,
                          env=cli_env(data_dir), input="y\ny\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{shared / 'lm' / 'config.json'} asks to run Python code" in proc.stderr and "nothing in it was run" \
        in proc.stderr
    assert not marker.exists() and proc.stdout == ""
    runpy.run_path(str(shared / "lm" / "modeling_evil.py"))  # the canary does fire when it is run
    assert marker.exists()


def test_tokenizer_asking_to_run_its_code_is_refused(bundle, photo, tmp_path, capsys):
    shared = copy_of(bundle, tmp_path)
    (shared / "lm" / "tokenization_evil.py").write_text(CANARY.format(marker=str(tmp_path / "pwned")))
    edit_json(shared / "lm" / "tokenizer_config.json", {"auto_map": {"AutoTokenizer": ["tokenization_evil.T", None]}})
    message = refused(capsys, "caption", "--model", str(shared), str(photo))
    assert f"{shared / 'lm' / 'tokenizer_config.json'} asks to run Python code" in message
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------------------- config.json by schema

CONFIG_CASES = {  # what config.json is changed to -> what the message names
    "summary a list": (lambda c: {**c, "summary": ["steps", 3]}, "config.json: summary is a JSON array, not an object"),
    "model a list": (lambda c: {**c, "model": [1, 2]}, "config.json: model is a JSON array, not an object"),
    "model a string": (lambda c: {**c, "model": "gpt2"}, "config.json: model is a JSON string, not an object"),
    "model missing": (lambda c: {k: v for k, v in c.items() if k != "model"}, "config.json: model is missing"),
    "top level a list": (lambda c: [c], "config.json holds a JSON array, not an object"),
    "unknown model field": (lambda c: {**c, "model": {**c["model"], "n_layers": 3}},
                            "config.json: model.n_layers is not a setting"),
    "mistyped model field": (lambda c: {**c, "model": {**c["model"], "num_layers": "3"}},
                             "num_layers must be a whole number, not '3'"),
    "unknown top-level field": (lambda c: {**c, "weights": "x"}, "config.json: weights is not a field"),
    "mistyped summary field": (lambda c: {**c, "summary": {"steps": "many"}}, "config.json: summary.steps is \"many\""),
    "summary holding an object": (lambda c: {**c, "summary": {"notes": {"a": 1}}},
                                  "config.json: summary.notes is {\"a\": 1}, not a plain value"),
    "a config of 2 MB": (lambda c: {**c, "summary": {"notes": "x" * (2 << 20)}},
                         "config.json is 2,097,"),
    "absurd mapper": (lambda c: {**c, "model": {**c["model"], "prefix_length": 10**7}},
                      "model.prefix_length is 10,000,000, over the limit of 1,024"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bundle_config_out_of_schema_is_refused_naming_the_field(bundle, photo, tmp_path, capsys, case):
    change, said = CONFIG_CASES[case]
    shared = copy_of(bundle, tmp_path)
    edit_json(shared / "config.json", change)
    before = files_under(tmp_path)
    message = refused(capsys, "caption", "--model", str(shared), str(photo))
    assert said in message and str(shared) in message
    assert files_under(tmp_path) == before


def test_bundle_whose_backbone_names_a_local_non_archive_file(bundle, photo, tmp_path, capsys):
    shared = copy_of(bundle, tmp_path)
    (tmp_path / "notes.txt").write_text("not a CLIP model")
    edit_json(shared / "config.json", lambda c: {**c, "model": {**c["model"], "backbone": str(tmp_path / "notes.txt")}})
    message = refused(capsys, "caption", "--model", str(shared), str(photo))
    assert "model.backbone names" in message and "not a CLIP archive" in message


# ---------------------------------------------------------------------------- the LM: sizes and weights

LM_CASES = {  # lm/config.json changed to -> what the message says
    "5,000 layers": ({"n_layer": 5000}, "n_layer is 5,000, over the limit of 256 layers"),
    "a huge width": ({"n_embd": 10**7}, "n_embd is 10,000,000, over the limit of 65,536 width"),
    "a huge vocabulary": ({"vocab_size": 10**9}, "vocab_size is 1,000,000,000, over the limit of 1,048,576"),
    "a layer count that is text": ({"n_layer": "12"}, "n_layer is \"12\", not a whole number"),
    "one block more than its weights": ({"n_layer": 13}, "it lacks transformer.h.12."),
    "one block less than its weights": ({"n_layer": 11}, "it holds transformer.h.11."),
}


@pytest.mark.parametrize("case", LM_CASES)
def test_lm_config_that_does_not_fit_is_refused_before_anything_is_built(bundle, photo, tmp_path, capsys, case):
    change, said = LM_CASES[case]
    shared = copy_of(bundle, tmp_path)
    edit_json(shared / "lm" / "config.json", change)
    start = time.perf_counter()
    message = refused(capsys, "caption", "--model", str(shared), str(photo))
    assert said in message and str(shared / "lm") in message, message
    assert time.perf_counter() - start < 30  # 5,000 layers took over 5 minutes to build


@pytest.mark.parametrize("where", ["lm", "mapper"])
def test_weights_lacking_a_tensor_are_refused_not_initialised_at_random(bundle, photo, tmp_path, capsys, where):
    from safetensors.torch import load_file, save_file

    shared = copy_of(bundle, tmp_path)
    file = shared / "lm" / "model.safetensors" if where == "lm" else shared / "mapper.safetensors"
    weights = load_file(str(file))
    dropped = "transformer.ln_f.bias" if where == "lm" else max(weights)
    save_file({k: v for k, v in weights.items() if k != dropped}, str(file))
    message = refused(capsys, "caption", "--model", str(shared), str(photo))
    assert f"it lacks {dropped}" in message and "Refused rather than filled with random weights" in message


def test_weights_whose_header_claims_more_than_the_file_holds(bundle, photo, tmp_path, capsys):
    shared = copy_of(bundle, tmp_path)
    file = shared / "mapper.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:-100])
    message = refused(capsys, "caption", "--model", str(shared), str(photo))
    assert f"{file} is not a complete safetensors file" in message


# ---------------------------------------------------------------------------- .clipcap files

def crafted_archive(bundle: Path, out: Path, extra: dict[str, tuple[bytes, int]] | None = None,
                    manifest: bytes | None = None, manifest_compression: int = zipfile.ZIP_STORED) -> Path:
    """A .clipcap of `bundle` plus `extra` members {name: (bytes, compression)}, each listed in the manifest
    with its true checksum (or the `manifest` given)."""
    import hashlib

    extra = extra or {}
    files = {p.relative_to(bundle).as_posix(): p.read_bytes() for p in sorted(bundle.rglob("*")) if p.is_file()}
    listed = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    listed |= {name: hashlib.sha256(data).hexdigest() for name, (data, _) in extra.items()}
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(MANIFEST, manifest if manifest is not None else
                    json.dumps({"archive_version": 1, "files": listed}), compress_type=manifest_compression)
        for name, data in files.items():
            zf.writestr(name, data)
        for name, (data, compression) in extra.items():
            zf.writestr(name, data, compress_type=compression)
    return out


ARCHIVE_CASES = {  # options of crafted_archive, made when the row runs -> what the message says
    "a member inflating to 64 MB": (lambda: dict(extra={"lm/padding.bin": (bytes(64 << 20), zipfile.ZIP_DEFLATED)}),
                                    "lm/padding.bin is compressed"),
    "a manifest inflating to 64 MB": (lambda: dict(manifest=b'{"archive_version": 1, "files": {}' + b" " * (64 << 20)
                                                   + b"}", manifest_compression=zipfile.ZIP_DEFLATED),
                                      f"its {MANIFEST} is 67,108,"),
    "too many members": (lambda: dict(extra={f"lm/f{i}": (b"", zipfile.ZIP_STORED) for i in range(1001)}),
                         "at most 1000 of them"),
}


@pytest.mark.parametrize("case", ARCHIVE_CASES)
def test_crafted_clipcap_is_refused_before_anything_is_unpacked(bundle, photo, tmp_path, capsys, case):
    options, said = ARCHIVE_CASES[case]
    archive = crafted_archive(bundle, tmp_path / "shared.clipcap", **options())
    assert archive.stat().st_size < 4 << 20
    message = refused(capsys, "caption", "--model", str(archive), str(photo))
    assert str(archive) in message and said in message and "nothing was unpacked" in message, message
    assert files_under(tmp_path / "user-cache") == []  # not one byte unpacked


def test_clipcap_with_a_damaged_member_unpacks_nothing(bundle, photo, tmp_path, capsys):
    archive = export_file(bundle, tmp_path / "shared.clipcap")
    data, member = bytearray(archive.read_bytes()), (bundle / "mapper.safetensors").read_bytes()
    data[data.index(member) + len(member) // 2] ^= 0xFF  # one bit inside the mapper's weights
    archive.write_bytes(bytes(data))
    message = refused(capsys, "caption", "--model", str(archive), str(photo))
    assert "mapper.safetensors" in message and "checksum" in message
    assert files_under(tmp_path / "user-cache") == []


def test_a_sound_clipcap_still_loads(bundle, tmp_path):
    archive = export_file(bundle, tmp_path / "shared.clipcap")
    assert Captioner.from_pretrained(archive).config == Captioner.from_pretrained(bundle).config
    assert sha256(archive)  # and its unpacked copy is in the user cache
    assert files_under(tmp_path / "user-cache")


# ---------------------------------------------------------------------------- import-clipcap

def _pt(state: dict, path: Path) -> Path:
    torch.save(state, path)
    return path


WIDTH = 8
CLIPCAP_CASES = {
    "a zero-width GPT-2": ({"gpt.transformer.wte.weight": torch.zeros(10, 0),
                            "clip_project.linear.weight": torch.zeros(24, 64),
                            "clip_project.prefix_const": torch.zeros(4, 0)},
                           "gpt.transformer.wte.weight has the shape (10, 0)"),
    "a zero-width mapper layer": ({"gpt.transformer.wte.weight": torch.zeros(10, WIDTH),
                                   "clip_project.model.0.weight": torch.zeros(0, 64),
                                   "clip_project.model.2.weight": torch.zeros(80, 0)},
                                  "clip_project.model.0.weight has the shape (0, 64)"),
    "a one-dimensional embedding": ({"gpt.transformer.wte.weight": torch.zeros(10),
                                     "clip_project.linear.weight": torch.zeros(24, 64)},
                                    "gpt.transformer.wte.weight has the shape (10,)"),
    "a prefix of 2,000": ({"gpt.transformer.wte.weight": torch.zeros(10, WIDTH),
                           "clip_project.linear.weight": torch.zeros(3 * WIDTH, 64),
                           "clip_project.prefix_const": torch.zeros(2000, WIDTH),
                           "clip_project.transformer.layers.0.mlp.fc1.weight": torch.zeros(16, WIDTH)},
                          "its shapes make prefix_length 2,000, over the limit of 1,024"),
}


@pytest.mark.parametrize("case", CLIPCAP_CASES)
def test_clipcap_weights_of_absurd_shapes_are_refused_in_one_line(tmp_path, capsys, case):
    state, said = CLIPCAP_CASES[case]
    weights = _pt(state, tmp_path / "coco_weights.pt")
    message = refused(capsys, "import-clipcap", str(weights), "--out", str(tmp_path / "bundle"))
    assert str(weights) in message and said in message, message
    assert not (tmp_path / "bundle").exists()


def test_clipcap_weights_inflating_past_the_file_are_refused_unread(tmp_path, capsys):
    """A 40 MB tensor whose bytes are deflated to ~40 KB inside torch's zip: 1,000 times its file's size."""
    _pt({"clip_project.model.0.weight": torch.zeros(10_000_000)}, tmp_path / "plain.pt")
    crafted = tmp_path / "coco_weights.pt"
    with zipfile.ZipFile(tmp_path / "plain.pt") as src, zipfile.ZipFile(crafted, "w") as dst:
        for info in src.infolist():
            compression = zipfile.ZIP_DEFLATED if "/data/" in info.filename else zipfile.ZIP_STORED
            dst.writestr(info.filename, src.read(info), compress_type=compression)
    (tmp_path / "plain.pt").unlink()
    assert crafted.stat().st_size < 200_000
    message = refused(capsys, "import-clipcap", str(crafted), "--out", str(tmp_path / "bundle"))
    assert "is compressed" in message and "inflate to 40,000,000" in message and "refused before" in message
    assert not (tmp_path / "bundle").exists()


# ---------------------------------------------------------------------------- shards

def test_shard_with_a_sparse_2_gib_member_skips_it_unread(tmp_path, capsys):
    if shutil.which("tar") is None:
        pytest.skip("GNU tar is needed to write a sparse member")
    folder = tmp_path / "members"
    folder.mkdir()
    for key, colour in (("000", "red"), ("001", "blue")):
        Image.new("RGB", (16, 16), colour).save(folder / f"{key}.jpg")
    (folder / "000.txt").write_text("a red square")
    with open(folder / "001.txt", "wb") as f:
        f.truncate(2 << 30)  # 2 GiB of holes: no disk used
    subprocess.run(["tar", "--sparse", "-cf", str(tmp_path / "shard.tar"), "000.jpg", "000.txt", "001.jpg",
                    "001.txt"], cwd=folder, check=True)
    (folder / "001.txt").unlink()
    assert (tmp_path / "shard.tar").stat().st_size < 100_000
    main(["features", "--dataset", "webdataset", "--path", str(tmp_path / "shard.tar"), "--cache-dir",
          str(tmp_path / "cache"), "--device", "cpu", "--num-workers", "0"])
    said = capsys.readouterr()
    assert "001.txt claims 2,147,483,648 bytes in a shard of" in said.out + said.err
    assert load_cache(tmp_path / "cache").captions["caption"].tolist() == ["a red square"]


# ---------------------------------------------------------------------------- the feature cache

FEATURES = ["features", "--dataset", "embedded", "--max-images", "200", "--chunk-size", "64", "--batch-size", "32",
            "--num-workers", "0", "--device", "cpu"]

# Runs `python -m utils ...` and kills itself (SIGKILL: nothing cleans up) at one point of the cache's writing.
KILLER = """
import os, shutil, signal, sys
from pathlib import Path
import utils.features as F
point = os.environ["KILL_AT"]
def die():
    os.kill(os.getpid(), signal.SIGKILL)
atomic_path, write_json, rmtree = F.atomic_path, F.write_json, shutil.rmtree
def dying_atomic_path(dest):
    if Path(dest).name == point:
        die()
    return atomic_path(dest)
def dying_write_json(dest, obj):
    if point == "marker" and obj.get("complete") and "num_captions" not in obj:
        die()
    return write_json(dest, obj)
def dying_rmtree(path, *args, **kwargs):
    if point == "chunks" and Path(path).name == "chunks" and Path(path).is_dir():
        die()
    return rmtree(path, *args, **kwargs)
F.atomic_path, F.write_json, F.shutil.rmtree = dying_atomic_path, dying_write_json, dying_rmtree
from utils.__main__ import main
main(sys.argv[1:])
"""


def killed_run(out: Path, point: str, data_dir: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", KILLER, *FEATURES, "--cache-dir", str(out)], cwd=ROOT,
                          env=cli_env(data_dir) | {"KILL_AT": point}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"not killed at {point}:\n{proc.stderr[-2000:]}"


@pytest.fixture(scope="module")
def clean_cache(data_dir, tmp_path_factory) -> Path:
    """The cache an uninterrupted `python -m utils features` makes (a process, as the killed runs are)."""
    out = tmp_path_factory.mktemp("clean") / "cache"
    run_cli(*FEATURES, "--cache-dir", str(out), data_dir=data_dir)
    return out


def same_cache(a: Path, b: Path) -> None:
    one, two = load_cache(a), load_cache(b)
    assert np.array_equal(np.asarray(one.features), np.asarray(two.features))
    pd.testing.assert_frame_equal(one.images, two.images)
    pd.testing.assert_frame_equal(one.captions, two.captions)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["images.csv", "features.npy", "marker", "chunks", "captions.csv"])
def test_cache_killed_anywhere_while_finishing_is_repaired_by_the_rerun(clean_cache, data_dir, tmp_path, capsys,
                                                                         point):
    """kill -9 at each step of finishing a cache (before the index, between the features file and meta.json's
    marker, while the chunks are dropped, before the captions index); the same command then finishes it."""
    out = tmp_path / "cache"
    killed_run(out, point, data_dir)
    if point in ("images.csv", "features.npy", "marker"):
        assert (out / "chunks").is_dir()  # the work is still there
    message = refused(capsys, "train", "--features", str(out), "--max-steps", "1", "--device", "cpu",
                      "--out-dir", str(tmp_path / "run"))
    assert "incomplete (interrupted?): rerun `python -m utils features`" in message
    assert not (tmp_path / "run").exists()
    main([*FEATURES, "--cache-dir", str(out)])
    assert not (out / "chunks").exists() and not list(out.glob(".*tmp-*"))
    same_cache(out, clean_cache)


@contextlib.contextmanager
def small_disk(folder: Path, size: str = "2m"):
    """A real filesystem of `size` mounted at `folder` (tmpfs), unmounted afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"a small tmpfs cannot be mounted here ({proc.stderr.strip() or 'mount refused'}): the real "
                    "full-disk rows need root and permission to mount")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Fill `disk` until `leave` bytes are free (in whole pages, as tmpfs counts)."""
    free = shutil.disk_usage(disk).free
    filler = disk / "filler"
    with open(filler, "wb") as f:
        f.write(bytes(max(0, free - leave)))
    return filler


@pytest.mark.slow
def test_features_on_a_really_full_disk_say_so_and_lose_nothing(clean_cache, data_dir, tmp_path, capsys):
    """The chunks are encoded; finishing the cache (features.npy) meets a full tmpfs: the documented message,
    never numpy's "N requested and M written"; the chunks stay and the rerun with room finishes the cache."""
    unfinished = tmp_path / "unfinished"
    killed_run(unfinished, "images.csv", data_dir)  # every chunk encoded, nothing joined yet
    with small_disk(tmp_path / "disk") as disk:
        out = shutil.copytree(unfinished, disk / "cache")
        page = 4096
        index = sum(-(-(clean_cache / name).stat().st_size // page) * page for name in ("images.csv", "skipped.csv"))
        assert (clean_cache / "features.npy").stat().st_size > 4 * page
        filler = fill(disk, index + 2 * page)  # room for the index files, not for the features
        chunks = sorted((out / "chunks").iterdir())
        message = refused(capsys, *FEATURES, "--cache-dir", str(out))
        assert f"no space left on device while writing {out / 'features.npy'}; nothing was replaced" in message
        assert "requested and" not in message
        assert sorted((out / "chunks").iterdir()) == chunks and not (out / "features.npy").exists()
        assert not list(out.glob(".*tmp-*"))
        filler.unlink()
        main([*FEATURES, "--cache-dir", str(out)])
        same_cache(out, clean_cache)


def test_bundle_saving_on_a_really_full_disk_says_so_and_writes_nothing(bundle, tmp_path, capsys):
    captioner = Captioner.from_pretrained(bundle)
    with small_disk(tmp_path / "disk") as disk:
        fill(disk, 256 << 10)  # the stand-in LM's weights alone are 2.6 MB
        with pytest.raises(DiskFull, match=f"no space left on device while writing {disk / 'captioner'}; nothing "
                                           "was replaced"):
            captioner.save_pretrained(disk / "captioner")
        assert [p.name for p in disk.iterdir()] == ["filler"]
        message = refused(capsys, "export", "--model", str(bundle), "--out", str(disk / "captioner.clipcap"))
        assert f"no space left on device while writing {disk / 'captioner.clipcap'}" in message
        assert [p.name for p in disk.iterdir()] == ["filler"]
