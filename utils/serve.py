"""The web demo: `python -m utils serve --model BUNDLE` shows a trained captioner to anyone with a browser.

One page with everything inline (no CDN: the demo must work offline): upload a photo or pick an example,
turn the decoding knobs, read the captions, translated if asked. The page is the template
`utils/templates/demo.html`; its knobs, and what its JavaScript greys out, come from the table of decoding
controls (`controls.py`), sent as JSON. The captioner is loaded once, and the CLIP embedding of each recent
image is kept, so turning a knob runs only the language model again. `create_app` builds the Flask app
without starting a server, so tests drive it with Flask's test client; `make_demo_server` serves it.

What one request may cost is bounded, so that the demo can be shown on a lab's network: a body is read
within BODY_SECONDS and MAX_BYTES; an image is refused by its header when it is not JPEG, PNG, WebP, BMP
or GIF, over MAX_PIXELS or a strip (the one policy of utils/images.py, the same reason `caption` prints);
it is decoded within DECODE_SECONDS outside the model's lock, large images one at a time and small ones
four at a time, so one client sending large images cannot starve the others; CLIP then sees at most a
few megapixels (the decode is drafted to twice its input). Anything unexpected is a JSON 500 naming the
error, logged with its traceback, never a bare page; every reply carries a Content-Security-Policy
(scripts and styles only the page's own, by nonce), X-Frame-Options and X-Content-Type-Options.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import re
import secrets
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

from flask import Flask, g, jsonify, render_template, request
from PIL import Image
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.serving import WSGIRequestHandler, make_server

from .clip_encoder import draft_size
from .config import DecodeConfig, DecodeConfigError
from .controls import KNOBS, METHODS, caption_call, decode_from_controls, start_values, table_json
from .features import FeatureCacheError, training_cache
from .images import (FORMAT_NAMES, IMAGE_SUFFIXES, MAX_IMAGE_PIXELS, UnreadableImage, decode_image, open_image,
                     preview_png, read_image_bytes)
from .model import CaptionerError
from .records import DatasetError
from .standin_names import is_standin
from .translate import LANGUAGES, TranslationError, Translators

MAX_BYTES = 10 * 1024 * 1024  # an upload over 10 MB is refused before it is read
MAX_PIXELS = MAX_IMAGE_PIXELS  # and an image over the one size limit of utils/images.py, before it is decoded
BODY_SECONDS = 30  # a request body must arrive within this (a client sending one byte a minute is cut off)
SOCKET_SECONDS = 10  # and no single wait for the client's next bytes may be longer
DECODE_SECONDS = 10  # an image must decode within this (at the 120 MP limit: 1-3 s on one core)
HEAVY_PIXELS = 12_000_000  # images that decode to more pixels than this take turns, one at a time ...
HEAVY_SLOTS, LIGHT_SLOTS = 1, 4  # ... while up to four smaller ones decode beside it
QUEUE_SECONDS = 30  # how long an image may wait for its turn before the client is asked to try again
KEEP = 32  # images whose embeddings are kept; an older upload must be sent again
EXAMPLES = 12  # images in the gallery
PREVIEW, THUMB = 320, 88  # pixels on the long edge of the shown image and of a gallery thumbnail


class DemoBusy(Exception):
    """No decode slot freed within QUEUE_SECONDS: the client is asked to try again (503)."""


class DecodeSlots:
    """The queue images are decoded through, outside the model's lock: large ones (over `heavy_pixels`
    decoded pixels) one at a time, small ones `light` at a time, so memory stays bounded and a client
    looping on large images holds one slot, never every one."""

    def __init__(self, heavy: int = HEAVY_SLOTS, light: int = LIGHT_SLOTS, heavy_pixels: int = HEAVY_PIXELS,
                 wait: float = QUEUE_SECONDS):
        self.heavy, self.light = threading.BoundedSemaphore(heavy), threading.BoundedSemaphore(light)
        self.heavy_pixels, self.wait = heavy_pixels, wait

    @contextlib.contextmanager
    def __call__(self, pixels: int):
        slot = self.heavy if pixels > self.heavy_pixels else self.light
        if not slot.acquire(timeout=self.wait):
            raise DemoBusy("The demo is busy decoding other images: try again in a moment.")
        try:
            yield
        finally:
            slot.release()


class Seen(NamedTuple):
    name: str
    embedding: object  # (1, clip_dim) tensor
    preview: str  # data: URL


VALIDATION = "validation images of the training data"  # what the gallery shows by default


def validation_examples(captioner, limit: int = EXAMPLES) -> dict[str, str]:
    """name -> path of the first validation images of the feature cache the bundle was trained on;
    empty when the bundle names no cache or the cache is not on this machine."""
    try:  # found even where the data folder moved
        cache = training_cache(captioner)
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
               examples_are: str = VALIDATION, translators: Translators | None = None,
               body_seconds: float = BODY_SECONDS, decode_seconds: float = DECODE_SECONDS,
               slots: DecodeSlots | None = None) -> Flask:
    """The demo's Flask app for a loaded captioner.

    examples: name -> image path, the gallery (unreadable ones are left out, with a warning in the log);
    examples_are: what they are, for the page ("12 validation images of the training data").
    decode: the settings the page starts from; those the page has no knob for (max_new_tokens,
    repetition_penalty, ...) hold for every request.
    translators: where the page's "translate to" choice gets its models (default: Translators(), which
    loads each language's on its first request; offline, the stand-in); only the languages the page
    offers (translate.LANGUAGES) are asked for.
    body_seconds, decode_seconds, slots: the bounds on one request's work (see the module's docstring).
    """
    base = decode or DecodeConfig()
    translators = translators or Translators()
    app = Flask(__name__)  # the page: templates/demo.html beside this file
    app.config["MAX_CONTENT_LENGTH"] = max_bytes
    app.wsgi_app = BoundedBody(app.wsgi_app, max_bytes, body_seconds, lambda: too_large_message(max_bytes))
    slots = slots or DecodeSlots()
    model, _ = captioner.image_encoder()  # loaded now: a broken bundle fails at start, not on the first upload
    draft = draft_size(model)  # JPEGs decode as `caption([path])` decodes them
    lock = threading.Lock()  # one caption at a time: generate() and its seeded RNG are not thread-safe
    # (images are decoded before it is taken, through `slots`: a large decode never holds up the others)
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

    def remember(name: str, image: Image.Image, preview: str) -> str:
        token = secrets.token_hex(8)
        seen[token] = Seen(name, captioner.embed([image]), preview)
        while len(seen) > KEEP:
            seen.popitem(last=False)
        return token

    @app.get("/")
    def index():
        return render_template("demo.html", title=title, summary=getattr(captioner, "summary", {}), page=page,
                               standin=is_standin(captioner.config.backbone), gallery=gallery, knobs=KNOBS,
                               start=start, method=base.method, methods=METHODS, languages=LANGUAGES,
                               nonce=nonce())

    def nonce() -> str:
        if "nonce" not in g:
            g.nonce = secrets.token_urlsafe(16)
        return g.nonce

    @app.after_request
    def security_headers(response):
        """The page runs only its own script and style (by nonce), talks only to this server, and may not be
        framed by another site; no reply is sniffed into another type."""
        own = f"'nonce-{g.nonce}'" if "nonce" in g else "'none'"
        response.headers["Content-Security-Policy"] = (
            f"default-src 'none'; script-src {own}; style-src {own}; img-src 'self' data:; connect-src 'self'; "
            "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_):
        return jsonify(error=too_large_message(max_bytes)), 413

    @app.errorhandler(Exception)
    def unexpected(exc):
        """A bug, not a bad request: said in JSON (the page shows it) and logged with its traceback."""
        if isinstance(exc, HTTPException):
            return exc
        app.logger.exception("the demo failed on %s %s", request.method, request.path)
        return jsonify(error=f"The demo failed ({type(exc).__name__}); its terminal shows why. The image and "
                             "settings may work again, or another image."), 500

    def image_of(source: bytes | str) -> Image.Image:
        """An upload's bytes or a gallery file decoded by the one policy, within the time budget, through
        the slots: outside the model's lock."""
        data = source if isinstance(source, bytes) else read_image_bytes(source)
        return decode_image(data, draft, max_pixels, seconds=decode_seconds, gate=slots)

    @app.post("/caption")
    def caption():
        """Captions of an upload (`image`), a gallery image (`example`: its position) or an image sent
        before (`token`), under the knobs' settings; JSON with `captions` (and with `translate`: a language
        code, `translations` and `translated_by`, or `translate_error`), or `error` saying what to do."""
        try:
            decode = decode_from_controls(request.form.get("method") or base.method, request.form, base)
        except DecodeConfigError as exc:
            return jsonify(error=f"Cannot caption with these settings: {exc}"), 400
        lang = request.form.get("translate", "").strip().lower()
        if lang and lang not in LANGUAGES:
            offered = ", ".join(f"{code} ({language})" for code, language in LANGUAGES.items())
            return jsonify(error=f"The demo does not translate to {_shown(lang)}: choose one of {offered}."), 400
        upload, example, token = request.files.get("image"), request.form.get("example"), request.form.get("token")
        if example is not None and not (re.fullmatch(r"[0-9]{1,6}", example) and int(example) < len(gallery)):
            return jsonify(error=f"There is no example {_shown(example)}: reload the page."), 400
        image = None
        try:
            if upload is not None:
                name = upload.filename or "the upload"
                image = image_of(upload.read())
            elif example is not None:
                name, path, _ = gallery[int(example)]
                image = image_of(path)
        except UnreadableImage as exc:
            return jsonify(error=f"{name} cannot be captioned: {exc}. Upload a photo ({FORMAT_NAMES}) "
                                 f"{page['limits']}."), 400
        except DemoBusy as exc:
            return jsonify(error=str(exc)), 503
        preview = None if image is None else _data_url(image, PREVIEW)  # also outside the lock
        with lock:
            if image is not None:
                token = remember(name, image, preview)
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


def too_large_message(max_bytes: int) -> str:
    return (f"The upload is larger than the {max_bytes / 2**20:g} MB limit: shrink the photo or save it as a JPEG, "
            "then upload it again.")


def _shown(value: str, limit: int = 20) -> str:
    """A client's value quoted in a message, cut short: a 5,000-digit number is not echoed back whole."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


class BoundedBody:
    """WSGI middleware: a request body read whole, within `seconds` and `max_bytes`, before the app sees it
    (408 or 413 in JSON otherwise). With the server's socket timeout (`make_demo_server`) a client that
    sends its upload a byte at a time holds a thread for `seconds` at most, not for ever."""

    def __init__(self, app, max_bytes: int, seconds: float, too_large):
        self.app, self.max_bytes, self.seconds, self.too_large = app, max_bytes, seconds, too_large

    def __call__(self, environ, start_response):
        if environ.get("REQUEST_METHOD") not in ("POST", "PUT", "PATCH"):
            return self.app(environ, start_response)
        try:
            length = int(environ.get("CONTENT_LENGTH") or -1)
        except ValueError:
            length = -1
        if length > self.max_bytes:  # the app refuses it unread (413)
            return self.app(environ, start_response)
        if length < 0 and not environ.get("wsgi.input_terminated"):
            length = 0  # no length and no end marker: there is no body to read
        stream = environ["wsgi.input"]
        read = getattr(stream, "read1", None) or stream.read
        deadline, chunks, got = time.monotonic() + self.seconds, [], 0
        try:
            while length < 0 or got < length:
                if time.monotonic() > deadline:
                    raise TimeoutError
                chunk = read(65536 if length < 0 else min(65536, length - got))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
                if got > self.max_bytes:
                    return _json_reply(start_response, 413, self.too_large())
        except OSError:  # the socket's own timeout (TimeoutError is an OSError) or a dropped connection
            return _json_reply(start_response, 408, f"The upload did not arrive within {self.seconds:g} s: "
                                                    "try again, or send a smaller photo.")
        body = b"".join(chunks)
        environ.update({"wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body)),
                        "wsgi.input_terminated": False})
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        return self.app(environ, start_response)


def _json_reply(start_response, status: int, error: str) -> list[bytes]:
    body = json.dumps({"error": error}).encode()
    reason = {408: "Request Timeout", 413: "Content Too Large"}[status]
    start_response(f"{status} {reason}", [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                                          ("X-Content-Type-Options", "nosniff"), ("Connection", "close")])
    return [body]


def make_demo_server(app: Flask, host: str, port: int, socket_seconds: float = SOCKET_SECONDS):
    """The threaded server `python -m utils serve` runs, each connection's reads bounded by
    `socket_seconds` (socketserver sets a handler's `timeout` on its connection); a port in use: OSError."""
    handler = type("DemoRequestHandler", (WSGIRequestHandler,), {"timeout": socket_seconds})
    return make_server(host, port, app, threaded=True, request_handler=handler)


def _data_url(image: Image.Image, side: int) -> str:
    return "data:image/png;base64," + base64.b64encode(preview_png(image, side)).decode()


def bundle_title(path: str | Path) -> str:
    """A bundle is named by its run: data/runs/embedded-mlp/captioner -> embedded-mlp."""
    path = Path(path).resolve()
    return path.parent.name if path.name == "captioner" else path.name
