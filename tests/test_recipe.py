"""The batch-size recipe: --lr and --warmup-steps are set for one batch (--lr-batch-size, ClipCap's 40), and a
run at another effective batch keeps the warm-up's number of captions and scales the LR by the square root
of the batch ratio (Adam's rule, Malladi et al. 2022), so batch 128 on a T4 trains like batch 40."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from utils.config import ConfigError, RuntimeConfig, TrainConfig, standin_preset
from utils.schedule import batch_recipe, effective_batch, get_lr, warmup_for
from utils.training import train
from utils.training_run import batch_recipe_message


def test_the_recipe_keeps_the_warmup_in_captions_and_scales_the_lr_by_the_square_root():
    cfg = TrainConfig(batch_size=128, lr=2e-5, min_lr=1e-6, warmup_steps=5000, lr_batch_size=40)
    moved = batch_recipe(cfg)
    assert moved.warmup_steps == 1562 and moved.warmup_steps * 128 == pytest.approx(5000 * 40, rel=1e-3)
    assert moved.lr == pytest.approx(2e-5 * math.sqrt(3.2)) and moved.min_lr == pytest.approx(1e-6 * math.sqrt(3.2))
    assert (moved.batch_size, moved.lr_batch_size, moved.decay, moved.epochs) == (128, 40, "linear", 10)
    assert cfg.lr == 2e-5 and cfg.warmup_steps == 5000, "the settings given are left as they are"


def test_the_effective_batch_counts_accumulation_and_processes():
    cfg = TrainConfig(batch_size=32, grad_accum=2, lr=1e-3, warmup_steps=100, lr_batch_size=40)
    assert effective_batch(cfg, 2) == 128
    one = batch_recipe(TrainConfig(batch_size=128, lr=1e-3, warmup_steps=100, lr_batch_size=40))
    moved = batch_recipe(cfg, 2)
    assert (moved.lr, moved.min_lr, moved.warmup_steps) == (one.lr, one.min_lr, one.warmup_steps) == (
        pytest.approx(1e-3 * math.sqrt(3.2)), 0.0, 31)
    smaller = batch_recipe(TrainConfig(batch_size=10, lr=1e-3, warmup_steps=100, lr_batch_size=40))  # more steps
    assert smaller.warmup_steps == 400 and smaller.lr == pytest.approx(5e-4)


def test_the_recipe_changes_nothing_at_its_own_batch_or_when_off():
    default = TrainConfig(batch_size=128)
    assert default.lr_batch_size == 0 and batch_recipe(default) is default, "off unless asked for"
    preset = standin_preset()[1]
    assert batch_recipe(preset) is preset
    same = TrainConfig(lr_batch_size=40)
    assert batch_recipe(same) is same, "at its own batch it changes nothing"
    assert batch_recipe(TrainConfig(batch_size=16, grad_accum=2, lr_batch_size=32, warmup_steps=7)).warmup_steps == 7


def test_the_warmup_never_rounds_to_nothing_and_zero_stays_zero():
    assert batch_recipe(TrainConfig(batch_size=400, warmup_steps=3, lr_batch_size=40)).warmup_steps == 1
    assert batch_recipe(TrainConfig(batch_size=400, warmup_steps=0, lr_batch_size=40)).warmup_steps == 0
    assert batch_recipe(TrainConfig(batch_size=400, lr=0.0, lr_batch_size=40)).lr == 0.0
    with pytest.raises(ConfigError, match=r"lr_batch_size must be >= 0, not -1 \(--lr-batch-size"):
        TrainConfig(lr_batch_size=-1)


def test_the_schedule_at_batch_128_warms_up_over_the_captions_of_batch_40():
    cfg = TrainConfig(batch_size=128, lr=1e-3, warmup_steps=320, lr_batch_size=40)
    moved = batch_recipe(cfg)
    assert warmup_for(moved, 10_000) == 100 and get_lr(99, moved, 10_000) == pytest.approx(1e-3 * math.sqrt(3.2))
    said = batch_recipe_message(cfg, moved, 1)
    assert said == ("batch 128 (--batch-size 128 x --grad-accum 1 x 1 process): --lr 0.001 -> 0.00179 and "
                    "--warmup-steps 320 -> 100, the same warm-up in captions as batch 40 (--lr-batch-size 0 to use "
                    "them as given)")


def test_a_run_under_the_recipe_says_so_records_the_settings_given_and_resumes_exactly(small_cache, data_dir,
                                                                                     tmp_path, one_thread, capsys):
    """The recipe's mechanics on a real run: its one line, checkpoints keeping --lr and --warmup-steps as given, and
    the LR after a resume continuing the recipe's schedule. Whether the recipe helps is a measurement, not a
    contract: bench/recipe.py (on the stand-ins it made batch 128 worse: README, "Training")."""
    model = dataclasses.replace(standin_preset()[0], num_layers=1)
    cfg = TrainConfig(epochs=2, batch_size=128, lr=3e-3, warmup_steps=20, lr_batch_size=40, watch_images=0,
                      checkpoint_minutes=0, log_every=1, out_dir=str(tmp_path / "run"))
    runtime = RuntimeConfig(offline=True, device="cpu")
    train(small_cache, model, dataclasses.replace(cfg, max_steps=5), runtime, data_dir)  # stopped, then resumed
    assert ("batch 128 (--batch-size 128 x --grad-accum 1 x 1 process): --lr 0.003 -> 0.00537 and --warmup-steps "
            "20 -> 6, the same warm-up in captions as batch 40") in capsys.readouterr().out
    assert train(small_cache, model, dataclasses.replace(cfg, resume=True), runtime, data_dir).steps == 10
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert checkpoint["config"]["train"]["lr"] == 3e-3 and checkpoint["config"]["train"]["warmup_steps"] == 20
    lrs = [row["lr"] for row in checkpoint["state"]["history"]["train"]]
    moved = batch_recipe(cfg)
    assert lrs == pytest.approx([get_lr(step, moved, 10) for step in range(10)])
    assert max(lrs) == pytest.approx(3e-3 * math.sqrt(3.2)) and lrs.index(max(lrs)) == 2  # 6 warm-up steps, cut to a third of 10
