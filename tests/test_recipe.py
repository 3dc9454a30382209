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


def test_on_the_standins_the_recipe_does_not_make_batch_128_train_like_batch_40(small_cache, data_dir, tmp_path,
                                                                              one_thread, capsys):
    """The check behind `lr_batch_size`'s default of 0: the same 12 epochs of small_cache's 621 training captions
    (2-layer mapper, lr 3e-3, 20 warm-up steps at batch 40: 192 steps; lr 1.5e-3 to 6e-3 with warm-ups of 6 to 60
    steps end at 0.32 to 0.36 there) at batch 40, and at batch 128 with and without the recipe.

    Measured on one CPU thread, final validation loss, seeds 0 / 1 / 2: batch 40 0.332 / 0.329 / 0.315; batch 128
    with the recipe (lr 5.37e-3, 6 warm-up steps) 0.472 / 0.436 / 0.439; batch 128 as given (3e-3, 20 steps,
    the third of its 60) 0.379 / 0.379 / 0.369; the linear rule (9.6e-3, 6 steps) 0.466 / 0.482 / 0.467. Batch
    128 stays behind batch 40 at every lr and warm-up tried (best 0.379), and the recipe's shorter warm-up
    (in steps) and higher LR make it worse: the stand-ins' gradient noise scale, tr(Sigma) / |G|^2, is about
    100 captions after the first epoch (under 1 at the start), so at batch 128 no LR rule recovers the steps
    lost. Only seed 0 runs here; its gaps (0.14, 0.09 and 0.05) are wider than any seed's spread (0.01 to 0.04)."""
    model = dataclasses.replace(standin_preset()[0], num_layers=2)
    runtime = RuntimeConfig(offline=True, device="cpu")

    def run(name: str, batch: int, lr_batch: int, **changes) -> float:
        cfg = TrainConfig(epochs=12, batch_size=batch, lr=3e-3, warmup_steps=20, lr_batch_size=lr_batch,
                          watch_images=0, checkpoint_minutes=0, log_every=1, out_dir=str(tmp_path / name))
        result = train(small_cache, model, dataclasses.replace(cfg, **changes), runtime, data_dir)
        return result.history["val"][-1]["val_loss"]

    batch_40 = run("40", 40, 40)
    assert "the same warm-up in captions" not in capsys.readouterr().out, "at its own batch the recipe is silent"
    run("128-recipe", 128, 40, max_steps=30)  # stopped half way and resumed with the same flags
    said = capsys.readouterr().out
    assert ("batch 128 (--batch-size 128 x --grad-accum 1 x 1 process): --lr 0.003 -> 0.00537 and --warmup-steps "
            "20 -> 6, the same warm-up in captions as batch 40") in said
    recipe = run("128-recipe", 128, 40, resume=True)
    checkpoint = torch.load(tmp_path / "128-recipe" / "checkpoint.pt", weights_only=True)
    assert checkpoint["config"]["train"]["lr"] == 3e-3 and checkpoint["config"]["train"]["warmup_steps"] == 20
    lrs = [row["lr"] for row in checkpoint["state"]["history"]["train"]]
    assert len(lrs) == 60 and max(lrs) == pytest.approx(3e-3 * math.sqrt(3.2)) and lrs.index(max(lrs)) == 5
    as_given = run("128", 128, 0)

    report = f"val loss: batch 40 {batch_40:.3f}, 128 with the recipe {recipe:.3f}, 128 as given {as_given:.3f}"
    assert recipe > batch_40 + 0.05, report  # not within noise of batch 40
    assert recipe > as_given + 0.03, report  # and worse than leaving --lr and --warmup-steps as they are
    assert as_given > batch_40 + 0.02, report  # batch 128 cannot keep up in the same epochs without it either

    # a checkpoint written before lr_batch_size existed (it used the settings as given) resumes
    checkpoint = torch.load(tmp_path / "128" / "checkpoint.pt", weights_only=True)
    del checkpoint["config"]["train"]["lr_batch_size"]
    torch.save(checkpoint, tmp_path / "128" / "checkpoint.pt")
    assert train(small_cache, model, TrainConfig(epochs=12, batch_size=128, lr=3e-3, warmup_steps=20, watch_images=0,
                                                 out_dir=str(tmp_path / "128"), resume=True),
                 runtime, data_dir).steps == 60
