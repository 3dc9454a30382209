"""The captioner: mapper + causal language model. Loss, freezing policy, generation, save and load.

Training sees `[prefix (P vectors) | caption tokens | EOS | padding]`. Labels are -100 (ignored) on the
prefix and on padding, so the loss is on caption tokens and EOS only; the logits at position P-1 predict
the first caption token. ClipCap instead padded with token 0 ("!"), which both hid real "!" from the
loss and never taught the model to stop; appending EOS is what lets our captions end on their own.

Captions are decoded by transformers' own `generate()` from the prefix (`inputs_embeds`), KV cache
included, rather than by a hand-written loop: greedy, beam search and sampling as a DecodeConfig says.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .config import DecodeConfig, ModelConfig, decode_config
from .datasets import UnreadableImage, _to_rgb, open_image
from .features import draft_size, load_clip
from .files import atomic_dir, read_json, write_json
from .mapper import build_mapper
from .runtime import announce_offline, default_data_dir
from .standins import STANDIN_PREFIX, gpt2_dir, is_standin

BUNDLE_VERSION = 1


class CaptionerError(ValueError):
    """A bundle that cannot be loaded, or inputs this captioner cannot take (CLIP embeddings of another
    width); the message says what to do."""


def language_model_source(name: str, offline: bool, models_dir: str | Path) -> tuple[str, str]:
    """Where `from_pretrained` reads the LM `name` (hub name or folder) from, and the name checkpoints
    record; offline, the stand-in GPT-2."""
    if offline and not Path(name).is_dir():
        announce_offline(f"language model '{name}' replaced by the tiny stand-in GPT-2")
        return str(gpt2_dir()), STANDIN_PREFIX + "gpt2"
    if name.startswith(STANDIN_PREFIX):
        return str(gpt2_dir()), name
    return name, name


def load_language_model(name: str, offline: bool, models_dir: str | Path):
    """`from_pretrained` the LM and its tokenizer by hub name or folder; offline, the stand-in GPT-2.

    Returns (lm, tokenizer, name as recorded in checkpoints).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, recorded = language_model_source(name, offline, models_dir)
    tokenizer = AutoTokenizer.from_pretrained(source)
    lm = AutoModelForCausalLM.from_pretrained(source)
    return lm, tokenizer, recorded


def transformer_blocks(lm: nn.Module) -> nn.ModuleList:
    """The LM's stack of blocks (GPT-2's `transformer.h`, Llama's `model.layers`, ...)."""
    n = lm.config.num_hidden_layers
    for module in lm.base_model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the {n} transformer blocks of {type(lm).__name__}: use --freeze frozen or full")


def final_norm(lm: nn.Module) -> nn.Module | None:
    """The norm after the last block (GPT-2's ln_f): the freezing policy and the parameter plot treat it apart."""
    for name in ("ln_f", "norm", "final_layer_norm"):
        module = getattr(lm.base_model, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def apply_freeze(lm: nn.Module, cfg: ModelConfig) -> list[str]:
    """Set requires_grad on the LM by policy; returns a description of what learns."""
    if cfg.freeze not in ("frozen", "full", "partial"):
        raise ValueError(f"freeze must be 'frozen', 'full' or 'partial', not {cfg.freeze!r}")
    lm.requires_grad_(cfg.freeze == "full")
    if cfg.freeze != "partial":
        return ["all of the LM"] if cfg.freeze == "full" else []
    blocks = transformer_blocks(lm)
    first = list(range(min(cfg.train_first_blocks, len(blocks))))
    last = list(range(max(len(blocks) - cfg.train_last_blocks, 0), len(blocks)))
    chosen = sorted(set(first + last))
    for i in chosen:
        blocks[i].requires_grad_(True)
    learns = [f"LM blocks {', '.join(map(str, chosen))} of 0-{len(blocks) - 1}"] if chosen else []
    norm = final_norm(lm)
    if last and norm is not None:
        norm.requires_grad_(True)
        learns.append("the LM's final norm")
    return learns


def generate_kwargs(decode: DecodeConfig, max_new_tokens: int) -> dict:
    """The one place a DecodeConfig becomes arguments of transformers' `generate()`.

    Only the chosen method's settings are passed, so generate() never warns about settings it ignores.
    `max_new_tokens` is the caption length to use when `decode` sets none.
    """
    kwargs = dict(do_sample=decode.method == "sample", num_beams=decode.num_beams if decode.method == "beam" else 1,
                  max_new_tokens=decode.max_new_tokens or max_new_tokens,
                  num_return_sequences=decode.num_return_sequences, repetition_penalty=decode.repetition_penalty,
                  no_repeat_ngram_size=decode.no_repeat_ngram_size)
    if decode.method == "beam" and decode.num_beams > 1:
        kwargs["length_penalty"] = decode.length_penalty
    if decode.method == "sample":
        kwargs.update(temperature=decode.temperature, top_k=decode.top_k, top_p=decode.top_p)
    if decode.stop_at_period:
        kwargs["stop_strings"] = ["."]  # stops once the text ends with "." (after "3." of "3.5" too)
    return kwargs


class Captioner(nn.Module):
    def __init__(self, config: ModelConfig, lm: nn.Module, tokenizer):
        super().__init__()
        self.config, self.lm, self.tokenizer = config, lm, tokenizer
        self._clip = None  # (CLIP model, preprocess), loaded by the first image_encoder() call
        self.lm_dim = lm.get_input_embeddings().embedding_dim
        self.mapper = build_mapper(config.mapper, config.clip_dim, self.lm_dim, config.prefix_length,
                                   config.clip_length, config.num_layers, config.num_heads, config.mlp_ratio,
                                   config.dropout)
        self.lm_learns = apply_freeze(lm, config)
        positions = getattr(lm.config, "n_positions", None) or getattr(lm.config, "max_position_embeddings", 1024)
        # prefix + caption must fit the LM's positions (ClipCap crashed on long captions past 1024)
        self.max_caption_tokens = min(config.max_caption_tokens, positions - config.prefix_length)
        # generate() ends a caption at any of these
        self.stop_ids = [tokenizer.eos_token_id] + self._token_id(config.stop_token)

    # ---- text ---------------------------------------------------------------------------------------
    def _token_id(self, token: str | None) -> list[int]:
        if token is None:
            return []
        ids = self.tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise CaptionerError(f"stop_token {token!r} is {len(ids)} tokens for this tokenizer, not one: "
                                 "choose a single token such as '.'.")
        return ids

    def encode_captions(self, captions: list[str]) -> tuple[list[list[int]], int]:
        """Token ids + EOS per caption, cut to fit; returns (ids, how many were cut)."""
        eos, limit = self.tokenizer.eos_token_id, self.max_caption_tokens
        if not len(captions):  # an empty split (no validation images): the tokenizer fails on []
            return [], 0
        ids = self.tokenizer(list(captions), add_special_tokens=False)["input_ids"]
        cut = sum(len(x) > limit - 1 for x in ids)
        return [x[: limit - 1] + [eos] for x in ids], cut

    def pad(self, token_lists: list[list[int]], device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-pad to the longest in the batch: (input_ids, attention_mask, labels), each (B, T)."""
        T = max(len(x) for x in token_lists)
        ids = torch.full((len(token_lists), T), self.tokenizer.eos_token_id, dtype=torch.long)
        mask = torch.zeros((len(token_lists), T), dtype=torch.long)
        for i, x in enumerate(token_lists):
            ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        return ids.to(device), mask.to(device), labels.to(device)

    # ---- model --------------------------------------------------------------------------------------
    def prefix(self, clip_embed: torch.Tensor) -> torch.Tensor:
        # clip_embed: (B, clip_dim)
        if clip_embed.shape[-1] != self.config.clip_dim:  # ClipCap's users mixed 512/640/768-d features up
            raise CaptionerError(f"these CLIP embeddings are {clip_embed.shape[-1]}-d, but this captioner reads the "
                                 f"{self.config.clip_dim}-d embeddings of {self.config.backbone}: make the features "
                                 f"with --backbone {self.config.backbone}.")
        x = clip_embed.float()
        if self.config.normalize_prefix:
            x = F.normalize(x, dim=-1)
        if self.training and self.config.feature_noise > 0:
            x = x + self.config.feature_noise * torch.randn_like(x)
        return self.mapper(x)  # (B, P, D)

    def forward(self, clip_embed: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over caption tokens (EOS included), never over prefix or padding."""
        B, P = clip_embed.shape[0], self.config.prefix_length
        prefix = self.prefix(clip_embed)  # (B, P, D)
        tokens = self.lm.get_input_embeddings()(input_ids)  # (B, T, D)
        embeds = torch.cat([prefix.to(tokens.dtype), tokens], dim=1)  # (B, P + T, D)
        mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1)  # (B, P + T)
        labels = torch.cat([labels.new_full((B, P), -100), labels], dim=1)  # (B, P + T)
        return self.lm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss

    @torch.no_grad()
    def generate(self, clip_embed, decode: DecodeConfig | None = None, batch_size: int = 64,
                 **overrides) -> list[str] | list[list[str]]:
        """Captions for CLIP embeddings via transformers' `generate()` on the prefix (KV cache included).

        clip_embed: (N, clip_dim) tensor or array. `decode` (default: greedy) with `overrides` of its fields,
        e.g. `generate(x, method="beam", num_beams=3)`. Returns one caption per image, or per image a list
        of num_return_sequences captions, each one line (runs of whitespace become one space). Images go
        through generate() `batch_size` at a time.
        """
        decode = decode_config(decode, **overrides)
        kwargs = generate_kwargs(decode, self.max_caption_tokens)
        if not torch.is_tensor(clip_embed):  # rows of a feature cache (float16 numpy), a list
            clip_embed = torch.tensor(np.asarray(clip_embed, dtype=np.float32))
        eos, device = self.tokenizer.eos_token_id, self.mapper_device
        dtype = self.lm.get_input_embeddings().weight.dtype
        was_training = self.training
        self.eval()
        texts = []
        with _seeded(decode.seed, device):
            for start in range(0, len(clip_embed), batch_size):
                prefix = self.prefix(clip_embed[start:start + batch_size].to(device)).to(dtype)  # (b, P, D)
                mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=device)  # (b, P)
                out = self.lm.generate(inputs_embeds=prefix, attention_mask=mask, eos_token_id=self.stop_ids,
                                       pad_token_id=eos, tokenizer=self.tokenizer,
                                       **kwargs)  # (b * num_return_sequences, new tokens)
                texts += [" ".join(t.split()) for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
        self.train(was_training)
        n = decode.num_return_sequences
        return texts if n == 1 else [texts[i:i + n] for i in range(0, len(texts), n)]

    @property
    def mapper_device(self) -> torch.device:
        return next(self.mapper.parameters()).device

    # ---- images -------------------------------------------------------------------------------------
    def image_encoder(self, models_dir: str | Path | None = None):
        """(CLIP model, preprocess) of the backbone the captioner was trained on, loaded on first use.

        A stand-in backbone ("standin:ViT") is built under `models_dir` (default: <data dir>/models).
        """
        if self._clip is None:
            name = self.config.backbone
            models_dir = Path(models_dir or Path(default_data_dir()) / "models")
            standin = is_standin(name)
            model, preprocess, _ = load_clip(name, self.mapper_device, standin, models_dir)
            if model.visual.output_dim != self.config.clip_dim:
                raise CaptionerError(f"CLIP {name} gives {model.visual.output_dim}-d embeddings but this captioner "
                                 f"was trained on {self.config.clip_dim}-d ones: its bundle is inconsistent.")
            self._clip = (model.requires_grad_(False), preprocess)  # a tuple: not a submodule, never saved
        return self._clip

    @torch.no_grad()
    def encode_images(self, images: list, batch_size: int = 32) -> tuple[torch.Tensor, list[str]]:
        """CLIP embeddings of PIL images or image paths, made as the feature cache makes them.

        Returns (embeddings (n_readable, clip_dim), reasons): reasons[i] is "" for a readable image, else
        why it could not be read ("truncated JPEG", "missing file", ...). Pixels are held `batch_size`
        images at a time, so a folder of any size fits in memory.
        """
        model, preprocess = self.image_encoder()
        device = next(model.parameters()).device
        embeds, reasons = [torch.zeros(0, self.config.clip_dim)], []
        for start in range(0, len(images), batch_size):
            pixels = []
            for image in images[start:start + batch_size]:
                try:
                    rgb = _to_rgb(image) if isinstance(image, Image.Image) else open_image(image, draft_size(model))
                    pixels.append(preprocess(rgb))  # (3, H, W)
                    reasons.append("")
                except UnreadableImage as exc:
                    reasons.append(str(exc) or "unreadable")
            if pixels:
                with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                    batch = model.encode_image(torch.stack(pixels).to(device))  # (b, clip_dim)
                embeds.append(batch.half().float().cpu())  # rounded to float16, as the cache stores them
        return torch.cat(embeds), reasons

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


    # ---- what learns --------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The tensors training changes: all a checkpoint needs beside the base LM it started from."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {n: t.detach() for n, t in self.state_dict().items() if n in names}

    def describe(self) -> str:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        mapper = sum(p.numel() for p in self.mapper.parameters())
        learns = ", ".join([f"the {self.config.mapper} mapper ({mapper / 1e6:.2f}M)"] + self.lm_learns)
        return f"trainable: {trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters ({learns})"

    # ---- bundle -------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, summary: dict | None = None) -> Path:
        """A self-contained folder: config.json, mapper.safetensors, the LM and its tokenizer."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists() and not (path / "config.json").is_file() and any(path.iterdir()):
            raise CaptionerError(f"{path} exists and is not a captioner bundle: a bundle replaces its folder "
                                 "whole, so choose a new folder for it (nothing was written).")
        with atomic_dir(path) as tmp:
            self.lm.save_pretrained(tmp / "lm")
            self.tokenizer.save_pretrained(tmp / "lm")
            save_file({k: v.contiguous() for k, v in self.mapper.state_dict().items()}, str(tmp / "mapper.safetensors"))
            write_json(tmp / "config.json", {"bundle_version": BUNDLE_VERSION, "summary": summary or {},
                                             "model": dataclasses.asdict(self.config)})
        return Path(path)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "Captioner":
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise CaptionerError(f"{path} is not a captioner bundle (no config.json): train one with "
                                 "`python -m utils train` or export one from a checkpoint.")
        try:  # safetensors holds tensors only: a file carrying pickled code fails here, unexecuted
            meta = read_json(path / "config.json")
            if meta.get("bundle_version") != BUNDLE_VERSION:
                raise CaptionerError(f"{path} is a version {meta.get('bundle_version')} bundle; this course reads "
                                     f"version {BUNDLE_VERSION}.")
            config = ModelConfig(**meta["model"])
            lm = AutoModelForCausalLM.from_pretrained(path / "lm")
            model = cls(config, lm, AutoTokenizer.from_pretrained(path / "lm"))
            model.mapper.load_state_dict(load_file(str(path / "mapper.safetensors")))
        except CaptionerError:
            raise
        except Exception as exc:  # JSON, config, transformers and safetensors each fail in their own way
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CaptionerError(f"{path} is damaged or its parts do not fit its config.json ({reason}); copy or "
                                 "make the bundle again.") from None
        model.summary = meta.get("summary", {})
        return model.to(device).eval()


def image_name(image, position: int) -> str:
    """A path as given; a PIL image by the file it was opened from, else by its position."""
    if isinstance(image, Image.Image):
        return getattr(image, "filename", "") or f"image {position}"
    return str(image)


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """Draw random numbers from `seed`, leaving the caller's RNG state as it was; None: the global RNG."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
