"""The first cell of every notebook, and `python -m utils info`: where we run, the versions and the device.

A front end over runtime.py (the platform, the GPU check, offline detection) and paths.py (the data folder):
`notebook_setup()` prints one line per fact, shows a GPU this torch cannot use as a boxed message with the fix,
and on Colab can keep the course's data on Google Drive (`mount_drive`).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from . import __version__
from .files import folder_bytes, free_bytes
from .paths import default_data_dir
from .runtime import GPUUnsupported, check_gpu, detect_platform, is_offline
from .standin_names import STANDINS_ENV


def environment_report(device: str = "auto") -> dict:
    """The versions and `device` (auto: the GPU torch would use) that matter when asking for help (the first
    cell and `python -m utils info` print these)."""
    import torch
    import transformers

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
    gpu = torch.device("cuda" if device == "auto" else device)
    if torch.cuda.is_available() and gpu.type == "cuda":
        index = gpu.index if gpu.index is not None else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        major, minor = torch.cuda.get_device_capability(index)
        report.update(device=f"cuda:{index}: {torch.cuda.get_device_name(index)}", compute_capability=f"{major}.{minor}",
                      gpu_memory_free_gib=round(free / 2**30, 1), gpu_memory_total_gib=round(total / 2**30, 1))
        try:
            check_gpu(torch.device("cuda", index))
            report["gpu_check"] = "ok"
        except GPUUnsupported as exc:
            report["gpu_check"] = str(exc)
    elif torch.cuda.is_available() and gpu.type != "cuda":
        report.update(device=f"{gpu.type} ({os.cpu_count()} cores), chosen over the GPU(s) torch sees",
                      gpu_check="not used: another device was chosen")
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
    on it (CLIPCAP_DATA), so the next notebook, on its own machine, finds what this one wrote; the stand-in
    models (CLIPCAP_STANDINS, unless set) and the figures (plots.figures_dir) go beside it. Elsewhere it
    does nothing and returns None (Kaggle keeps /kaggle/working; a local machine keeps data/)."""
    if detect_platform() != "colab":
        return None
    from google.colab import drive  # Colab's own module

    drive.mount("/content/drive")
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    os.environ["CLIPCAP_DATA"] = data_dir
    # the stand-in models beside it, so a fresh machine does not build them again (figures_dir: beside it too)
    os.environ.setdefault(STANDINS_ENV, str(Path(data_dir).parent / "standins"))
    return data_dir


def disk_line(data: str | Path) -> str:
    """What the course's data folder takes and what is left on its disk: on Kaggle /kaggle/working holds about
    20 GB for everything a session writes (README, "Disk": what each notebook writes)."""
    return (f"{folder_bytes(data) / 2**30:.2f} GB in {data}, {free_bytes(data) / 2**30:.1f} GB free on its disk"
            + (" (Kaggle's /kaggle/working: about 20 GB in all)" if detect_platform() == "kaggle" else ""))


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
             ("data", report["data_dir"]), ("disk", disk_line(report["data_dir"]))]
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
