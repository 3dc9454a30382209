"""The captioner: mapper + causal language model. Loss, freezing policy, generation, save and load.

Training sees `[prefix (P vectors) | caption tokens | EOS | padding]`. Labels are -100 (ignored) on the
prefix and on padding, so the loss is on caption tokens and EOS only; the logits at position P-1 predict
the first caption token. ClipCap instead padded with token 0 ("!"), which both hid real "!" from the
loss and never taught the model to stop; appending EOS is what lets our captions end on their own.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .files import atomic_dir, read_json, write_json
from .mapper import build_mapper
from .runtime import announce_offline
from .standins import STANDIN_PREFIX, gpt2_dir

BUNDLE_VERSION = 1


def load_language_model(name: str, offline: bool, models_dir: str | Path):
    """`from_pretrained` the LM and its tokenizer by hub name or folder; offline, the stand-in GPT-2.

    Returns (lm, tokenizer, name as recorded in checkpoints).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, recorded = name, name
    if offline and not Path(name).is_dir():
        announce_offline(f"language model '{name}' replaced by the tiny stand-in GPT-2")
        source, recorded = str(gpt2_dir(models_dir)), STANDIN_PREFIX + "gpt2"
    elif name.startswith(STANDIN_PREFIX):
        source = str(gpt2_dir(models_dir))
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


def _final_norm(lm: nn.Module) -> nn.Module | None:
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
    norm = _final_norm(lm)
    if last and norm is not None:
        norm.requires_grad_(True)
        learns.append("the LM's final norm")
    return learns


class Captioner(nn.Module):
    def __init__(self, config: ModelConfig, lm: nn.Module, tokenizer):
        super().__init__()
        self.config, self.lm, self.tokenizer = config, lm, tokenizer
        self.lm_dim = lm.get_input_embeddings().embedding_dim
        self.mapper = build_mapper(config.mapper, config.clip_dim, self.lm_dim, config.prefix_length,
                                   config.clip_length, config.num_layers, config.num_heads, config.mlp_ratio,
                                   config.dropout)
        self.lm_learns = apply_freeze(lm, config)
        positions = getattr(lm.config, "n_positions", None) or getattr(lm.config, "max_position_embeddings", 1024)
        # prefix + caption must fit the LM's positions (ClipCap crashed on long captions past 1024)
        self.max_caption_tokens = min(config.max_caption_tokens, positions - config.prefix_length)

    # ---- text ---------------------------------------------------------------------------------------
    def encode_captions(self, captions: list[str]) -> tuple[list[list[int]], int]:
        """Token ids + EOS per caption, cut to fit; returns (ids, how many were cut)."""
        eos, limit = self.tokenizer.eos_token_id, self.max_caption_tokens
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
    def generate(self, clip_embed: torch.Tensor, max_new_tokens: int | None = None, **decoding) -> list[str]:
        """Captions for a batch of CLIP embeddings via `generate()` on the prefix (KV cache included).

        `decoding` goes to transformers' generate: num_beams, do_sample, temperature, top_k, top_p, ...
        """
        was_training = self.training
        self.eval()
        prefix = self.prefix(clip_embed.to(self.mapper_device))  # (B, P, D)
        prefix = prefix.to(self.lm.get_input_embeddings().weight.dtype)
        mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        eos = self.tokenizer.eos_token_id
        out = self.lm.generate(inputs_embeds=prefix, attention_mask=mask, eos_token_id=eos, pad_token_id=eos,
                               max_new_tokens=max_new_tokens or self.max_caption_tokens, **decoding)
        self.train(was_training)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    @property
    def mapper_device(self) -> torch.device:
        return next(self.mapper.parameters()).device

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
            raise FileNotFoundError(f"{path} is not a captioner bundle (no config.json): train one with "
                                    "`python -m utils train` or export one from a checkpoint.")
        meta = read_json(path / "config.json")
        if meta.get("bundle_version") != BUNDLE_VERSION:
            raise ValueError(f"{path} is a version {meta.get('bundle_version')} bundle; this course reads "
                             f"version {BUNDLE_VERSION}.")
        config = ModelConfig(**meta["model"])
        lm = AutoModelForCausalLM.from_pretrained(path / "lm")
        model = cls(config, lm, AutoTokenizer.from_pretrained(path / "lm"))
        model.mapper.load_state_dict(load_file(str(path / "mapper.safetensors")))
        model.summary = meta.get("summary", {})
        return model.to(device).eval()
