"""The batch-size recipe measured on the stand-ins: does --lr-batch-size make batch 128 train like batch 40?

    .venv/bin/python bench/recipe.py [--seeds 0 1 2] [--out bench/results]

The experiment behind `TrainConfig.lr_batch_size`'s default of 0 (off), moved here from the test suite (a
number measured is a result, not a contract): the same 12 epochs of an embedded feature cache of 240 images
(621 training captions; 2-layer mapper, lr 3e-3, 20 warm-up steps) at batch 40, at batch 128 with the recipe
(lr x sqrt(3.2), the warm-up kept in captions: 6 steps), at batch 128 as given, and with the linear rule. It
writes the final validation loss of each, per seed, to results/recipe-cpu.md and .json, with the machine.

Measured on one CPU thread (2026-12-01), seeds 0 / 1 / 2: batch 40 0.332 / 0.329 / 0.315; batch 128 with the
recipe 0.472 / 0.436 / 0.439; as given 0.379 / 0.379 / 0.369; the linear rule 0.466 / 0.482 / 0.467.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import torch

from utils.bench import machine_info
from utils.config import DataConfig, FeatureConfig, RuntimeConfig, TrainConfig, standin_preset
from utils.features import cache_features
from utils.readers import load_records
from utils.training import train

RUNS = {  # name: (batch, lr_batch_size, settings changed)
    "batch 40": (40, 40, {}),
    "batch 128, recipe": (128, 40, {}),
    "batch 128, as given": (128, 0, {}),
    "batch 128, linear rule": (128, 0, {"lr": 3e-3 * 3.2, "warmup_steps": 6}),
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = dataclasses.replace(standin_preset()[0], num_layers=2)
    losses: dict[str, list[float]] = {name: [] for name in RUNS}
    with tempfile.TemporaryDirectory() as tmp:
        data = DataConfig(dataset="embedded", data_dir=tmp, max_images=240, val_fraction=0.1)
        cache = cache_features(load_records(data), FeatureConfig(num_workers=0, cache_dir=f"{tmp}/cache"), data,
                               RuntimeConfig(offline=True, device="cpu"))
        for seed in args.seeds:
            runtime = RuntimeConfig(offline=True, device="cpu", seed=seed)
            for name, (batch, lr_batch, changes) in RUNS.items():
                cfg = TrainConfig(epochs=12, batch_size=batch, lr=3e-3, warmup_steps=20, lr_batch_size=lr_batch,
                                  watch_images=0, checkpoint_minutes=0, log_every=1,
                                  out_dir=f"{tmp}/{seed}-{name.replace(' ', '').replace(',', '-')}")
                result = train(cache, model, dataclasses.replace(cfg, **changes), runtime, tmp)
                losses[name].append(round(result.history["val"][-1]["val_loss"], 3))
    result = {"benchmark": "recipe", "machine": machine_info(torch.device("cpu")), "seeds": args.seeds,
              "final_val_loss": losses}
    lines = ["# The batch-size recipe on the stand-ins (final validation loss, 12 epochs)\n",
             f"seeds {args.seeds}, one CPU thread\n", "| run | " + " | ".join(f"seed {s}" for s in args.seeds) + " |",
             "|---|" + "---|" * len(args.seeds)]
    lines += [f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + " |" for name, values in losses.items()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe-cpu.md").write_text("\n".join(lines) + "\n")
    (out / "recipe-cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
