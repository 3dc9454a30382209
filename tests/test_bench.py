"""The lean training step keeps the maths (fused GELU, the LM head on label positions, frozen blocks out of the
weight-gradient path, bucketed batches), ClipCap's mechanics are ClipCap's, and the GPU script's quick mode
runs on the CPU and writes every results file."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, cli_env
from utils.bench import bench_captions, bench_models
from utils.runtime import compile_supported, mixed_precision
from utils.bench_clipcap import clipcap_loss, clipcap_max_seq_len, clipcap_pad
from utils.bench_training import real_token_flops
from utils.config import TrainConfig
from utils.schedule import epoch_order, length_bucketed_batches, padding_share
from utils.training_run import make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def captioner(tiny_captioner):
    return tiny_captioner("partial", train_last_blocks=1)


def _batch(captioner, n: int = 5, seed: int = 0):
    tokens = bench_captions(n, captioner.lm.config.vocab_size, captioner.tokenizer.eos_token_id, seed)
    return torch.randn(n, 64, generator=torch.Generator().manual_seed(seed)), tokens


def test_fused_gelu_is_gelu_new_and_gpt2_loads_with_it(captioner):
    from transformers.activations import ACT2FN

    x = torch.linspace(-12, 12, 200_001)
    assert (ACT2FN["gelu_pytorch_tanh"](x) - ACT2FN["gelu_new"](x)).abs().max() < 1e-6
    assert captioner.lm.config.activation_function == "gelu_pytorch_tanh"


def test_loss_on_label_positions_equals_the_full_lm_loss_and_its_gradients(captioner):
    clip_embed, tokens = _batch(captioner)
    ids, mask, labels = captioner.pad(tokens)
    P = captioner.config.prefix_length
    captioner.zero_grad(set_to_none=True)
    lean = captioner(clip_embed, ids, mask, labels)
    lean.backward()
    lean_grads = {n: p.grad.clone() for n, p in captioner.named_parameters() if p.grad is not None}
    captioner.zero_grad(set_to_none=True)
    embeds = torch.cat([captioner.prefix(clip_embed), captioner.lm.get_input_embeddings()(ids)], 1)
    full = captioner.lm(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(len(ids), P, dtype=torch.long),
                                                                        mask], 1),
                        labels=torch.cat([torch.full((len(ids), P), -100), labels], 1)).loss
    full.backward()
    assert lean.item() == pytest.approx(full.item(), rel=1e-6)
    for name, p in captioner.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(lean_grads[name], p.grad, rtol=1e-4, atol=1e-6)
    captioner.zero_grad(set_to_none=True)


def test_clipcap_mechanics_compute_the_same_loss_with_its_padding(captioner):
    clip_embed, tokens = _batch(captioner, seed=1)
    ours = captioner(clip_embed, *captioner.pad(tokens))
    theirs = clipcap_loss(captioner, clip_embed, *clipcap_pad(captioner, tokens, 60))
    assert theirs.item() == pytest.approx(ours.item(), rel=1e-5)


def test_frozen_blocks_get_no_weight_gradients(captioner):
    """Only the trained blocks' weights reach autograd's accumulators; the frozen ones are passed through for
    the prefix's gradient alone."""
    clip_embed, tokens = _batch(captioner)
    captioner.zero_grad(set_to_none=True)
    loss = captioner(clip_embed, *captioner.pad(tokens))
    accumulated, stack, seen = set(), [loss.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            accumulated.add(id(fn.variable))
        stack += [f for f, _ in fn.next_functions]
    trained = {id(p) for p in captioner.parameters() if p.requires_grad}
    assert accumulated == trained
    loss.backward()
    blocks = captioner.lm.transformer.h
    assert all(p.grad is None for p in blocks[0].parameters())
    assert all(p.grad is not None for p in blocks[-1].parameters())
    captioner.zero_grad(set_to_none=True)


def test_bucketed_batches_cover_the_epoch_once_are_reproducible_and_pad_little():
    lengths = torch.randint(4, 60, (1000,), generator=torch.Generator().manual_seed(0))
    batches = length_bucketed_batches(lengths, 40, seed=3, epoch=1, window=5)
    assert sorted(torch.cat(batches).tolist()) == list(range(1000))
    assert all(len(b) == 40 for b in batches)
    again = length_bucketed_batches(lengths, 40, seed=3, epoch=1, window=5)
    assert all(torch.equal(a, b) for a, b in zip(batches, again)), "a pure function of (seed, epoch): exact resume"
    other = length_bucketed_batches(lengths, 40, seed=3, epoch=2, window=5)
    assert not all(torch.equal(a, b) for a, b in zip(batches, other))
    shuffled = list(epoch_order(1000, 3, 1).split(40))
    assert padding_share(lengths, batches) < 0.2 < padding_share(lengths, shuffled)
    assert padding_share([5, 5, 10], [torch.tensor([0, 1, 2])]) == pytest.approx(1 - 20 / 30)


def test_adamw_is_fused_and_updates_as_the_loop_does(captioner):
    optimizer = make_optimizer(captioner, TrainConfig())
    assert optimizer.defaults["fused"]
    params = [p for p in captioner.parameters() if p.requires_grad][:4]
    copies = [p.detach().clone().requires_grad_() for p in params]
    for a, b in zip(params, copies):
        a.grad = b.grad = torch.randn_like(a, generator=torch.Generator().manual_seed(a.numel()))
    fused, loop = torch.optim.AdamW(params, lr=1e-3, fused=True), torch.optim.AdamW(copies, lr=1e-3, foreach=False)
    with torch.no_grad():
        saved = [p.clone() for p in params]
        for _ in range(3):
            fused.step(), loop.step()
        for a, b in zip(params, copies):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        for p, v in zip(params, saved):
            p.copy_(v)
    for p in params:
        p.grad = None
    if torch.cuda.is_available():
        gpu = make_optimizer(captioner.to("cuda"), TrainConfig())
        captioner.to("cpu")
        assert gpu.defaults["fused"]


def test_clipcap_padding_rule_is_mean_plus_ten_std_capped_at_the_longest():
    assert clipcap_max_seq_len([10] * 999 + [100]) == 38  # mean 10.09, std 2.846 (Bessel): int(38.55)
    assert clipcap_max_seq_len([10, 12, 14]) == 14


def test_precision_and_compile_follow_the_device_not_emulation():
    cpu = torch.device("cpu")
    assert mixed_precision("auto", cpu) == "no" and mixed_precision("fp16", cpu) == "fp16"
    assert not compile_supported(cpu)


def test_flops_on_real_tokens_fit_exactly_and_ignore_padding(models_dir):
    from torch.utils.flop_counter import FlopCounterMode

    ours, _ = bench_models("tiny", torch.device("cpu"), models_dir, clipcap=False)
    f = real_token_flops(ours)
    ids, mask, labels = ours.pad([[1] * 30])
    with FlopCounterMode(display=False) as counter:
        ours(torch.zeros(1, 64), ids, mask, labels).backward()
    assert f(30) == pytest.approx(counter.get_total_flops(), rel=1e-6)
    assert f(20) < f(30)


def test_gpu_script_quick_mode_runs_on_the_cpu_and_writes_every_result(tmp_path, data_dir):
    env = cli_env(data_dir) | {"PYTHON": sys.executable, "BENCH_OUT": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = {p.name for p in tmp_path.iterdir()}
    assert {f"{b}-cpu.{e}" for b in ("features", "training", "captioning", "gpu") for e in ("json", "md")} <= names
    training = json.loads((tmp_path / "training-cpu.json").read_text())["summary"]
    pipelines = [r["pipeline"] for r in training["pipelines"]]
    assert pipelines[0].startswith("ours") and pipelines[1].startswith("ClipCap's mechanics")
    assert [r["batch_size"] for r in training["pipelines"]] == [4, 4, 8]
    assert training["pipelines"][0]["padding_share"] < training["pipelines"][1]["padding_share"]
    assert {"ours", "clipcap", "before_training", "paired_standard_error"} <= set(training["held_out_loss"])
    assert "ClipCap's mechanics" in (tmp_path / "training-cpu.md").read_text()
    features = json.loads((tmp_path / "features-cpu.json").read_text())["summary"]
    assert set(features["images_per_s"]) == {"decode_resize_only", "ours_batched", "clipcap_per_caption"}
    summary = json.loads((tmp_path / "gpu-cpu.json").read_text())
    assert summary["quick"] and set(summary["results"]) == {"features", "training", "captioning"}
