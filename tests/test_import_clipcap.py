"""Importing the ClipCap paper's released weights (`python -m utils import-clipcap`).

The released files are too big for a test, so each test writes a state dict in their exact key layout,
at the stand-in's size (GPT-2 width 64 instead of 768, the stand-in CLIP's 112-d embeddings instead of
512/640), stale `attn.bias` / `attn.masked_bias` buffers included, and checks our captions from the
imported weights against a direct re-implementation of ClipCap's forward pass and decoding loop below.
"""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import TouchWhenUnpickled, run_cli
from utils.captioner import Captioner
from utils.clipcap_import import ClipCapImportError, import_clipcap
from utils.config import RuntimeConfig
from utils.standin_clip import clip_archive
from utils.standin_text import gpt2_dir

OFFLINE = RuntimeConfig(offline=True, device="cpu")
CLIP_DIM, HEADS = 112, 8  # the stand-in CLIP's width; ClipCap's transformer always has 8 heads


pytestmark = pytest.mark.usefixtures("one_thread")


def _randn(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


@pytest.fixture(scope="module")
def gpt(models_dir) -> dict[str, torch.Tensor]:
    """The stand-in GPT-2's weights moved off it, as fine-tuning moves them, under ClipCap's `gpt.` keys,
    with the buffers old transformers saved. The final norm's bias leans towards ".", so that (like
    ClipCap's GPT-2, which never learned EOS) some captions end at a period and others run to the limit."""
    from transformers import GPT2LMHeadModel

    lm = GPT2LMHeadModel.from_pretrained(gpt2_dir(models_dir))
    g = torch.Generator().manual_seed(1)
    state = {f"gpt.{k}": v + _randn(g, *v.shape, scale=0.1) for k, v in lm.state_dict().items()}
    wte = state["gpt.transformer.wte.weight"]
    state["gpt.lm_head.weight"] = wte  # tied, as in the released files
    period = wte[_period_id(models_dir)]
    state["gpt.transformer.ln_f.bias"] += 1.5 * period / period.norm() ** 2
    n = lm.config.n_positions
    for i in range(lm.config.n_layer):
        state[f"gpt.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
        state[f"gpt.transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return state


def _period_id(models_dir) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gpt2_dir(models_dir)).encode(".")[0]


def mlp_file(gpt: dict, prefix_length: int = 10) -> dict[str, torch.Tensor]:
    """ClipCap's MLP checkpoint: clip_project.model.{0,2} = Linear(C, P*D/2) -> Tanh -> Linear(P*D/2, P*D)."""
    g, width = torch.Generator().manual_seed(2), gpt["gpt.transformer.wte.weight"].shape[1]
    hidden, out = prefix_length * width // 2, prefix_length * width
    return gpt | {"clip_project.model.0.weight": _randn(g, hidden, CLIP_DIM, scale=3 * CLIP_DIM ** -0.5),
                  "clip_project.model.0.bias": _randn(g, hidden, scale=0.1),
                  "clip_project.model.2.weight": _randn(g, out, hidden, scale=hidden ** -0.5),
                  "clip_project.model.2.bias": _randn(g, out, scale=0.1)}


def transformer_file(gpt: dict, prefix_length: int = 4, clip_length: int = 3, layers: int = 3) -> dict:
    """ClipCap's transformer checkpoint: linear, prefix_const and pre-LN layers under clip_project.transformer."""
    g, D = torch.Generator().manual_seed(3), gpt["gpt.transformer.wte.weight"].shape[1]
    state = {"clip_project.linear.weight": _randn(g, clip_length * D, CLIP_DIM, scale=8 * CLIP_DIM ** -0.5),
             "clip_project.linear.bias": _randn(g, clip_length * D, scale=0.1),
             "clip_project.prefix_const": _randn(g, prefix_length, D)}
    for i in range(layers):
        p = f"clip_project.transformer.layers.{i}."
        state |= {p + "norm1.weight": 1 + _randn(g, D, scale=0.1), p + "norm1.bias": _randn(g, D, scale=0.1),
                  p + "attn.to_queries.weight": _randn(g, D, D, scale=D ** -0.5),
                  p + "attn.to_keys_values.weight": _randn(g, 2 * D, D, scale=D ** -0.5),
                  p + "attn.project.weight": _randn(g, D, D, scale=D ** -0.5),
                  p + "attn.project.bias": _randn(g, D, scale=0.1),
                  p + "norm2.weight": 1 + _randn(g, D, scale=0.1), p + "norm2.bias": _randn(g, D, scale=0.1),
                  p + "mlp.fc1.weight": _randn(g, 2 * D, D, scale=D ** -0.5),
                  p + "mlp.fc1.bias": _randn(g, 2 * D, scale=0.1),
                  p + "mlp.fc2.weight": _randn(g, D, 2 * D, scale=(2 * D) ** -0.5),
                  p + "mlp.fc2.bias": _randn(g, D, scale=0.1)}
    return gpt | state


# ---- ClipCap, re-implemented from its paper's code: the reference our captions must equal ------------


def clipcap_mlp(s: dict, clip_embed: torch.Tensor, prefix_length: int) -> torch.Tensor:
    h = torch.tanh(F.linear(clip_embed, s["clip_project.model.0.weight"], s["clip_project.model.0.bias"]))
    out = F.linear(h, s["clip_project.model.2.weight"], s["clip_project.model.2.bias"])
    return out.view(len(clip_embed), prefix_length, -1)  # (B, P, D)


def clipcap_transformer(s: dict, clip_embed: torch.Tensor, clip_length: int, layers: int) -> torch.Tensor:
    """The transformer file is used on L2-normalised CLIP embeddings (its inference notebook)."""
    x = clip_embed / clip_embed.norm(2, -1, keepdim=True)
    B = len(x)
    x = F.linear(x, s["clip_project.linear.weight"], s["clip_project.linear.bias"]).view(B, clip_length, -1)
    const = s["clip_project.prefix_const"]
    x = torch.cat([x, const.unsqueeze(0).expand(B, *const.shape)], dim=1)  # (B, C + P, D)
    D = x.shape[-1]
    for i in range(layers):
        p = f"clip_project.transformer.layers.{i}."
        h = F.layer_norm(x, (D,), s[p + "norm1.weight"], s[p + "norm1.bias"])
        n = h.shape[1]
        queries = F.linear(h, s[p + "attn.to_queries.weight"]).reshape(B, n, HEADS, D // HEADS)
        keys_values = F.linear(h, s[p + "attn.to_keys_values.weight"]).reshape(B, n, 2, HEADS, D // HEADS)
        keys, values = keys_values[:, :, 0], keys_values[:, :, 1]
        attention = (torch.einsum("bnhd,bmhd->bnmh", queries, keys) * (D // HEADS) ** -0.5).softmax(dim=2)
        out = torch.einsum("bnmh,bmhd->bnhd", attention, values).reshape(B, n, D)
        x = x + F.linear(out, s[p + "attn.project.weight"], s[p + "attn.project.bias"])
        h = F.layer_norm(x, (D,), s[p + "norm2.weight"], s[p + "norm2.bias"])
        x = x + F.linear(F.relu(F.linear(h, s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"])),
                         s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"])
    return x[:, clip_length:]  # (B, P, D)


def clipcap_captions(s: dict, models_dir, prefixes: list[torch.Tensor], length: int = 67) -> list[str]:
    """ClipCap's decoding loop on each (1, P, D) prefix: the whole sequence through GPT-2 at each step,
    argmax, stop after "." (an EOS also ends it here: its GPT-2 never learned to say one, and what would
    follow one is no caption). GPT-2 is transformers' class, as in ClipCap, holding the file's weights."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir(models_dir))
    gpt = GPT2LMHeadModel(GPT2Config.from_pretrained(gpt2_dir(models_dir))).eval()
    gpt.load_state_dict({k.removeprefix("gpt."): v for k, v in s.items()
                         if k.startswith("gpt.") and not k.endswith((".attn.bias", ".attn.masked_bias"))})
    stop, captions = tokenizer.encode(".")[0], []
    with torch.no_grad():
        for embeds in prefixes:
            tokens = []
            for _ in range(length):
                token = int(gpt(inputs_embeds=embeds).logits[0, -1].argmax())
                if token == tokenizer.eos_token_id:
                    break
                tokens.append(token)
                if token == stop:
                    break
                embeds = torch.cat([embeds, gpt.transformer.wte(torch.tensor([[token]]))], dim=1)  # (1, P + t, D)
            captions.append(" ".join(tokenizer.decode(tokens).split()))
    return captions


def _embeds(n: int = 8) -> torch.Tensor:
    return torch.randn(n, CLIP_DIM, generator=torch.Generator().manual_seed(0))


def _save(state: dict, path) -> str:
    torch.save(state, path)
    return str(path)


# ---- import ------------------------------------------------------------------------------------------


def test_mlp_checkpoint_captions_equal_clipcap_and_survive_the_bundle(gpt, models_dir, tmp_path):
    state = mlp_file(gpt)
    weights = _save(state, tmp_path / "coco_weights.pt")
    captioner = import_clipcap(weights, tmp_path / "bundle", OFFLINE, backbone="standin:ViT")
    x = _embeds()
    expected = clipcap_captions(state, models_dir, [clipcap_mlp(state, e[None], 10) for e in x])
    assert len(set(expected)) > 1, "each image should get its own caption, or the test proves little"
    assert any(c.endswith(".") for c in expected) and not all(c.endswith(".") for c in expected)
    assert captioner.generate(x) == expected

    loaded = Captioner.from_pretrained(tmp_path / "bundle")
    c = loaded.config
    assert (c.mapper, c.clip_dim, c.prefix_length, c.backbone, c.normalize_prefix, c.stop_token, c.freeze) == \
        ("mlp", CLIP_DIM, 10, "standin:ViT", False, ".", "full")
    assert loaded.summary["imported_from"] == weights
    torch.testing.assert_close(loaded.lm.state_dict()["transformer.h.1.mlp.c_fc.weight"],
                               state["gpt.transformer.h.1.mlp.c_fc.weight"])  # the file's GPT-2, not the stand-in's
    assert loaded.generate(x) == expected


def test_transformer_checkpoint_captions_equal_clipcap_normalised_prefix_included(gpt, models_dir, tmp_path):
    state = transformer_file(gpt)
    weights = _save(state, tmp_path / "transformer_weights.pt")
    captioner = import_clipcap(weights, tmp_path / "bundle", OFFLINE, backbone="standin:RN")
    c = captioner.config
    assert (c.mapper, c.prefix_length, c.clip_length, c.num_layers, c.num_heads, c.mlp_ratio, c.normalize_prefix,
            c.freeze) == ("transformer", 4, 3, 3, HEADS, 2.0, True, "frozen")
    x = _embeds()
    expected = clipcap_captions(state, models_dir, [clipcap_transformer(state, e[None], 3, 3) for e in x])
    assert len(set(expected)) > 1
    assert Captioner.from_pretrained(tmp_path / "bundle").generate(x) == expected
    assert captioner.generate(4 * x) == expected, "the CLIP embedding is normalised inside the bundle"


def test_settings_that_contradict_the_file_are_refused(gpt, models_dir, tmp_path):
    weights = _save(transformer_file(gpt), tmp_path / "transformer_weights.pt")
    for settings, message in [
            (dict(prefix_length=10), "prefix_length=10, but the file's shapes say 4"),
            (dict(mapper="mlp"), "mapper='mlp', but the file's shapes say 'transformer'"),
            (dict(num_heads=4), "num_heads=4, but ClipCap's mapper always has 8"),  # no shape records the heads
            (dict(backbone="ViT-B/32"), "takes 112-d CLIP embeddings, but ViT-B/32 gives 512-d ones: pass --backbone "
                                        "standin:ViT or standin:RN"),
            ({}, "112-d CLIP embeddings, which no released ClipCap file does: pass --backbone standin:ViT")]:
        with pytest.raises(ClipCapImportError, match=message.replace("(", r"\(")):
            import_clipcap(weights, tmp_path / "bundle", OFFLINE, **settings)
    del_block = {k: v for k, v in mlp_file(gpt).items() if not k.startswith("gpt.transformer.h.1.")}
    with pytest.raises(ClipCapImportError, match=r"GPT-2 in .* does not fit standin:gpt2: the file has no "
                                                 r"transformer\.h\.1\.ln_1\.weight.*Offline, the language model is"):
        import_clipcap(_save(del_block, tmp_path / "short.pt"), tmp_path / "bundle", OFFLINE,
                       backbone="standin:ViT")
    assert not (tmp_path / "bundle").exists(), "nothing is written for a refused file"


def test_cli_imports_then_captions_image_files(gpt, models_dir, data_dir, tmp_path):
    clip_archive("ViT-B/32", models_dir)  # the stand-in CLIP the bundle's images go through
    weights = _save(mlp_file(gpt), tmp_path / "coco_weights.pt")
    bundle = tmp_path / "clipcap-coco"
    proc = run_cli("import-clipcap", weights, "--out", str(bundle), "--backbone", "standin:ViT", data_dir=data_dir)
    assert ("imported ClipCap's MLP mapper (prefix 10) for standin:ViT embeddings (112-d) and its fine-tuned GPT-2 "
            "(standin:gpt2)") in proc.stdout
    images = []
    for colour in ["red", "navy", "yellow"]:
        images.append(str(tmp_path / f"{colour}.png"))
        Image.new("RGB", (64, 64), colour).save(images[-1])
    captioned = run_cli("caption", "--model", str(bundle), *images, data_dir=data_dir).stdout.splitlines()
    captioner = Captioner.from_pretrained(bundle)
    captioner.image_encoder(models_dir)
    assert captioned == [f"{p}\t{c}" for p, c in zip(images, captioner.caption(images))]


def _refused(path, data_dir, tmp_path) -> str:
    proc = run_cli("import-clipcap", str(path), "--out", str(tmp_path / "bundle"), "--backbone", "standin:ViT",
                   data_dir=data_dir, check=False)
    assert proc.returncode != 0 and proc.stdout == "" and not (tmp_path / "bundle").exists()
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr  # one line, no traceback
    return proc.stderr


def test_cli_refuses_a_file_of_the_wrong_shape_in_one_line(gpt, data_dir, tmp_path):
    state = mlp_file(gpt)
    state["clip_project.model.2.weight"] = state["clip_project.model.2.weight"][:-1]  # P*D - 1 outputs
    assert "MLP mapper's shapes (320, 112) and (639, 320) are not ClipCap's" in _refused(
        _save(state, tmp_path / "coco_weights.pt"), data_dir, tmp_path)
    assert "holds no ClipCap mapper" in _refused(_save({"weight": torch.zeros(2)}, tmp_path / "other.pt"), data_dir,
                                                 tmp_path)
    for key in ("clip_project.transformer.layers.x.norm1.weight", "clip_project.transformer.layers.².norm1.weight"):
        state = transformer_file(gpt) | {key: torch.zeros(64)}
        assert f"{key} is not a layer's tensor" in _refused(_save(state, tmp_path / "transformer_weights.pt"),
                                                            data_dir, tmp_path)


def test_cli_refuses_a_pickle_carrying_code_without_running_it(data_dir, tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "coco_weights.pt", "wb") as f:
        pickle.dump({"clip_project.model.0.weight": TouchWhenUnpickled(marker)}, f)
    assert "holds pickled Python objects or code, not just tensors: it is refused, never run" in _refused(
        tmp_path / "coco_weights.pt", data_dir, tmp_path)
    assert not marker.exists()
