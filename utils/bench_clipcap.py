"""ClipCap's mechanics, rebuilt from what github.com/rmokady/CLIP_prefix_caption does, for the bench to
measure ours against in the same run. Nothing here is used to train or caption: only to be timed.

What is copied is how ClipCap computes, not its bugs in what it computes: its labels hid every real token 0
("!") and never taught EOS; here it trains on our labels, so both pipelines minimise the same loss and
their losses after the same number of samples can be compared.

- train.py: every caption padded (or cut) to one `max_seq_len = min(int(mean + 10 std), int(max))` of the
  data's token lengths; fp32; the LM's logits over every position (prefix and padding too), sliced, then
  cross-entropy; plain `loss.backward()`, a per-tensor AdamW loop, no clipping, `loss.item()` every step.
- parse_coco.py: one image per forward, once per caption (an image with five captions is encoded five
  times); CLIP as `clip.load` gives it: fp16 weights on a GPU, fp32 on a CPU.
- predict.py's generate2 / generate_beam: one image at a time, the whole sequence recomputed every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image


def clipcap_max_seq_len(lengths) -> int:
    """train.py's padding length: min(int(mean + 10 * std), int(max)) of the token lengths (torch's std,
    with Bessel's correction, as ClipCap computed it)."""
    lengths = torch.as_tensor(lengths, dtype=torch.float32)
    return min(int(lengths.mean() + lengths.std() * 10), int(lengths.max()))


def clipcap_pad(captioner, token_lists: list[list[int]], max_seq_len: int, device=None):
    """Every caption right-padded (or cut) to `max_seq_len`, whatever the batch: (ids, mask, labels), (B, T)."""
    B = len(token_lists)
    ids = torch.full((B, max_seq_len), captioner.tokenizer.eos_token_id, dtype=torch.long)
    mask = torch.zeros((B, max_seq_len), dtype=torch.long)
    for i, x in enumerate(token_lists):
        x = x[:max_seq_len]
        ids[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids.to(device), mask.to(device), labels.to(device)


def clipcap_loss(captioner, clip_embed, ids, mask, labels) -> torch.Tensor:
    """ClipCap's forward: the LM's logits at every position of [prefix | caption | padding], then sliced."""
    B, P = clip_embed.shape[0], captioner.config.prefix_length
    tokens = captioner.lm.get_input_embeddings()(ids)  # (B, T, D)
    embeds = torch.cat([captioner.prefix(clip_embed), tokens], 1)  # (B, P + T, D)
    mask = torch.cat([mask.new_ones(B, P), mask], 1)
    logits = captioner.lm(inputs_embeds=embeds, attention_mask=mask).logits[:, P - 1:-1]  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def clipcap_optimizer(param_groups: list[dict], lr: float) -> torch.optim.AdamW:
    """transformers' AdamW as train.py used it: one tensor at a time (no foreach, no fused kernel)."""
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in param_groups]
    return torch.optim.AdamW(groups, lr=lr, foreach=False, fused=False)


def clipcap_step(captioner, optimizer, clip_embed, ids, mask, labels, lr: float) -> float:
    """One train.py step, fp32: zero_grad, forward, backward, step, and `loss.item()` for the progress bar."""
    for group in optimizer.param_groups:  # get_linear_schedule_with_warmup's value at this step
        group["lr"] = lr
    captioner.zero_grad()
    loss = clipcap_loss(captioner, clip_embed, ids, mask, labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


@torch.no_grad()
def clipcap_encode_per_caption(model, preprocess, paths: list[str], captions_per_image: int, device) -> int:
    """parse_coco.py: for each caption, open its image, preprocess, encode it alone. Returns the encodes done."""
    done = 0
    for path in paths:
        for _ in range(captions_per_image):
            image = preprocess(Image.open(path)).unsqueeze(0).to(device)  # (1, 3, H, W)
            model.encode_image(image.to(next(model.parameters()).dtype)).cpu()
            done += 1
    return done


@torch.no_grad()
def clipcap_greedy(captioner, clip_embed: torch.Tensor, max_tokens: int) -> list[list[int]]:
    """generate2: one image at a time, the whole sequence recomputed at every step (no KV cache)."""
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
def clipcap_beam(captioner, clip_embed: torch.Tensor, max_tokens: int, beams: int = 5) -> list[list[int]]:
    """generate_beam: per image, all beams recomputed in full each step, ranked by length-averaged log-prob."""
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
                embeds, tokens = embeds.expand(beams, -1, -1), nxt[:, None]
                lengths = torch.ones(beams, device=logp.device)
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
