"""The training bench: our real training step against ClipCap's mechanics, in the same run, from the same
weights over the same captions, and the held-out loss each reaches after the same samples.

Timed: the median of at least 30 steps after a warm-up, wall and host-CPU seconds; model FLOPs counted on
real tokens by torch's flop counter, so that MFU credits no pipeline for padding it computes.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from .bench import (CAPTIONS_PER_IMAGE, FLICKR30K_TRAIN_CAPTIONS, bench_captions, bench_models,
                    machine_info, machine_line, peak_tflops, write_results)
from .bench_clipcap import clipcap_max_seq_len, clipcap_optimizer, clipcap_pad, clipcap_step
from .runtime import compile_supported, mixed_precision, resolve_device, to_device

# Both pipelines, same schedule: short warm-up and a high rate, so that 30-odd steps visibly lower the loss.
BENCH_SCHEDULE = dict(lr=3e-4, warmup_steps=5, decay="constant")


def real_token_flops(captioner, lengths=(8, 16, 24)) -> np.poly1d:
    """FLOPs of one caption's training step (forward and backward) as a function f(L) of its token count,
    counted by torch's FlopCounterMode on the unpadded caption through our forward: work on real tokens only
    (no padding; the LM head only where a label is). Matmul FLOPs are a polynomial of degree 2 in L at most,
    so three lengths fix f. Attention's score products count where the counter knows the kernel (GPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = captioner.mapper_device
    clip = torch.zeros(1, captioner.config.clip_dim, device=device)
    counts = []
    for length in lengths:
        ids, mask, labels = captioner.pad([[1] * length], device)
        with FlopCounterMode(display=False) as counter:
            captioner(clip, ids, mask, labels).backward()
        counts.append(counter.get_total_flops())
    captioner.zero_grad(set_to_none=True)
    return np.poly1d(np.polyfit(lengths, counts, 2))


def ours_step(model, captioner, accelerator, optimizer, clip_embed, token_lists, lr: float, cfg):
    """Our real training step: pad to the batch's longest caption, then `training.train_step` (forward with the
    LM head and loss on caption positions only, per-token loss, accelerator.backward, gradient clipping, AdamW,
    zero_grad), exactly as train() calls it. Returns (loss, grad_norm), 0-d tensors on the device."""
    from .training import train_step

    ids, mask, labels = captioner.pad(token_lists, accelerator.device)
    return train_step(model, optimizer, accelerator, [(clip_embed, ids, mask, labels)], lr, cfg)


class _StepClock:
    """Wall and host-CPU seconds of each step. On a GPU, CUDA events between step starts: no sync per step,
    so what a host sync costs (a GPU waiting for the host) shows in the step it happens in."""

    def __init__(self, device: torch.device):
        self.cuda, self.marks, self.host = device.type == "cuda", [], []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())
        self.host.append(time.process_time())

    def seconds(self, contiguous: bool) -> tuple[list[float], list[float]]:
        """Marks come in (start, end) pairs; `contiguous`: step i ends where step i + 1 starts."""
        if self.cuda:
            torch.cuda.synchronize()
        m = self.marks
        ends = [m[i + 2] if contiguous and i + 2 < len(m) else m[i + 1] for i in range(0, len(m), 2)]
        wall = [(a.elapsed_time(b) / 1e3 if self.cuda else b - a) for a, b in zip(m[::2], ends)]
        return wall, [b - a for a, b in zip(self.host[::2], self.host[1::2])]


@torch.no_grad()
def _held_out(captioner, clip_embed: torch.Tensor, token_lists: list[list[int]]) -> np.ndarray:
    """Per-caption loss, fp32, one caption at a time (no padding): the same measure for both pipelines."""
    captioner.eval()
    device = captioner.mapper_device
    out = [float(captioner(clip_embed[i:i + 1], *captioner.pad([t], device))) for i, t in enumerate(token_lists)]
    captioner.train()
    return np.array(out)


def _pipeline_summary(name, batch_size, wall, host, flops_per_batch, peak_gib, peak_tflops, padding) -> dict:
    step = statistics.median(wall)
    tflops = flops_per_batch / step / 1e12
    return {"pipeline": name, "batch_size": batch_size, "timed_steps": len(wall), "median_step_s": round(step, 4),
            "host_cpu_s_per_step": round(statistics.median(host), 4), "samples_per_s": round(batch_size / step, 2),
            "padding_share": round(padding, 3), "model_tflops_per_s": round(tflops, 3),
            "mfu": round(tflops / peak_tflops, 4) if peak_tflops else None, "peak_memory_gib": peak_gib}


def bench_training(steps: int = 30, batch_size: int = 40, device: str = "auto", arch: str = "real",
                   models_dir: str | Path | None = None, out_dir: str | Path = "bench/results",
                   precision: str = "auto", batch_sizes: list[int] | None = None, warmup: int = 2,
                   compile: bool = False, baseline: bool = True, suffix: str = "") -> dict:
    """Samples/s per training step: ours (the step train() runs, length-bucketed batches, the lean forward,
    the training precision) against ClipCap's mechanics (fp32, every caption padded to its max_seq_len rule,
    full logits, a per-tensor AdamW, `loss.item()` each step) at the first batch size, in the same run, from
    the same weights over the same captions; then the held-out loss each reached after the same samples.
    On a CPU the two alternate step by step, so other load on the machine hits both alike."""
    from accelerate import Accelerator

    from .config import TrainConfig
    from .schedule import epoch_order, get_lr, length_bucketed_batches, padding_share
    from .training_run import make_optimizer

    device = resolve_device(device)
    mixed = mixed_precision(precision, device)  # as train() chooses it; never torch.cuda.is_bf16_supported()
    if compile and not compile_supported(device):
        raise ValueError(f"torch.compile is not supported on {device} here (a GPU of compute capability 7.0 or "
                         "more is needed): leave --compile off.")
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=mixed)
    ours, base = bench_models(arch, device, models_dir, clipcap=baseline)
    sizes = batch_sizes or [batch_size]
    cfg = TrainConfig(batch_size=sizes[0], **BENCH_SCHEDULE)
    total = warmup + steps
    eos, dim = ours.tokenizer.eos_token_id, ours.config.clip_dim
    n_eval = sizes[0]
    tokens = bench_captions(max(sizes) * total + n_eval, ours.lm.config.vocab_size, eos)
    held_tokens, tokens = tokens[:n_eval], tokens[n_eval:]
    images = torch.randn(len(tokens) // CAPTIONS_PER_IMAGE + 1, dim, generator=torch.Generator().manual_seed(2))
    images = images.to(device)
    held_clip = torch.randn(n_eval, dim, generator=torch.Generator().manual_seed(3)).to(device)
    flops_of = real_token_flops(ours)
    peak = peak_tflops(device)
    before = _held_out(ours, held_clip, held_tokens)

    optimizer = make_optimizer(ours, cfg)
    model, optimizer = accelerator.prepare(ours, optimizer)
    if compile:
        model.compile(dynamic=True)
    lr = [get_lr(i, cfg, total) for i in range(total)]
    log_every = 10

    def ours_steps(bs: int):
        lengths = [len(t) for t in tokens[:bs * total]]
        batches = length_bucketed_batches(lengths, bs, seed=0, epoch=0)[:total]
        window = torch.zeros((), device=device)
        for i, idx in enumerate(batches):
            clip = images[to_device(idx // CAPTIONS_PER_IMAGE, device)]  # (B, clip_dim)
            loss, grad_norm = ours_step(model, ours, accelerator, optimizer, clip, [tokens[j] for j in idx.tolist()],
                                        lr[i], cfg)
            window += loss
            if (i + 1) % log_every == 0:  # the one host sync: the log line's loss and gradient norm
                _ = float(window) / log_every, float(grad_norm)
                window.zero_()
            yield loss
        return

    def clipcap_steps(bs: int, max_seq_len: int):
        base_opt = clipcap_optimizer(make_optimizer(base, cfg).param_groups, cfg.lr)
        order = epoch_order(bs * total, seed=0, epoch=0)
        for i in range(total):  # DataLoader(shuffle=True, drop_last=True)
            idx = order[i * bs:(i + 1) * bs]
            ids, mask, labels = clipcap_pad(base, [tokens[j] for j in idx.tolist()], max_seq_len, device)
            clip = images[idx.to(device) // CAPTIONS_PER_IMAGE]  # (B, clip_dim)
            yield clipcap_step(base, base_opt, clip, ids, mask, labels, lr[i])

    def run(streams: dict, interleave: bool) -> dict:
        """Run each stream's steps (warm-up untimed); interleaved step by step, or one stream after another."""
        clocks = {k: _StepClock(device) for k in streams}
        losses = {k: [] for k in streams}
        peaks = {}
        names = list(streams)
        order = [(k, i) for i in range(total) for k in names] if interleave else \
                [(k, i) for k in names for i in range(total)]
        for k, i in order:
            if device.type == "cuda" and i == 0:
                torch.cuda.reset_peak_memory_stats(device)
            timed = i >= warmup
            if timed:
                clocks[k].mark()
            losses[k].append(next(streams[k]))
            if timed:
                clocks[k].mark()
            if device.type == "cuda" and i == total - 1:
                peaks[k] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            if (i + 1) % 10 == 0 and k == names[-1]:
                print(f"  {k}: {i + 1} of {total} steps", flush=True)
        return {k: (clocks[k].seconds(contiguous=not interleave), losses[k], peaks.get(k)) for k in names}

    rows, lengths0 = [], [len(t) for t in tokens[:sizes[0] * total]]
    max_seq_len = clipcap_max_seq_len(lengths0)
    streams = {"ours": ours_steps(sizes[0])}
    if baseline:
        streams["clipcap"] = clipcap_steps(sizes[0], max_seq_len)
    first = run(streams, interleave=device.type == "cpu")
    for bs in sizes[1:]:
        first |= {f"ours_{bs}": run({"x": ours_steps(bs)}, interleave=False)["x"]}

    def flops_per_batch(bs: int) -> float:
        return float(np.mean([flops_of(len(t)) for t in tokens[:bs * total]])) * bs

    def padding(bs: int) -> float:
        lengths = [len(t) for t in tokens[:bs * total]]
        return padding_share(lengths, length_bucketed_batches(lengths, bs, seed=0, epoch=0))

    for key, ((wall, host), _, peak_gib) in first.items():
        bs = sizes[0] if key in ("ours", "clipcap") else int(key.split("_")[1])
        if key == "clipcap":
            pad = 1 - sum(min(n, max_seq_len) for n in lengths0) / (len(lengths0) * max_seq_len)
            rows.append(_pipeline_summary(f"ClipCap's mechanics: fp32, padded to {max_seq_len}", bs, wall, host,
                                          flops_per_batch(bs), peak_gib, peak, pad))
        else:
            rows.append(_pipeline_summary(f"ours: bucketed batches, {mixed if mixed != 'no' else 'fp32'}"
                                          + (", compiled" if compile else ""), bs, wall, host,
                                          flops_per_batch(bs), peak_gib, peak, padding(bs)))
    shuffled = [torch.as_tensor(b) for b in epoch_order(len(lengths0), 0, 0).split(sizes[0])]
    summary = {
        "precision": mixed if mixed != "no" else "fp32", "compile": compile, "warmup_steps": warmup,
        "timed_steps": steps, "schedule": BENCH_SCHEDULE, "pipelines": rows,
        "padding_share_shuffled_batches": round(padding_share(lengths0, shuffled), 3),
        "real_token_gflop_per_caption": round(float(np.mean([flops_of(n) for n in lengths0])) / 1e9, 3),
        "flickr30k_epoch_minutes": round(FLICKR30K_TRAIN_CAPTIONS / max(r["samples_per_s"] for r in rows
                                                                         if r["pipeline"].startswith("ours")) / 60, 1),
    }
    after = _held_out(ours, held_clip, held_tokens)
    summary["held_out_loss"] = {"before_training": round(float(before.mean()), 4),
                                "ours": round(float(after.mean()), 4)}
    if baseline:
        base_after = _held_out(base, held_clip, held_tokens)
        diff = after - base_after
        summary["held_out_loss"] |= {
            "clipcap": round(float(base_after.mean()), 4), "difference": round(float(diff.mean()), 4),
            "paired_standard_error": round(float(diff.std(ddof=1) / np.sqrt(len(diff))), 4),
            "share_of_what_training_lowered": round(float(abs(diff.mean()) / max(before.mean() - after.mean(), 1e-9)),
                                                    3)}
        summary["speedup_vs_clipcap"] = round(rows[0]["samples_per_s"] / rows[1]["samples_per_s"], 2)
        summary["clipcap_max_seq_len"] = max_seq_len
    if device.type == "cuda":  # one more step of each, after the measurements: how often it waits for the GPU
        streams = {"ours": ours_steps(sizes[0])} | ({"clipcap": clipcap_steps(sizes[0], max_seq_len)} if baseline
                                                    else {})
        try:
            summary["host_syncs_per_step"] = {k: host_syncs(lambda v=v: next(v)) for k, v in streams.items()}
        except Exception as exc:  # never measured before a GPU session: it must not cost the figures above
            summary["host_syncs_per_step"] = {"not measured": f"{type(exc).__name__}: {exc}"}
    result = {"benchmark": "training", "architecture": f"{arch}: 6-layer transformer mapper, prefix 10, GPT-2 "
              f"{'124M shape' if arch == 'real' else 'tiny'} (last 2 blocks trained), random init",
              "machine": machine_info(device), "summary": summary}
    write_results(Path(out_dir), "training", device, result, _training_table(result), suffix)
    return result


def host_syncs(step) -> int:
    """Times `step()` makes the host wait for the GPU, as torch's CUDA sync debug mode counts them (a warning
    each). Ours should have none outside a log step; ClipCap's `loss.item()` is one."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _training_table(result: dict) -> str:
    s = result["summary"]
    rows = "\n".join(f"| {r['pipeline']} | {r['batch_size']} | {r['samples_per_s']} | {r['median_step_s']} | "
                     f"{r['host_cpu_s_per_step']} | {r['padding_share']:.1%} | {r['model_tflops_per_s']} | "
                     f"{'n/a' if r['mfu'] is None else format(r['mfu'], '.1%')} | "
                     f"{'n/a (CPU)' if r['peak_memory_gib'] is None else r['peak_memory_gib']} |"
                     for r in s["pipelines"])
    loss = s["held_out_loss"]
    text = (f"# Training step ({result['architecture']})\n\n{machine_line(result)}\n\n"
            f"{s['timed_steps']} timed steps per pipeline after {s['warmup_steps']} warm-up steps; medians. "
            f"Model FLOPs counted on real tokens ({s['real_token_gflop_per_caption']} GFLOP per caption, forward and "
            "backward, torch.utils.flop_counter), the same for every pipeline.\n\n"
            "| pipeline | batch | samples/s | step (s) | host CPU (s/step) | padding | model TFLOP/s | MFU | "
            "peak GPU memory (GiB) |\n|---|---|---|---|---|---|---|---|---|\n" + rows + "\n\n"
            f"Padding share of the caption positions: ours (length-bucketed) as in the table; "
            f"{s['padding_share_shuffled_batches']:.1%} for shuffled batches padded to their longest caption.\n")
    if "host_syncs_per_step" in s:
        text += ("\nHost syncs in one step outside a log step (torch.cuda.set_sync_debug_mode): "
                 + ", ".join(f"{k} {v}" for k, v in s["host_syncs_per_step"].items()) + ".\n")
    if "clipcap" in loss:
        text += (f"\n**Speed-up over ClipCap's mechanics: {s['speedup_vs_clipcap']}x.** Held-out loss after the same "
                 f"samples from the same weights: ours {loss['ours']}, ClipCap's mechanics {loss['clipcap']} "
                 f"(before training {loss['before_training']}; difference {loss['difference']}, paired standard "
                 f"error {loss['paired_standard_error']}, {loss['share_of_what_training_lowered']:.1%} of what "
                 f"training lowered it).\n")
    return text + (f"\nProjected Flickr30k epoch ({FLICKR30K_TRAIN_CAPTIONS:,} captions) at our best rate: "
                   f"{s['flickr30k_epoch_minutes']} min.\n")
