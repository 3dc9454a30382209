"""Where are we running (Kaggle, Colab, local), can this torch use the GPU, and is the network there?

Everything heavy calls `check_gpu()` first, so an unsupported GPU (a CUDA 13 build of torch on a
Kaggle P100) gets one clear message with what to do instead of a CUDA crash an hour later.
"""

from __future__ import annotations

import functools
import os
import platform
import socket
import sys
from pathlib import Path

# Hosts the real models come from: CLIP weights (openaipublic) and GPT-2 (Hugging Face).
HUB_HOSTS = (("openaipublic.azureedge.net", 443), ("huggingface.co", 443))


class GPUUnsupported(RuntimeError):
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
    print(f"{bar}\n!! OFFLINE MODE: {what}\n!! Stand-in models are tiny (CLIP and GPT-2 fitted briefly to synthetic"
          f" drawings\n!! and their captions): they teach the mechanics, not photos. With network,\n"
          f"!! run without --offline.\n{bar}",
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


def environment_report(device: str = "auto") -> dict:
    """The versions and the device that matter when asking for help (the first cell prints these)."""
    import torch
    import transformers

    from . import __version__
    from .paths import default_data_dir

    try:
        import clip  # noqa: F401  (openai-clip)
        from importlib.metadata import version
        clip_version = version("openai-clip")
    except Exception as exc:  # the first notebook cell installs it; say why it is missing
        clip_version = f"not importable ({type(exc).__name__}: {exc})"
    report = {
        "platform": detect_platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "openai-clip": clip_version,
        "clipcap-course": __version__,
        "offline": is_offline(None),
        "data_dir": default_data_dir(),
    }
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        major, minor = torch.cuda.get_device_capability()
        report.update(device=f"cuda: {torch.cuda.get_device_name()}", compute_capability=f"{major}.{minor}",
                      gpu_memory_free_gib=round(free / 2**30, 1), gpu_memory_total_gib=round(total / 2**30, 1))
        try:
            check_gpu()
            report["gpu_check"] = "ok"
        except GPUUnsupported as exc:
            report["gpu_check"] = str(exc)
    else:
        report.update(device=f"cpu ({os.cpu_count()} cores)", gpu_check="no GPU visible to torch")
    return report


def _free_ram_gib() -> float | None:
    """Memory free for new work (Linux: MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = dict(line.split(":", 1) for line in f)
        return round(int(info["MemAvailable"].split()[0]) / 2**20, 1)
    except (OSError, KeyError, ValueError):
        return None


COLAB_DRIVE_DATA = "/content/drive/MyDrive/clipcap-course/data"


def mount_drive(data_dir: str = COLAB_DRIVE_DATA) -> str | None:
    """On Colab: mount Google Drive (Colab asks for permission once) and keep the course's data in `data_dir`
    on it (CLIPCAP_DATA), so the next notebook, on its own machine, finds what this one wrote. Elsewhere it
    does nothing and returns None (Kaggle keeps /kaggle/working; a local machine keeps data/)."""
    if detect_platform() != "colab":
        return None
    from google.colab import drive  # Colab's own module

    drive.mount("/content/drive")
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    os.environ["CLIPCAP_DATA"] = data_dir
    return data_dir


def notebook_setup(device: str = "auto", drive: bool = False) -> dict:
    """The first cell of every notebook: where we run, the versions that matter, the device and the GPU check.

    Prints one line per item and returns the same facts as a dict. A GPU this torch cannot use is shown as
    a boxed message with what to do, never as a traceback. `drive=True`: on Colab, first mount Google Drive
    and keep the course's data there (`mount_drive`); ignored elsewhere.
    """
    if drive:
        mount_drive()
    report = environment_report(device)
    where = {"kaggle": "Kaggle (inputs read-only under /kaggle/input, outputs in /kaggle/working, which is this "
                       "notebook's own: see README, 'The course', to carry data to the next notebook)",
             "colab": "Colab (files under /content vanish with the session and are not seen by the next notebook: "
                      "run the first cell with notebook_setup(drive=True) to keep data/ on Google Drive)"
                      if not os.environ.get("CLIPCAP_DATA", "").startswith("/content/drive") else
                      "Colab, with the course's data on Google Drive",
             "local": "local machine"}[report["platform"]]
    memory = (f"{report['gpu_memory_free_gib']} of {report['gpu_memory_total_gib']} GiB GPU memory free, compute "
              f"capability {report['compute_capability']}" if "gpu_memory_free_gib" in report
              else f"{_free_ram_gib()} GiB RAM free")
    lines = [("platform", where), ("python", report["python"]),
             ("torch", f"{report['torch']} (CUDA {report['torch_cuda'] or 'none: a CPU build'})"),
             ("transformers", report["transformers"]), ("openai-clip", report["openai-clip"]),
             ("clipcap-course", report["clipcap-course"]), ("device", f"{report['device']}, {memory}"),
             ("models", "OFFLINE: tiny stand-in CLIP and GPT-2 (mechanics only, not real captions)"
              if report["offline"] else "real CLIP and GPT-2 from their hubs"),
             ("data", report["data_dir"])]
    for name, value in lines:
        print(f"{name:>14}: {value}")
    check = report["gpu_check"]
    if check not in ("ok", "no GPU visible to torch"):  # the message of GPUUnsupported, with the fix
        bar = "=" * 78
        print(f"\n{bar}\nGPU NOT USABLE by this torch. Fix it as below, or set device = \"cpu\" in the parameters "
              f"cell to go on (slowly) on the CPU.\n{check}\n{bar}")
    elif check != "ok":
        print(f"{'gpu check':>14}: {check}" + ("; on Kaggle/Colab turn on a GPU (T4) in the notebook's settings"
                                               if report["platform"] != "local" else ""))
    else:
        print(f"{'gpu check':>14}: ok")
    return report
