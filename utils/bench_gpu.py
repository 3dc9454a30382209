"""The GPU session's bench (`python -m utils bench gpu`, bench/gpu.sh): features, the training step at several
batch sizes and captioning, each against ClipCap's mechanics in the same run, then one summary table."""

from __future__ import annotations

import time
from pathlib import Path

from .bench import bench_captioning, bench_features, machine_info, machine_line, write_results
from .bench_training import bench_training
from .runtime import resolve_device


GPU_PLAN = {  # quick: the same code on the CPU in seconds, for the test suite
    "quick": dict(arch="tiny", images=8, baseline_images=2, batch=4, workers=0, steps=3, warmup=1,
                  batch_sizes=[4, 8], caption_images=4, caption_baseline=2),
    "full": dict(arch="real", images=512, baseline_images=32, batch=128, workers=8, steps=30, warmup=3,
                 batch_sizes=[40, 128, 256], caption_images=64, caption_baseline=8),
}


def bench_gpu(quick: bool = False, device: str = "auto", precision: str = "auto", compile: bool = False,
              parts: tuple[str, ...] = ("features", "training", "captioning"),
              models_dir: str | Path | None = None, out_dir: str | Path = "bench/results") -> dict:
    """Features, the training step at several batch sizes (ClipCap's mechanics at its batch 40), captioning,
    MFU and peak memory, each written to out_dir, then a summary `gpu-<device>.md/.json`. A run with
    --precision fp16 takes the T4/P100 path (fp16, loss scaling); --compile times torch.compile's step."""
    device = resolve_device(device)
    if device.type != "cuda" and not quick:
        raise ValueError(f"`bench gpu` measures a GPU, and {device} is none: add --quick for its small CPU run.")
    plan, where = GPU_PLAN["quick" if quick else "full"], str(device)
    suffix = ("" if precision == "auto" else f"-{precision}") + ("-compiled" if compile else "")
    if suffix:  # features and captioning do not depend on the training precision
        parts = ("training",)
    done, seconds = {}, {}
    for part in parts:
        start = time.perf_counter()
        if part == "features":
            done[part] = bench_features(plan["images"], where, plan["batch"], plan["workers"],
                                        plan["baseline_images"], out_dir)["summary"]
        elif part == "training":
            sizes = plan["batch_sizes"][:1] if compile else plan["batch_sizes"]
            done[part] = bench_training(plan["steps"], sizes[0], where, plan["arch"], models_dir, out_dir, precision,
                                        sizes, plan["warmup"] + 2 * compile, compile, baseline=not compile,
                                        suffix=suffix)["summary"]
        elif part == "captioning":
            done[part] = bench_captioning(plan["caption_images"], plan["caption_baseline"], 20, where, plan["arch"],
                                          models_dir, out_dir)["summary"]
        else:
            raise ValueError(f"unknown part {part!r}: choose from features, training, captioning")
        seconds[part] = round(time.perf_counter() - start, 1)
    result = {"benchmark": "gpu", "quick": quick, "precision": precision, "compile": compile,
              "machine": machine_info(device), "seconds": seconds, "results": done}
    lines = [f"# GPU bench{' (quick, CPU check)' if quick else ''}\n\n{machine_line(result)} Precision {precision}"
             f"{', compiled' if compile else ''}.\n\n| part | seconds | headline |\n|---|---|---|"]
    for part, summary in done.items():
        if part == "features":
            head = f"ours {summary['images_per_s']['ours_batched']} images/s, {summary['speedup_vs_clipcap']}x"
        elif part == "training":
            best = max(summary["pipelines"], key=lambda r: r["samples_per_s"])
            head = (f"best {best['samples_per_s']} samples/s at batch {best['batch_size']}, MFU "
                    f"{best['mfu']}, {best['peak_memory_gib']} GiB; {summary.get('speedup_vs_clipcap', '-')}x")
        else:
            head = f"greedy {summary['speedup_greedy']}x, beam 5 {summary['speedup_beam5']}x"
        lines.append(f"| {part} | {seconds[part]} | {head} |")
    write_results(Path(out_dir), "gpu", device, result, "\n".join(lines) + "\n", suffix)
    return result
