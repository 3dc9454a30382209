"""clipcap-course: image captioning the ClipCap way (frozen CLIP -> mapper -> partly frozen GPT-2).

Every notebook and the CLI (`python -m utils ...`) call into this package; the stages live in one
module each (see README, "How the code is laid out").
"""

import warnings

__version__ = "0.1.0"

# openai-clip 1.0.1 imports pkg_resources, whose deprecation warning would greet students on every
# import; the pin setuptools<81 keeps it working, so the warning says nothing they can act on.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
