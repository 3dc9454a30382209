"""Training across sessions, through the real `python -m utils train` on the stand-ins: --max-steps then
--resume, Ctrl-C and SIGTERM, refused settings, the collapse watch, checkpoint contents; and the pieces
under them (per-token loss, eval mode of the frozen LM, strict checkpoint keys)."""

from __future__ import annotations

import dataclasses
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, cli_env, quick_train_config, run_cli
from utils.config import ConfigError, DecodeConfig, ModelConfig, RuntimeConfig, TrainConfig, standin_preset
from utils.checkpoints import TrainState, load_trainable
from utils.errors import TrainingError
from utils.monitors import MAX_SKIPPED_STEPS, check_steps
from utils.schedule import get_lr, warmup_for
from utils.training import train, train_step

OFFLINE = RuntimeConfig(offline=True, device="cpu")
# 39 steps per epoch on small_cache's 621 training captions: 117 steps, long enough to be interrupted mid-run
ARGS = ["--epochs", "3", "--batch-size", "16", "--num-layers", "2", "--dropout", "0.1", "--warmup-steps", "5",
        "--checkpoint-every", "5", "--log-every", "3", "--device", "cpu"]


def _train(cache, out, *extra):
    return ["train", "--features", str(cache), *ARGS, "--out-dir", str(out), *extra]


@pytest.fixture(scope="module")
def clean(small_cache, data_dir, tmp_path_factory):
    """A run never stopped: what every stopped and resumed run below must end like."""
    out = tmp_path_factory.mktemp("clean") / "run"
    proc = run_cli(*_train(small_cache, out), data_dir=data_dir)
    return out, proc


def _assert_same_run(a_dir, b_dir) -> None:
    a = torch.load(a_dir / "checkpoint.pt", weights_only=True)
    b = torch.load(b_dir / "checkpoint.pt", weights_only=True)
    assert a["state"]["step"] == b["state"]["step"]
    for name, tensor in a["trainable"].items():
        torch.testing.assert_close(b["trainable"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    ta, tb = a["state"]["history"]["train"], b["state"]["history"]["train"]
    assert [r["step"] for r in tb] == [r["step"] for r in ta]
    assert [r["lr"] for r in tb] == pytest.approx([r["lr"] for r in ta], rel=1e-12)
    assert [r["loss"] for r in tb] == pytest.approx([r["loss"] for r in ta], rel=1e-5)
    val_a = {r["step"]: r["val_loss"] for r in a["state"]["history"]["val"]}
    val_b = {r["step"]: r["val_loss"] for r in b["state"]["history"]["val"]}
    assert set(val_a) <= set(val_b)
    assert [val_b[s] for s in val_a] == pytest.approx(list(val_a.values()), rel=1e-5)


def test_max_steps_then_resume_follows_the_schedule_of_a_run_never_stopped(clean, small_cache, data_dir, tmp_path):
    """--max-steps only stops: the LR decays over the whole run's 3 epochs, so resuming continues it."""
    out = tmp_path / "run"
    first = run_cli(*_train(small_cache, out, "--max-steps", "12"), data_dir=data_dir)
    assert "stopping at step 12 (LR schedule over 117)" in first.stdout
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["state"]["step"] == 12 and checkpoint["state"]["decay_steps"] == 117
    assert checkpoint["state"]["history"]["train"][-1]["lr"] > 0.5 * 3e-3, "not decayed to 0 at the stop"
    resumed = run_cli(*_train(small_cache, out, "--resume"), data_dir=data_dir)
    assert f"resuming {out} at step 12" in resumed.stdout and "runs to step 117" in resumed.stdout
    _assert_same_run(clean[0], out)
    lrs = [r["lr"] for r in torch.load(out / "checkpoint.pt", weights_only=True)["state"]["history"]["train"]]
    assert lrs[-1] < lrs[5] and all(b <= a for a, b in zip(lrs[2:], lrs[3:])), "one decay, no sawtooth"


@pytest.mark.fault
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_run_saves_says_how_to_continue_and_resumes_exactly(clean, small_cache, data_dir, tmp_path, sig):
    """Ctrl-C (Jupyter's "Interrupt kernel") and SIGTERM (a platform ending the session) mid-run."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "utils", *_train(small_cache, out)], cwd=ROOT,
                            env=cli_env(data_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoint.pt").exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, f"exit {proc.returncode}: the run was not interrupted mid-run\n{stderr}"
    assert "Traceback" not in stderr, stderr
    said = [line for line in stderr.splitlines() if "--resume" in line]
    assert len(said) == 1 and said[0].startswith(f"{sig.name} at step ") and str(out / "checkpoint.pt") in said[0]
    at = torch.load(out / "checkpoint.pt", weights_only=True)["state"]["step"]
    assert 0 < at < 117 and f"at step {at}:" in said[0]
    resumed = run_cli(*_train(small_cache, out, "--resume"), data_dir=data_dir)
    assert f"resuming {out} at step {at}" in resumed.stdout
    _assert_same_run(clean[0], out)


def test_interrupt_in_python_raises_one_clean_exception(small_cache, data_dir, tmp_path):
    """In a notebook: train() raises TrainingInterrupted, which IPython shows as one line."""
    from utils import training

    real, steps = training.train_step, []

    def interrupted_at_step_3(model, optimizer, accelerator, micro, lr, cfg):
        result = real(model, optimizer, accelerator, micro, lr, cfg)
        steps.append(lr)
        if len(steps) == 3:  # the third step: Ctrl-C while it runs
            signal.raise_signal(signal.SIGINT)
        return result

    training.train_step = interrupted_at_step_3
    before = signal.getsignal(signal.SIGINT)  # Python's default_int_handler; SIG_IGN in a shell's background job
    try:
        with pytest.raises(training.TrainingInterrupted) as info:
            train(small_cache, _model(), quick_train_config(tmp_path / "run"), OFFLINE, data_dir)
    finally:
        training.train_step = real
    assert info.value.exit_code == 130 and info.value._render_traceback_() == [f"TrainingInterrupted: {info.value}"]
    assert "SIGINT at step 3" in str(info.value) and torch.load(tmp_path / "run" / "checkpoint.pt",
                                                                weights_only=True)["state"]["step"] == 3
    assert signal.getsignal(signal.SIGINT) is before, "Ctrl-C acts as it did before train()"


def _refused(proc, *fragments, code=1):
    assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "error: " in last and all(f in last for f in fragments), proc.stderr[-3000:]
    return last


@pytest.mark.fault
@pytest.mark.parametrize("flags,fragments,code", [
    (["--decay", "cosin"], ["--decay", "'cosin'", "linear", "cosine", "constant"], 2),
    (["--freeze", "frozn"], ["--freeze", "'frozn'", "frozen", "full", "partial"], 2),
    (["--mapper", "transfomer"], ["--mapper", "'transfomer'", "transformer", "mlp"], 2),
    (["--precision", "fp61"], ["--precision", "'fp61'", "fp16", "bf16", "fp32"], 2),
    (["--lr", "-1"], ["--lr", "-1", ">= 0"], 1),
    (["--batch-size", "0"], ["--batch-size", "0", ">= 1"], 1),
    (["--epochs", "0"], ["--epochs", "0", ">= 1"], 1),
    (["--device", "gpu"], ["--device", "'gpu'", "cuda:N"], 1),
    (["--min-lr", "1"], ["--min-lr 1", "above --lr"], 1),
    (["--resume"], ["--resume", "no checkpoint.pt"], 1),
    (["--batch-size", "400", "--grad-accum", "2"], ["621 training captions", "fewer than one optimiser step",
                                                    "--batch-size 400 x --grad-accum 2"], 1),
], ids=lambda v: " ".join(v) if isinstance(v, list) and v and v[0].startswith("--") else None)
def test_bad_settings_stop_before_any_work(small_cache, data_dir, tmp_path, flags, fragments, code):
    out = tmp_path / "run"
    proc = run_cli(*_train(small_cache, out, *flags), data_dir=data_dir, check=False)
    _refused(proc, *fragments, code=code)
    assert not out.exists() or not any(out.iterdir()), "nothing was written"


def test_every_train_flag_is_described_with_its_default(data_dir):
    out = run_cli("train", "--help", data_dir=data_dir).stdout
    flat = " ".join(out.split())
    for cls in (ModelConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            if f.name == "clip_dim":
                continue
            flag = "--" + f.name.replace("_", "-")
            found = re.search(r"^  " + re.escape(flag) + r"[ ,\n]", out, re.MULTILINE)  # its entry: 2 spaces in
            assert found, flag
            text = " ".join(out[found.start():].split())
            assert f.metadata["help"][:20] in text[:400] and "(default:" in text[:600], flag
    assert "--decay {linear,cosine,constant}" in flat and "(default: 10; offline: 8)" in flat


def test_configs_refuse_bad_values_in_python_too():
    with pytest.raises(ConfigError, match=r"decay must be one of linear, cosine, constant, not 'cosin' \(--decay"):
        TrainConfig(decay="cosin")
    with pytest.raises(ConfigError, match=r"freeze must be one of frozen, full, partial, not 'frozn'"):
        dataclasses.replace(ModelConfig(), freeze="frozn")
    with pytest.raises(ConfigError, match="epochs must be a whole number, not '3'"):
        TrainConfig(epochs="3")
    with pytest.raises(ConfigError, match="top_p must be > 0 and <= 1"):
        DecodeConfig(top_p=0)
    assert TrainConfig(resume="auto").resume == "auto" and standin_preset()[1].checkpoint_every == 0


# ---------------------------------------------------------------------------- schedule

def test_a_warmup_longer_than_a_third_of_the_schedule_is_shortened_and_said(small_cache, data_dir, tmp_path):
    cfg = TrainConfig(lr=1e-3, warmup_steps=5000)
    assert warmup_for(cfg, 830) == 276 and get_lr(275, cfg, 830) == pytest.approx(1e-3)
    assert warmup_for(cfg, 30_000) == 5000
    proc = run_cli(*_train(small_cache, tmp_path / "run", "--warmup-steps", "1000", "--max-steps", "40"),
                   data_dir=data_dir)
    assert "warm-up shortened: --warmup-steps 1000 is more than a third of the 117 steps" in proc.stdout
    assert "warming up over 39 steps instead" in proc.stdout
    history = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["state"]["history"]
    lrs = [r["lr"] for r in history["train"]]
    assert max(lrs) == pytest.approx(3e-3), "the LR reaches --lr"


def test_a_streak_of_skipped_fp16_steps_stops_the_run():
    """Read at log steps, as train() does: the steps' losses stay on the device until check_steps reads them."""
    state, nan, inf, one = TrainState(decay_steps=100), torch.tensor(float("nan")), torch.tensor(float("inf")), \
        torch.tensor(1.0)
    steps = [(i, nan, one) for i in range(MAX_SKIPPED_STEPS - 1)] + [(MAX_SKIPPED_STEPS - 1, one, one)]
    assert len(check_steps(state, steps, "fp16")) == MAX_SKIPPED_STEPS and not steps, "the pending steps are read"
    check_steps(state, [(MAX_SKIPPED_STEPS + i, inf, one) for i in range(MAX_SKIPPED_STEPS - 1)], "fp16")
    with pytest.raises(TrainingError, match=f"not finite for {MAX_SKIPPED_STEPS} steps in a row \\(up to step 49;"):
        check_steps(state, [(2 * MAX_SKIPPED_STEPS - 1, nan, one)], "fp16")
    with pytest.raises(TrainingError, match="the loss became nan at step 3: training diverged"):
        check_steps(TrainState(decay_steps=100), [(2, one, one), (3, nan, one), (4, nan, one)], "fp32")


# ---------------------------------------------------------------------------- the step, the LM's mode

def _model() -> ModelConfig:
    return dataclasses.replace(standin_preset()[0], num_layers=2, dropout=0.1)


@pytest.fixture(scope="module")
def tiny(tiny_captioner):
    return tiny_captioner


def test_the_loss_is_per_token_over_the_accumulated_step(tiny):
    """Two micro-batches (one of short captions, one of long) step exactly as one batch holding all four:
    each token weighs the same, as the HF Trainer's num_items_in_batch makes it."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    captions = ["a red circle.", "a star.", "a big blue square on the left of a green picture.",
                "a small yellow triangle at the top right of the picture, on grey."]
    clip = torch.randn(4, 64)
    results = []
    for split in ([slice(0, 4)], [slice(0, 2), slice(2, 4)]):
        model = tiny()
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        ids_lists = model.encode_captions(captions)[0]
        micro = [(clip[s], *model.pad(ids_lists[s])) for s in split]
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        model.train()
        loss, norm = map(float, train_step(model, optimizer, accelerator, micro, lr=1.0, cfg=TrainConfig(grad_clip=0)))
        results.append((loss, norm, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss_one, norm_one, w_one), (loss_two, norm_two, w_two) = results
    assert loss_two == pytest.approx(loss_one, rel=1e-5) and norm_two == pytest.approx(norm_one, rel=1e-4)
    for name, tensor in w_one.items():
        torch.testing.assert_close(w_two[name], tensor, rtol=1e-4, atol=1e-6, msg=name)


def test_lm_parts_that_do_not_learn_stay_in_eval_mode(tiny):
    frozen = tiny("frozen").train()
    assert frozen.training and frozen.mapper.training
    assert not any(m.training for m in frozen.lm.modules()), "frozen: GPT-2 in eval mode, as ClipCap's variant"
    ids, mask, labels = frozen.pad(frozen.encode_captions(["a red circle", "a blue star"])[0])
    clip = torch.randn(2, 64)
    assert frozen(clip, ids, mask, labels).item() == frozen(clip, ids, mask, labels).item(), "no dropout"

    partial = tiny("partial", train_first_blocks=0, train_last_blocks=1).train()
    blocks = partial.lm.transformer.h
    assert not blocks[0].training and all(m.training for m in blocks[-1].modules())
    assert not partial.lm.transformer.drop.training, "the embedding dropout feeds a frozen block"
    full = tiny("full").train()
    assert all(m.training for m in full.lm.modules())
    assert not frozen.eval().training and not any(m.training for m in frozen.modules())


@pytest.mark.fault
def test_a_checkpoint_with_missing_or_unexpected_tensors_is_refused(tiny, tmp_path):
    captioner = tiny("partial", train_last_blocks=1)
    state = captioner.trainable_state()
    load_trainable(captioner, state, tmp_path / "ok.pt")
    missing = dict(list(state.items())[1:])
    with pytest.raises(TrainingError, match=r"lacks 1 tensor\(s\) that learn here"):
        load_trainable(captioner, missing, tmp_path / "missing.pt")
    extra = state | {"lm.transformer.wte.weight": captioner.lm.transformer.wte.weight.detach()}
    with pytest.raises(TrainingError, match=r"has 1 this model does not train \(lm.transformer.wte.weight\)"):
        load_trainable(captioner, extra, tmp_path / "extra.pt")
    name = next(iter(state))
    with pytest.raises(TrainingError, match="does not fit this model"):
        load_trainable(captioner, state | {name: torch.zeros(1)}, tmp_path / "shape.pt")


def test_device_is_honoured(small_cache, data_dir, tmp_path):
    proc = run_cli(*_train(small_cache, tmp_path / "run", "--device", "cuda:1"), data_dir=data_dir, check=False)
    if torch.cuda.device_count() > 1:
        assert proc.returncode == 0 and "on cuda:1" in proc.stdout
    else:
        _refused(proc, "--device cuda:1", f"this machine has {torch.cuda.device_count()} GPU(s)")


# ---------------------------------------------------------------------------- checkpoints, collapse

def test_checkpoints_say_where_and_best_holds_no_optimiser(clean):
    out, proc = clean
    assert f"checkpoint at step 5: {out / 'checkpoint.pt'} (" in proc.stdout and " MB)" in proc.stdout
    assert f"best at step 39: {out / 'best.pt'}" in proc.stdout
    resumable = torch.load(out / "checkpoint.pt", weights_only=True)
    best = torch.load(out / "best.pt", weights_only=True)
    assert {"optimizer", "rng", "scaler"} <= set(resumable) and not {"optimizer", "rng", "scaler"} & set(best)
    assert (out / "best.pt").stat().st_size < (out / "checkpoint.pt").stat().st_size / 2
    assert not list((out / "captioner").rglob("*optim*"))


def test_a_healthy_run_gives_no_collapse_warning(clean):
    out, proc = clean
    samples = torch.load(out / "checkpoint.pt", weights_only=True)["state"]["history"]["samples"]
    assert len(samples) == 3 and all(0 < s["reference_share"] <= 1 for s in samples)
    assert "collapsing" not in proc.stdout + proc.stderr


def test_a_collapsed_run_is_warned_of(small_cache, data_dir, tmp_path):
    """Every image with the same features: the captions cannot differ, and the watch must say so."""
    cache = shutil.copytree(small_cache, tmp_path / "same-features")
    features = np.load(cache / "features.npy")
    np.save(cache / "features.npy", np.repeat(features[:1], len(features), axis=0))
    proc = run_cli("train", "--features", str(cache), "--max-steps", "40", "--eval-every", "8", "--batch-size", "8",
                   "--num-layers", "1", "--warmup-steps", "5", "--device", "cpu", "--out-dir", str(tmp_path / "run"),
                   data_dir=data_dir)
    warnings = [line for line in proc.stdout.splitlines() if "collapsing towards one" in line]
    assert warnings and warnings[0].startswith("warning: at step 24 only 1 distinct captions for 8"), proc.stdout
    assert "no more for 3 evaluations" in warnings[0]


@pytest.mark.fault
def test_a_deepspeed_zero_checkpoint_is_refused_on_resume_by_name(small_cache, data_dir, tmp_path):
    """ZeRO shards the optimiser state; our checkpoint holds one process's share: resuming it is refused."""
    out = tmp_path / "run"
    run_cli(*_train(small_cache, out, "--max-steps", "6"), data_dir=data_dir)
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["state"]["zero_sharded"] is False  # a plain run records that it is not sharded
    checkpoint["state"]["zero_sharded"] = True  # as a run under accelerate's DeepSpeed plugin records it
    torch.save(checkpoint, out / "checkpoint.pt")
    before = (out / "checkpoint.pt").read_bytes()
    proc = run_cli(*_train(small_cache, out, "--resume"), data_dir=data_dir, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"cannot resume {out / 'checkpoint.pt'}" in proc.stderr and "DeepSpeed ZeRO" in proc.stderr
    assert (out / "checkpoint.pt").read_bytes() == before  # nothing lost


def test_compile_is_refused_where_it_cannot_run(small_cache, data_dir, tmp_path):
    """--compile is for GPUs of compute capability 7.0+; elsewhere it is refused before any work starts."""
    with pytest.raises(TrainingError, match="--compile: torch.compile needs a GPU of compute capability 7.0"):
        train(small_cache, _model(), quick_train_config(tmp_path / "run", compile=True), OFFLINE, data_dir)
    assert not (tmp_path / "run").exists()
