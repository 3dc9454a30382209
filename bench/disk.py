"""What a full T4 run of the course writes, from the code's own size rules (no training, no download).

    .venv/bin/python bench/disk.py

The captioner is built at the course's defaults (6-layer transformer mapper, prefix 10, GPT-2 124M's shape with
random weights: sizes do not depend on what the weights learned), and each file's size comes from the functions
training uses before it starts (`checkpoints.checkpoint_bytes`, `checkpoints.bundle_bytes`): checkpoint.pt with
the optimiser's moments, best.pt without, the bundle with every weight. The feature cache is float16 CLIP-512
rows. README's "Disk" table is this script's output.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from utils.captioner import Captioner
from utils.checkpoints import bundle_bytes, checkpoint_bytes
from utils.config import ModelConfig

SETS = {"flickr30k": 31_783, "flickr8k": 8_091, "coco (Karpathy train+restval)": 113_287}


def main() -> None:
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config())  # GPT-2 124M's shape
    gib = 2**30
    rows = []
    for freeze in ("partial", "frozen", "full"):
        cfg = dataclasses.replace(ModelConfig(clip_dim=512), freeze=freeze)
        captioner = Captioner(cfg, lm, tokenizer=SimpleNamespace(eos_token_id=50256))  # only its EOS is read
        rows.append((freeze, checkpoint_bytes(captioner) / gib, checkpoint_bytes(captioner, False) / gib,
                     bundle_bytes(captioner) / gib))
    print("| freeze | checkpoint.pt | best.pt | captioner/ bundle | a run folder (all three) |\n|---|---|---|---|---|")
    for freeze, ckpt, best, bundle in rows:
        print(f"| {freeze} | {ckpt:.2f} GB | {best:.2f} GB | {bundle:.2f} GB | {ckpt + best + bundle:.2f} GB |")
    print("\n| feature cache (float16, 512-d) | size |\n|---|---|")
    for name, images in SETS.items():
        print(f"| {name}: {images:,} images | {images * 512 * 2 / 2**20:.0f} MB |")


if __name__ == "__main__":
    main()
