"""Where are we running (Kaggle, Colab, local), can this torch use the GPU, and is the network there?

Everything heavy calls `check_gpu()` first, so an unsupported GPU (a CUDA 13 build of torch on a
Kaggle P100) gets one clear message with what to do instead of a CUDA crash an hour later.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
from pathlib import Path

from .errors import CourseError

# Hosts the real models come from: CLIP weights (openaipublic) and GPT-2 (Hugging Face).
HUB_HOSTS = (("openaipublic.azureedge.net", 443), ("huggingface.co", 443))


class GPUUnsupported(CourseError, RuntimeError):
    """This torch build cannot run kernels on the GPU that is present."""


def detect_platform() -> str:
    """'kaggle', 'colab' or 'local'."""
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE"):
        return "kaggle"
    if Path("/content").is_dir() and ("COLAB_RELEASE_TAG" in os.environ or "google.colab" in sys.modules
                                      or Path("/content/sample_data").is_dir()):
        return "colab"
    return "local"


@functools.lru_cache(maxsize=None)
def _hubs_reachable(timeout: float = 2.0) -> bool:
    for host, port in HUB_HOSTS:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return True
        except OSError:
            continue
    return False


def is_offline(offline: bool | None = None) -> bool:
    """Explicit setting first, then CLIPCAP_OFFLINE=1/0, then whether a model hub answers."""
    if offline is not None:
        return offline
    env = os.environ.get("CLIPCAP_OFFLINE", "").strip().lower()
    if env in ("1", "true", "yes"):
        return True
    if env in ("0", "false", "no"):
        return False
    return not _hubs_reachable()


def announce_offline(what: str) -> None:
    """Say loudly that stand-ins are in use, so nobody mistakes their output for a trained model."""
    if announce_offline.said:
        print(f"!! OFFLINE MODE: {what}", file=sys.stderr, flush=True)
        return
    announce_offline.said = True
    bar = "!" * 78
    print(f"{bar}\n!! OFFLINE MODE: {what}\n!! Stand-in models are tiny: a CLIP that sees coarse colour and light in any"
          f" image\n!! and the course's drawn shapes, a GPT-2 that knows caption words, not the world.\n"
          f"!! They teach the mechanics, not photos. With network, run without --offline.\n{bar}",
          file=sys.stderr, flush=True)


announce_offline.said = False


def resolve_device(device: str = "auto"):
    """'auto' -> cuda when torch can really use it, else cpu; checks the GPU before returning it."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        check_gpu(torch.device(device))
    return torch.device(device)


def to_device(tensor, device):
    """A host tensor onto `device` (None: left where it is). Onto a GPU through pinned memory and without
    waiting: a plain `.to("cuda")` from pageable memory waits for the copy, and so for all the GPU work
    queued before it, a host sync per batch. Every batch the course puts on a device goes through here."""
    import torch

    if device is None:
        return tensor
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def check_gpu(device=None) -> None:
    """Raise GPUUnsupported, with the fix, when this torch build has no kernels for the GPU present."""
    import torch

    if not torch.cuda.is_available():
        return
    index = torch.device(device or "cuda").index or 0
    name = torch.cuda.get_device_name(index)
    major, minor = torch.cuda.get_device_capability(index)
    built = torch.cuda.get_arch_list()  # e.g. ['sm_75', 'sm_80', ..., 'compute_120']
    sms = {int(a.split("_")[1]) for a in built if a.startswith("sm_")}
    ptx = {int(a.split("_")[1]) for a in built if a.startswith("compute_")}
    cap = major * 10 + minor
    if cap in sms or any(p <= cap for p in ptx) or not built:
        return
    raise GPUUnsupported(
        f"This torch {torch.__version__} (CUDA {torch.version.cuda}) has no kernels for your GPU {name} "
        f"(compute capability {major}.{minor}; this build supports {', '.join(sorted(built))}).\n"
        "What to do:\n"
        "  - On Kaggle: Settings -> Accelerator -> 'GPU T4 x2' (compute capability 7.5), or\n"
        "  - keep the P100 and install a CUDA 12.6 build in the first cell, then restart the kernel:\n"
        "      pip install torch torchvision --index-url https://download.pytorch.org/whl/cu126\n"
        "  - or run on the CPU with --device cpu (slow).")


def compile_supported(device) -> bool:
    """torch.compile's GPU code (Triton) needs compute capability 7.0 or more: a T4 (7.5) has it, never a
    P100 (6.0). On a CPU it would need a C++ toolchain and gains little here: the course offers it on GPUs."""
    import torch

    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (7, 0)


def supports_bf16(device) -> bool:
    import torch

    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def mixed_precision(choice: str, device) -> str:
    """The one precision rule, as accelerate names it, for training and for the bench that times training:
    fp32 ("no") on a CPU; on a GPU bf16 only where it computes it natively (supports_bf16), fp16 with loss
    scaling otherwise (T4, P100). ValueError for bf16 asked of a GPU without it."""
    if choice == "auto":
        return "no" if device.type != "cuda" else ("bf16" if supports_bf16(device) else "fp16")
    if choice == "bf16" and not supports_bf16(device):
        raise ValueError(f"--precision bf16: this device ({device}) has no bf16; use fp16 (P100, T4) or auto")
    return {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}[choice]
