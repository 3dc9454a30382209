"""The model: CLIP embedding -> mapper -> prefix -> causal language model. Loss, freezing, generation.

Training sees `[prefix (P vectors) | caption tokens | EOS | padding]`. Labels are -100 (ignored) on the
prefix and on padding, so the loss is on caption tokens and EOS only; the logits at position P-1 predict
the first caption token. ClipCap instead padded with token 0 ("!"), which both hid real "!" from the
loss and never taught the model to stop; appending EOS is what lets our captions end on their own.

Captions are decoded by transformers' own `generate()` from the prefix (`inputs_embeds`), KV cache
included, rather than by a hand-written loop: greedy, beam search and sampling as a DecodeConfig says.

This file is the whole model, as nanoGPT's model.py is: images in and bundles out are captioner.py's
and bundle.py's.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import DecodeConfig, ModelConfig, decode_config
from .errors import CourseError
from .mapper import build_mapper
from .runtime import to_device


# LMs whose logits are their head applied to the last hidden state, nothing after it: forward() runs the head
# on the caption positions only
LEAN_HEAD_MODELS = ("gpt2", "gpt_neo", "gptj", "llama", "mistral", "qwen2")


class CaptionerError(CourseError, ValueError):
    """A bundle that cannot be loaded, or inputs this captioner cannot take (CLIP embeddings of another
    width); the message says what to do."""


def is_encoder_decoder(lm: nn.Module) -> bool:
    return bool(getattr(lm.config, "is_encoder_decoder", False))


def transformer_blocks(lm: nn.Module) -> nn.ModuleList:
    """The LM's stack of blocks (GPT-2's `transformer.h`, Llama's `model.layers`, ...); for an
    encoder-decoder, the encoder's blocks then the decoder's, so "first" blocks are where the prefix enters
    and "last" blocks the ones before the LM head."""
    if is_encoder_decoder(lm):
        return nn.ModuleList([*lm.get_encoder().block, *lm.get_decoder().block])
    n = lm.config.num_hidden_layers
    for module in lm.base_model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the {n} transformer blocks of {type(lm).__name__}: use --freeze frozen or full")


def final_norm(lm: nn.Module) -> nn.Module | None:
    """The norm after the last block (GPT-2's ln_f): the freezing policy and the parameter plot treat it apart."""
    if is_encoder_decoder(lm):
        return getattr(lm.get_decoder(), "final_layer_norm", None)
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


def frozen_lm_modules(lm: nn.Module, cfg: ModelConfig) -> list[nn.Module]:
    """The parts of the LM that do not learn, which training keeps in eval mode (dropout off).

    Their weights were trained by the LM's makers and stay as they are, so their dropout would only add
    noise to what the mapper (and the blocks that learn) are taught through them; ClipCap's frozen variant
    keeps GPT-2 in eval mode for the same reason. frozen: the whole LM; partial: the frozen blocks, and the
    embedding dropout when the first block is frozen too; full: nothing."""
    if cfg.freeze == "frozen":
        return [lm]
    if cfg.freeze == "full":
        return []
    blocks = transformer_blocks(lm)
    frozen = [b for b in blocks if not any(p.requires_grad for p in b.parameters())]
    if frozen and frozen[0] is blocks[0]:
        frozen += [m for m in lm.base_model.children() if isinstance(m, nn.Dropout)]
    return frozen


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


class CaptionModel(nn.Module):
    """Mapper + causal LM: `forward` is the training loss, `generate` the captions of CLIP embeddings."""

    def __init__(self, config: ModelConfig, lm: nn.Module, tokenizer):
        super().__init__()
        self.config, self.lm, self.tokenizer = config, lm, tokenizer
        self.lm_dim = lm.get_input_embeddings().embedding_dim
        self.mapper = build_mapper(config.mapper, config.clip_dim, self.lm_dim, config.prefix_length,
                                   config.clip_length, config.num_layers, config.num_heads, config.mlp_ratio,
                                   config.dropout)
        self.encoder_decoder = is_encoder_decoder(lm)
        self.lm_learns = apply_freeze(lm, config)
        self.frozen_lm = frozen_lm_modules(lm, config)  # a list, not submodules: kept in eval mode by train()
        positions = getattr(lm.config, "n_positions", None) or getattr(lm.config, "max_position_embeddings", 1024)
        # prefix + caption must fit the LM's positions (ClipCap crashed on long captions past 1024)
        self.max_caption_tokens = min(config.max_caption_tokens, positions - config.prefix_length)
        # generate() ends a caption at any of these
        self.stop_ids = [tokenizer.eos_token_id] + self._token_id(config.stop_token)

    def train(self, mode: bool = True) -> "CaptionModel":
        """nn.Module.train, except that the LM's parts that do not learn stay in eval mode (see
        frozen_lm_modules)."""
        super().train(mode)
        for module in self.frozen_lm:
            module.eval()
        return self

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
        return to_device(ids, device), to_device(mask, device), to_device(labels, device)

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
        """Mean cross-entropy over caption tokens (EOS included), never over prefix or padding.

        The LM head (768 x 50k for GPT-2) and the loss skip the prefix positions (a third of their work at
        Flickr30k's caption lengths): the same loss as `lm(..., labels=...)`. Padding positions stay in,
        ignored by the loss (selecting the labelled ones would cost a host sync per step on a GPU);
        length-bucketed batches keep them few.
        """
        B, P = clip_embed.shape[0], self.config.prefix_length
        prefix = self.prefix(clip_embed)  # (B, P, D)
        if self.encoder_decoder:  # T5: the encoder reads the prefix, the decoder writes the caption from it
            dtype = self.lm.get_input_embeddings().weight.dtype
            return self.lm(inputs_embeds=prefix.to(dtype), attention_mask=attention_mask.new_ones(B, P),
                           labels=labels).loss  # labels (B, T): shifted right inside, -100 on padding
        tokens = self.lm.get_input_embeddings()(input_ids)  # (B, T, D)
        embeds = torch.cat([prefix.to(tokens.dtype), tokens], dim=1)  # (B, P + T, D)
        mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1)  # (B, P + T)
        head = self.lm.get_output_embeddings()
        if head is None or self.lm.config.model_type not in LEAN_HEAD_MODELS:
            labels = torch.cat([labels.new_full((B, P), -100), labels], dim=1)  # (B, P + T)
            return self.lm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
        hidden = self.lm.base_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
        # the hidden state at P - 1 + t predicts caption token t; made one contiguous (B * T, D) matrix first, so
        # the head is one large matmul (on the strided 3-D slice torch runs B small ones, ~2.5x slower on a CPU)
        hidden = hidden[:, P - 1:-1].reshape(-1, hidden.shape[-1])  # (B * T, D)
        return F.cross_entropy(head(hidden).float(), labels.flatten(), ignore_index=-100)  # logits (B * T, vocab)

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


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """Draw random numbers from `seed`, leaving the caller's RNG state as it was; None: the global RNG."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
