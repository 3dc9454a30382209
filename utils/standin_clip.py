"""The stand-in CLIP: a tiny `clip.model.CLIP` saved as a TorchScript archive, as OpenAI publishes CLIP
(openai-clip 1.0.1 cannot rebuild a model from a plain state-dict file, only from an archive), so that
`clip.load(path, jit=False)` runs its real code on it.

The ViT stand-in's image embedding has two parts (EMBED_DIM = 64 + 48 = 112 dimensions):

- dimensions 0-63, FITTED: a 2-layer ViT (16x16 patches, 64 of its 128 channels) and a 1-layer text tower
  fitted with CLIP's contrastive loss on private drawings of the course's kind (seed 12345, never the
  course's own set): they carry shape, colour, position, size and background of such drawings;
- dimensions 64-111, FIXED: the mean colour of each of the 4x4 = 16 image cells of 16x16 pixels (R, G, B
  in CLIP's normalised units), for ANY image. They are computed by the same ViT, through weights set by
  hand and kept fixed while the rest is fitted (`_fixed_grid_pathway`): the patch embedding averages
  each patch's colour, block 1's MLP writes it into a channel of its own per cell (gated by the position
  embedding), block 2's attention pools the cells into the class token, and the projection copies them
  out. A linear function of the pixels, up to LayerNorm's per-token scale, which large constant
  "ballast" channels hold nearly fixed: on random images the 48 dimensions equal 1.5 x the cells' mean
  colours to within 0.001. So what a picture shows where (which colours, light and dark,
  coarse layout) is in the embedding whatever the picture, and any region grid coarser than 4x4 is a
  linear function of it (tests/test_standins.py probes 3x3 grids of random colours).

The ResNet stand-in for RN* backbones keeps random (seeded) weights: it is only there so that RN*
backbones load and mismatches can be shown.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import warnings
from pathlib import Path

import torch

from .files import atomic_path
from .standins import PRIVATE_DRAWINGS, announce, folder, lr_scale, private_drawings, private_torch_state
from .standin_names import STANDIN_CLIP_DIM, STANDIN_PREFIX, clip_standin_name

FITTED, GRID = 64, 4  # fitted channels (and embedding dimensions); cells per side of the fixed colour grid
GRID_DIMS = 3 * GRID * GRID  # 48 fixed embedding dimensions: R, G, B of each cell
EMBED_DIM = FITTED + GRID_DIMS
assert EMBED_DIM == STANDIN_CLIP_DIM

# Tiny shapes: a ViT or a ModifiedResNet of CLIP's own classes. Widths are multiples of 64 because
# clip.model.build_model infers heads as width // 64 (the ViT's 128 channels: 2 heads, one fitted, one
# the fixed pathway's); the ResNet's attention-pool width is 32 x width. context_length and vocab_size
# stay CLIP's, so `clip.tokenize` feeds the text tower as it is.
_CLIP_VIT = dict(embed_dim=EMBED_DIM, image_resolution=64, vision_layers=2, vision_width=2 * FITTED,
                 vision_patch_size=16, context_length=77, vocab_size=49408, transformer_width=64,
                 transformer_heads=1, transformer_layers=1)
_CLIP_RN = dict(_CLIP_VIT, vision_layers=(1, 1, 1, 1), vision_width=8, vision_patch_size=None)

# How the ViT stand-in is fitted (see `_fit_clip`). group_weights: how often a batch's groups vary shape,
# colour, position, size or background. image_delay: steps during which only the text tower learns.
_CLIP_FIT = dict(PRIVATE_DRAWINGS, steps=600, batch=64, lr=1e-3, warmup=20, weight_decay=0.1,
                 group_fraction=1.0, group_weights=(0.4, 0.05, 0.35, 0.15, 0.05), image_delay=40)

# The fixed pathway's channels, after the 64 fitted ones (see `_fixed_grid_pathway`).
_REF, _RGB, _COL, _ROW = 64, 65, 68, 72  # a channel always 0; patch mean colour; one-hot column; one-hot row
_CELLS = 76  # 48 channels: R, G, B of cell (row, col) at _CELLS + 3 * (4 * row + col) + c
_BALLAST = 124  # 4 channels at +-_BALLAST_VALUE: they hold every LayerNorm's scale nearly fixed
_BALLAST_VALUE = 60.0
_GATE, _OFFSET = 40.0, 8.0  # the MLP gate's weight on position, and the offset that keeps QuickGELU linear
_GRID_SCALE = 1.5  # the fixed dimensions' scale in the embedding: their spread across images near the fitted ones'


def clip_archive(backbone: str, models_dir: str | Path | None = None) -> Path:
    """Path of the stand-in CLIP TorchScript archive for `backbone`, built on first use in `models_dir`
    (default: `standins_home()`, once per machine).

    The ViT stand-in is fitted then (about half a minute on one CPU core, on drawings it generates in
    `models_dir / CLIP_DATA`; see the module's docstring); the ResNet one keeps random weights. Both are
    deterministic: building again gives the same weights.
    """
    kind = clip_standin_name(backbone).removeprefix(STANDIN_PREFIX)
    where = folder(models_dir)
    path = where / f"standin-clip-{kind.lower()}.pt"
    if path.is_file():
        return path
    start = announce(f"stand-in CLIP ({kind})", where, "40 s" if kind != "RN" else "5 s")
    model = _standin_clip(kind, where)
    n = model.visual.input_resolution
    image = torch.zeros(1, 3, n, n)
    text = torch.zeros(1, model.context_length, dtype=torch.long)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # "converting a tensor to a Python index"
        warnings.filterwarnings("ignore", r"`torch\.jit\.", FutureWarning)  # torch 2.10+: "trace is deprecated"
        traced = torch.jit.trace(model, (image, text), check_trace=False)
    with atomic_path(path) as tmp:
        traced.save(str(tmp))
    print(f"stand-in CLIP ({kind}) built in {time.perf_counter() - start:.0f} s: {path}", file=sys.stderr, flush=True)
    return path


def _standin_clip(kind: str, models_dir: Path):
    import clip.model

    with private_torch_state():
        model = clip.model.CLIP(**(_CLIP_RN if kind == "RN" else _CLIP_VIT))
        if kind != "RN":
            data = _clip_training_set(models_dir, model.visual.input_resolution)
            with torch.no_grad():
                _whitened_patch_embedding(model.visual, data.pixels[:1000])
            _fit_clip(model, data, _fixed_grid_pathway(model.visual))
    return model.eval()


# ---------------------------------------------------------------------------------------------
# The fixed pathway: the mean colour of each 16x16 cell, carried to embedding dimensions 64-111


def _fixed_grid_pathway(visual) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Set the fixed pathway's weights in `visual` (a 2-layer, 128-channel VisionTransformer) and return
    them as (parameter, mask, values) to pin after every optimiser step of the fit.

    Channel by channel, for a patch token at (row, col) of the 4x4 grid (the class token has 0 in all but
    the ballast):
    - patch embedding: channels 65-67 = the patch's mean R, G, B; position embedding: channel 68 + col and
      72 + row = 1; channels 124-127 = +-60 for every token (the ballast: every LayerNorm's variance is
      then about 60^2 / 32 whatever the image, so its scale s is nearly constant, and the LayerNorms'
      gains of s0 = 60 / sqrt(32) undo it: each LayerNorm is then nearly "subtract the token's mean").
      Every fixed read below weighs channels with weights summing to 0 (against channel 64, always 0),
      so the mean that LayerNorm subtracts cancels.
    - block 1, MLP: two hidden units per cell and colour, 256 + 2 * (3 * (4 * row + col) + c) and the next,
      compute QuickGELU(8 + colour_c + 40 * (column match + row match - 2)) and the same without colour_c;
      their difference, written to channel 76 + 3 * (4 * row + col) + c, is colour_c at the cell's own
      patch (QuickGELU is the identity there to 0.1%) and 0 at every other token.
    - block 2, attention head 2 (channels 64-127): queries and keys 0, so the class token averages the 17
      tokens; values: channels 76-123; output x17: the class token's channels 76-123 then hold each cell's
      mean colour.
    - projection: channel 76 + i -> embedding dimension 64 + i, times 1.5; the fitted channels never
      reach dimensions 64-111, and the fixed ones never reach 0-63.
    The fitted part (channels 0-63, hidden units 0-255, attention head 1) reads every channel but the
    ballast and writes only channels 0-63.
    """
    width = visual.conv1.out_channels
    fixed = slice(FITTED, width)
    s0 = _BALLAST_VALUE * math.sqrt((width - _BALLAST) / width)
    pins = []

    def pin(param, mask, values):
        with torch.no_grad():
            param[mask] = values[mask]
        pins.append((param, mask, values.clone()))

    def rows(param, which):
        mask = torch.zeros_like(param, dtype=torch.bool)
        mask[which] = True
        return mask

    p = visual.conv1.kernel_size[0]
    conv = visual.conv1.weight.detach().clone()
    conv[fixed] = 0
    for c in range(3):
        conv[_RGB + c, c] = 1.0 / (p * p)
    pin(visual.conv1.weight, rows(conv, fixed), conv)
    cls = visual.class_embedding.detach().clone()
    cls[fixed] = 0
    pin(visual.class_embedding, rows(cls, fixed), cls)
    pos = visual.positional_embedding.detach().clone()
    pos[:, fixed] = 0
    for i in range(GRID * GRID):
        row, col = divmod(i, GRID)
        pos[1 + i, _COL + col] = pos[1 + i, _ROW + row] = 1.0
    pos[:, _BALLAST:] = torch.tensor([1.0, -1.0] * ((width - _BALLAST) // 2)) * _BALLAST_VALUE
    mask = torch.zeros_like(pos, dtype=torch.bool)
    mask[:, fixed] = True
    pin(visual.positional_embedding, mask, pos)

    def layer_norm(ln, keep_ballast: bool):
        weight = ln.weight.detach().clone()
        weight[:] = s0  # fitted channels start at s0 too: the fitted part reads its channels at their scale
        if not keep_ballast:
            weight[_BALLAST:] = 0
        pin(ln.weight, rows(weight, fixed), weight)
        pin(ln.bias, rows(ln.bias, fixed), torch.zeros_like(ln.bias))
        with torch.no_grad():
            ln.weight[:FITTED] = s0

    layer_norm(visual.ln_pre, keep_ballast=True)  # its output is the stream: the ballast stays in it
    layer_norm(visual.ln_post, keep_ballast=False)
    hidden = visual.transformer.resblocks[0].mlp.c_fc.out_features
    for b, block in enumerate(visual.transformer.resblocks):
        layer_norm(block.ln_1, keep_ballast=False)
        layer_norm(block.ln_2, keep_ballast=False)
        attn = block.attn
        w_in = attn.in_proj_weight.detach().clone()
        head2 = [range(k * width + FITTED, (k + 1) * width) for k in range(3)]  # head 2's q, k, v rows
        head2 = [r for rs in head2 for r in rs]
        w_in[head2] = 0
        out = attn.out_proj.weight.detach().clone()
        out[fixed] = 0
        out[:, fixed] = 0
        out_bias = attn.out_proj.bias.detach().clone()
        out_bias[fixed] = 0
        if b == len(visual.transformer.resblocks) - 1:
            for i in range(GRID_DIMS):
                w_in[2 * width + FITTED + i, _CELLS + i] = 1.0
                w_in[2 * width + FITTED + i, _REF] = -1.0
                out[_CELLS + i, FITTED + i] = float(GRID * GRID + 1)  # the average over 17 tokens, undone
        pin(attn.in_proj_weight, rows(w_in, head2), w_in)
        pin(attn.in_proj_bias, rows(attn.in_proj_bias, head2), torch.zeros_like(attn.in_proj_bias))
        mask = torch.zeros_like(out, dtype=torch.bool)
        mask[fixed] = True
        mask[:, fixed] = True
        pin(attn.out_proj.weight, mask, out)
        pin(attn.out_proj.bias, rows(out_bias, fixed), out_bias)

        gates = slice(hidden // 2, hidden)
        fc, fc_bias = block.mlp.c_fc.weight.detach().clone(), block.mlp.c_fc.bias.detach().clone()
        fc[gates], fc_bias[gates] = 0, 0
        proj, proj_bias = block.mlp.c_proj.weight.detach().clone(), block.mlp.c_proj.bias.detach().clone()
        proj[fixed], proj[:, gates], proj_bias[fixed] = 0, 0, 0
        if b == 0:
            for i in range(GRID * GRID):
                row, col = divmod(i, GRID)
                for c in range(3):
                    # two units with the same gate, one reading the colour: their difference is the colour
                    # at the cell's own patch and 0 elsewhere, with no offset left in the stream
                    unit, channel = hidden // 2 + 2 * (3 * i + c), _CELLS + 3 * i + c
                    fc[unit, _RGB + c] = 1.0
                    for u in (unit, unit + 1):
                        fc[u, _COL + col] = fc[u, _ROW + row] = _GATE
                        fc[u, _REF] = -(fc[u, _RGB + c] + 2 * _GATE)
                        fc_bias[u] = _OFFSET - 2 * _GATE
                    proj[channel, unit], proj[channel, unit + 1] = 1.0, -1.0
        pin(block.mlp.c_fc.weight, rows(fc, gates), fc)
        pin(block.mlp.c_fc.bias, rows(fc_bias, gates), fc_bias)
        mask = torch.zeros_like(proj, dtype=torch.bool)
        mask[fixed] = True
        mask[:, gates] = True
        pin(block.mlp.c_proj.weight, mask, proj)
        pin(block.mlp.c_proj.bias, rows(proj_bias, fixed), proj_bias)

    proj = visual.proj.detach().clone()
    proj[fixed] = 0
    proj[:, FITTED:] = 0
    for i in range(GRID_DIMS):
        proj[_CELLS + i, FITTED + i] = _GRID_SCALE
        proj[_REF, FITTED + i] = -_GRID_SCALE
    mask = torch.zeros_like(proj, dtype=torch.bool)
    mask[fixed] = True
    mask[:, FITTED:] = True
    pin(visual.proj, mask, proj)
    return pins


def _pin(pins) -> None:
    with torch.no_grad():
        for param, mask, values in pins:
            param[mask] = values[mask]


# ---------------------------------------------------------------------------------------------
# Fitting the ViT stand-in: CLIP's contrastive loss on a private set of the course's drawings


@dataclasses.dataclass
class _TrainingSet:
    pixels: torch.Tensor  # (N, 3, R, R) float, exactly what clip's preprocess makes of each image
    tokens: torch.Tensor  # (N, 3, L) long, clip.tokenize of the three captions, cut after the longest
    keys: list  # per image: its (shape, colour, position, size, background) read from its captions, or None


def _clip_training_set(models_dir: Path, resolution: int) -> _TrainingSet:
    """The private drawings (generated on first use), preprocessed and tokenized once, all in memory."""
    import clip
    from PIL import Image

    where, captions = private_drawings(models_dir)
    names = list(captions)
    preprocess = clip.clip._transform(resolution)
    images = []
    for name in names:
        with Image.open(where / "images" / name) as im:
            images.append(preprocess(im))
    texts = sorted({c for name in names for c in captions[name]})
    row = {c: i for i, c in enumerate(texts)}
    tokens = clip.tokenize(texts)
    tokens = tokens[:, :int((tokens != 0).sum(1).max())]  # the rest is padding, never attended to
    picks = [[row[c] for c in (captions[n] * 3)[:3]] for n in names]
    return _TrainingSet(torch.stack(images), tokens[torch.tensor(picks)], [caption_key(captions[n]) for n in names])


def caption_key(captions: list[str]):
    """(shape, colour, position, size, background) that all of an image's captions state, else None."""
    from .embedded import EMBEDDED_ATTRIBUTES, embedded_attributes

    keys = {tuple(embedded_attributes(c)[a] for a in EMBEDDED_ATTRIBUTES) for c in captions}
    key = keys.pop() if len(keys) == 1 else None
    return None if key is None or None in key else key


def _fit_clip(model, data: _TrainingSet, pins) -> None:
    """Fit both towers with CLIP's symmetric InfoNCE loss, in place, deterministically, the fixed pathway's
    weights (`pins`) set back after every step.

    A plain run (random init, random batches) stalls for hundreds of steps with the loss near
    log(batch / 2): at the start the background dominates every image embedding and the template words
    every caption embedding, and both towers collapse onto background alone, a saddle point. What makes
    this tiny CLIP learn in a few hundred CPU steps instead:
    - the patch embedding starts as the whitened principal components of the training patches, so every
      direction of pixel variation weighs the same, not just the background's; the ViT's position
      embedding starts at unit scale, so the initial image embeddings already tell position and size;
    - the text attention starts uniform (the text tower starts as a bag of words), and for the first
      `image_delay` steps only the text tower (and the temperature) learns: it learns to read the initial
      image embeddings, position included, before the image tower moves; without this delay the first
      updates wash position out of the image embeddings and it takes most of the run to come back;
    - batches are made of groups of images alike in all attributes but one, one image per value of that
      one (`group_weights`: shape, colour, position, size, background), so each batch holds negatives
      that only that attribute tells apart;
    - images whose captions name the same attributes (there are only 600 combinations) are positives
      of each other's captions, not false negatives;
    - images are preprocessed and captions tokenized once; the text runs up to the longest caption only
      (with the causal mask the padding after it changes nothing), and only the embedding rows of the
      words that occur are trained (the others would get no gradient anyway).
    """
    import torch.nn.functional as F

    fit = _CLIP_FIT
    gen = torch.Generator().manual_seed(fit["seed"])
    length = data.tokens.shape[-1]
    combos = {k: i for i, k in enumerate(sorted({k for k in data.keys if k is not None}))}
    key_id = torch.tensor([combos[k] if k is not None else len(combos) + i for i, k in enumerate(data.keys)])
    sampler = _GroupSampler(data.keys, gen)
    visual = model.visual
    with torch.no_grad():
        for block in model.transformer.resblocks:  # uniform causal attention: the text starts as a bag of words
            block.attn.in_proj_weight[:2 * model.transformer.width].zero_()
    vocab, tokens = torch.unique(data.tokens, return_inverse=True)  # CLIP's 49408 rows -> the few words used
    eot = tokens.argmax(-1)  # the end-of-text token has the highest id, before and after renumbering
    words = torch.nn.Parameter(model.token_embedding.weight.detach()[vocab].clone())
    model.token_embedding.weight.requires_grad_(False)
    full_mask = model.build_attention_mask()

    def encode_text(rows, ends):  # = model.encode_text on the first `length` tokens
        x = words[rows] + model.positional_embedding[:length]
        x = model.ln_final(model.transformer(x.permute(1, 0, 2)).permute(1, 0, 2))
        return x[torch.arange(len(rows)), ends] @ model.text_projection

    decay = [p for name, p in model.named_parameters()
             if p.requires_grad and p.ndim >= 2 and "embedding" not in name]
    no_decay = [p for p in [*model.parameters(), words] if p.requires_grad and all(p is not q for q in decay)]
    image = {id(p) for p in visual.parameters()}
    opt = torch.optim.AdamW([dict(params=[p for p in params if (id(p) in image) == is_image], weight_decay=wd, image=is_image)
                             for params, wd in ((decay, fit["weight_decay"]), (no_decay, 0.0)) for is_image in (True, False)],
                            lr=fit["lr"], betas=(0.9, 0.98), eps=1e-6)
    steps, warmup = fit["steps"], fit["warmup"]
    for block in model.transformer.resblocks:
        block.attn_mask = full_mask[:length, :length]
    model.train()
    try:
        for step in range(steps):
            scale = lr_scale(step, steps, warmup)
            late = step - fit["image_delay"]
            image_scale = 0.0 if late < 0 else min(1.0, (late + 1) / warmup) * scale  # its own warm-up, late
            for group in opt.param_groups:
                group["lr"] = fit["lr"] * (image_scale if group["image"] else scale)
            idx = sampler.batch(fit["batch"], fit["group_fraction"], fit["group_weights"])
            caption = torch.randint(0, 3, (len(idx),), generator=gen)
            image_emb = F.normalize(model.encode_image(data.pixels[idx]), dim=-1)
            text_emb = F.normalize(encode_text(tokens[idx, caption], eot[idx, caption]), dim=-1)
            logits = model.logit_scale.exp() * image_emb @ text_emb.T
            same = (key_id[idx, None] == key_id[None, idx]).float()
            target = same / same.sum(1, keepdim=True)  # symmetric: the same for both directions
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _pin(pins)
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))  # as CLIP does
    finally:
        for block in model.transformer.resblocks:
            block.attn_mask = full_mask
        with torch.no_grad():
            model.token_embedding.weight[vocab] = words.detach()
        model.token_embedding.weight.requires_grad_(True)
    model.eval()


def _whitened_patch_embedding(visual, pixels: torch.Tensor, eps: float = 1e-2) -> None:
    """Start the fitted channels of the ViT's patch embedding as the whitened top principal components of
    the images' patches (centred through the position embedding, as the patch convolution has no bias),
    and their position embedding at unit scale, comparable to what the patches then give."""
    import torch.nn.functional as F

    conv = visual.conv1
    p = conv.kernel_size[0]
    patches = F.unfold(pixels, p, stride=p).transpose(1, 2).reshape(-1, 3 * p * p).double()
    mean = patches.mean(0)
    values, vectors = torch.linalg.eigh((patches - mean).T @ (patches - mean) / len(patches))
    top = vectors[:, -FITTED:].flip(1) / (values[-FITTED:].flip(0) + eps).sqrt()
    conv.weight[:FITTED] = top.T.reshape(FITTED, 3, p, p).float()
    visual.positional_embedding[:, :FITTED].normal_(0.0, 1.0)
    visual.positional_embedding[1:, :FITTED] -= (top.T @ mean).float()


class _GroupSampler:
    """Batches of small groups: images alike in all attributes but one, one image per value of that one
    (the attribute drawn with `weights`), filling `group_fraction` of the batch; the rest at random.
    Images whose captions could not be read are only ever drawn at random."""

    def __init__(self, keys: list, gen: torch.Generator):
        self.keys, self.gen = keys, gen
        self.known = [i for i, k in enumerate(keys) if k is not None]
        self.by_key: dict[tuple, list[int]] = {}
        for i in self.known:
            self.by_key.setdefault(keys[i], []).append(i)
        self.values = [sorted({k[a] for k in self.by_key}) for a in range(5)]

    def _randint(self, high: int) -> int:
        return int(torch.randint(0, high, (1,), generator=self.gen))

    def batch(self, size: int, group_fraction: float, weights: tuple[float, ...]) -> torch.Tensor:
        chosen: list[int] = []
        while self.known and len(chosen) < int(size * group_fraction):
            anchor = self.keys[self.known[self._randint(len(self.known))]]
            attr = int(torch.multinomial(torch.tensor(weights, dtype=torch.float), 1, generator=self.gen))
            for value in self.values[attr]:
                same = self.by_key.get(anchor[:attr] + (value,) + anchor[attr + 1:])
                if same:
                    chosen.append(same[self._randint(len(same))])
        chosen = chosen[:int(size * group_fraction)]
        rest = torch.randint(0, len(self.keys), (size - len(chosen),), generator=self.gen)
        return torch.cat([torch.tensor(chosen, dtype=torch.long), rest])
