"""A free GPU session's budget, on the stand-ins: a comparison run keeps only its history (keep="history"), a run
that would not fit on its disk is refused before it starts, with the numbers, a resumed run's summary counts this
session's steps, the collapse watch compares captions by content, and a stand-in's CLIPScore is marked where it
means nothing."""

from __future__ import annotations

import dataclasses

import pytest

from conftest import quick_train_config
from utils import training_run
from utils.calibration import closing_table
from utils.config import ModelConfig, RuntimeConfig, standin_preset
from utils.course import training_report
from utils.errors import TrainingError
from utils.evaluation import STANDIN_CLIP_NOTE, clip_note
from utils.monitors import distinct_captions
from utils.training import train

OFFLINE = RuntimeConfig(offline=True, device="cpu")


def _model() -> ModelConfig:
    return dataclasses.replace(standin_preset()[0], num_layers=1)


def _size(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_a_comparison_run_keeps_its_history_only_and_is_reused(small_cache, data_dir, tmp_path, one_thread):
    out = tmp_path / "variant"
    cfg = quick_train_config(out, epochs=1, keep="history", resume="auto")
    result = train(small_cache, _model(), cfg, OFFLINE, data_dir)
    assert result.bundle is None and result.history["train"] and result.best_val_loss is not None
    assert sorted(p.name for p in out.iterdir()) == ["history.json", "history_train.csv", "history_val.csv",
                                                      "summary.json"] or \
        sorted(p.name for p in out.iterdir()) == ["history.json", "history_samples.csv", "history_train.csv",
                                                  "history_val.csv", "summary.json"]
    assert _size(out) < 200_000, "no checkpoint, no optimiser state, no bundle"
    again = train(small_cache, _model(), cfg, OFFLINE, data_dir)  # a rerun of the notebook: reused, not retrained
    assert (again.steps, again.best_val_loss, again.history) == (result.steps, result.best_val_loss, result.history)
    with pytest.raises(TrainingError, match="it was made with other settings"):
        train(small_cache, _model(), quick_train_config(out, epochs=1, keep="history", resume="auto", lr=1e-3),
              OFFLINE, data_dir)


def test_a_run_that_would_not_fit_on_its_disk_is_refused_with_the_numbers(small_cache, data_dir, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setattr(training_run, "free_bytes", lambda folder: 1000)  # the free-space probe of the real path
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"is on a disk with 0\.00 GB free, and this run's checkpoints and bundle "
                                            r"need about 0\.\d\d GB\. Free some space"):
        train(small_cache, _model(), quick_train_config(out), OFFLINE, data_dir)
    assert not out.exists() or not any(out.iterdir()), "refused before anything was written"


def test_a_resumed_runs_summary_counts_this_sessions_steps(small_cache, data_dir, tmp_path):
    out = tmp_path / "run"
    first = train(small_cache, _model(), quick_train_config(out, max_steps=4), OFFLINE, data_dir)
    assert not first.resumed and training_report(first).startswith("trained 4 steps (")
    second = train(small_cache, _model(), quick_train_config(out, max_steps=8, resume=True), OFFLINE, data_dir)
    assert (second.first_step, second.steps) == (4, 8) and second.resumed
    assert training_report(second).startswith("resumed at step 4: trained 4 steps in this session, to step 8 (")


def test_the_collapse_watch_compares_captions_by_content():
    garbage = [f"a a a the the of a {x}" for x in "abcdefgh"]  # eight near-copies of one sentence
    assert distinct_captions(garbage) == 1
    assert distinct_captions(["a red circle on the left .", "a blue circle on the left .",
                              "A red circle on the left", "a small green square at the top ."]) == 3


def test_a_standin_clipscore_is_marked_where_it_means_nothing():
    """The stand-in CLIP's text tower knows the drawings' captions only: on other images its CLIPScore is marked in
    the table that prints it, and in `evaluate --json`'s notes (evaluation.clip_note)."""
    ours = {"BLEU-4": 0.2, "CIDEr": 0.5, "CLIPScore": 0.52, "RefCLIPScore": 0.6}
    calibration = {name: dict(ours) for name in ("reference", "shuffled", "most frequent")}
    photos, _ = closing_table(ours, calibration, "csv", standin=True)
    assert "CLIPScore (stand-in CLIP: means nothing on these images)" in photos.index
    assert "RefCLIPScore (stand-in CLIP: means nothing on these images)" in photos.index
    drawings, _ = closing_table(ours, calibration, "embedded", standin=True)  # what it was made for
    real, _ = closing_table(ours, calibration, "flickr30k", standin=False)
    assert {"CLIPScore", "RefCLIPScore"} <= set(drawings.index) & set(real.index)
    assert clip_note(True, "flickr30k") == STANDIN_CLIP_NOTE and clip_note(False, "flickr30k") is None


def test_every_notebooks_first_cell_says_what_the_data_takes_and_what_is_free(monkeypatch, tmp_path, capsys):
    from utils.setup import notebook_setup

    (tmp_path / "features").mkdir()
    (tmp_path / "features" / "f.npy").write_bytes(b"0" * 3 * 2**20)
    monkeypatch.setenv("CLIPCAP_DATA", str(tmp_path))
    notebook_setup()
    line = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("disk:"))
    assert f"0.00 GB in {tmp_path}, " in line and "GB free on its disk" in line
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    notebook_setup()
    assert "Kaggle's /kaggle/working: about 20 GB in all" in capsys.readouterr().out
