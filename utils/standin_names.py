"""The names the offline stand-in models go by, and nothing else: a leaf every layer may import.

A stand-in is recorded in caches, checkpoints and bundles under a name of its own (`standin:ViT`,
`standin:gpt2`), never under the real model's, so stand-in and real features or weights never mix. The models
themselves are built by standin_clip.py and standin_text.py, in standins.standins_home(); sources.py decides
when they replace a real name.
"""

from __future__ import annotations

STANDIN_PREFIX = "standin:"
STANDINS_ENV = "CLIPCAP_STANDINS"  # where the stand-ins are built, once per machine (see standins_home)
STANDIN_CLIP_DIM = 112  # both stand-in CLIPs' embedding width (64 fitted + 48 of a fixed colour grid)


def is_standin(name: str) -> bool:
    return str(name).startswith(STANDIN_PREFIX)


def clip_standin_name(backbone: str) -> str:
    """'ViT-B/32' -> 'standin:ViT' (RN* names get the ResNet stand-in), as recorded in caches; a stand-in
    name stays itself."""
    kind = str(backbone).removeprefix(STANDIN_PREFIX)
    return STANDIN_PREFIX + ("RN" if kind.upper().startswith("RN") else "ViT")
