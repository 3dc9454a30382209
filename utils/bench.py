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

    from .clip_encoder import ImageFiles as _ImageFiles, draft_size, encode_batches as encode_images

    device = resolve_device(device)
    torch.manual_seed(0)
    model = clip.model.CLIP(**VIT_B32).eval().to(device)
    resolution = model.visual.input_resolution
    preprocess = clip.clip._transform(resolution)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_photos(Path(tmp), n_images)
        batches = [list(range(i, min(i + batch_size, n_images))) for i in range(0, n_images, batch_size)]

        def decode_only():
            loader = torch.utils.data.DataLoader(_ImageFiles(paths, preprocess, resolution, draft_size(model)),
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
    s = result["summary"]
    rows = "\n".join(f"| {k} | {v:.1f} | {v / s['images_per_s']['clipcap_one_image_fp32']:.2f}x |"
                     for k, v in s["images_per_s"].items())
    return (f"# CLIP feature extraction ({result['architecture']})\n\n{_machine_line(result)} "
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


# ---- training --------------------------------------------------------------------------------------

# Dense peak TFLOP/s of the tensor cores at the precision we train in, for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "T4": 65.0, "V100": 125.0,
               "P100": 18.7}


def _bench_captioner(arch: str, device: torch.device, models_dir: Path):
    """The course default (6-layer transformer mapper, prefix 10, GPT-2 partly frozen) at real size, random init."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from .captioner import Captioner
    from .config import ModelConfig
    from .standins import gpt2_dir

    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir(models_dir))  # only its EOS id is used here
    torch.manual_seed(0)
    if arch == "tiny":
        lm = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=len(tokenizer),
                                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id))
        cfg = ModelConfig(clip_dim=64, num_heads=4, num_layers=2)
    else:
        lm, cfg = GPT2LMHeadModel(GPT2Config()), ModelConfig(clip_dim=512)  # GPT-2 124M shape, ViT-B/32 width
    return Captioner(cfg, lm, tokenizer).to(device)


def _caption_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Token counts shaped like Flickr30k's GPT-2 tokenised captions (mean ~16, long tail to ~90)."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.gamma(5.0, 3.2, n).round().astype(int) + 1, 4, 90)


def bench_training(steps: int = 3, batch_size: int = 40, device: str = "auto", arch: str = "real",
                   models_dir: str | Path = "data/models", out_dir: str | Path = "bench/results") -> dict:
    """Samples/s and peak memory per training step: ours (dynamic padding, AMP on GPU) vs ClipCap's train.py
    (fp32, every caption padded to the dataset's max_seq_len = min(mean + 10 std, max))."""
    from .config import TrainConfig
    from .training import make_optimizer

    device = resolve_device(device)
    captioner = _bench_captioner(arch, device, Path(models_dir))
    vocab = captioner.lm.config.vocab_size
    lengths = _caption_lengths(10_000)
    fixed = int(min(lengths.mean() + 10 * lengths.std(), lengths.max()))  # ClipCap's max_seq_len
    rng = np.random.default_rng(1)
    batches = [[rng.integers(1, vocab, n).tolist() for n in rng.choice(lengths, batch_size)] for _ in range(steps + 1)]
    clip = torch.randn(batch_size, captioner.config.clip_dim, device=device)
    optimizer = make_optimizer(captioner, TrainConfig())
    amp = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16

    def run(pad_to: int | None, autocast: bool) -> tuple[float, float, int]:
        scaler = torch.amp.GradScaler(enabled=autocast and amp == torch.float16)
        tokens = 0

        def step(batch):
            nonlocal tokens
            if pad_to:  # ClipCap: every caption padded to max_seq_len
                batch = [x[:pad_to] + [0] * (pad_to - len(x[:pad_to])) for x in batch]
            ids, mask, labels = captioner.pad(batch, device)
            with torch.autocast(device.type, dtype=amp, enabled=autocast):
                loss = captioner(clip, ids, mask, labels)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            tokens += ids.numel() + batch_size * captioner.config.prefix_length

        step(batches[0])  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        tokens = 0
        seconds = _timed(lambda: [step(b) for b in batches[1:]], device)
        peak = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
        return steps * batch_size / seconds, peak, tokens / seconds

    on_gpu = device.type == "cuda"
    # alternate the two, twice, and keep each one's faster run: other load on the machine hits both alike
    runs = [(run(None, on_gpu), run(fixed, False)) for _ in range(2)]
    ours_rate, ours_peak, ours_tokens = max((r[0] for r in runs), key=lambda r: r[0])
    base_rate, base_peak, _ = max((r[1] for r in runs), key=lambda r: r[0])
    n_all = sum(p.numel() for p in captioner.parameters())
    n_train = sum(p.numel() for p in captioner.parameters() if p.requires_grad)
    # forward 2N per token; backward 2N for activation gradients through every layer (the prefix needs
    # them) + 2N_trainable for weight gradients; attention's T^2 terms are left out (short sequences)
    flops = (4 * n_all + 2 * n_train) * ours_tokens
    peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if on_gpu and k in torch.cuda.get_device_name(device)), None)
    summary = {
        "batch_size": batch_size, "steps": steps, "clipcap_max_seq_len": fixed,
        "mean_caption_tokens": round(float(lengths.mean()), 1), "precision_ours": str(amp) if on_gpu else "fp32",
        "samples_per_s": {"ours": round(ours_rate, 2), "clipcap_fp32_fixed_padding": round(base_rate, 2)},
        "speedup_vs_clipcap": round(ours_rate / base_rate, 2),
        "peak_memory_gib": {"ours": ours_peak, "clipcap_fp32_fixed_padding": base_peak},
        "model_tflops_per_s": round(flops / 1e12, 2),
        "mfu": round(flops / 1e12 / peak_tflops, 3) if peak_tflops else None,
        "flickr30k_epoch_minutes": round(155_000 / ours_rate / 60, 1),
        "parameters": {"total": n_all, "trainable": n_train},
    }
    result = {"benchmark": "training", "architecture": f"{arch}: 6-layer transformer mapper, prefix 10, GPT-2 "
              f"{'124M shape' if arch == 'real' else 'tiny'} (last 2 blocks trained), random init",
              "machine": machine_info(device), "summary": summary}
    s = summary
    memory = {k: "n/a (CPU)" if v is None else v for k, v in s["peak_memory_gib"].items()}
    table = (f"# Training throughput ({result['architecture']})\n\n{_machine_line(result)}\n\n"
             "| pipeline | samples/s | peak GPU memory (GiB) |\n|---|---|---|\n"
             f"| ours: dynamic padding, {s['precision_ours']} | {s['samples_per_s']['ours']} | {memory['ours']} |\n"
             f"| ClipCap train.py: fp32, padded to {fixed} tokens | {s['samples_per_s']['clipcap_fp32_fixed_padding']} "
             f"| {memory['clipcap_fp32_fixed_padding']} |\n\n"
             f"Speed-up {s['speedup_vs_clipcap']}x; {s['model_tflops_per_s']} model TFLOP/s"
             + (f", MFU {s['mfu']:.1%}" if s["mfu"] else " (MFU: GPU only)")
             + f". Projected Flickr30k epoch (155k captions): {s['flickr30k_epoch_minutes']} min.\n")
    _write_results(Path(out_dir), "training", device, result, table)
    return result


# ---- captioning ------------------------------------------------------------------------------------

@torch.no_grad()
def _clipcap_greedy(captioner, clip_embed: torch.Tensor, max_tokens: int) -> list[list[int]]:
    """ClipCap's generate2, kept as the baseline: one image at a time, the whole sequence recomputed at
    every step (no KV cache). It exists only to be measured against."""
    out = []
    eos = captioner.tokenizer.eos_token_id
    wte = captioner.lm.get_input_embeddings()
    for x in clip_embed:
        embeds, tokens = captioner.prefix(x[None]), []  # (1, P, D)
        for _ in range(max_tokens):
            token = int(captioner.lm(inputs_embeds=embeds).logits[0, -1].argmax())
            tokens.append(token)
            if token == eos:
                break
            embeds = torch.cat([embeds, wte(torch.tensor([[token]], device=embeds.device))], 1)
        out.append(tokens)
    return out


@torch.no_grad()
def _clipcap_beam(captioner, clip_embed: torch.Tensor, max_tokens: int, beams: int = 5) -> list[list[int]]:
    """ClipCap's generate_beam, kept as the baseline: per image, all beams recomputed in full each step,
    beams ranked by length-averaged log-probability."""
    out = []
    eos = captioner.tokenizer.eos_token_id
    wte = captioner.lm.get_input_embeddings()
    for x in clip_embed:
        embeds = captioner.prefix(x[None])  # (1, P, D)
        scores = tokens = stopped = lengths = None
        for _ in range(max_tokens):
            logp = captioner.lm(inputs_embeds=embeds).logits[:, -1].log_softmax(-1)  # (k, V)
            if scores is None:
                scores, nxt = logp[0].topk(beams)
                embeds, tokens, lengths = embeds.expand(beams, -1, -1), nxt[:, None], torch.ones(beams)
                stopped = nxt == eos
            else:
                logp[stopped] = -float("inf")
                logp[stopped, 0] = 0  # a finished beam carries on with a free token
                lengths[~stopped] += 1
                average, flat = ((scores[:, None] + logp) / lengths[:, None]).view(-1).topk(beams)
                src, nxt = flat // logp.shape[1], flat % logp.shape[1]
                lengths = lengths[src]
                scores = average * lengths
                embeds, tokens = embeds[src], torch.cat([tokens[src], nxt[:, None]], 1)
                stopped = stopped[src] | (nxt == eos)
            embeds = torch.cat([embeds, wte(nxt)[:, None]], 1)
            if stopped.all():
                break
        out.append(tokens[int((scores / lengths).argmax())].tolist())
    return out


def bench_captioning(images: int = 32, baseline_images: int = 4, max_tokens: int = 20, device: str = "auto",
                     arch: str = "real", models_dir: str | Path = "data/models",
                     out_dir: str | Path = "bench/results") -> dict:
    """Captions/s, greedy and beam 5: ours (`generate()` on a batch, KV cache) vs ClipCap's one image at a time
    with the full sequence recomputed each step. The baseline runs on fewer images: its rate per caption
    does not depend on how many there are, and it is slow."""
    device = resolve_device(device)
    captioner = _bench_captioner(arch, device, Path(models_dir)).eval()
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
    for name, decoding, baseline in (("greedy", dict(do_sample=False), _clipcap_greedy),
                                     ("beam5", dict(num_beams=5, do_sample=False), _clipcap_beam)):
        rates[f"ours_{name}"] = images / _timed(lambda: ours(clip, **decoding), device)
        base = []
        rates[f"clipcap_{name}"] = baseline_images / _timed(
            lambda: base.extend(baseline(captioner, clip[:baseline_images], max_tokens)), device)
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
    table = (f"# Captioning throughput ({result['architecture']})\n\n{_machine_line(result)}\n\n"
             f"Batch {images} for ours, {baseline_images} images one at a time for ClipCap's way; captions of up to "
             f"{max_tokens} tokens.\n\n| decoding | ours (captions/s) | ClipCap way (captions/s) | speed-up |\n"
             f"|---|---|---|---|\n| greedy | {s['ours_greedy']} | {s['clipcap_greedy']} | {summary['speedup_greedy']}x |\n"
             f"| beam 5 | {s['ours_beam5']} | {s['clipcap_beam5']} | {summary['speedup_beam5']}x |\n\n"
             f"Same greedy captions as the baseline: {summary['same_greedy_captions']}.\n")
    _write_results(Path(out_dir), "captioning", device, result, table)
    return result


def _machine_line(result: dict) -> str:
    m = result["machine"]
    return f"Device: {m.get('gpu', m['cpu'])} ({m['device']}), torch {m['torch']}, {m['cpu_threads']} CPU threads."
