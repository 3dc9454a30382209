"""clipcap-course: image captioning the ClipCap way (frozen CLIP -> mapper -> partly frozen GPT-2).

Every notebook and the CLI (`python -m utils ...`) call into this package; the stages live in one
module each (see README, "How the code is laid out").
"""

import warnings

__version__ = "0.1.0"
# What the notebooks' setup cell checks after `import utils`: a student's own utils.py (or another project's
# utils/ folder) earlier on the path would hide this package, and every later cell would fail obscurely.
COURSE = "clipcap-course"


# openai-clip 1.0.1 imports pkg_resources, whose deprecation warning would greet students on every
# import; the pin setuptools<81 keeps it working, so the warning says nothing they can act on.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
