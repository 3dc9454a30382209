"""Speed, measured side by side with ClipCap's mechanics in the same run, on whatever device is present.

Absolute numbers depend on the machine; the ratios against a baseline run seconds earlier on the same
machine are what the course promises. Real-size architectures (CLIP ViT-B/32, GPT-2 124M shapes) with
random weights: speed does not depend on what the weights learned. ClipCap's side (utils/bench_clipcap.py)
computes as ClipCap's scripts do, on our model and labels, so the two train to the same loss.
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

from .bench_clipcap import clipcap_beam, clipcap_encode_per_caption, clipcap_greedy
from .files import write_json, write_text
from .clip_encoder import precision as clip_dtype
from .runtime import resolve_device

# CLIP ViT-B/32: embed 512, 224 px, 12 x 768 vision, patch 32, 77 tokens, 12 x 512 text.
VIT_B32 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
               context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
               transformer_layers=12)
# Dense peak TFLOP/s of the tensor cores in fp16/bf16 (the P100 has none: its fp16 peak), for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "T4": 65.0, "V100": 125.0,
               "P100": 18.7}
FLICKR30K_TRAIN_CAPTIONS = 143_000
CAPTIONS_PER_IMAGE = 5  # Flickr30k and COCO: ClipCap's feature pass encodes each image this many times


def machine_info(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor()
            or platform.machine(), "cpu_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        info.update(gpu=torch.cuda.get_device_name(device), compute_capability=f"{major}.{minor}")
    return info


def machine_line(result: dict) -> str:
    m = result["machine"]
    return f"Device: {m.get('gpu', m['cpu'])} ({m['device']}), torch {m['torch']}, {m['cpu_threads']} CPU threads."


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name(device)), None)


def write_results(out_dir: Path, name: str, device: torch.device, result: dict, table: str, suffix: str = "") -> None:
    tag = re.sub(r"[^a-z0-9]+", "-", result["machine"].get("gpu", device.type).lower()).strip("-") + suffix
    write_json(out_dir / f"{name}-{tag}.json", result)
    write_text(out_dir / f"{name}-{tag}.md", table)
    print(table)
    print(f"written to {out_dir / f'{name}-{tag}.md'} and .json")


# ---- features --------------------------------------------------------------------------------------

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
                   baseline_images: int | None = None, out_dir: str | Path = "bench/results") -> dict:
    """Images/s for: decode + resize only; ours (batched, workers, fp16 on a GPU, each image once); ClipCap's
    parse_coco.py (one image per forward, once per caption, CLIP as clip.load gives it: fp16 on a GPU)."""
    import clip.model

    from .clip_encoder import ImageFiles as _ImageFiles, draft_size, encode_batches as encode_images

    device = resolve_device(device)
    torch.manual_seed(0)
    model = clip.model.CLIP(**VIT_B32).eval().to(device)
    if device.type == "cuda":  # clip.load keeps CLIP's weights in fp16 on a GPU; so do we
        clip.model.convert_weights(model)
    resolution = model.visual.input_resolution
    preprocess = clip.clip._transform(resolution)
    baseline_images = min(baseline_images or n_images, n_images)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_photos(Path(tmp), n_images)
        batches = [list(range(i, min(i + batch_size, n_images))) for i in range(0, n_images, batch_size)]

        def decode_only():
            loader = torch.utils.data.DataLoader(_ImageFiles(paths, preprocess, resolution, draft_size(model)),
                                                 batch_sampler=batches, num_workers=num_workers)
            for _ in loader:
                pass

        def ours():
            for _ in encode_images(model, preprocess, paths, batches, device, num_workers, fp16=True):
                pass

        def per_caption():
            clipcap_encode_per_caption(model, preprocess, paths[:baseline_images], CAPTIONS_PER_IMAGE, device)

        decode_only(), ours()  # warm-up: page cache, worker start, kernel selection
        clipcap_encode_per_caption(model, preprocess, paths[:1], 1, device)
        seconds = {"decode_resize_only": _timed(decode_only, device), "ours_batched": _timed(ours, device),
                   "clipcap_per_caption": _timed(per_caption, device) * n_images / baseline_images}
    rates = {k: n_images / v for k, v in seconds.items()}
    summary = {
        "images": n_images, "baseline_images": baseline_images, "captions_per_image": CAPTIONS_PER_IMAGE,
        "batch_size": batch_size, "num_workers": num_workers,
        "clip_precision": clip_dtype(device, fp16=True),  # the rule `ours` encodes by (clip_encoder.precision)
        "images_per_s": {k: round(v, 2) for k, v in rates.items()},
        "speedup_vs_clipcap": round(rates["ours_batched"] / rates["clipcap_per_caption"], 2),
        "share_of_decode_limit": round(rates["ours_batched"] / rates["decode_resize_only"], 3),
        "flickr30k_minutes": round(31_783 / rates["ours_batched"] / 60, 1),
    }
    result = {"benchmark": "features", "architecture": "CLIP ViT-B/32 shape, random init",
              "machine": machine_info(device), "summary": summary}
    s = summary
    rows = "\n".join(f"| {k} | {v:.1f} | {v / s['images_per_s']['clipcap_per_caption']:.2f}x |"
                     for k, v in s["images_per_s"].items())
    table = (f"# CLIP feature extraction ({result['architecture']})\n\n{machine_line(result)} "
             f"{n_images} Flickr-sized JPEGs (500x375), batch {batch_size}, {num_workers} workers, CLIP in "
             f"{s['clip_precision']}. ClipCap's mechanics (parse_coco.py): one image per forward, each image encoded "
             f"once per caption ({CAPTIONS_PER_IMAGE}), timed on {baseline_images} images.\n\n"
             "| pipeline | images/s | vs ClipCap's mechanics |\n|---|---|---|\n" + rows +
             f"\n\nOurs reaches {s['share_of_decode_limit']:.0%} of the decode-and-resize limit. "
             f"Projected Flickr30k feature pass (31,783 images): {s['flickr30k_minutes']} min.\n")
    write_results(Path(out_dir), "features", device, result, table)
    return result


# ---- the models and data of the training and captioning benches --------------------------------------

def bench_models(arch: str, device: torch.device, models_dir: Path | None = None, clipcap: bool = True):
    """(ours, ClipCap's) captioners: the course default (6-layer transformer mapper, prefix 10, GPT-2 with its
    last 2 blocks trained) at real size or tiny, random init, identical weights. Ours loads its LM through
    `load_language_model` as training does (fused GELU); ClipCap's through plain `from_pretrained` (gelu_new)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    from .captioner import Captioner
    from .sources import NO_REMOTE_CODE, load_language_model
    from .config import ModelConfig
    from .standin_text import gpt2_dir

    logging.disable_progress_bar()  # saving and loading the random LM: no bars in the bench's output
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir(models_dir), **NO_REMOTE_CODE)  # only its EOS id is used here
    torch.manual_seed(0)
    if arch == "tiny":
        lm = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=len(tokenizer),
                                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id))
        cfg = ModelConfig(clip_dim=64, num_heads=4, num_layers=2)
    else:  # GPT-2 124M shape, ViT-B/32 width
        lm = GPT2LMHeadModel(GPT2Config(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id))
        cfg = ModelConfig(clip_dim=512)
    with tempfile.TemporaryDirectory() as tmp:
        lm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del lm
        ours_lm, tokenizer, _ = load_language_model(tmp, offline=False)
        base_lm = AutoModelForCausalLM.from_pretrained(tmp, **NO_REMOTE_CODE) if clipcap else None
    torch.manual_seed(1)
    ours = Captioner(cfg, ours_lm, tokenizer).to(device)
    if not clipcap:
        return ours, None
    torch.manual_seed(1)
    return ours, Captioner(cfg, base_lm, tokenizer).to(device)


def caption_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Token counts (EOS included) shaped like Flickr30k's GPT-2 tokenised captions: mean ~17, tail to 90."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.gamma(5.0, 3.2, n).round().astype(int) + 1, 4, 90)


def bench_captions(n: int, vocab: int, eos: int, seed: int = 0) -> list[list[int]]:
    """`n` token lists of Flickr-like lengths, ending in EOS; words Zipf-distributed as in real text, so a
    model that learns their frequencies lowers its loss and the two pipelines' losses can be compared."""
    rng = np.random.default_rng(seed + 1)
    ranks = (rng.zipf(1.2, int(caption_lengths(n, seed).sum())) - 1) % (vocab - 1)
    words = np.where(ranks >= eos, ranks + 1, ranks)  # never EOS inside a caption
    out, at = [], 0
    for length in caption_lengths(n, seed):
        out.append(words[at:at + length - 1].tolist() + [eos])
        at += length - 1
    return out



# ---- captioning ------------------------------------------------------------------------------------

def bench_captioning(images: int = 32, baseline_images: int = 4, max_tokens: int = 20, device: str = "auto",
                     arch: str = "real", models_dir: str | Path | None = None,
                     out_dir: str | Path = "bench/results") -> dict:
    """Captions/s, greedy and beam 5: ours (`generate()` on a batch, KV cache) vs ClipCap's mechanics (one image
    at a time, the full sequence recomputed each step). The baseline runs on fewer images: its rate per
    caption does not depend on how many there are, and it is slow. Both in fp32."""
    device = resolve_device(device)
    captioner = bench_models(arch, device, models_dir, clipcap=False)[0].eval()
    clip = torch.randn(images, captioner.config.clip_dim, device=device)
    eos = captioner.tokenizer.eos_token_id

    @torch.no_grad()
    def ours(x, **decoding):
        prefix = captioner.prefix(x)  # (B, P, D): what Captioner.generate hands to generate()
        mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=device)
        return captioner.lm.generate(inputs_embeds=prefix, attention_mask=mask, max_new_tokens=max_tokens,
                                     eos_token_id=eos, pad_token_id=eos, **decoding)

    ours(clip[:2], do_sample=False)  # warm-up
    rates, same = {}, None
    for name, decoding, baseline in (("greedy", dict(do_sample=False), clipcap_greedy),
                                     ("beam5", dict(num_beams=5, do_sample=False), clipcap_beam)):
        rates[f"ours_{name}"] = images / _timed(lambda decoding=decoding: ours(clip, **decoding), device)
        base = []
        rates[f"clipcap_{name}"] = baseline_images / _timed(
            lambda base=base, baseline=baseline: base.extend(baseline(captioner, clip[:baseline_images], max_tokens)),
            device)
        if name == "greedy":  # the same captions, token for token, before the first EOS
            mine = ours(clip[:baseline_images], do_sample=False).tolist()
            same = sum(m[:len(b)] == b for m, b in zip(mine, base))
    summary = {"images": images, "baseline_images": baseline_images, "max_new_tokens": max_tokens,
               "captions_per_s": {k: round(v, 2) for k, v in rates.items()},
               "speedup_greedy": round(rates["ours_greedy"] / rates["clipcap_greedy"], 1),
               "speedup_beam5": round(rates["ours_beam5"] / rates["clipcap_beam5"], 1),
               "same_greedy_captions": f"{same} of {baseline_images}"}
    result = {"benchmark": "captioning", "architecture": f"{arch}: transformer mapper + GPT-2 "
              f"{'124M shape' if arch == 'real' else 'tiny'}, random init", "machine": machine_info(device),
              "summary": summary}
    s = summary["captions_per_s"]
    table = (f"# Captioning throughput ({result['architecture']})\n\n{machine_line(result)}\n\n"
             f"Batch {images} for ours, {baseline_images} images one at a time for ClipCap's mechanics; captions of "
             f"up to {max_tokens} tokens, fp32.\n\n| decoding | ours (captions/s) | ClipCap's mechanics (captions/s) "
             f"| speed-up |\n|---|---|---|---|\n"
             f"| greedy | {s['ours_greedy']} | {s['clipcap_greedy']} | {summary['speedup_greedy']}x |\n"
             f"| beam 5 | {s['ours_beam5']} | {s['clipcap_beam5']} | {summary['speedup_beam5']}x |\n\n"
             f"Same greedy captions as the baseline: {summary['same_greedy_captions']}.\n")
    write_results(Path(out_dir), "captioning", device, result, table)
    return result


# ---- everything a GPU session should bring back, in one call ---------------------------------------
