"""The stand-in GPT-2, its tokenizer, and the stand-in Marian and T5 models, in `from_pretrained` layout.

The tokenizer is a byte-level BPE (so any text round-trips), trained with `tokenizers` on everyday caption
sentences generated from the course's own word lists (`utils/standin_words.py`: about 2,200 words, nothing
downloaded) and on the private drawings' captions, saved as GPT-2's `vocab.json` + `merges.txt`. Its
merges run out at about 3,700 tokens: every listed word is one token or two, so a newcomer's or a
Flickr-style caption takes about as many tokens as with the real GPT-2 (tests/test_standins.py measures
tokens per word on hand-written captions).

The stand-in GPT-2 has the real GPT-2's 12 blocks at a tiny width (64, 4 heads), so that
`freeze="frozen"`, `"partial"` (the last two blocks learn) and `"full"` mean what they mean for the real
one. It is PRE-FITTED, as the real GPT-2 is pre-trained, for a few hundred steps of next-token loss on
text alone: pairs of captions of the same private drawing joined by an end-of-text token ("a small red
circle on the left ... .<|endoftext|>There is a little red circle ..."). So it knows those captions'
grammar and words, and it has learned to restate what the text before it said, the in-context skill a
soft prompt relies on; what it cannot know is the image. The everyday words are in its vocabulary but
learned only when a run trains on them (fitting it on the generated everyday captions as well cost
twice the time and made it restate less well in the time we give it). It is a teaching stand-in: the
real GPT-2 knows English.

The Marian and T5 stand-ins keep random weights: they show the mechanics only.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import torch

from .files import write_json
from .standins import EOS, announce, folder, lr_scale, private_drawings, private_torch_state
from .standin_words import caption_corpus, vocabulary

# GPT-2's 12 blocks at width 64. No dropout: it would only slow the short fit and the course's training.
_GPT2 = dict(n_positions=256, n_embd=64, n_layer=12, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
# How it is pre-fitted (see `_fit_gpt2`): next-token loss on pairs of captions of the private drawings.
_GPT2_FIT = dict(steps=300, batch=32, lr=6e-3, warmup=20, weight_decay=0.01, seed=12345)
# The tokenizer's English (utils/standin_words.py): generated everyday caption sentences, with the private
# drawings' captions; BPE merges up to _TOKENIZER_VOCAB tokens (the corpus runs out of pairs seen twice
# at about 3,700: every listed word is then one token, or two).
_TEXT = dict(sentences=40000, seed=2024)
_TOKENIZER_VOCAB = 5000

# What the Marian stand-in's tokenizer is trained on.
_CORPUS = """a photo of a dog running across the grass . two young men look at their hands in the yard .
a man in a red shirt rides a bicycle down the street . a woman is cooking food in the kitchen .
a plate of pasta with tomato sauce and cheese . a bowl of soup next to a piece of bread .
children are playing in the park near the water . the cat is sleeping on a small white bed .
a group of people stand on the left side of the picture . there is a large blue car at the top .
a little green triangle sits at the bottom of the image , on a dark background .
an orange square in the centre , a yellow circle on the right , a purple cross on the left !
what is in this picture ? it shows one shape , small or large , in some colour and place ."""



def gpt2_dir(models_dir: str | Path | None = None) -> Path:
    """Folder holding the stand-in GPT-2 and its tokenizer in `from_pretrained` layout, built (and
    pre-fitted, see the module's docstring) on first use in `models_dir` (default: `standins_home()`)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    where = folder(models_dir)
    dest = where / "standin-gpt2"
    if (dest / "standin.json").is_file():
        return dest
    start = announce("stand-in GPT-2", where, "45 s")
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _, drawings = private_drawings(where)
    everyday = caption_corpus(_TEXT["sentences"], _TEXT["seed"])
    tokenizer = _train_tokenizer(tmp, everyday + [c for cs in drawings.values() for c in cs])
    with private_torch_state():
        config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                            eos_token_id=tokenizer.eos_token_id, **_GPT2)
        model = GPT2LMHeadModel(config)
        losses = _fit_gpt2(model, _caption_pairs(drawings, tokenizer))
    model.save_pretrained(tmp)
    write_json(tmp / "standin.json", {"standin": True, "what": "tiny GPT-2 (12 blocks, width 64) pre-fitted on "
                                      "pairs of generated captions, for offline runs", "config": _GPT2,
                                      "fit": _GPT2_FIT, "text": _TEXT, "loss_first_last": losses,
                                      "tokenizer_vocab": len(tokenizer)})
    if (dest / "standin.json").is_file():  # another process built it meanwhile: the same weights
        shutil.rmtree(tmp, ignore_errors=True)
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    print(f"stand-in GPT-2 built in {time.perf_counter() - start:.0f} s (next-token loss {losses[0]:.2f} -> "
          f"{losses[1]:.2f}): {dest}", file=sys.stderr, flush=True)
    return dest


def _rows(pairs: list[list[int]]) -> torch.Tensor:
    out = torch.full((len(pairs), max(map(len, pairs))), -1, dtype=torch.long)
    for i, row in enumerate(pairs):
        out[i, :len(row)] = torch.tensor(row)
    return out


def _caption_pairs(captions: dict[str, list[str]], tokenizer) -> torch.Tensor:
    """Token rows `EOS caption EOS other caption of the same drawing EOS`, padded with -1, from the private
    drawings (the same set the stand-in CLIP is fitted on)."""
    eos = tokenizer.eos_token_id
    return _rows([[eos, *tokenizer(cs[i])["input_ids"], eos, *tokenizer(cs[(i + 1) % len(cs)])["input_ids"], eos]
                  for cs in captions.values() for i in range(len(cs))])


def _fit_gpt2(model, rows: torch.Tensor) -> tuple[float, float]:
    """Next-token loss on `rows` (padding -1), AdamW with warm-up and cosine decay, in place,
    deterministically; returns the loss of the first step and the mean of the last ten.

    The softmax runs over the tokens the rows hold only (about 60 of the 3,700), as the stand-in CLIP's
    fit trains only the words that occur: over all of them, Adam moves every row of the (tied) embedding
    every step, and in 300 steps the model learned to restate the text before it far less well (0.40 of
    the facts against 0.59). The other tokens keep their initial embeddings until a run trains them."""
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    fit = _GPT2_FIT
    gen = torch.Generator().manual_seed(fit["seed"])
    used = torch.unique(rows[rows >= 0])
    position = torch.full((model.config.vocab_size,), -100, dtype=torch.long)
    position[used] = torch.arange(len(used))  # a token's place among `used`; -100: none
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=fit["weight_decay"]), dict(params=rest, weight_decay=0.0)],
                            lr=fit["lr"], betas=(0.9, 0.98))
    steps, warmup, losses = fit["steps"], fit["warmup"], []
    model.train()
    for step in tqdm(range(steps), desc="fitting the stand-in GPT-2", unit="step", mininterval=2, leave=False):
        for group in opt.param_groups:
            group["lr"] = fit["lr"] * lr_scale(step, steps, warmup)
        batch = rows[torch.randint(0, len(rows), (fit["batch"],), generator=gen)]
        batch = batch[:, :int((batch >= 0).sum(1).max())]  # up to the longest row of this batch
        mask = batch >= 0
        hidden = model.transformer(input_ids=batch.clamp(min=0), attention_mask=mask.long()).last_hidden_state
        logits = hidden[:, :-1] @ model.transformer.wte.weight[used].T  # (B, T - 1, len(used)): GPT-2's tied head
        targets = position[batch[:, 1:].clamp(min=0)].masked_fill(~mask[:, 1:], -100)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return round(losses[0], 4), round(sum(losses[-10:]) / len(losses[-10:]), 4)


def _train_tokenizer(dest: Path, texts: list[str]):
    """Byte-level BPE on `texts` and on the listed words themselves, saved and reloaded as a GPT-2
    tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Tokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts + [" ".join(vocabulary())] * 2, vocab_size=_TOKENIZER_VOCAB,
                            min_frequency=2, special_tokens=[EOS], show_progress=False)
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

    dest = folder(models_dir) / "standin-marian"
    if (dest / "standin.json").is_file():
        return dest
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()  # as sentencepiece splits
    bpe.train_from_iterator(_CORPUS.splitlines(), trainers.BpeTrainer(
        vocab_size=_MARIAN_VOCAB, special_tokens=["</s>", "<unk>", "<pad>"], show_progress=False))
    bpe.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    with private_torch_state():
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

    dest = folder(models_dir) / "standin-t5"
    if (dest / "standin.json").is_file():
        return dest
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir(models_dir))
    eos = tokenizer.eos_token_id
    with private_torch_state():
        model = T5ForConditionalGeneration(T5Config(vocab_size=len(tokenizer), pad_token_id=eos, eos_token_id=eos,
                                                    decoder_start_token_id=eos, **_T5))
    with atomic_dir(dest) as tmp:
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)
        write_json(tmp / "standin.json", {"standin": True, "what": "tiny random-init T5 for offline runs",
                                          "config": _T5})
    return dest
