"""The captioning pipeline: image files or PIL images in, captions out.

    image (file or PIL) --clip_encoder--> CLIP embedding (clip_dim) --model--> caption

`Captioner` is the model of model.py (mapper + LM) with the parts that meet the outside world: its CLIP
image encoder (loaded on first use, never saved), captions of images, and the bundle it is saved to and
loaded from (bundle.py). Training builds one; `Captioner.from_pretrained(bundle)` gives one back.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from . import bundle
from .clip_encoder import as_stored, encode_images
from .config import DecodeConfig, decode_config
from .images import UnreadableImage, image_name
from .model import CaptionerError, CaptionModel
from .paths import models_dir as default_models_dir
from .sources import load_clip
from .standin_names import is_standin


class Captioner(CaptionModel):
    """A CaptionModel that captions images and saves to / loads from a bundle."""

    def __init__(self, config, lm, tokenizer):
        super().__init__(config, lm, tokenizer)
        self._clip = None  # (CLIP model, preprocess), loaded by the first image_encoder() call
        self.summary: dict = {}  # how it was made: filled from the bundle (bundle.py)
        self.bundle_path: Path | None = None

    # ---- images -------------------------------------------------------------------------------------
    def image_encoder(self, models_dir: str | Path | None = None):
        """(CLIP model, preprocess) of the backbone the captioner was trained on, loaded on first use.

        A real backbone is downloaded into `models_dir`/clip (default: <data dir>/models); a stand-in one
        ("standin:ViT") is the machine's stand-in CLIP (standins.standins_home), built once per machine.
        """
        if self._clip is None:
            name = self.config.backbone
            model, preprocess, _ = load_clip(name, self.mapper_device, is_standin(name),
                                             Path(models_dir or default_models_dir()))
            if model.visual.output_dim != self.config.clip_dim:
                raise CaptionerError(f"CLIP {name} gives {model.visual.output_dim}-d embeddings but this captioner "
                                     f"was trained on {self.config.clip_dim}-d ones: its bundle is inconsistent.")
            self._clip = (model.requires_grad_(False), preprocess)  # a tuple: not a submodule, never saved
        return self._clip

    def encode_fp16(self) -> bool:
        """Whether images are encoded in fp16: as the training features were (the bundle records the rule),
        where this device can; a warning says when it cannot, as captions may then differ slightly."""
        trained = self.summary.get("clip_precision")  # None: a bundle from before the rule was recorded
        device = self.mapper_device
        if trained == "fp16" and device.type != "cuda" and not getattr(self, "_warned_precision", False):
            self._warned_precision = True
            warnings.warn("this captioner's training features were encoded by CLIP in fp16 on a GPU, but here "
                          f"images are encoded in fp32 on the {device.type}: captions of image files may differ "
                          "slightly from captions of the cached features. Caption on a GPU to match them.",
                          stacklevel=3)
        return trained != "fp32"

    def encode_images(self, images: list, batch_size: int = 32) -> tuple[torch.Tensor, list[str]]:
        """CLIP embeddings of PIL images or image paths, made as the feature cache makes them.

        Returns (embeddings (n_readable, clip_dim), reasons): reasons[i] is "" for a readable image, else
        why it could not be read ("truncated JPEG", "missing file", ...). Pixels are held `batch_size`
        images at a time, so a folder of any size fits in memory.
        """
        model, preprocess = self.image_encoder()
        device = next(model.parameters()).device
        embeds, reasons = encode_images(model, preprocess, list(images), device, batch_size, self.encode_fp16())
        return as_stored(embeds), reasons  # rounded to float16, as the cache stores them

    def embed(self, images: list, batch_size: int = 32) -> torch.Tensor:
        """(N, clip_dim) CLIP embeddings of PIL images or paths; UnreadableImage names any that cannot be read."""
        embeds, reasons = self.encode_images(images, batch_size)
        bad = [f"{image_name(image, i)} ({why})" for i, (image, why) in enumerate(zip(images, reasons)) if why]
        if bad:
            raise UnreadableImage(f"cannot read {len(bad)} image(s): {', '.join(bad)}. Replace them, or use "
                                  "caption_files() to caption the readable ones.")
        return embeds

    def caption(self, images: list, decode: DecodeConfig | None = None, batch_size: int = 32,
                **overrides) -> list[str] | list[list[str]]:
        """Captions of PIL images or image paths (see `generate` for `decode` and `overrides`).

        Raises UnreadableImage naming every image that cannot be read; `caption_files` captions the rest.
        """
        return self.generate(self.embed(images, batch_size), decode, batch_size, **overrides)

    def caption_files(self, images: list, decode: DecodeConfig | None = None, batch_size: int = 32,
                      **overrides) -> list[dict]:
        """One result per image: {"image": its name, "caption": str (or list of str), "error": None}, or
        for an image that cannot be read {"image", "caption": None, "error": why}. The rest are captioned."""
        decode = decode_config(decode, **overrides)
        embeds, reasons = self.encode_images(images, batch_size)
        captions = iter(self.generate(embeds, decode, batch_size))
        return [{"image": image_name(image, i), "caption": None if why else next(captions), "error": why or None}
                for i, (image, why) in enumerate(zip(images, reasons))]

    # ---- bundle -------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, summary: dict | None = None) -> Path:
        """A self-contained folder: config.json, mapper.safetensors, the LM and its tokenizer (bundle.py)."""
        return bundle.save(self, path, summary)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "Captioner":
        return bundle.load(cls, path, device)
