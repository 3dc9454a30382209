"""The web demo: `python -m utils serve --model BUNDLE` shows a trained captioner to anyone with a browser.

One page with everything inline (no CDN: the demo must work offline): upload a photo or pick an example,
turn the decoding knobs, read the captions, translated if asked. The page is the template
`utils/templates/demo.html`; its knobs, and what its JavaScript greys out, come from the table of decoding
controls (`controls.py`), sent as JSON. The captioner is loaded once, and the CLIP embedding of each recent
image is kept, so turning a knob runs only the language model again. `create_app` builds the Flask app
without starting a server, so tests drive it with Flask's test client.
"""

from __future__ import annotations

import base64
import dataclasses
import secrets
import threading
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

from flask import Flask, jsonify, render_template, request
from PIL import Image
from werkzeug.exceptions import RequestEntityTooLarge

from .bundle import training_cache
from .clip_encoder import draft_size
from .config import DecodeConfig, DecodeConfigError
from .controls import KNOBS, METHODS, caption_call, decode_from_controls, start_values, table_json
from .features import FeatureCacheError
from .images import IMAGE_SUFFIXES, MAX_IMAGE_PIXELS, UnreadableImage, decode_image, open_image, preview_png
from .model import CaptionerError
from .records import DatasetError
from .standins import is_standin
from .translate import LANGUAGES, TranslationError, Translators

MAX_BYTES = 10 * 1024 * 1024  # an upload over 10 MB is refused before it is read
MAX_PIXELS = MAX_IMAGE_PIXELS  # and an image over the one size limit of utils/images.py, before it is decoded
KEEP = 32  # images whose embeddings are kept; an older upload must be sent again
EXAMPLES = 12  # images in the gallery
PREVIEW, THUMB = 320, 88  # pixels on the long edge of the shown image and of a gallery thumbnail


class Seen(NamedTuple):
    name: str
    embedding: object  # (1, clip_dim) tensor
    preview: str  # data: URL


VALIDATION = "validation images of the training data"  # what the gallery shows by default


def validation_examples(captioner, limit: int = EXAMPLES) -> dict[str, str]:
    """name -> path of the first validation images of the feature cache the bundle was trained on;
    empty when the bundle names no cache or the cache is not on this machine."""
    try:  # found even where the data folder moved
        cache = training_cache(getattr(captioner, "summary", {}), getattr(captioner, "bundle_path", None))
    except (CaptionerError, FeatureCacheError):
        return {}
    val = cache.images[cache.images["split"] == "val"].head(limit)
    return dict(zip(val["image_id"], val["image_path"]))


def folder_examples(folder: str | Path, limit: int = EXAMPLES) -> dict[str, str]:
    """name -> path of the first image files of `folder` (sorted, subfolders included); DatasetError
    when the folder is missing or none of those images can be read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"--examples {folder}: no such folder. Give a folder of images (JPEG, PNG, ...).")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())[:limit]
    reasons = []
    for path in paths:
        try:
            open_image(path)
            break
        except UnreadableImage as exc:
            reasons.append(f"{path.name}: {exc}")
    else:
        found = f"none of its image files can be read ({'; '.join(reasons[:3])})" if paths else \
            f"it holds no image files ({', '.join(IMAGE_SUFFIXES)})"
        raise DatasetError(f"--examples {folder}: {found}. Give a folder of readable images.")
    return {p.name: str(p) for p in paths}


def create_app(captioner, examples: dict[str, str] | None = None, decode: DecodeConfig | None = None,
               title: str = "captioner", max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS,
               examples_are: str = VALIDATION, translators: Translators | None = None) -> Flask:
    """The demo's Flask app for a loaded captioner.

    examples: name -> image path, the gallery (unreadable ones are left out, with a warning in the log);
    examples_are: what they are, for the page ("12 validation images of the training data").
    decode: the settings the page starts from; those the page has no knob for (max_new_tokens,
    repetition_penalty, ...) hold for every request.
    translators: where the page's "translate to" choice gets its models (default: Translators(), which
    loads each language's on its first request; offline, the stand-in).
    """
    base = decode or DecodeConfig()
    translators = translators or Translators()
    app = Flask(__name__)  # the page: templates/demo.html beside this file
    app.config["MAX_CONTENT_LENGTH"] = max_bytes
    model, _ = captioner.image_encoder()  # loaded now: a broken bundle fails at start, not on the first upload
    draft = draft_size(model)  # JPEGs decode as `caption([path])` decodes them
    lock = threading.Lock()  # one caption at a time: generate() and its seeded RNG are not thread-safe
    seen: OrderedDict[str, Seen] = OrderedDict()
    gallery, unreadable = [], []
    for name, path in (examples or {}).items():
        try:
            gallery.append((name, path, _data_url(open_image(path, draft), THUMB)))
        except UnreadableImage as exc:
            unreadable.append(f"{path} ({exc})")
    if unreadable:
        app.logger.warning("%d of %d example images left out of the gallery, as unreadable: %s", len(unreadable),
                           len(examples), ", ".join(unreadable[:3]) + (", ..." if len(unreadable) > 3 else ""))
    start = start_values(base)  # the knobs' first values
    page = {"max_bytes": max_bytes, "limits": f"up to {max_bytes / 2**20:g} MB and {max_pixels / 1e6:g} megapixels",
            "controls": table_json(), "examples_are": examples_are}

    def remember(name: str, image: Image.Image) -> str:
        token = secrets.token_hex(8)
        seen[token] = Seen(name, captioner.embed([image]), _data_url(image, PREVIEW))
        while len(seen) > KEEP:
            seen.popitem(last=False)
        return token

    @app.get("/")
    def index():
        return render_template("demo.html", title=title, summary=getattr(captioner, "summary", {}), page=page,
                               standin=is_standin(captioner.config.backbone), gallery=gallery, knobs=KNOBS,
                               start=start, method=base.method, methods=METHODS, languages=LANGUAGES)

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_):
        return jsonify(error=f"The upload is larger than the {max_bytes / 2**20:g} MB limit: shrink the photo "
                             "or save it as a JPEG, then upload it again."), 413

    @app.post("/caption")
    def caption():
        """Captions of an upload (`image`), a gallery image (`example`: its position) or an image sent
        before (`token`), under the knobs' settings; JSON with `captions` (and with `translate`: a language
        code, `translations` and `translated_by`, or `translate_error`), or `error` saying what to do."""
        try:
            decode = decode_from_controls(request.form.get("method") or base.method, request.form, base)
        except DecodeConfigError as exc:
            return jsonify(error=f"Cannot caption with these settings: {exc}"), 400
        lang = request.form.get("translate", "").strip()
        upload, example, token = request.files.get("image"), request.form.get("example"), request.form.get("token")
        if example is not None and not (example.isdecimal() and int(example) < len(gallery)):
            return jsonify(error=f"There is no example {example!r}: reload the page."), 400
        with lock:
            try:
                if upload is not None:
                    name = upload.filename or "the upload"
                    token = remember(name, decode_image(upload.read(), draft, max_pixels))
                elif example is not None:
                    name, path, _ = gallery[int(example)]
                    token = remember(name, open_image(path, draft))
            except UnreadableImage as exc:
                return jsonify(error=f"{name} cannot be captioned: {exc}. Upload a photo (JPEG, PNG, WebP, BMP "
                                     f"or GIF) {page['limits']}."), 400
            if token not in seen:
                return jsonify(error="Upload a photo or pick an example first." if not token else
                               "The server no longer holds that image (it keeps the last few, and forgets "
                               "them when restarted): upload it again."), 400
            seen.move_to_end(token)
            name, embedding, preview = seen[token]
            captions = captioner.generate(embedding, decode)[0]
            captions = [captions] if isinstance(captions, str) else captions
            reply = dict(token=token, name=name, preview=preview, captions=captions, call=caption_call(decode),
                         decode=dataclasses.asdict(decode))
            if lang:
                try:
                    translator = translators[lang]
                    reply.update(translations=translator(captions), translated_by=translator.about)
                except TranslationError as exc:  # the captions are still shown
                    reply.update(translate_error=str(exc))
        return jsonify(reply)

    return app


def _data_url(image: Image.Image, side: int) -> str:
    return "data:image/png;base64," + base64.b64encode(preview_png(image, side)).decode()


def bundle_title(path: str | Path) -> str:
    """A bundle is named by its run: data/runs/embedded-mlp/captioner -> embedded-mlp."""
    path = Path(path).resolve()
    return path.parent.name if path.name == "captioner" else path.name
