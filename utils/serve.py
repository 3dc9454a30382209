"""The web demo: `python -m utils serve --model BUNDLE` shows a trained captioner to anyone with a browser.

One page with everything inline (no CDN: the demo must work offline): upload a photo or pick an example,
turn the decoding knobs, read the captions. The captioner is loaded once, and the CLIP embedding of each
recent image is kept, so turning a knob runs only the language model again. `create_app` builds the Flask
app without starting a server, so tests drive it with Flask's test client.
"""

from __future__ import annotations

import base64
import dataclasses
import secrets
import threading
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

from flask import Flask, jsonify, render_template_string, request
from PIL import Image
from werkzeug.exceptions import RequestEntityTooLarge

from .bundle import training_cache
from .clip_encoder import draft_size
from .config import METHOD_ONLY, DecodeConfig, DecodeConfigError, decode_config
from .images import IMAGE_SUFFIXES, MAX_IMAGE_PIXELS, UnreadableImage, decode_image, open_image, preview_png
from .records import DatasetError
from .features import FeatureCacheError
from .model import CaptionerError
from .standins import is_standin

MAX_BYTES = 10 * 1024 * 1024  # an upload over 10 MB is refused before it is read
MAX_PIXELS = MAX_IMAGE_PIXELS  # and an image over the one size limit of utils/images.py, before it is decoded
KEEP = 32  # images whose embeddings are kept; an older upload must be sent again
EXAMPLES = 12  # images in the gallery
PREVIEW, THUMB = 320, 88  # pixels on the long edge of the shown image and of a gallery thumbnail


class Knob(NamedTuple):
    label: str
    kind: type
    low: float
    high: float
    step: float
    methods: tuple[str, ...]  # the decoding methods that read it


# The page's controls, by DecodeConfig field. Their bounds also bound what a request may ask for, so
# nobody can ask the server for 1000 beams.
KNOBS = {
    "temperature": Knob("temperature", float, 0.05, 2.0, 0.05, ("sample",)),
    "top_p": Knob("top-p", float, 0.05, 1.0, 0.05, ("sample",)),
    "num_beams": Knob("beams", int, 1, 10, 1, ("beam",)),
    "num_return_sequences": Knob("captions", int, 1, 10, 1, ("beam", "sample")),
    "seed": Knob("seed", int, 0, 2**31 - 1, 1, ("sample",)),
}


METHODS = {"greedy": "the likeliest word at each step", "beam": "keeps the best few captions so far",
           "sample": "draws each word at random"}


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
               examples_are: str = VALIDATION) -> Flask:
    """The demo's Flask app for a loaded captioner.

    examples: name -> image path, the gallery (unreadable ones are left out, with a warning in the log);
    examples_are: what they are, for the page ("12 validation images of the training data").
    decode: the settings the page starts from; those the page has no knob for (max_new_tokens,
    repetition_penalty, ...) hold for every request.
    """
    base = decode or DecodeConfig()
    app = Flask(__name__)
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
    start = {field: getattr(base, field) for field in KNOBS}  # the knobs' first values
    start.update(num_return_sequences=base.num_return_sequences if base.num_return_sequences > 1 else 3,
                 seed=base.seed or 0)
    page = {"max_bytes": max_bytes, "limits": f"up to {max_bytes / 2**20:g} MB and {max_pixels / 1e6:g} megapixels",
            "knobs": {field: knob.methods for field, knob in KNOBS.items()}, "examples_are": examples_are}

    def remember(name: str, image: Image.Image) -> str:
        token = secrets.token_hex(8)
        seen[token] = Seen(name, captioner.embed([image]), _data_url(image, PREVIEW))
        while len(seen) > KEEP:
            seen.popitem(last=False)
        return token

    @app.get("/")
    def index():
        return render_template_string(PAGE, title=title, summary=getattr(captioner, "summary", {}), page=page,
                                      standin=is_standin(captioner.config.backbone), gallery=gallery, knobs=KNOBS,
                                      start=start, method=base.method, methods=METHODS)

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_):
        return jsonify(error=f"The upload is larger than the {max_bytes / 2**20:g} MB limit: shrink the photo "
                             "or save it as a JPEG, then upload it again."), 413

    @app.post("/caption")
    def caption():
        """Captions of an upload (`image`), a gallery image (`example`: its position) or an image sent
        before (`token`), under the knobs' settings; JSON with `captions`, or `error` saying what to do."""
        try:
            decode, given = _decode(request.form, base)
        except DecodeConfigError as exc:
            return jsonify(error=f"Cannot caption with these settings: {exc}"), 400
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
        return jsonify(token=token, name=name, preview=preview, captions=[captions] if isinstance(captions, str)
                       else captions, call=_call(decode, given), decode=dataclasses.asdict(decode))

    return app


def _decode(form, base: DecodeConfig) -> tuple[DecodeConfig, dict]:
    """The DecodeConfig the page's controls ask for on top of `base`, and the settings given for the
    method (only those: decode_config refuses a setting the method would ignore)."""
    method = form.get("method") or base.method
    given = {"method": method}
    for field, knob in KNOBS.items():
        if method not in knob.methods:
            continue
        text = form.get(field, "").strip()
        try:
            value = knob.kind(text) if text else getattr(base, field)
        except ValueError:
            raise DecodeConfigError(f"{knob.label} must be a{' whole' if knob.kind is int else ''} number, "
                                    f"not {text!r}") from None
        if value is not None and not knob.low <= value <= knob.high:
            raise DecodeConfigError(f"{knob.label} must be between {knob.low:g} and {knob.high:g}, not {value:g}")
        given[field] = value
    if method == "beam":  # beam search returns its best captions, at most num_beams of them
        given["num_return_sequences"] = min(given["num_return_sequences"], given["num_beams"])
    given.setdefault("num_return_sequences", 1)  # greedy: one caption
    return decode_config(base, **given), given


def _call(decode: DecodeConfig, given: dict) -> str:
    """The Python call that gives the same captions: the page's settings and the server's fixed ones."""
    default = DecodeConfig()
    fixed = {f.name: getattr(decode, f.name) for f in dataclasses.fields(DecodeConfig)
             if f.name not in given and f.name not in KNOBS and getattr(decode, f.name) != getattr(default, f.name)
             and METHOD_ONLY.get(f.name, decode.method) == decode.method}
    settings = {k: v for k, v in {**given, **fixed}.items() if k != "num_return_sequences" or v != 1}
    return "captioner.caption([image], " + ", ".join(f"{k}={v!r}" for k, v in settings.items()) + ")"


def _data_url(image: Image.Image, side: int) -> str:
    return "data:image/png;base64," + base64.b64encode(preview_png(image, side)).decode()


def bundle_title(path: str | Path) -> str:
    """A bundle is named by its run: data/runs/embedded-mlp/captioner -> embedded-mlp."""
    path = Path(path).resolve()
    return path.parent.name if path.name == "captioner" else path.name


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ClipCap demo: {{ title }}</title>
<style>
  :root { --ink: #1d2330; --muted: #5b6475; --line: #d9dee7; --accent: #2457c5; --bad: #b3261e; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
         background: #f4f6fa; }
  header { padding: 14px 24px; background: #fff; border-bottom: 1px solid var(--line); }
  header h1 { margin: 0; font-size: 20px; }
  header p { margin: 2px 0 0; color: var(--muted); }
  .standin { margin: 8px 0 0; padding: 6px 10px; background: #fff4d6; border: 1px solid #e8c766; border-radius: 6px;
             color: #5c4500; }
  main { display: grid; grid-template-columns: 300px 270px minmax(320px, 1fr); gap: 16px; padding: 16px 24px;
         align-items: start; }
  @media (max-width: 960px) { main { grid-template-columns: 1fr; } }
  section { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 14px 16px; }
  h2 { margin: 0 0 10px; font-size: 16px; }
  h3 { margin: 14px 0 6px; font-size: 14px; color: var(--muted); font-weight: 600; }
  .upload { display: block; padding: 18px 12px; border: 2px dashed #a9b6cf; border-radius: 8px; text-align: center;
            cursor: pointer; background: #f8faff; }
  .upload:hover { border-color: var(--accent); }
  .upload input { display: block; margin: 8px auto 0; max-width: 100%; }
  .hint { margin: 6px 0 0; color: var(--muted); font-size: 13px; }
  #gallery { display: grid; grid-template-columns: repeat(3, 1fr); gap: 6px; }
  #gallery button { padding: 0; border: 2px solid transparent; border-radius: 6px; background: none; cursor: pointer;
                    line-height: 0; }
  #gallery button[aria-pressed="true"] { border-color: var(--accent); }
  #gallery img { width: 100%; aspect-ratio: 1; object-fit: cover; border-radius: 4px; image-rendering: pixelated; }
  fieldset { border: 0; margin: 0 0 10px; padding: 0; }
  fieldset:disabled { opacity: .45; }
  legend, label.knob { display: block; font-weight: 600; font-size: 13px; margin-bottom: 2px; }
  .methods label { display: block; padding: 3px 0; }
  .methods small { display: block; margin: -2px 0 0 24px; color: var(--muted); }
  input[type=range] { width: 100%; }
  output { float: right; font-weight: 400; font-variant-numeric: tabular-nums; }
  .seed { display: flex; gap: 6px; }
  .seed input { width: 100%; }
  button.again { white-space: nowrap; }
  #picture { display: flex; gap: 14px; align-items: flex-start; flex-wrap: wrap; }
  #preview { max-width: 100%; width: 240px; border-radius: 6px; background: #eef1f6; image-rendering: pixelated; }
  #preview:not([src]) { height: 160px; }
  #name { font-weight: 600; word-break: break-all; }
  #status { color: var(--muted); font-size: 13px; }
  #call { display: block; margin-top: 6px; padding: 6px 8px; background: #f1f3f7; border-radius: 6px; font-size: 12.5px;
          white-space: pre-wrap; word-break: break-word; }
  #message { margin: 0 0 12px; padding: 8px 12px; border-radius: 6px; background: #fdecea; color: var(--bad);
             border: 1px solid #f1b8b3; }
  #captions { list-style: none; margin: 14px 0 0; padding: 0; display: grid; gap: 10px;
              grid-template-columns: repeat(auto-fill, minmax(190px, 1fr)); }
  #captions li { padding: 10px 12px; border: 1px solid var(--line); border-radius: 8px; background: #fbfcfe;
                 font-size: 16px; }
  #captions li::before { content: attr(data-n); display: block; font-size: 12px; color: var(--muted); }
  #captions[aria-busy="true"] { opacity: .5; }
</style>
</head>
<body>
<header>
  <h1>ClipCap captioner: {{ title }}</h1>
  <p>{% if summary.dataset %}Trained on {{ summary.dataset }}
     {%- if summary.steps %} for {{ summary.steps }} steps{% endif %}
     {%- if summary.best_val_loss is number %}, best validation loss {{ '%.3f' % summary.best_val_loss }}{% endif %}.
     {% endif %}CLIP sees the image, a mapper turns its embedding into a prefix, GPT-2 writes on from there.</p>
  {% if standin %}<p class="standin"><b>Stand-in model.</b> Its CLIP and GPT-2 are tiny offline stand-ins: the
     captions show the mechanics, not what a trained ClipCap says.</p>{% endif %}
</header>
<main>
  <section>
    <h2>1. An image</h2>
    <label class="upload">Upload a photo
      <input type="file" id="upload" accept="image/*">
    </label>
    <p class="hint">JPEG, PNG, WebP, BMP or GIF, {{ page.limits }}.</p>
    <h3>or pick an example</h3>
    {% if gallery %}
    <div id="gallery">
      {% for name, _, thumb in gallery %}<button type="button" data-example="{{ loop.index0 }}" title="{{ name }}"
        aria-pressed="false"><img src="{{ thumb }}" alt="{{ name }}"></button>{% endfor %}
    </div>
    <p class="hint">{{ gallery|length }} {{ page.examples_are }}.</p>
    {% else %}
    <p class="hint" id="gallery">No examples here: the images this model was trained on are not on this machine.
       Start the server with <code>--examples DIR</code> to show the images of a folder.</p>
    {% endif %}
  </section>
  <section>
    <h2>2. Decoding</h2>
    <form id="controls">
      <fieldset class="methods"><legend>method</legend>
        {% for m, note in methods.items() %}
        <label><input type="radio" name="method" value="{{ m }}"{% if m == method %} checked{% endif %}> {{ m }}
          <small>{{ note }}</small></label>{% endfor %}
      </fieldset>
      {% for field, knob in knobs.items() if field != "seed" %}
      <fieldset data-knob="{{ field }}"><label class="knob" for="{{ field }}">{{ knob.label }}
        <output for="{{ field }}">{{ start[field] }}</output></label>
        <input type="range" id="{{ field }}" name="{{ field }}" min="{{ knob.low }}" max="{{ knob.high }}"
               step="{{ knob.step }}" value="{{ start[field] }}">
      </fieldset>{% endfor %}
      <fieldset data-knob="seed"><label class="knob" for="seed">seed</label>
        <div class="seed"><input type="number" id="seed" name="seed" min="0" step="1" value="{{ start.seed }}">
          <button type="button" class="again" id="again">draw again</button></div>
      </fieldset>
    </form>
  </section>
  <section>
    <h2>3. Captions</h2>
    <p id="message" role="alert" hidden></p>
    <div id="picture">
      <img id="preview" alt="">
      <div><div id="name">no image yet</div><div id="status">upload a photo or pick an example</div></div>
    </div>
    <code id="call"></code>
    <ol id="captions" aria-busy="false" aria-live="polite"></ol>
  </section>
</main>
<script>
const page = {{ page|tojson }};
const $ = (id) => document.getElementById(id);
const form = $("controls");
let token = null, latest = 0;

function say(text) { $("message").textContent = text; $("message").hidden = !text; }

function method() { return form.elements.method.value; }

function grey() {  // a knob the chosen method does not read is greyed out and not sent
  for (const box of form.querySelectorAll("fieldset[data-knob]")) {
    box.disabled = !page.knobs[box.dataset.knob].includes(method());
  }
  for (const out of form.querySelectorAll("output")) { out.textContent = $(out.htmlFor.value).value; }
}

async function ask(what) {  // what: {image: File} | {example: n} | {} (the same image, new settings)
  if (!what.image && what.example === undefined && !token) return;
  const body = new FormData(form);
  if (what.image) body.append("image", what.image, what.image.name);
  else if (what.example !== undefined) body.append("example", what.example);
  else body.append("token", token);
  const ticket = ++latest;
  $("captions").setAttribute("aria-busy", "true");
  $("status").textContent = "captioning...";
  let reply;
  try {
    const response = await fetch("caption", {method: "POST", body, signal: AbortSignal.timeout(120000)});
    reply = await response.json().catch(() => ({error: `The server answered ${response.status} ` +
      `${response.statusText}; its terminal says why.`}));
  } catch (err) {
    reply = {error: `No answer from the server (${err.message}): is python -m utils serve still running?`};
  }
  if (ticket !== latest) return;  // a newer request is on its way
  $("captions").setAttribute("aria-busy", "false");
  if (reply.error) {
    say(reply.error);
    $("status").textContent = token ? "the captions below are still those of the image shown" : "";
    return;
  }
  say("");
  token = reply.token;
  $("preview").src = reply.preview;
  $("name").textContent = reply.name;
  $("status").textContent = `${reply.captions.length} caption${reply.captions.length > 1 ? "s" : ""}`;
  $("call").textContent = reply.call;
  $("captions").replaceChildren(...reply.captions.map((text, i) => {
    const li = document.createElement("li");
    li.dataset.n = reply.captions.length > 1 ? `${reply.decode.method} ${i + 1}` : reply.decode.method;
    li.textContent = text;
    return li;
  }));
}

function pressed(button) {
  for (const b of document.querySelectorAll("#gallery button")) b.setAttribute("aria-pressed", b === button);
}

$("upload").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (!file) return;
  if (file.size > page.max_bytes) {  // refused here, before sending megabytes the server would refuse
    say(`${file.name} is larger than the limit (${page.limits}): shrink the photo or save it as a JPEG.`);
  } else {
    pressed(null);
    ask({image: file});
  }
  event.target.value = "";  // choosing the same file again still counts as a change
});
for (const button of document.querySelectorAll("#gallery button")) {
  button.addEventListener("click", () => { pressed(button); ask({example: button.dataset.example}); });
}
form.addEventListener("input", grey);
form.addEventListener("change", () => { grey(); ask({}); });
form.addEventListener("submit", (event) => { event.preventDefault(); ask({}); });
$("again").addEventListener("click", () => { $("seed").value = Number($("seed").value) + 1; ask({}); });
grey();
const first = document.querySelector("#gallery button");
if (first) first.click();
</script>
</body>
</html>
"""
