"""Tiny offline stand-ins for CLIP, GPT-2 and its tokenizer, loaded through the REAL loaders.

Without network (our CI, a laptop on a train) the hubs that serve CLIP and GPT-2 are out of reach.
Rather than mocking the loaders, we build miniature models of the same classes and save them in the
formats the real weights come in, so `clip.load(...)` and `from_pretrained(...)` run their real code:

- CLIP: a tiny `clip.model.CLIP` saved as a TorchScript archive, as OpenAI publishes it
  (openai-clip 1.0.1 cannot rebuild a model from a plain state-dict file, only from an archive);
- GPT-2: a tiny `GPT2LMHeadModel` saved with `save_pretrained`;
- tokenizer: a byte-level BPE (so any text round-trips) trained with `tokenizers`, saved as GPT-2's
  `vocab.json` + `merges.txt`.

None of them is a real model, and every name and message that shows them says "stand-in".

The stand-in CLIP for ViT backbones is a tiny model TRAINED briefly when it is first built: a 2-layer
ViT (16x16 patches, width 64) and a 1-layer text transformer (width 64) with 64-d embeddings, fitted
for 600 steps (batches of 64) of CLIP's own symmetric contrastive (InfoNCE) loss on a private
synthetic set of 3000 `utils.embedded.make_embedded` drawings generated with seed 12345, which the
course never uses, so the course's own images are never seen. It takes about half a minute on two CPU
cores, once per machine (see below). It learns the attributes of those drawings and the words that name them:
colour, position and background almost perfectly, size well, shape only partly (see
tests/test_standins.py for the numbers checked). That is what the course needs -- a captioner trained
on its embeddings can learn where and how big the shape is, which random weights do not carry -- and
all it knows: it is a teaching stand-in, not CLIP and not a model of photographs. The ResNet stand-in
for RN* backbones keeps random (seeded) weights: it is only there so that RN* backbones load and
mismatches can be shown, and fitting it would take three times as long.

The stand-in GPT-2 has the real GPT-2's 12 blocks at a tiny width (64, 4 heads; 0.65M parameters against
124M), so that `freeze="frozen"`, `"partial"` (the last two blocks learn) and `"full"` mean what they mean
for the real one. It is PRE-FITTED, as the real GPT-2 is pre-trained, for a few hundred steps of next-token
loss on text alone: pairs of captions of the same private drawing joined by an end-of-text token
("a small red circle on the left ... .<|endoftext|>There is a little red circle ..."). So it knows the
captions' grammar and words, and it has learned to restate what the text before it said, the in-context
skill a soft prompt relies on; what it cannot know is the image. It is a teaching stand-in: the real GPT-2
knows English, this one knows a few hundred caption words.

Both are built ONCE PER MACHINE, in `standins_home()` (a user cache folder: `$CLIPCAP_STANDINS`, else
`$XDG_CACHE_HOME/clipcap-course`, else `~/.cache/clipcap-course`), with a progress line, and every data
folder reuses them. Building takes about a minute on one core the first time.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

from .files import atomic_path, write_json
from .paths import user_cache
from .standin_names import STANDIN_PREFIX, STANDINS_ENV, clip_standin_name, is_standin  # noqa: F401

EOS = "<|endoftext|>"

# Tiny shapes: a ViT or a ModifiedResNet of CLIP's own classes. Widths are multiples of 64 because
# clip.model.build_model infers heads as width // 64; the ResNet's attention-pool width is 32 x width.
# context_length and vocab_size stay CLIP's, so `clip.tokenize` feeds the text tower as it is.
_CLIP_VIT = dict(embed_dim=64, image_resolution=64, vision_layers=2, vision_width=64, vision_patch_size=16,
                 context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                 transformer_layers=1)
_CLIP_RN = dict(_CLIP_VIT, vision_layers=(1, 1, 1, 1), vision_width=8, vision_patch_size=None)

# How the ViT stand-in is fitted (see `_fit_clip`). The data seed differs from the course's (0), so
# the course's own images are never trained on. group_weights: how often a batch's groups vary shape,
# colour, position, size or background. image_delay: steps during which only the text tower learns.
CLIP_DATA = "standin-clip-data"  # folder under models_dir holding the private training drawings
_CLIP_FIT = dict(images=3000, seed=12345, steps=600, batch=64, lr=1e-3, warmup=20, weight_decay=0.1,
                 group_fraction=1.0, group_weights=(0.4, 0.05, 0.35, 0.15, 0.05), image_delay=40)

# GPT-2's 12 blocks at width 64. No dropout: it would only slow the short fit and the course's training.
_GPT2 = dict(n_positions=256, n_embd=64, n_layer=12, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
# How it is pre-fitted (see `_fit_gpt2`): next-token loss on pairs of captions of the private drawings.
_GPT2_FIT = dict(steps=300, batch=32, lr=6e-3, warmup=20, weight_decay=0.01, seed=12345)
_STANDINS_VERSION = 2  # bump when a stand-in's recipe changes: the machine's old copies are then not used
_TOKENIZER_VOCAB = 600

# What the tokenizer is trained on: ordinary English around our captions, so BPE merges are sensible.
_CORPUS = """a photo of a dog running across the grass . two young men look at their hands in the yard .
a man in a red shirt rides a bicycle down the street . a woman is cooking food in the kitchen .
a plate of pasta with tomato sauce and cheese . a bowl of soup next to a piece of bread .
children are playing in the park near the water . the cat is sleeping on a small white bed .
a group of people stand on the left side of the picture . there is a large blue car at the top .
a little green triangle sits at the bottom of the image , on a dark background .
an orange square in the centre , a yellow circle on the right , a purple cross on the left !
what is in this picture ? it shows one shape , small or large , in some colour and place ."""


def standins_home() -> Path:
    """The folder the stand-in models are built in, once per machine, and read from by every data folder:
    `$CLIPCAP_STANDINS`, else `$XDG_CACHE_HOME/clipcap-course`, else `~/.cache/clipcap-course` (a
    `standins-v<N>` folder inside, so a course with other stand-ins never reads these)."""
    return user_cache(STANDINS_ENV) / f"standins-v{_STANDINS_VERSION}"


def _folder(models_dir: str | Path | None) -> Path:
    return Path(models_dir) if models_dir is not None else standins_home()


def _announce(what: str, where: Path, seconds: str) -> float:
    print(f"building the {what} once for this machine in {where} (about {seconds} on one CPU core; "
          "every later run reuses it)", file=sys.stderr, flush=True)
    return time.perf_counter()


def clip_archive(backbone: str, models_dir: str | Path | None = None) -> Path:
    """Path of the stand-in CLIP TorchScript archive for `backbone`, built on first use in `models_dir`
    (default: `standins_home()`, once per machine).

    The ViT stand-in is trained then (about half a minute on one CPU core, on drawings it generates
    in `models_dir / CLIP_DATA`; see the module's docstring); the ResNet one keeps random weights.
    Both are deterministic: building again gives the same weights.
    """
    kind = clip_standin_name(backbone).removeprefix(STANDIN_PREFIX)
    folder = _folder(models_dir)
    path = folder / f"standin-clip-{kind.lower()}.pt"
    if path.is_file():
        return path
    start = _announce(f"stand-in CLIP ({kind})", folder, "30 s" if kind != "RN" else "5 s")
    model = _standin_clip(kind, folder)
    n = model.visual.input_resolution
    image = torch.zeros(1, 3, n, n)
    text = torch.zeros(1, model.context_length, dtype=torch.long)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # "converting a tensor to a Python index"
        traced = torch.jit.trace(model, (image, text), check_trace=False)
    with atomic_path(path) as tmp:
        traced.save(str(tmp))
    print(f"stand-in CLIP ({kind}) built in {time.perf_counter() - start:.0f} s: {path}", file=sys.stderr, flush=True)
    return path


@contextlib.contextmanager
def _private_torch_state():
    """Seeded RNG and one CPU thread for a build, leaving the caller's RNG state and thread count as they
    were. With one thread the fitted weights do not depend on the machine's core count (another CPU or
    library version may still round differently), and it is barely slower: the tiny model's matrices
    are too small for threads to pay off, and two threads on a busy two-core machine are far slower."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def _standin_clip(kind: str, models_dir: Path):
    import clip.model

    with _private_torch_state():
        model = clip.model.CLIP(**(_CLIP_RN if kind == "RN" else _CLIP_VIT))
        if kind != "RN":
            _fit_clip(model, _clip_training_set(models_dir / CLIP_DATA, model.visual.input_resolution))
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Fitting the ViT stand-in: CLIP's contrastive loss on a private set of the course's drawings


@dataclasses.dataclass
class _TrainingSet:
    pixels: torch.Tensor  # (N, 3, R, R) float, exactly what clip's preprocess makes of each image
    tokens: torch.Tensor  # (N, 3, L) long, clip.tokenize of the three captions, cut after the longest
    keys: list  # per image: its (shape, colour, position, size, background) read from its captions, or None


def _clip_training_set(folder: Path, resolution: int) -> _TrainingSet:
    """The private drawings (generated on first use), preprocessed and tokenized once, all in memory."""
    import clip
    from PIL import Image

    from .embedded import make_embedded

    make_embedded(folder, n_images=_CLIP_FIT["images"], seed=_CLIP_FIT["seed"])
    captions: dict[str, list[str]] = {}
    with open(folder / "captions.csv", newline="", encoding="utf-8") as f:
        for name, caption in list(csv.reader(f))[1:]:
            captions.setdefault(name, []).append(caption)
    names = sorted(captions)
    preprocess = clip.clip._transform(resolution)
    images = []
    for name in names:
        with Image.open(folder / "images" / name) as im:
            images.append(preprocess(im))
    texts = sorted({c for name in names for c in captions[name]})
    row = {c: i for i, c in enumerate(texts)}
    tokens = clip.tokenize(texts)
    tokens = tokens[:, :int((tokens != 0).sum(1).max())]  # the rest is padding, never attended to
    picks = [[row[c] for c in (captions[n] * 3)[:3]] for n in names]
    return _TrainingSet(torch.stack(images), tokens[torch.tensor(picks)], [_caption_key(captions[n]) for n in names])


def _caption_key(captions: list[str]):
    """(shape, colour, position, size, background) that all of an image's captions state, else None."""
    from .embedded import EMBEDDED_ATTRIBUTES, embedded_attributes

    keys = {tuple(embedded_attributes(c)[a] for a in EMBEDDED_ATTRIBUTES) for c in captions}
    key = keys.pop() if len(keys) == 1 else None
    return None if key is None or None in key else key


def _fit_clip(model, data: _TrainingSet) -> None:
    """Fit both towers with CLIP's symmetric InfoNCE loss, in place, deterministically.

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
        _whitened_patch_embedding(visual, data.pixels[:1000])
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
            scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
            late = step - fit["image_delay"]
            image_scale = 0.0 if late < 0 else min(1.0, (late + 1) / warmup) * scale
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
    """Start the ViT's patch embedding as the whitened top principal components of the images' patches
    (centred through the position embedding, as the patch convolution has no bias), and its position
    embedding at unit scale, comparable to what the patches then give."""
    import torch.nn.functional as F

    conv, width = visual.conv1, visual.conv1.out_channels
    p = conv.kernel_size[0]
    patches = F.unfold(pixels, p, stride=p).transpose(1, 2).reshape(-1, 3 * p * p).double()
    mean = patches.mean(0)
    values, vectors = torch.linalg.eigh((patches - mean).T @ (patches - mean) / len(patches))
    top = vectors[:, -width:].flip(1) / (values[-width:].flip(0) + eps).sqrt()
    conv.weight.copy_(top.T.reshape(width, 3, p, p).float())
    visual.positional_embedding.normal_(0.0, 1.0)
    visual.positional_embedding[1:] -= (top.T @ mean).float()


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


def gpt2_dir(models_dir: str | Path | None = None) -> Path:
    """Folder holding the stand-in GPT-2 and its tokenizer in `from_pretrained` layout, built (and
    pre-fitted, see the module's docstring) on first use in `models_dir` (default: `standins_home()`)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = _folder(models_dir)
    dest = folder / "standin-gpt2"
    if (dest / "standin.json").is_file():
        return dest
    start = _announce("stand-in GPT-2", folder, "a minute")
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = _train_tokenizer(tmp)
    with _private_torch_state():
        config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                            eos_token_id=tokenizer.eos_token_id, **_GPT2)
        model = GPT2LMHeadModel(config)
        losses = _fit_gpt2(model, _caption_pairs(folder / CLIP_DATA, tokenizer))
    model.save_pretrained(tmp)
    write_json(tmp / "standin.json", {"standin": True, "what": "tiny GPT-2 (12 blocks, width 64) pre-fitted on "
                                      "pairs of generated captions, for offline runs", "config": _GPT2,
                                      "fit": _GPT2_FIT, "loss_first_last": losses, "tokenizer_vocab": len(tokenizer)})
    if (dest / "standin.json").is_file():  # another process built it meanwhile: the same weights
        shutil.rmtree(tmp, ignore_errors=True)
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    print(f"stand-in GPT-2 built in {time.perf_counter() - start:.0f} s (next-token loss {losses[0]:.2f} -> "
          f"{losses[1]:.2f}): {dest}", file=sys.stderr, flush=True)
    return dest


def _caption_pairs(folder: Path, tokenizer) -> torch.Tensor:
    """Token rows `EOS caption EOS other caption of the same drawing EOS`, padded with -1, from the private
    drawings (generated on first use; the same set the stand-in CLIP is fitted on)."""
    from .embedded import make_embedded

    make_embedded(folder, n_images=_CLIP_FIT["images"], seed=_CLIP_FIT["seed"])
    captions: dict[str, list[str]] = {}
    with open(folder / "captions.csv", newline="", encoding="utf-8") as f:
        for name, caption in list(csv.reader(f))[1:]:
            captions.setdefault(name, []).append(caption)
    eos = tokenizer.eos_token_id
    rows = [[eos, *tokenizer(cs[i])["input_ids"], eos, *tokenizer(cs[(i + 1) % len(cs)])["input_ids"], eos]
            for name in sorted(captions) for cs in [captions[name]] for i in range(len(cs))]
    out = torch.full((len(rows), max(map(len, rows))), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row)
    return out


def _fit_gpt2(model, rows: torch.Tensor) -> tuple[float, float]:
    """Next-token loss on `rows` (padding -1), AdamW with warm-up and cosine decay, in place,
    deterministically; returns the loss of the first and of the last step."""
    from tqdm.auto import tqdm

    fit = _GPT2_FIT
    gen = torch.Generator().manual_seed(fit["seed"])
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=fit["weight_decay"]), dict(params=rest, weight_decay=0.0)],
                            lr=fit["lr"], betas=(0.9, 0.98))
    steps, warmup, losses = fit["steps"], fit["warmup"], []
    model.train()
    for step in tqdm(range(steps), desc="fitting the stand-in GPT-2", unit="step", mininterval=2, leave=False):
        scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        for group in opt.param_groups:
            group["lr"] = fit["lr"] * scale
        batch = rows[torch.randint(0, len(rows), (fit["batch"],), generator=gen)]
        batch = batch[:, :int((batch >= 0).sum(1).max())]  # up to the longest row of this batch
        mask = batch >= 0
        loss = model(input_ids=batch.clamp(min=0), attention_mask=mask.long(), labels=batch.masked_fill(~mask, -100)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return round(losses[0], 4), round(sum(losses[-10:]) / len(losses[-10:]), 4)


def _train_tokenizer(dest: Path):
    """Byte-level BPE on a small corpus, saved and reloaded as a GPT-2 tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Tokenizer

    from .embedded import EMBEDDED_ATTRIBUTES

    words = " ".join(w for values in EMBEDDED_ATTRIBUTES.values() for w in values)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_CORPUS.splitlines() + [words], vocab_size=_TOKENIZER_VOCAB,
                            min_frequency=1, special_tokens=[EOS], show_progress=False)
    dest.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(dest))  # vocab.json + merges.txt, GPT-2's own files
    tokenizer = GPT2Tokenizer.from_pretrained(dest, unk_token=EOS, bos_token=EOS, eos_token=EOS)
    tokenizer.save_pretrained(dest)
    return tokenizer


# ---------------------------------------------------------------------------------------------
# The stand-in Marian translation model (utils/translate.py): a tiny random MarianMTModel and a BPE
# tokenizer trained here, saved in `from_pretrained` layout. Its output is random words, never a
# translation; translate.py labels every line it gives so. (The real opus-mt tokenizer is a
# MarianTokenizer, which needs sentencepiece; this one is a `tokenizers` BPE, which does not.)

_MARIAN = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
               encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
               init_std=0.5)  # at 0.02 the tiny random model gives one output whatever the input
_MARIAN_VOCAB = 400


def marian_dir(models_dir: str | Path | None = None) -> Path:
    """Folder holding the stand-in Marian model and its tokenizer, built on first use (about a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import MarianConfig, MarianMTModel, PreTrainedTokenizerFast

    from .files import atomic_dir

    dest = _folder(models_dir) / "standin-marian"
    if (dest / "standin.json").is_file():
        return dest
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()  # as sentencepiece splits
    bpe.train_from_iterator(_CORPUS.splitlines(), trainers.BpeTrainer(
        vocab_size=_MARIAN_VOCAB, special_tokens=["</s>", "<unk>", "<pad>"], show_progress=False))
    bpe.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    with _private_torch_state():
        model = MarianMTModel(MarianConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                           eos_token_id=tokenizer.eos_token_id, forced_eos_token_id=tokenizer.eos_token_id,
                                           decoder_start_token_id=tokenizer.pad_token_id, **_MARIAN))
    with atomic_dir(dest) as tmp:  # a folder half written is never taken for a built one
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)
        write_json(tmp / "standin.json", {"standin": True, "what": "tiny random-init Marian model for offline runs: "
                                          "its output is random words, not a translation", "config": _MARIAN})
    return dest


# ---- stand-in T5 (an encoder-decoder language model) ------------------------------------------------
# T5's own layout at a tiny size, with the stand-in GPT-2's byte-level tokenizer (T5's sentencepiece
# vocabulary cannot be had offline): EOS doubles as padding and as the decoder's start token, as the
# real T5 uses its pad token. Random weights: it shows the mechanics of a prefix read by an encoder.
_T5 = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, dropout_rate=0.1)


def t5_dir(models_dir: str | Path | None = None) -> Path:
    """Folder holding the stand-in T5 and its tokenizer in `from_pretrained` layout, built on first use."""
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    from .files import atomic_dir

    dest = _folder(models_dir) / "standin-t5"
    if (dest / "standin.json").is_file():
        return dest
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir(models_dir))
    eos = tokenizer.eos_token_id
    with _private_torch_state():
        model = T5ForConditionalGeneration(T5Config(vocab_size=len(tokenizer), pad_token_id=eos, eos_token_id=eos,
                                                    decoder_start_token_id=eos, **_T5))
    with atomic_dir(dest) as tmp:
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)
        write_json(tmp / "standin.json", {"standin": True, "what": "tiny random-init T5 for offline runs",
                                          "config": _T5})
    return dest
