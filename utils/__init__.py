"""clipcap-course: image captioning the ClipCap way (frozen CLIP -> mapper -> partly frozen GPT-2).

Every notebook and the CLI (`python -m utils ...`) call into this package; the stages live in one
module each: config, runtime, standins, datasets, download, features.
"""

__version__ = "0.1.0"
