"""CLIPScore and RefCLIPScore (Hessel et al. 2021, arXiv:2104.08718): how well CLIP finds a caption to match
its image, with no reference captions needed (RefCLIP-S also compares the caption with the references).

CLIP-S = w * max(cos(image, "A photo depicts " + caption), 0), w = 2.5, as the paper defines it. Images go
through the one encoding loop of clip_encoder.py, so they are decoded and encoded as the feature cache does.
"""

from __future__ import annotations

import numpy as np
import torch

from .clip_encoder import encode_images
from .images import UnreadableImage, image_name


def clip_score(model, preprocess, images: list, candidates: list[str], device, w: float = 2.5,
               prefix: str = "A photo depicts", batch_size: int = 64) -> np.ndarray:
    """CLIP-S per image: w * max(cos(image, caption), 0) (Hessel et al. 2021), a score without references.

    `model, preprocess` are what `clip.load` returns; w=2.5 stretches typical cosines (~0.3) towards
    0-1. Like the paper's code, each caption is read as "A photo depicts <caption>" (prefix="" to not).
    """
    _same_length(images=images, candidates=candidates)
    image_emb = _image_embeddings(model, preprocess, images, device, batch_size)  # (N, d), unit length
    text_emb = _text_embeddings(model, _prefixed(candidates, prefix), device, batch_size)  # (N, d)
    return _clip_s(image_emb, text_emb, w)


def ref_clip_score(model, preprocess, images: list, candidates: list[str], references: list[list[str]],
                   device, w: float = 2.5, prefix: str = "A photo depicts",
                   batch_size: int = 64) -> np.ndarray:
    """RefCLIP-S per image: harmonic mean of CLIP-S and max(max_r cos(caption, reference r), 0).

    The harmonic mean is high only when the caption both fits the image and says what people said.
    """
    return clip_scores(model, preprocess, images, candidates, references, device, w, prefix, batch_size)[1]


def clip_scores(model, preprocess, images: list, candidates: list[str], references: list[list[str]],
                device, w: float = 2.5, prefix: str = "A photo depicts",
                batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(CLIP-S, RefCLIP-S) per image from one pass of CLIP over the images and captions."""
    _same_length(images=images, candidates=candidates, references=references)
    image_emb = _image_embeddings(model, preprocess, images, device, batch_size)  # (N, d), unit length
    cand = _text_embeddings(model, _prefixed(candidates, prefix), device, batch_size)  # (N, d)
    clip_s = _clip_s(image_emb, cand, w)
    flat = [r for refs in references for r in refs]
    ref_emb = _text_embeddings(model, _prefixed(flat, prefix), device, batch_size)  # (sum of refs, d)
    owner = np.repeat(np.arange(len(references)), [len(refs) for refs in references])
    best = np.zeros(len(candidates))
    np.maximum.at(best, owner, (cand[owner] * ref_emb).sum(axis=1))  # max over each image's refs, floor 0
    both = clip_s + best
    return clip_s, np.where(both > 0, 2 * clip_s * best / np.where(both > 0, both, 1), 0.0)


def _clip_s(image_emb: np.ndarray, text_emb: np.ndarray, w: float) -> np.ndarray:
    return w * np.clip((image_emb * text_emb).sum(axis=1), 0, None)  # (N,)


def _same_length(**lists) -> None:
    sizes = {name: len(values) for name, values in lists.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"Need one entry per image, but got {sizes}.")


def _prefixed(texts: list[str], prefix: str) -> list[str]:
    return [f"{prefix} {t}" if prefix else t for t in texts]


def _image_embeddings(model, preprocess, images: list, device, batch_size: int) -> np.ndarray:
    """Unit-length embeddings (N, d) of PIL images or paths, through the one encoding loop (clip_encoder)."""
    embeds, reasons = encode_images(model, preprocess, images, device, batch_size)
    if any(reasons):
        bad = next(f"{image_name(im, i)} ({why})" for i, (im, why) in enumerate(zip(images, reasons)) if why)
        raise UnreadableImage(f"cannot score an image that cannot be read: {bad}")
    return torch.nn.functional.normalize(embeds, dim=-1).double().numpy() if len(images) else np.zeros((0, 0))


@torch.no_grad()
def _text_embeddings(model, texts: list[str], device, batch_size: int) -> np.ndarray:
    import clip

    out = []
    for start in range(0, len(texts), batch_size):
        tokens = clip.tokenize(texts[start:start + batch_size], truncate=True).to(device)  # (B, 77)
        out.append(torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    return torch.cat(out).double().numpy() if out else np.zeros((0, 0))
