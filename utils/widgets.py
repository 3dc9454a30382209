"""The decoding explorer of notebook 05: pick or upload an image, turn the decoding knobs, read captions.

The logic lives here, not in the notebook, so a test can set the widgets' values exactly as a student's
clicks do and check which decoding was asked for and what caption was shown.
"""

from __future__ import annotations

import html
from pathlib import Path

import ipywidgets as w
from PIL import Image

from .config import DECODE_METHODS, DecodeConfig, DecodeConfigError, decode_config
from .images import UnreadableImage, decode_image, open_image, preview_png

PREVIEW = 224  # pixels: the picture is shown this wide, whatever its size


class DecodingExplorer:
    """Widgets for method, temperature, beams, top-p, captions per image and seed, an image picker and an
    upload button; the captions update on every change.

    images: name -> image path (or PIL image), the choices of the picker; an uploaded photo joins them.
    caption_fn(image, decode) -> caption or list of captions; default: `captioner.caption([image], decode)[0]`.
    `calls` records every (image name, DecodeConfig) asked for, newest last; `output.value` holds the
    captions shown (HTML).
    """

    def __init__(self, captioner, images: dict[str, str | Path | Image.Image], caption_fn=None):
        self.captioner = captioner
        self.images = dict(images)
        self.caption_fn = caption_fn or (lambda image, decode: captioner.caption([image], decode)[0])
        self.calls: list[tuple[str, DecodeConfig]] = []
        style = {"description_width": "90px"}
        self.image = w.Dropdown(options=list(self.images), description="image", style=style)
        self.upload = w.FileUpload(accept="image/*", multiple=False, description="your photo")
        self.method = w.Dropdown(options=DECODE_METHODS, value="greedy", description="method", style=style)
        self.temperature = w.FloatSlider(value=1.0, min=0.05, max=2.0, step=0.05, description="temperature",
                                         style=style)
        self.num_beams = w.IntSlider(value=5, min=1, max=10, description="beams", style=style)
        self.top_p = w.FloatSlider(value=1.0, min=0.1, max=1.0, step=0.05, description="top-p", style=style)
        self.samples = w.IntSlider(value=3, min=1, max=6, description="captions", style=style)
        self.seed = w.IntText(value=0, description="seed", style=style)
        self.picture = w.Image(format="png", width=PREVIEW)
        self.settings = w.HTML()
        self.output = w.HTML()
        for control in (self.image, self.method, self.temperature, self.num_beams, self.top_p, self.samples,
                        self.seed):
            control.observe(self.refresh, names="value")
        self.upload.observe(self._uploaded, names="value")
        self.refresh()

    def decode(self) -> DecodeConfig:
        """The DecodeConfig the widgets describe; knobs the method does not read are greyed out and not passed."""
        method = self.method.value
        self.temperature.disabled = self.top_p.disabled = self.seed.disabled = method != "sample"
        self.num_beams.disabled = method != "beam"
        self.samples.disabled = method == "greedy"
        if method == "beam":  # beam search returns its best captions, at most num_beams of them
            return decode_config(method="beam", num_beams=self.num_beams.value,
                                 num_return_sequences=min(self.samples.value, self.num_beams.value))
        if method == "sample":
            return decode_config(method="sample", temperature=self.temperature.value, top_p=self.top_p.value,
                                 num_return_sequences=self.samples.value, seed=self.seed.value)
        return decode_config(method=method)

    def refresh(self, *_) -> None:
        name = self.image.value
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
        self.settings.value = f"<code>{html.escape(_describe(decode))}</code>"
        captions = self.caption_fn(image, decode)
        captions = [captions] if isinstance(captions, str) else captions
        self.output.value = "<ol>" + "".join(f"<li>{html.escape(c)}</li>" for c in captions) + "</ol>"

    def _image(self, name: str) -> Image.Image:
        source = self.images[name]
        return source if isinstance(source, Image.Image) else open_image(source)

    def _uploaded(self, change) -> None:
        for item in change["new"]:  # ipywidgets 8: a tuple of {"name", "type", "size", "content", ...}
            name = f"upload: {item['name']}"
            try:
                self.images[name] = decode_image(bytes(item["content"]))
            except UnreadableImage as exc:
                self.output.value = (f"<b>{html.escape(item['name'])}</b> is not an image we can read: "
                                     f"{html.escape(str(exc))}")
                return
            self.image.options = list(self.images)
            self.image.value = name  # refreshes, captioning the new photo

    def widget(self) -> w.Widget:
        knobs = w.VBox([self.image, self.upload, self.method, self.temperature, self.num_beams, self.top_p,
                        self.samples, self.seed])
        return w.HBox([knobs, w.VBox([self.picture, self.settings, self.output], layout=w.Layout(width="420px"))])

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget())


def _describe(decode: DecodeConfig) -> str:
    """The settings the chosen method reads, as the call a student would write."""
    if decode.method == "beam":
        return f"method='beam', num_beams={decode.num_beams}, num_return_sequences={decode.num_return_sequences}"
    if decode.method == "sample":
        return (f"method='sample', temperature={decode.temperature:g}, top_p={decode.top_p:g}, "
                f"num_return_sequences={decode.num_return_sequences}, seed={decode.seed}")
    return "method='greedy'"
