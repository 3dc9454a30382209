"""The stand-in models' names and their folder: the leaf every layer may import (no torch, no models).

A stand-in is recorded as `standin:<kind>` (in caches, bundles, messages), and built once per machine in
`standins_home()`. The models themselves: `utils/standins.py` (and the modules it gathers).
"""

from __future__ import annotations

from pathlib import Path

from .paths import user_cache

STANDIN_PREFIX = "standin:"
STANDINS_ENV = "CLIPCAP_STANDINS"  # where the stand-ins are built, once per machine (see standins_home)
STANDIN_CLIP_DIM = 112  # both stand-in CLIPs' embedding width (64 fitted + 48 of a fixed colour grid)
_STANDINS_VERSION = 3  # bump when a stand-in's recipe changes: the machine's old copies are then not used


def is_standin(name: str) -> bool:
    return str(name).startswith(STANDIN_PREFIX)


def standins_home() -> Path:
    """The folder the stand-in models are built in, once per machine, and read from by every data folder:
    `$CLIPCAP_STANDINS`, else `$XDG_CACHE_HOME/clipcap-course`, else `~/.cache/clipcap-course` (a
    `standins-v<N>` folder inside, so a course with other stand-ins never reads these)."""
    return user_cache(STANDINS_ENV) / f"standins-v{_STANDINS_VERSION}"


def clip_standin_name(backbone: str) -> str:
    """'ViT-B/32' -> 'standin:ViT' (RN* names get the ResNet stand-in), as recorded in caches; a stand-in
    name stays itself."""
    kind = str(backbone).removeprefix(STANDIN_PREFIX)
    return STANDIN_PREFIX + ("RN" if kind.upper().startswith("RN") else "ViT")
