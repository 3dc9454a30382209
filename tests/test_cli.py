"""The command line and the configs it shares with the notebooks."""

from __future__ import annotations

import argparse
import json

import pytest

from conftest import cli_in_process, run_cli
from utils import paths, runtime
from utils.config import DataConfig, FeatureConfig, RuntimeConfig, add_arguments, from_arguments


def test_every_config_field_is_a_flag_and_defaults_stay_the_dataclass_defaults():
    parser = argparse.ArgumentParser()
    for cls in (RuntimeConfig, DataConfig, FeatureConfig):
        add_arguments(parser, cls)
    args = parser.parse_args(["--batch-size", "8", "--backbone", "RN50x4", "--no-fp16", "--offline",
                              "--dataset", "csv", "--max-images", "5", "--val-fraction", "0.2"])
    feats, data, rt = (from_arguments(c, args) for c in (FeatureConfig, DataConfig, RuntimeConfig))
    assert feats == FeatureConfig(batch_size=8, backbone="RN50x4", fp16=False)
    assert data == DataConfig(dataset="csv", max_images=5, val_fraction=0.2)
    assert rt == RuntimeConfig(offline=True)
    defaults = parser.parse_args([])
    assert from_arguments(FeatureConfig, defaults) == FeatureConfig()
    with pytest.raises(SystemExit):
        parser.parse_args(["--dataset", "imagenet"])


@pytest.mark.parametrize("command", ["info", "download", "features", "course", "bench", "serve"])
def test_each_command_explains_itself(command, data_dir):
    out = cli_in_process(command, "--help", data_dir=data_dir).stdout
    assert "--offline" in out and "--device" in out
    if command in ("features", "course"):
        assert "--batch-size" in out and "--backbone" in out and "--chunk-size" in out


def test_offline_detection_order(monkeypatch):
    monkeypatch.setenv("CLIPCAP_OFFLINE", "1")
    assert runtime.is_offline(None) is True
    assert runtime.is_offline(False) is False  # an explicit setting wins
    monkeypatch.setenv("CLIPCAP_OFFLINE", "0")
    assert runtime.is_offline(None) is False


def test_platform_detection(monkeypatch):
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    assert runtime.detect_platform() == "kaggle"
    monkeypatch.delenv("CLIPCAP_DATA", raising=False)
    assert paths.default_data_dir() == "/kaggle/working/data"
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE")
    monkeypatch.setenv("CLIPCAP_DATA", "/somewhere")
    assert paths.default_data_dir() == "/somewhere"


def test_gpu_check_passes_where_there_is_no_gpu():
    runtime.check_gpu()  # no GPU: nothing to refuse
    assert str(runtime.resolve_device("auto")) in ("cpu", "cuda")


def test_course_main_job_runs_offline_end_to_end_and_again(tmp_path):
    proc = run_cli("course", "--embedded-images", "90", "--num-workers", "0", data_dir=tmp_path)
    assert "OFFLINE MODE" in proc.stderr
    assert "270 captions of 90 images" in proc.stdout
    assert "feature cache ready at" in proc.stdout
    assert "done: features made, training made" in proc.stdout
    again = run_cli("course", "--embedded-images", "90", "--num-workers", "0", data_dir=tmp_path).stdout
    assert "reusing the finished feature cache at" in again and "reusing the finished training run at" in again
    assert again.splitlines()[-1] == "done: features reused, training reused"
    def scores(out):
        return out.split("(scores x100):")[1].split("scores and per-image")[0]

    assert scores(again) == scores(proc.stdout)  # the same captioner, the same scores
    info = run_cli("info", data_dir=tmp_path).stdout
    assert "embedded-standin-ViT: 90 images, 270 captions, standin:ViT (112-d) [stand-in]" in info
    assert "standin-clip-vit.pt" in info and "torch:" in info and "gpu_check:" in info


def test_bench_writes_a_results_table(tmp_path):
    proc = run_cli("bench", "--images", "4", "--out", str(tmp_path), "--device", "cpu", data_dir=tmp_path)
    result = json.loads((tmp_path / "features-cpu.json").read_text())
    assert set(result["summary"]["images_per_s"]) == {"decode_resize_only", "ours_batched", "clipcap_per_caption"}
    assert "| ours_batched |" in (tmp_path / "features-cpu.md").read_text()
    assert "speedup_vs_clipcap" in proc.stdout


def test_training_and_captioning_benches_write_their_tables(tmp_path):
    run_cli("bench", "training", "--arch", "tiny", "--steps", "2", "--out", str(tmp_path), "--device", "cpu",
            data_dir=tmp_path)
    run_cli("bench", "captioning", "--arch", "tiny", "--images", "4", "--out", str(tmp_path), "--device", "cpu",
            data_dir=tmp_path)
    training = json.loads((tmp_path / "training-cpu.json").read_text())["summary"]
    assert [r["pipeline"].split(":")[0] for r in training["pipelines"]] == ["ours", "ClipCap's mechanics"]
    assert training["clipcap_max_seq_len"] > 20  # min(mean + 10 std, max) of lengths with mean ~17
    captioning = json.loads((tmp_path / "captioning-cpu.json").read_text())["summary"]
    assert set(captioning["captions_per_s"]) == {"ours_greedy", "clipcap_greedy", "ours_beam5", "clipcap_beam5"}
    assert captioning["same_greedy_captions"] == "4 of 4", "the cached batched greedy decoding equals ClipCap's"
