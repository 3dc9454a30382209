"""Speed, measured side by side with the ClipCap way in the same run, on whatever device is present.

Absolute numbers depend on the machine; the ratios against a baseline run seconds earlier on the same
machine are what the course promises. Real-size architectures (CLIP ViT-B/32 shape) with random
weights: speed does not depend on what the weights learned.
"""

from __future__ import annotations

import platform
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .files import write_json, write_text
from .runtime import resolve_device

# CLIP ViT-B/32: embed 512, 224 px, 12 x 768 vision, patch 32, 77 tokens, 12 x 512 text.
VIT_B32 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
               context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
               transformer_layers=12)


def machine_info(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor()
            or platform.machine(), "cpu_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def make_photos(folder: Path, n: int, size=(500, 375), seed: int = 0) -> list[str]:
    """Flickr-sized JPEGs with smooth shapes and grain, so decoding costs what real photos cost."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size[1], 0:size[0]] / max(size)
    paths = []
    for i in range(n):
        a, b, c = rng.uniform(2, 12, 3)
        base = np.stack([np.sin(a * xx + b * yy), np.cos(b * xx - c * yy), np.sin(c * xx * yy * 4)], -1)
        pixels = (base * 90 + 128 + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
        path = folder / f"photo_{i:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    return paths


def bench_features(n_images: int = 64, device: str = "auto", batch_size: int = 64, num_workers: int = 2,
                   out_dir: str | Path = "bench/results") -> dict:
    """Images/s for: decode + resize only, ours (batched, workers, fp16 on GPU), and one image at a time in
    fp32 as ClipCap's parse_coco.py does."""
    import clip.model

    from .features import _ImageFiles, encode_images

    device = resolve_device(device)
    torch.manual_seed(0)
    model = clip.model.CLIP(**VIT_B32).eval().to(device)
    resolution = model.visual.input_resolution
    preprocess = clip.clip._transform(resolution)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_photos(Path(tmp), n_images)
        batches = [list(range(i, min(i + batch_size, n_images))) for i in range(0, n_images, batch_size)]

        def decode_only():
            loader = torch.utils.data.DataLoader(_ImageFiles(paths, preprocess, resolution),
                                                 batch_sampler=batches, num_workers=num_workers)
            for _ in loader:
                pass

        def ours():
            for _ in encode_images(ours_model, preprocess, paths, batches, device, num_workers, fp16=True):
                pass

        def one_at_a_time():  # parse_coco.py: open, preprocess, encode, one image per forward, fp32
            with torch.no_grad():
                for p in paths:
                    image = preprocess(Image.open(p)).unsqueeze(0).to(device)
                    model.encode_image(image).cpu()

        ours_model = model
        if device.type == "cuda":  # clip.load keeps CLIP's weights in fp16 on a GPU; so do we
            import copy
            ours_model = copy.deepcopy(model)
            clip.model.convert_weights(ours_model)
        decode_only(), ours()  # warm-up: page cache, worker start, kernel selection
        with torch.no_grad():
            model.encode_image(torch.zeros(1, 3, resolution, resolution, device=device))
        seconds = {name: _timed(fn, device) for name, fn in
                   (("decode_resize_only", decode_only), ("ours_batched", ours),
                    ("clipcap_one_image_fp32", one_at_a_time))}
    rates = {k: n_images / v for k, v in seconds.items()}
    summary = {
        "images": n_images, "batch_size": batch_size, "num_workers": num_workers,
        "images_per_s": {k: round(v, 2) for k, v in rates.items()},
        "speedup_vs_clipcap": round(rates["ours_batched"] / rates["clipcap_one_image_fp32"], 2),
        "share_of_decode_limit": round(rates["ours_batched"] / rates["decode_resize_only"], 3),
        "flickr30k_epoch_minutes": round(31_783 / rates["ours_batched"] / 60, 1),
    }
    result = {"benchmark": "features", "architecture": "CLIP ViT-B/32 shape, random init",
              "machine": machine_info(device), "summary": summary}
    _write_results(Path(out_dir), "features", device, result, _features_table(result))
    return result


def _features_table(result: dict) -> str:
    s, m = result["summary"], result["machine"]
    rows = "\n".join(f"| {k} | {v:.1f} | {v / s['images_per_s']['clipcap_one_image_fp32']:.2f}x |"
                     for k, v in s["images_per_s"].items())
    return (f"# CLIP feature extraction ({result['architecture']})\n\n"
            f"Device: {m.get('gpu', m['cpu'])} ({m['device']}), torch {m['torch']}, {m['cpu_threads']} CPU threads; "
            f"{s['images']} Flickr-sized JPEGs (500x375), batch {s['batch_size']}, {s['num_workers']} workers.\n\n"
            "| pipeline | images/s | vs ClipCap way |\n|---|---|---|\n" + rows +
            f"\n\nOurs reaches {s['share_of_decode_limit']:.0%} of the decode-and-resize limit. "
            f"Projected Flickr30k feature pass (31,783 images): {s['flickr30k_epoch_minutes']} min.\n")


def _write_results(out_dir: Path, name: str, device: torch.device, result: dict, table: str) -> None:
    tag = re.sub(r"[^a-z0-9]+", "-", result["machine"].get("gpu", device.type).lower()).strip("-")
    write_json(out_dir / f"{name}-{tag}.json", result)
    write_text(out_dir / f"{name}-{tag}.md", table)
    print(table)
    print(f"written to {out_dir / f'{name}-{tag}.md'} and .json")
