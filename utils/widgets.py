"""The decoding explorer of notebook 05: pick or upload an image, turn the decoding knobs, read captions.

The logic lives here, not in the notebook, so a test can set the widgets' values exactly as a student's
clicks do and check which decoding was asked for and what caption was shown. The knobs are built from the
table of decoding controls (`controls.py`), as the web demo's are, and images are decoded as
`captioner.caption([path])` decodes them, so a photo gets the same caption here, in the demo and from the CLI.
"""

from __future__ import annotations

import html
from pathlib import Path

import ipywidgets as w
from PIL import Image

from .clip_encoder import draft_size
from .config import DecodeConfig, DecodeConfigError
from .controls import KNOBS, METHODS, caption_call, decode_from_controls, start_values
from .images import UnreadableImage, decode_image, open_image, preview_png
from .translate import LANGUAGES, TranslationError, Translators

PREVIEW = 224  # pixels: the picture is shown this wide, whatever its size
# Jupyter's server drops a widget message over 10 MiB (its websocket_max_message_size) without a word, so an
# upload larger than that never reaches the kernel: the explorer says so beside the button, and takes a path.
UPLOAD_LIMIT = 10 * 2**20
STYLE = {"description_width": "90px"}


def _knob(field: str, value) -> w.Widget:
    """The widget for one row of the table of decoding controls."""
    c = KNOBS[field]
    if c.widget == "number":
        return w.BoundedIntText(value=value, min=c.low, max=c.high, step=c.step, description=c.label, style=STYLE)
    slider = w.FloatSlider if c.kind is float else w.IntSlider
    return slider(value=value, min=c.low, max=c.high, step=c.step, description=c.label, style=STYLE)


class DecodingExplorer:
    """Widgets for the method and each knob of the table of decoding controls (`knobs`, by DecodeConfig
    field; also as attributes: temperature, top_p, num_beams, samples, seed), an image picker, an upload
    button, a path box for photos too large to upload, and a language to translate the captions to.
    The captions update on every change.

    images: name -> image path (or PIL image), the choices of the picker; an uploaded photo joins them.
    caption_fn(image, decode) -> caption or list of captions; default: `captioner.caption([image], decode)[0]`.
    translators: where the translations come from (default: Translators(), offline the stand-in).
    `calls` records every (image name, DecodeConfig) asked for, newest last; `output.value` holds the
    captions shown (HTML), `translation.value` their translation.
    """

    def __init__(self, captioner, images: dict[str, str | Path | Image.Image], caption_fn=None,
                 translators: Translators | None = None):
        self.captioner = captioner
        self.images = dict(images)
        self.caption_fn = caption_fn or (lambda image, decode: captioner.caption([image], decode)[0])
        self.translators = translators or Translators()
        self.draft = draft_size(captioner.image_encoder()[0])  # JPEGs decode as caption([path]) decodes them
        self.calls: list[tuple[str, DecodeConfig]] = []
        self.image = w.Dropdown(options=list(self.images), description="image", style=STYLE)
        self.upload = w.FileUpload(accept="image/*", multiple=False, description="your photo")
        self.upload_note = w.HTML(f"<small>up to {UPLOAD_LIMIT // 2**20} MB: Jupyter drops a larger upload without a "
                                  "word. For a larger photo, type its path below.</small>")
        self.path = w.Text(description="or a path", placeholder="a photo on this machine", style=STYLE,
                           continuous_update=False)
        self.method = w.Dropdown(options=list(METHODS), value="greedy", description="method", style=STYLE)
        self.knobs = {field: _knob(field, value) for field, value in start_values().items()}
        self.temperature, self.top_p, self.num_beams = (self.knobs[f] for f in ("temperature", "top_p", "num_beams"))
        self.samples, self.seed = self.knobs["num_return_sequences"], self.knobs["seed"]
        self.translate = w.Dropdown(options=[("English only", "")] + [(name, code) for code, name in LANGUAGES.items()],
                                    value="", description="translate to", style=STYLE)
        self.picture = w.Image(format="png", width=PREVIEW)
        self.settings = w.HTML()
        self.output = w.HTML()
        self.translation = w.HTML()
        for control in (self.image, self.method, self.translate, *self.knobs.values()):
            control.observe(self.refresh, names="value")
        self.upload.observe(self._uploaded, names="value")
        self.path.observe(self._typed, names="value")
        self.refresh()

    def decode(self) -> DecodeConfig:
        """The DecodeConfig the widgets describe; knobs the method does not read are greyed out and not passed."""
        method = self.method.value
        for field, knob in self.knobs.items():
            knob.disabled = method not in KNOBS[field].methods
        return decode_from_controls(method, {field: knob.value for field, knob in self.knobs.items()})

    def refresh(self, *_) -> None:
        name = self.image.value
        self.translation.value = ""
        if name is None:
            self.output.value = "<i>no image: pick one or upload a photo</i>"
            return
        try:
            image = self._image(name)
        except UnreadableImage as exc:
            self.output.value = f"<b>{html.escape(str(name))}</b> cannot be read: {html.escape(str(exc))}"
            return
        self.picture.value = preview_png(image, PREVIEW)
        try:
            decode = self.decode()
        except DecodeConfigError as exc:  # the sliders only make valid settings; say so if that ever changes
            self.output.value = f"<b>these settings do not go together:</b> {html.escape(str(exc))}"
            return
        self.calls.append((name, decode))
        self.settings.value = f"<code>{html.escape(caption_call(decode))}</code>"
        captions = self.caption_fn(image, decode)
        captions = [captions] if isinstance(captions, str) else captions
        self.output.value = _items(captions)
        if self.translate.value:
            try:
                translator = self.translators[self.translate.value]
                self.translation.value = f"<i>{html.escape(translator.about)}</i>" + _items(translator(captions))
            except TranslationError as exc:
                self.translation.value = f"<b>no translation:</b> {html.escape(str(exc))}"

    def _image(self, name: str) -> Image.Image:
        source = self.images[name]
        return source if isinstance(source, Image.Image) else open_image(source, self.draft)

    def _add(self, name: str, image: Image.Image) -> None:
        self.images[name] = image
        self.image.options = list(self.images)
        if self.image.value == name:
            self.refresh()
        self.image.value = name  # refreshes, captioning the new photo

    def _uploaded(self, change) -> None:
        for item in change["new"]:  # ipywidgets 8: a tuple of {"name", "type", "size", "content", ...}
            try:
                image = decode_image(bytes(item["content"]), self.draft)
            except UnreadableImage as exc:
                self.output.value = (f"<b>{html.escape(item['name'])}</b> is not an image we can read: "
                                     f"{html.escape(str(exc))}")
                return
            self._add(f"upload: {item['name']}", image)

    def _typed(self, change) -> None:
        """A photo by its path on this machine: any size (it never passes through a widget message)."""
        if not str(change["new"]).strip():
            return
        path = Path(str(change["new"]).strip()).expanduser()
        try:
            image = open_image(path, self.draft)
        except UnreadableImage as exc:  # "missing file" among them: the path is read on the kernel's machine
            self.output.value = f"<b>{html.escape(str(path))}</b> cannot be read: {html.escape(str(exc))}"
            return
        self._add(f"file: {path.name}", image)

    def widget(self) -> w.Widget:
        knobs = w.VBox([self.image, self.upload, self.upload_note, self.path, self.method, *self.knobs.values(),
                        self.translate])
        return w.HBox([knobs, w.VBox([self.picture, self.settings, self.output, self.translation],
                                     layout=w.Layout(width="420px"))])

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget())


def _items(texts: list[str]) -> str:
    return "<ol>" + "".join(f"<li>{html.escape(t)}</li>" for t in texts) + "</ol>"
