"""An encoder-decoder LM (the T5 family, as seed 001 trained with T5/T0) as the captioner's language model:
the prefix goes into the encoder, the caption is decoded. Loaded, frozen, trained, saved, loaded back and
decoding on the tiny stand-in T5 (real T5 classes, built offline and read by from_pretrained)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import run_cli
from utils.captioner import Captioner
from utils.config import ModelConfig, RuntimeConfig, standin_preset
from utils.model import transformer_blocks
from utils.sources import load_language_model
from utils.training import train

pytestmark = pytest.mark.usefixtures("one_thread")
OFFLINE = RuntimeConfig(offline=True, device="cpu")


def test_a_t5_name_offline_loads_the_stand_in_t5(models_dir):
    lm, tokenizer, name = load_language_model("google/flan-t5-small", offline=True)
    assert type(lm).__name__ == "T5ForConditionalGeneration" and lm.config.is_encoder_decoder
    assert name == "standin:t5"
    blocks = transformer_blocks(lm)  # the encoder's blocks, then the decoder's
    assert len(blocks) == lm.config.num_layers + lm.config.num_decoder_layers
    assert blocks[0] is lm.encoder.block[0] and blocks[-1] is lm.decoder.block[-1]


def test_partial_freezing_trains_the_first_encoder_and_last_decoder_blocks(models_dir):
    lm, tokenizer, _ = load_language_model("t5-small", offline=True)
    model = Captioner(ModelConfig(lm="standin:t5", clip_dim=64, prefix_length=4, mapper="mlp", freeze="partial",
                                  train_first_blocks=1, train_last_blocks=1), lm, tokenizer)
    learns = lambda m: any(p.requires_grad for p in m.parameters())  # noqa: E731
    assert learns(lm.encoder.block[0]) and not learns(lm.encoder.block[1])
    assert learns(lm.decoder.block[-1]) and not learns(lm.decoder.block[0])
    assert learns(lm.decoder.final_layer_norm) and "LM blocks 0, 3" in model.describe()


def test_the_loss_is_the_decoders_cross_entropy_on_caption_tokens_only(models_dir):
    lm, tokenizer, _ = load_language_model("t5-small", offline=True)
    torch.manual_seed(0)
    model = Captioner(ModelConfig(lm="standin:t5", clip_dim=64, prefix_length=4, mapper="mlp", freeze="full"),
                      lm, tokenizer).eval()
    tokens, _ = model.encode_captions(["a red square", "a small blue circle on the left"])
    ids, mask, labels = model.pad(tokens)
    embed = torch.randn(2, 64)
    loss = model(embed, ids, mask, labels)
    # by hand: the decoder starts from its start token and predicts each caption token and EOS, padding ignored
    prefix = model.prefix(embed)
    start = torch.full((2, 1), lm.config.decoder_start_token_id)
    dec_in = torch.cat([start, ids[:, :-1]], dim=1)
    logits = lm(inputs_embeds=prefix, attention_mask=torch.ones(2, 4, dtype=torch.long),
                decoder_input_ids=dec_in).logits
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, want)


@pytest.mark.slow
def test_a_t5_captioner_trains_saves_loads_and_captions(small_cache, data_dir, tmp_path):
    model_cfg, train_cfg = standin_preset()
    result = train(small_cache, dataclasses.replace(model_cfg, lm="t5-small", mapper="mlp"),
                   dataclasses.replace(train_cfg, epochs=3, lr=3e-3, warmup_steps=5, out_dir=str(tmp_path / "run")),
                   OFFLINE, data_dir)
    losses = [r["loss"] for r in result.history["train"]]
    assert losses[-1] < 0.7 * losses[0], losses  # it learns
    captioner = Captioner.from_pretrained(result.bundle)
    assert type(captioner.lm).__name__ == "T5ForConditionalGeneration" and captioner.config.lm == "standin:t5"
    feats = torch.tensor(__import__("numpy").load(small_cache / "features.npy")[:4].astype("float32"))
    greedy = captioner.generate(feats)
    assert all(isinstance(c, str) and c for c in greedy)
    assert captioner.generate(feats, method="beam", num_beams=3)
    assert len(captioner.generate(feats[:1], method="sample", num_return_sequences=3, seed=1)[0]) == 3
    reloaded = Captioner.from_pretrained(result.bundle)
    assert reloaded.generate(feats) == greedy  # the bundle holds the whole model
    image = sorted((data_dir / "embedded").rglob("*.png"))[0]
    out = run_cli("caption", "--model", str(result.bundle), str(image), data_dir=data_dir)
    assert image.name in out.stdout
