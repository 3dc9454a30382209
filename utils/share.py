"""Sharing a trained captioner: one file, the Hugging Face Hub, Kaggle Models.

A bundle is a folder (config.json, mapper.safetensors, lm/). People who want one file get a `.clipcap`
archive of that folder (an uncompressed zip with a manifest of SHA-256 sums); people who want to share
publish the folder to the Hub or to Kaggle Models with the clients' own upload calls, and anyone loads
it back by its id: bundle_files.py turns a path, a `.clipcap` file, a Hub id or a Kaggle handle into a
local bundle folder (`resolve_bundle`), checking a `.clipcap` file whole before unpacking it.

Nothing here writes into a bundle: publishing uploads the folder as it is, plus a model card beside it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from pathlib import Path

from .bundle_files import ARCHIVE_SUFFIX, ARCHIVE_VERSION, HUB_ID, MANIFEST, ShareError, is_bundle, sha256
from .files import atomic_path


# ---- one file -----------------------------------------------------------------------------------------

# The line a model card gives to install the course (the notebooks' setup cell installs the same)
INSTALL = 'pip install "setuptools<81" openai-clip==1.0.1 "git+https://github.com/clipcap-course/clipcap-course@main"'

def export_file(bundle: str | Path, out: str | Path | None = None) -> Path:
    """Write the bundle folder as one `.clipcap` file (atomically); returns its path."""
    bundle = Path(bundle)
    if not is_bundle(bundle):
        raise ShareError(f"{bundle} is not a captioner bundle (config.json and mapper.safetensors are missing): "
                         "export the `captioner` folder that training wrote.")
    out = Path(out) if out else bundle.with_name(bundle.name + ARCHIVE_SUFFIX)
    if out.is_dir():
        out = out / (bundle.name + ARCHIVE_SUFFIX)
    files = sorted(p for p in bundle.rglob("*") if p.is_file())
    manifest = {"archive_version": ARCHIVE_VERSION,
                "files": {p.relative_to(bundle).as_posix(): sha256(p) for p in files}}
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.writestr(MANIFEST, json.dumps(manifest, indent=1))
        for p in files:  # weights do not compress: stored as they are, read back without inflating
            zf.write(p, p.relative_to(bundle).as_posix())
    return out


def model_card(bundle: Path) -> str:
    meta = json.loads((bundle / "config.json").read_text())
    model, summary = meta.get("model", {}), meta.get("summary", {})
    rows = "\n".join(f"| {k} | {v} |" for k, v in {**{f"model.{k}": v for k, v in model.items()},
                                                    **{f"training.{k}": v for k, v in summary.items()}}.items())
    standin = "standin" in json.dumps(meta).lower()
    warning = ("\n**This bundle was trained offline on the course's stand-in models: it shows the mechanics, "
               "it does not caption real photos.**\n" if standin else "")
    return (f"---\ntags: [image-captioning, clipcap, clipcap-course]\n---\n# ClipCap captioner (clipcap-course)\n"
            f"{warning}\nInstall the course's package (it is named `utils`), then load it:\n```bash\n{INSTALL}\n```\n"
            f"```python\nimport utils\n\nassert getattr(utils, \"COURSE\", None) == \"clipcap-course\", "
            f"f\"another `utils` came first: {{utils.__file__}}; rename it\"\n"
            f"from utils.captioner import Captioner\n\n"
            f"captioner = Captioner.from_pretrained(\"<this id>\")\ncaptioner.caption([\"photo.jpg\"])\n```\n\n"
            f"| setting | value |\n|---|---|\n{rows}\n")


def publish(bundle: str | Path, to: str, offline: bool = False, private: bool = False) -> str:
    """Upload a bundle folder to `hub:NAME` (user/name) or `kaggle:OWNER/NAME`; returns where it went."""
    bundle = Path(bundle)
    if not is_bundle(bundle):
        raise ShareError(f"{bundle} is not a captioner bundle: publish the `captioner` folder that training wrote.")
    kind, ident = (to.split(":", 1) + [""])[:2] if ":" in to else ("", to)
    if kind not in ("hub", "kaggle") or not HUB_ID.match(ident):
        raise ShareError(f"--to {to!r}: write hub:USER/NAME (Hugging Face Hub) or kaggle:OWNER/NAME (Kaggle Models).")
    if offline:
        raise ShareError(f"cannot publish to {to}: this machine is offline (or --offline was given). Publishing "
                         "needs the network; export one file instead (`python -m utils export --model "
                         f"{bundle}`) and publish it from a machine with network.")
    with tempfile.TemporaryDirectory() as tmp:  # the bundle plus a model card, the bundle left untouched
        staged = Path(tmp) / bundle.name
        shutil.copytree(bundle, staged)
        (staged / "README.md").write_text(model_card(bundle))
        if kind == "hub":
            from huggingface_hub import HfApi

            api = HfApi()
            try:
                api.create_repo(ident, private=private, exist_ok=True)
                api.upload_folder(repo_id=ident, folder_path=str(staged), commit_message="clipcap-course captioner")
            except Exception as exc:
                raise ShareError(f"the Hub refused the upload to {ident} ({str(exc).splitlines()[0]}): log in with "
                                 "`huggingface-cli login` (or set HF_TOKEN) with a write token.") from None
            return f"https://huggingface.co/{ident}"
        import kagglehub

        handle = f"{ident}/pyTorch/default"
        try:
            kagglehub.model_upload(handle, str(staged), license_name="Apache 2.0",
                                   version_notes="clipcap-course captioner")
        except Exception as exc:
            raise ShareError(f"Kaggle refused the upload to {handle} ({str(exc).splitlines()[0]}): set "
                             "KAGGLE_API_TOKEN (kaggle.com -> Settings -> API -> Generate New Token).") from None
        return f"kaggle:{handle}"
