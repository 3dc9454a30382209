"""Sharing a captioner: one `.clipcap` file, and loading by Hub id or Kaggle handle through the real
clients (huggingface_hub.snapshot_download, kagglehub.model_download) from their own caches, laid out
exactly as the clients write them; publishing offline is refused with one message."""

from __future__ import annotations

import shutil
import zipfile

import pytest
import torch

from conftest import run_cli
from utils.captioner import Captioner
from utils.sources import load_language_model
from utils.config import DecodeConfig, ModelConfig
from utils.bundle_files import ShareError, import_file, resolve_bundle
from utils.share import export_file, publish

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bundle(models_dir, tmp_path_factory):
    lm, tokenizer, _ = load_language_model("gpt2", offline=True)
    torch.manual_seed(0)
    captioner = Captioner(ModelConfig(mapper="mlp", clip_dim=64, prefix_length=4, freeze="full",
                                      backbone="standin:ViT", max_caption_tokens=12), lm, tokenizer).eval()
    return captioner.save_pretrained(tmp_path_factory.mktemp("b") / "captioner", summary={"steps": 0})


def _captions(path) -> list[str]:
    captioner = Captioner.from_pretrained(path)
    embeds = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    return captioner.generate(embeds, DecodeConfig(method="greedy"))


def test_single_file_round_trip(bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPCAP_CACHE", str(tmp_path / "cache"))
    archive = export_file(bundle, tmp_path / "mine.clipcap")
    assert archive.is_file() and zipfile.is_zipfile(archive)
    unpacked = resolve_bundle(str(archive))
    assert unpacked != bundle and (unpacked / "config.json").is_file()
    assert resolve_bundle(str(archive)) == unpacked  # the second load unpacks nothing
    assert _captions(unpacked) == _captions(bundle)


def test_damaged_archive_is_refused(bundle, tmp_path):
    archive = export_file(bundle, tmp_path / "mine.clipcap")
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    data[len(data) // 2 + 1] ^= 0xFF
    (tmp_path / "bad.clipcap").write_bytes(bytes(data))
    with pytest.raises(ShareError, match="damaged|checksum|not a .clipcap"):
        import_file(tmp_path / "bad.clipcap", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "notzip.clipcap").write_text("hello")
    with pytest.raises(ShareError, match="not a .clipcap file"):
        import_file(tmp_path / "notzip.clipcap", tmp_path / "out")


def test_archive_cannot_write_outside(tmp_path):
    with zipfile.ZipFile(tmp_path / "evil.clipcap", "w") as zf:
        zf.writestr("clipcap-manifest.json", '{"archive_version": 1, "files": {"../escape.txt": "0"}}')
        zf.writestr("../escape.txt", "x")
    with pytest.raises(ShareError, match="outside the bundle"):
        import_file(tmp_path / "evil.clipcap", tmp_path / "out" / "b")
    assert not (tmp_path / "out" / "escape.txt").exists()


def test_load_by_hub_id_from_the_hub_cache(bundle, tmp_path, monkeypatch):
    """The Hub client's cache layout: models--user--name/snapshots/<commit>/..., refs/main."""
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--alice--clipcap-shapes"
    shutil.copytree(bundle, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))  # read once at import: the cache this test laid out
    path = resolve_bundle("alice/clipcap-shapes", offline=True)
    assert path == repo / "snapshots" / commit
    assert _captions(path) == _captions(bundle)
    with pytest.raises(ShareError, match="offline and the Hub's cache"):
        resolve_bundle("hub:alice/not-there", offline=True)


def test_load_by_kaggle_handle_from_kagglehub_cache(bundle, tmp_path, monkeypatch):
    """kagglehub's cache layout: models/<owner>/<model>/<framework>/<variation>/<version>/ + <version>.complete."""
    base = tmp_path / "kh" / "models" / "alice" / "clipcap-shapes" / "pyTorch" / "default"
    shutil.copytree(bundle, base / "1")
    (base / "1.complete").touch()
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kh"))
    path = resolve_bundle("kaggle:alice/clipcap-shapes/pyTorch/default/1", offline=True)
    assert path == base / "1"
    assert _captions(path) == _captions(bundle)
    with pytest.raises(ShareError, match="not a Kaggle model handle"):
        resolve_bundle("kaggle:alice/clipcap")


def test_publish_offline_is_refused_with_one_message(bundle):
    with pytest.raises(ShareError, match="offline.*export one file"):
        publish(bundle, "hub:alice/clipcap-shapes", offline=True)
    with pytest.raises(ShareError, match="hub:USER/NAME"):
        publish(bundle, "dropbox:alice/x", offline=True)


def test_deepspeed_zero2_config_is_read_by_accelerate():
    """The shipped ZeRO-2 config is one accelerate itself reads (DeepSpeed is not installed here)."""
    from importlib.resources import files

    from accelerate.commands.config.config_args import ClusterConfig

    path = files("utils") / "configs" / "deepspeed_zero2.yaml"
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.distributed_type == "DEEPSPEED" and config.deepspeed_config["zero_stage"] == 2
    assert config.num_processes == 2 and config.mixed_precision == "fp16"


def test_export_and_publish_through_the_cli(bundle, data_dir, tmp_path):
    out = run_cli("export", "--model", str(bundle), "--out", str(tmp_path / "one.clipcap"), data_dir=data_dir)
    assert (tmp_path / "one.clipcap").is_file() and "one file" in out.stdout
    assert ".clipcap file" in run_cli("caption", "--help", data_dir=data_dir).stdout
    refused = run_cli("publish", "--model", str(bundle), "--to", "hub:alice/x", data_dir=data_dir, check=False)
    assert refused.returncode == 1 and "offline" in refused.stderr and "Traceback" not in refused.stderr


def test_from_pretrained_takes_the_single_file(bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPCAP_CACHE", str(tmp_path / "cache"))
    archive = export_file(bundle, tmp_path / "b.clipcap")
    captioner = Captioner.from_pretrained(archive)
    assert captioner.generate(torch.zeros(1, 64))


def test_a_mistyped_local_bundle_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    from utils.bundle_files import parse_source

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert parse_source("runs/captionr") == ("folder", "runs/captionr")  # "runs" is here: a local path
    assert parse_source("alice/clipcap-shapes") == ("hub", "alice/clipcap-shapes")  # no folder "alice": the Hub
    assert parse_source("hub:runs/x") == ("hub", "runs/x")  # said explicitly
    with pytest.raises(Exception, match="not a captioner bundle"):
        Captioner.from_pretrained("runs/captionr")


def test_the_model_card_says_how_to_install_and_checks_the_course_was_imported(bundle):
    """A published bundle's card: the install line, then a snippet that stops at once when another `utils` (a
    student's utils.py) came first, and that runs as Python."""
    import ast

    from utils.share import INSTALL, model_card

    card = model_card(bundle)
    assert INSTALL in card and "git+https://github.com/clipcap-course/clipcap-course@main" in INSTALL
    snippet = card.split("```python\n")[1].split("```")[0]
    ast.parse(snippet)
    assert 'getattr(utils, "COURSE", None) == "clipcap-course"' in snippet
    assert snippet.index("assert getattr(utils") < snippet.index("from utils.captioner import Captioner")
