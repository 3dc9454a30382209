"""Training: the schedule, the loss mask, freezing, checkpoints and exact resume."""

from __future__ import annotations

import dataclasses
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import (ROOT, TouchWhenUnpickled, assert_same_weights_and_losses, cli_env, lm_without_dropout,
                      quick_train_config, run_cli)
from utils.captioner import Captioner
from utils.config import ModelConfig, RuntimeConfig, TrainConfig, standin_preset
from utils.features import load_cache
from utils.errors import TrainingError
from utils.schedule import get_lr
from utils.training import train
from utils.training_run import build_captioner, make_optimizer

OFFLINE = RuntimeConfig(offline=True, device="cpu")


def test_warmup_then_linear_and_cosine_decay():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, min_lr=1e-4)
    assert get_lr(0, cfg, 110) == pytest.approx(1e-4)  # (0 + 1) / 10 of the peak
    assert get_lr(4, cfg, 110) == pytest.approx(5e-4)
    assert get_lr(9, cfg, 110) == pytest.approx(1e-3)  # the peak, at the end of the warm-up
    assert get_lr(60, cfg, 110) == pytest.approx(1e-3 - 0.9e-3 * 0.5)  # half way down the linear decay
    assert get_lr(110, cfg, 110) == pytest.approx(1e-4)
    cosine = dataclasses.replace(cfg, decay="cosine")
    assert get_lr(60, cosine, 110) == pytest.approx(1e-4 + 0.5 * 0.9e-3)
    assert get_lr(35, cosine, 110) > get_lr(60, cosine, 110) > get_lr(85, cosine, 110)
    assert get_lr(500, dataclasses.replace(cfg, decay="constant"), 110) == 1e-3


@pytest.fixture(scope="module")
def captioner(tiny_captioner):
    return tiny_captioner("full")


def test_loss_is_on_caption_tokens_and_eos_only(captioner):
    """logits at prefix_length-1 predict the first caption token; prefix and padding carry no loss."""
    tok = captioner.tokenizer
    ids_lists, _ = captioner.encode_captions(["a red circle!", "a big blue square on the left side"])
    assert ids_lists[0][-1] == tok.eos_token_id and tok.decode(ids_lists[0][:-1]) == "a red circle!"
    ids, mask, labels = captioner.pad(ids_lists)
    assert (labels[0, len(ids_lists[0]):] == -100).all() and (labels[1] != -100).all()
    bang = tok.convert_tokens_to_ids("!")
    assert bang in labels[0].tolist(), 'a real "!" is trained on, not masked as padding'

    clip_embed = torch.randn(2, 64)
    captioner.eval()
    loss = captioner(clip_embed, ids, mask, labels)
    P = captioner.config.prefix_length
    prefix = captioner.prefix(clip_embed)
    embeds = torch.cat([prefix, captioner.lm.get_input_embeddings()(ids)], 1)
    logits = captioner.lm(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(2, P, dtype=torch.long), mask], 1)).logits
    terms = []
    for b, seq in enumerate(ids_lists):
        for t, token in enumerate(seq):  # position P-1+t predicts caption token t
            terms.append(-torch.log_softmax(logits[b, P - 1 + t], -1)[token])
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)


def test_captions_are_cut_to_fit_the_lm_positions(captioner):
    ids, cut = captioner.encode_captions(["word " * 1000, "short"])
    assert cut == 1 and len(ids[0]) == captioner.max_caption_tokens and ids[0][-1] == captioner.tokenizer.eos_token_id
    assert captioner.config.prefix_length + captioner.max_caption_tokens <= captioner.lm.config.n_positions


@pytest.mark.parametrize("policy,first,last", [("frozen", 0, 0), ("partial", 0, 1), ("partial", 1, 0), ("full", 0, 0)])
def test_exactly_the_intended_parameters_change(small_cache, models_dir, policy, first, last):
    cache = load_cache(small_cache)
    cfg = ModelConfig(freeze=policy, train_first_blocks=first, train_last_blocks=last, num_layers=1, num_heads=4)
    torch.manual_seed(0)
    model = build_captioner(cfg, cache, OFFLINE)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = make_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.1))
    ids, mask, labels = model.pad(model.encode_captions(["a red circle", "a blue star on the left"])[0])
    model(torch.tensor(cache.features[:2], dtype=torch.float32), ids, mask, labels).backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    lm_changed = {n.split(".", 1)[1] for n in changed if n.startswith("lm.")}
    assert {n for n in changed if n.startswith("mapper.")} == {n for n in before if n.startswith("mapper.")}
    if policy == "frozen":
        assert lm_changed == set()
    elif policy == "full":
        assert {"transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.ln_f.weight"} <= lm_changed
    else:
        top = model.lm.config.n_layer - 1  # the stand-in has GPT-2's 12 blocks
        block = f"transformer.h.{top}." if last else "transformer.h.0."
        frozen = "transformer.h.0." if last else f"transformer.h.{top}."
        assert lm_changed and all(n.startswith(block) or (last and n.startswith("transformer.ln_f")) for n in lm_changed)
        assert not any(n.startswith(frozen) for n in lm_changed) and "transformer.wte.weight" not in lm_changed
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable, "every trainable tensor moves, no frozen one does"
    assert "trainable:" in model.describe()


def _model() -> ModelConfig:
    return dataclasses.replace(standin_preset()[0], num_layers=2, dropout=0.1)


def test_training_writes_history_checkpoints_and_a_bundle(small_cache, data_dir, tmp_path):
    result = train(small_cache, _model(), quick_train_config(tmp_path / "run"), OFFLINE, data_dir)
    history = result.history
    assert result.steps == 2 * (len(load_cache(small_cache).split("train")) // 16 + 1)
    assert [r["step"] for r in history["train"]][:3] == [2, 4, 6]
    assert {"loss", "lr", "grad_norm", "samples_per_s", "epoch"} <= set(history["train"][0])
    assert history["train"][-1]["loss"] < history["train"][0]["loss"]
    assert len(history["val"]) == 2 and result.best_val_loss == min(r["val_loss"] for r in history["val"])
    for name in ("checkpoint.pt", "best.pt", "history.json", "history_train.csv", "history_val.csv"):
        assert (tmp_path / "run" / name).is_file()
    loaded = Captioner.from_pretrained(result.bundle)
    assert loaded.config.clip_dim == load_cache(small_cache).features.shape[1]  # the stand-in CLIP's width
    assert loaded.config.backbone == "standin:ViT"
    assert loaded.config.lm == "standin:gpt2" and loaded.summary["standin"] is True
    with pytest.raises(TrainingError, match="--resume"):
        train(small_cache, _model(), quick_train_config(tmp_path / "run"), OFFLINE, data_dir)


@pytest.mark.fault
def test_resume_refuses_other_settings_and_pickled_code(small_cache, data_dir, tmp_path):
    train(small_cache, _model(), quick_train_config(tmp_path / "run", max_steps=4), OFFLINE, data_dir)
    other = dataclasses.replace(_model(), prefix_length=7)
    with pytest.raises(TrainingError, match=r"model.prefix_length: checkpoint has 10, now 7"):
        train(small_cache, other, quick_train_config(tmp_path / "run", resume=True), OFFLINE, data_dir)
    with pytest.raises(TrainingError, match=r"train.lr: checkpoint has 0.003, now 0.001"):
        train(small_cache, _model(), quick_train_config(tmp_path / "run", resume=True, lr=1e-3), OFFLINE, data_dir)
    (tmp_path / "evil").mkdir()
    with open(tmp_path / "evil" / "checkpoint.pt", "wb") as f:
        pickle.dump({"version": 1, "payload": TouchWhenUnpickled(tmp_path / "pwned")}, f)
    with pytest.raises(TrainingError, match="refused, not executed"):
        train(small_cache, _model(), quick_train_config(tmp_path / "evil", resume=True), OFFLINE, data_dir)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.fault
def test_killed_run_resumed_ends_like_an_uninterrupted_one(small_cache, data_dir, tmp_path):
    """kill -9 a real `python -m utils train` after its first checkpoint, resume it, compare."""
    args = ["train", "--features", str(small_cache), "--epochs", "3", "--batch-size", "8", "--num-layers", "2",
            "--dropout", "0.1", "--warmup-steps", "5", "--checkpoint-every", "5", "--log-every", "5", "--device", "cpu"]
    run_cli(*args, "--out-dir", str(tmp_path / "clean"), data_dir=data_dir)

    env = cli_env(data_dir)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "utils", *args, "--out-dir", str(killed)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "checkpoint.pt").exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be interrupted"
    at = torch.load(killed / "checkpoint.pt", weights_only=True)["state"]["step"]
    resumed = run_cli(*args, "--out-dir", str(killed), "--resume", data_dir=data_dir)
    assert f"resuming {killed} at step {at}" in resumed.stdout

    a = torch.load(tmp_path / "clean" / "checkpoint.pt", weights_only=True)
    b = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert a["state"]["step"] == b["state"]["step"] > at
    for name, tensor in a["trainable"].items():
        torch.testing.assert_close(b["trainable"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    va, vb = a["state"]["history"]["val"], b["state"]["history"]["val"]
    assert [r["val_loss"] for r in vb] == pytest.approx([r["val_loss"] for r in va], rel=1e-5)
    ta, tb = a["state"]["history"]["train"], b["state"]["history"]["train"]
    assert [r["loss"] for r in tb] == pytest.approx([r["loss"] for r in ta], rel=1e-5)


def test_watched_captions_and_early_stopping(small_cache, data_dir, tmp_path):
    # lr 0: the weights never move, so the second evaluation is no better and patience 1 ends the run
    result = train(small_cache, _model(), quick_train_config(tmp_path / "run", epochs=6, lr=0.0, patience=1, watch_images=4),
                   OFFLINE, data_dir)
    samples = result.history["samples"]
    assert len(samples) == len(result.history["val"]) >= 2
    assert all(len(s["captions"]) == 4 and 0 < s["distinct_share"] <= 1 for s in samples)
    assert samples[0]["image_ids"] == samples[-1]["image_ids"], "the same images are watched every time"
    assert len(result.history["val"]) == 2


def test_two_processes_train_as_one_with_gradient_accumulation(small_cache, data_dir, models_dir, tmp_path):
    """Kaggle's 2xT4 path, on two CPU processes (torchrun, gloo): each process takes every other batch and
    their gradients are averaged, which is what one process does with --grad-accum 2. Dropout is off in
    the mapper and the LM, so the two runs must end with the same weights and log the same losses."""
    lm = lm_without_dropout(tmp_path / "lm-no-dropout")
    args = ["train", "--features", str(small_cache), "--max-steps", "6", "--batch-size", "8", "--num-layers", "1",
            "--dropout", "0", "--warmup-steps", "2", "--checkpoint-every", "3", "--log-every", "1", "--lm", str(lm),
            "--device", "cpu"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "utils", *args, "--out-dir", str(tmp_path / "two")], cwd=ROOT,
                         env=cli_env(data_dir), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("2 process(es)") == 1 and two.stdout.count("trained 6 steps") == 1, two.stdout
    run_cli(*args, "--grad-accum", "2", "--out-dir", str(tmp_path / "one"), data_dir=data_dir)

    assert_same_weights_and_losses(tmp_path / "two", tmp_path / "one")
    assert Captioner.from_pretrained(tmp_path / "two" / "captioner").config.dropout == 0
