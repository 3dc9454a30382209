"""CLIP, the frozen image encoder: loading it, and the one loop that turns images into embeddings.

The feature cache (training's input), the captioner (files or PIL images in) and CLIPScore all encode
through `encode_batches` here, so the same photo gets the same embedding on every path:
- decoding: `open_image` with JPEG draft mode at `draft_size` (twice CLIP's input), or a PIL image as given;
- precision, the one dtype rule (`precision`): on a GPU, CLIP's weights as `clip.load` leaves them there
  (fp16) under fp16 autocast; on a CPU, or with fp16 turned off, fp32 throughout. The cache records the
  rule it used in meta.json ("clip_precision"), and a captioner encoding files follows its bundle's;
- storage: the cache keeps float16 (`STORED_DTYPE`); the captioner rounds to it too (`as_stored`), so a
  file's embedding equals its cached row. CLIPScore keeps the float32 output.
"""

from __future__ import annotations


import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .images import UnreadableImage, draft_side, open_image, prepare_image

PRECISIONS = ("fp16", "fp32")
STORED_DTYPE = np.float16  # what the feature cache stores, and what captioning rounds to


def draft_size(model) -> int:
    """JPEGs decode at a reduced scale still twice CLIP's input: much faster, and the same pixels after
    `preprocess`. The cache, captioning, CLIPScore and the web demo must all decode alike."""
    return draft_side(model.visual.input_resolution)


def precision(device: torch.device | str, fp16: bool = True) -> str:
    """The one dtype rule: "fp16" (fp16 weights under autocast) on a GPU when fp16 is wanted, else "fp32"."""
    return "fp16" if fp16 and torch.device(device).type == "cuda" else "fp32"


def as_stored(features: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Embeddings rounded as the feature cache stores them, as a float32 tensor (what the mapper reads)."""
    return torch.as_tensor(np.asarray(features, dtype=np.float32).astype(STORED_DTYPE)).float()


class ImageFiles(Dataset):
    """Decodes (a path) or converts (a PIL image) and preprocesses one image; a bad one yields its reason
    instead of failing the batch."""

    def __init__(self, images: list, preprocess, resolution: int, draft: int):
        self.images, self.preprocess, self.resolution, self.draft = images, preprocess, resolution, draft

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image = self.images[i]
        try:
            rgb = prepare_image(image) if isinstance(image, Image.Image) else open_image(image, draft=self.draft)
            return i, self.preprocess(rgb), ""
        except UnreadableImage as exc:
            n = self.resolution
            return i, torch.zeros(3, n, n), str(exc) or "unreadable"


def encode_batches(model, preprocess, images: list, batches: list[list[int]], device: torch.device,
                   num_workers: int = 2, fp16: bool = True):
    """The one encoding loop. Yield (positions, features (n_ok, D) float32, bad [(position, reason)]) for
    each batch of positions into `images` (paths or PIL images).

    Batches are given explicitly so a resumed cache groups images exactly as an uninterrupted one.
    """
    device = torch.device(device)
    files = ImageFiles(images, preprocess, model.visual.input_resolution, draft_size(model))
    loader = DataLoader(files, batch_sampler=batches, num_workers=num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=False)
    use_fp16 = precision(device, fp16) == "fp16"
    if not use_fp16:
        model.float()  # clip.load keeps fp16 weights on a GPU; fp32 means fp32 throughout
    for positions, pixels, reasons in loader:
        ok = [j for j, r in enumerate(reasons) if not r]
        feats = np.zeros((0, model.visual.output_dim), np.float32)
        if ok:
            x = pixels[ok].to(device, non_blocking=True)  # (n_ok, 3, H, W)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=use_fp16):
                feats = model.encode_image(x).float().cpu().numpy()  # (n_ok, D)
        bad = [(int(positions[j]), reasons[j]) for j, r in enumerate(reasons) if r]
        yield positions.numpy()[ok], feats, bad


def encode_images(model, preprocess, images: list, device: torch.device, batch_size: int = 32,
                  fp16: bool = True) -> tuple[torch.Tensor, list[str]]:
    """Embeddings of paths or PIL images, `batch_size` held in memory at a time, in this process.

    Returns (embeddings (n_readable, D) float32, reasons): reasons[i] is "" for a readable image, else why
    it could not be read ("truncated JPEG", "missing file", ...).
    """
    batches = [list(range(i, min(i + batch_size, len(images)))) for i in range(0, len(images), batch_size)]
    embeds, reasons = [torch.zeros(0, model.visual.output_dim)], [""] * len(images)
    for _, feats, bad in encode_batches(model, preprocess, images, batches, device, num_workers=0, fp16=fp16):
        embeds.append(torch.from_numpy(feats))
        for position, why in bad:
            reasons[position] = why
    return torch.cat(embeds), reasons
