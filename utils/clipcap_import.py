"""Import the ClipCap paper's released weights (rmokady/CLIP_prefix_caption) as one of our bundles.

The paper published three plain state dicts, with nothing inside saying how to rebuild the model:

| file | mapper | CLIP | prefix | GPT-2 |
|---|---|---|---|---|
| COCO, MLP | Linear(512, 3840) -> Tanh -> Linear(3840, 7680) | ViT-B/32, 512-d | 10 | fine-tuned |
| Conceptual Captions, MLP | the same | ViT-B/32, 512-d | 10 | fine-tuned |
| COCO, transformer | clip length 40, 8 layers, 8 heads | RN50x4, 640-d, L2-normalised | 40 | GPT-2 as released |

They no longer load into a current transformers (they carry GPT-2's old `attn.bias` / `attn.masked_bias`
buffers: ClipCap issue #76), and users mixed up CLIP widths and prefix lengths between training and
inference (#26, #45, #53, #55). Here the file is read with `torch.load(weights_only=True)`, so one carrying
pickled code is refused, never run; the stale buffers are dropped; the mapper, CLIP width, prefix and
clip lengths and layers are read from the tensors' shapes (a setting given that disagrees is refused);
and the result is saved as our bundle, which records all of it, so `Captioner.from_pretrained`,
`caption` and `evaluate` use it like a model this course trained. Our mappers hold ClipCap's tensors as
they are (`clip_project.transformer.layers.` becomes `layers.`). ClipCap never trained an end token and
stopped its captions at the first ".", so the bundle's `stop_token` is "." and its length ClipCap's 67.
"""

from __future__ import annotations

import pickle
import pickletools
import warnings
import zipfile
from pathlib import Path

import torch

from .bundle import LM_LIMITS, MAPPER_LIMITS
from .captioner import Captioner
from .config import ModelConfig, RuntimeConfig
from .errors import CourseError
from .sources import NO_REMOTE_CODE, language_model_source, load_tokenizer
from .runtime import is_offline
from .standin_names import STANDIN_CLIP_DIM

# Embedding width of each CLIP: the mapper's input width says which backbones can feed it.
CLIP_WIDTHS = {"RN50": 1024, "RN101": 512, "RN50x4": 640, "RN50x16": 768, "RN50x64": 1024, "ViT-B/32": 512,
               "ViT-B/16": 512, "ViT-L/14": 768, "ViT-L/14@336px": 768,
               "standin:ViT": STANDIN_CLIP_DIM, "standin:RN": STANDIN_CLIP_DIM}
PAPER_BACKBONES = {512: "ViT-B/32", 640: "RN50x4"}  # the CLIP each released file was trained on, by width
CLIPCAP_HEADS = 8  # fixed in ClipCap's code, so not in its files
CLIPCAP_LENGTH = 67  # tokens ClipCap's own decoding generates at most
_STALE = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers old transformers saved with GPT-2


class ClipCapImportError(CourseError, ValueError):
    """A file that is not one of ClipCap's checkpoints, or settings that contradict it; says what to do."""


def import_clipcap(weights: str | Path, out: str | Path, runtime: RuntimeConfig = RuntimeConfig(),
                   **settings) -> Captioner:
    """Read a ClipCap checkpoint, save it as a captioner bundle at `out`, and return the captioner.

    `settings` are ModelConfig fields: those the shapes decide (mapper, prefix_length, ...) must agree
    with the file; `backbone` is needed where the CLIP width does not name the paper's; `lm` names where
    GPT-2's config and tokenizer come from (offline: the stand-in GPT-2, or a folder).
    """
    path = Path(weights)
    state = read_weights(path)
    found = shapes_config(state, path)
    conflicts = [f"{k}={settings[k]!r}, but the file's shapes say {v!r}" for k, v in found.items()
                 if k in settings and settings[k] != v]
    if settings.get("num_heads", CLIPCAP_HEADS) != CLIPCAP_HEADS:  # not in the shapes: another count reads them wrong
        conflicts.append(f"num_heads={settings['num_heads']!r}, but ClipCap's mapper always has {CLIPCAP_HEADS}")
    if conflicts:
        raise ClipCapImportError(f"{path} does not fit the settings given: {'; '.join(conflicts)}. Leave those "
                                 "settings out: they are read from the file.")
    backbone = settings.get("backbone") or _guess_backbone(found["clip_dim"], path)
    if CLIP_WIDTHS.get(backbone, found["clip_dim"]) != found["clip_dim"]:
        raise ClipCapImportError(f"{path} takes {found['clip_dim']}-d CLIP embeddings, but {backbone} gives "
                                 f"{CLIP_WIDTHS[backbone]}-d ones: {_backbones_of(found['clip_dim'])}.")
    lm, tokenizer, lm_name = _language_model(state, settings.get("lm", "gpt2"), is_offline(runtime.offline), path)
    defaults = dict(num_heads=CLIPCAP_HEADS, freeze="full" if found["mapper"] == "mlp" else "frozen",
                    normalize_prefix=found["mapper"] == "transformer", stop_token=".",
                    max_caption_tokens=CLIPCAP_LENGTH, dropout=0.0)
    config = ModelConfig(**(defaults | settings | found | {"backbone": backbone, "lm": lm_name}))
    captioner = Captioner(config, lm, tokenizer)
    mapper = {k.removeprefix("clip_project.").replace("transformer.layers.", "layers."): v
              for k, v in state.items() if k.startswith("clip_project.")}
    _load(captioner.mapper, mapper, f"the {config.mapper} mapper in {path} does not fit ours",
          "Is it one of the paper's files?")
    captioner.save_pretrained(out, summary={"imported_from": str(path), "clipcap": True,
                                            "standin": lm_name.startswith("standin:")})
    return captioner.eval()


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors, without the stale buffers; anything but a plain dict of tensors is refused, and
    so is a file whose tensors would take more memory than the file holds bytes (compressed or overlapping
    data): it is checked as a zip, then loaded memory-mapped (nothing materialised) and its storages measured."""
    if not path.is_file():
        raise ClipCapImportError(f"{path}: no such file. Download the weights from the links in ClipCap's README "
                                 "(github.com/rmokady/CLIP_prefix_caption) and give that file.")
    _check_archive(path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files it then refuses anyway
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        if str(exc).startswith("Weights only load failed"):
            raise ClipCapImportError(f"{path} holds pickled Python objects or code, not just tensors: it is "
                                     "refused, never run. ClipCap's released files are plain state dicts: "
                                     "download them again from the links in its README.") from None
        raise ClipCapImportError(f"{path} is not a PyTorch checkpoint ({exc}): is the download complete?") from None
    except Exception as exc:
        raise ClipCapImportError(f"{path} is not a PyTorch checkpoint ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'}): is the download "
                                 "complete?") from None
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ClipCapImportError(f"{path} is not a state dict (a dict of tensors), as ClipCap's released files are.")
    size = path.stat().st_size
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in state.values()}
    if sum(storages.values()) > size:
        raise ClipCapImportError(f"{path}: its tensors claim {sum(storages.values()):,} bytes, more than the "
                                 f"{size:,} bytes of the file: it is damaged or crafted; refused before anything "
                                 "was loaded into memory.")
    return {k: v for k, v in state.items() if not k.endswith(_STALE)}


def _check_archive(path: Path) -> None:
    """torch.save writes a zip whose members are stored as they are: a member that is compressed could
    inflate past the file's size (a 390 KB file holding a 400 MB tensor), so it is refused unread."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        if _pickled_objects(path):
            raise ClipCapImportError(f"{path} holds pickled Python objects or code, not just tensors: it is "
                                     "refused, never run. ClipCap's released files are plain state dicts: "
                                     "download them again from the links in its README.") from None
        raise ClipCapImportError(f"{path} is not a PyTorch checkpoint in torch.save's zip format (used since "
                                 "PyTorch 1.6, and by ClipCap's released files): is the download complete? A file "
                                 "saved by an older PyTorch: load it there and torch.save it again.") from None
    compressed = next((i for i in infos if i.compress_type != zipfile.ZIP_STORED), None)
    if compressed is not None:
        raise ClipCapImportError(f"{path}: {compressed.filename} is compressed ({compressed.compress_size:,} bytes "
                                 f"that inflate to {compressed.file_size:,}); torch.save never compresses, so the "
                                 "file is damaged or crafted: refused before anything was loaded.")
    claimed, size = sum(i.file_size for i in infos), path.stat().st_size
    if claimed > size:
        raise ClipCapImportError(f"{path}: its members claim {claimed:,} bytes, more than the {size:,} bytes of the "
                                 "file: it is damaged or crafted; refused before anything was loaded.")


def _pickled_objects(path: Path) -> bool:
    """Whether a plain pickle names Python objects beyond torch's and containers (code it would run), read
    opcode by opcode with pickletools: nothing is unpickled."""
    found = []
    try:
        with open(path, "rb") as f:
            for opcode, arg, _ in pickletools.genops(f):
                if opcode.name in ("GLOBAL", "INST") and not str(arg).startswith(("torch", "collections")):
                    found.append(arg)
                elif opcode.name in ("STACK_GLOBAL", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ", "BUILD"):
                    found.append(opcode.name)
                if found or opcode.name == "STOP":
                    break
    except Exception:  # not a pickle at all
        return False
    return bool(found)


def shapes_config(state: dict[str, torch.Tensor], path: Path) -> dict:
    """The ModelConfig fields the tensors' shapes decide: mapper kind, CLIP width, prefix, layers; a shape
    with a zero or an absurd size is refused before anything is built."""
    if "clip_project.model.0.weight" not in state and "clip_project.linear.weight" not in state:
        raise ClipCapImportError(f"{path} holds no ClipCap mapper: neither clip_project.model.* (MLP) nor "
                                 "clip_project.linear / transformer.* (transformer). Is it one of the paper's files?")
    vocab, width = _matrix(state, "gpt.transformer.wte.weight", path)  # GPT-2's width D
    if width > LM_LIMITS["width"] or vocab > LM_LIMITS["vocabulary"]:
        raise ClipCapImportError(f"{path}: gpt.transformer.wte.weight is {vocab:,} x {width:,}, over the limits of "
                                 f"{LM_LIMITS['vocabulary']:,} tokens and width {LM_LIMITS['width']:,} this course "
                                 "loads: is it one of the paper's files?")
    if "clip_project.model.0.weight" in state:  # MLP: Linear(clip, P*D/2) -> Tanh -> Linear(P*D/2, P*D)
        first, last = (_matrix(state, f"clip_project.model.{i}.weight", path) for i in (0, 2))
        if last[0] % width or last[1] != first[0] or first[0] != last[0] // 2:
            raise ClipCapImportError(f"{path}: the MLP mapper's shapes {first} and {last} are not ClipCap's "
                                     f"Linear(C, P*{width}/2) -> Linear(P*{width}/2, P*{width}).")
        return _within_limits(dict(mapper="mlp", clip_dim=first[1], prefix_length=last[0] // width), path)
    # transformer: clip tokens + a constant prefix through pre-LN layers
    linear = _matrix(state, "clip_project.linear.weight", path)  # (C*D, clip_dim)
    const = _matrix(state, "clip_project.prefix_const", path)  # (P, D)
    layer_keys = [k for k in state if k.startswith("clip_project.transformer.layers.")]
    for k in layer_keys:  # clip_project.transformer.layers.<i>.<tensor>
        if not k.split(".")[3].isdecimal():  # "x", "" or "²" (a digit int() refuses)
            raise ClipCapImportError(f"{path}: {k} is not a layer's tensor (clip_project.transformer.layers.<number>."
                                     "<name>): is it one of the paper's files?")
    layers = {int(k.split(".")[3]) for k in layer_keys}
    if linear[0] % width or const[1] != width or not layers or layers != set(range(len(layers))):
        shown = sorted(layers) if len(layers) <= 10 else f"{len(layers)} numbered {min(layers)}..{max(layers)}"
        raise ClipCapImportError(f"{path}: the transformer mapper's shapes (linear {linear}, prefix_const {const}, "
                                 f"layers {shown}) do not fit GPT-2's width {width}.")
    hidden = _matrix(state, "clip_project.transformer.layers.0.mlp.fc1.weight", path)[0]
    return _within_limits(dict(mapper="transformer", clip_dim=linear[1], clip_length=linear[0] // width,
                               prefix_length=const[0], num_layers=len(layers), mlp_ratio=hidden / width), path)


def _matrix(state: dict, key: str, path: Path) -> tuple[int, int]:
    """The shape of a 2-D tensor of the file, each side at least 1."""
    shape = tuple(_tensor(state, key, path).shape)
    if len(shape) != 2 or min(shape) < 1:
        raise ClipCapImportError(f"{path}: {key} has the shape {shape}, not a matrix with rows and columns (a layer "
                                 "of zero width cannot be ClipCap's): is it one of the paper's files?")
    return shape


def _within_limits(found: dict, path: Path) -> dict:
    """Refuse a file whose shapes ask for a mapper past what this course loads (bundle.MAPPER_LIMITS)."""
    for key, value in found.items():
        if key in MAPPER_LIMITS and value > MAPPER_LIMITS[key]:
            raise ClipCapImportError(f"{path}: its shapes make {key} {value:,}, over the limit of "
                                     f"{MAPPER_LIMITS[key]:,} this course loads (ClipCap's files have at most 40): "
                                     "is it one of the paper's files?")
    return found


def _tensor(state: dict, key: str, path: Path) -> torch.Tensor:
    if key not in state:
        raise ClipCapImportError(f"{path} has no {key}: it is not one of ClipCap's checkpoints "
                                 f"(its first keys: {', '.join(list(state)[:4])}).")
    return state[key]


def _backbones_of(width: int) -> str:
    names = [name for name, w in CLIP_WIDTHS.items() if w == width]
    return f"pass --backbone {' or '.join(names) if names else f'naming a CLIP with {width}-d embeddings'}"


def _guess_backbone(width: int, path: Path) -> str:
    if width not in PAPER_BACKBONES:
        raise ClipCapImportError(f"{path} takes {width}-d CLIP embeddings, which no released ClipCap file does: "
                                 f"{_backbones_of(width)}.")
    return PAPER_BACKBONES[width]


def _language_model(state: dict, name: str, offline: bool, path: Path):
    """GPT-2 built from `name`'s config (the hub's gpt2; offline the stand-in) holding the file's weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source, recorded = language_model_source(name, offline)
    config = AutoConfig.from_pretrained(source, **NO_REMOTE_CODE)
    lm = AutoModelForCausalLM.from_config(config)
    weights = {k.removeprefix("gpt."): v for k, v in state.items() if k.startswith("gpt.")}
    hint = ("Offline, the language model is the stand-in GPT-2: run with network, or pass --lm FOLDER holding "
            "gpt2's config and tokenizer (its save_pretrained files)." if recorded.startswith("standin:") else
            "Pass --lm naming the GPT-2 these weights were trained from.")
    tied = frozenset({"lm_head.weight"})  # GPT-2's output layer is its token embedding
    _load(lm, weights, f"the GPT-2 in {path} does not fit {recorded}", hint, tied)
    return lm, load_tokenizer(source), recorded


def _load(module: torch.nn.Module, weights: dict, what: str, hint: str, optional: frozenset = frozenset()) -> None:
    """Load `weights` into `module`, or refuse naming what is missing, extra or of another shape."""
    want = module.state_dict()
    problems = [f"{k} is {tuple(v.shape)} in the file, {tuple(want[k].shape)} in the model"
                for k, v in weights.items() if k in want and v.shape != want[k].shape]
    problems += [f"the file has no {k}" for k in want if k not in weights and k not in optional]
    problems += [f"the model has no place for {k}" for k in weights if k not in want]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ClipCapImportError(f"{what}: {'; '.join(problems[:3])}{more}. {hint}")
    module.load_state_dict(weights, strict=False)


def describe(captioner: Captioner) -> str:
    """One line on what was imported, for the CLI and notebooks."""
    c = captioner.config
    mapper = (f"MLP mapper (prefix {c.prefix_length})" if c.mapper == "mlp" else
              f"transformer mapper (prefix {c.prefix_length}, clip length {c.clip_length}, {c.num_layers} layers)")
    gpt = "its fine-tuned GPT-2" if c.freeze == "full" else "its GPT-2"
    norm = ", L2-normalised" if c.normalize_prefix else ""
    return f"ClipCap's {mapper} for {c.backbone} embeddings ({c.clip_dim}-d{norm}) and {gpt} ({c.lm})"

