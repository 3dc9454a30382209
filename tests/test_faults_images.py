"""The fault matrix, images: files made to hurt, met through the real commands (`python -m utils features`
and `caption`) and the web demo's app (Flask's test client, and its real server for slow clients).

Each row asserts one refusal: one line naming the file and the reason (the same reason from `caption`,
`features` and the demo), no traceback, a non-zero exit or a 400, nothing hung, and the demo still
serving afterwards. The one image policy they exercise is utils/images.py; the demo's bounds, utils/serve.py.
"""

from __future__ import annotations

import io
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import post, quick_train_config, run_cli
from utils.__main__ import main
from utils.captioner import Captioner
from utils.config import ModelConfig, RuntimeConfig
from utils.features import load_cache
from utils.images import IMAGE_FORMATS, UnreadableImage, decode_image
from utils.serve import DecodeSlots, create_app, make_demo_server
from utils.training import train
from utils.translate import Translators

pytestmark = [pytest.mark.fault, pytest.mark.usefixtures("one_thread")]
NOT_OURS = "not an image the course reads: {} format; save it as JPEG, PNG, WebP, BMP or GIF"


def encoded(image: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def good_png() -> bytes:
    image = Image.new("RGB", (96, 64), (40, 90, 230))
    image.paste((236, 236, 230), (0, 0, 48, 64))
    return encoded(image, "PNG")


# name -> (bytes of the file, or how to make a file that is not one; the reason every front end gives)
CONTENT_CASES = {
    "strip.png": (lambda: encoded(Image.new("L", (5000, 1), 90), "PNG"), "a strip of 5000x1 pixels"),
    "needle.png": (lambda: encoded(Image.new("1", (1, 1_000_000)), "PNG"), "a strip of 1x1000000 pixels"),
    "deep16.tif": (lambda: encoded(Image.fromarray(np.arange(1200, dtype=np.uint16).reshape(30, 40)), "TIFF"),
                   NOT_OURS.format("TIFF")),
    "float.tif": (lambda: encoded(Image.fromarray(np.linspace(0, 1, 1200, dtype=np.float32).reshape(30, 40)), "TIFF"),
                  NOT_OURS.format("TIFF")),
    "icon.ico": (lambda: encoded(Image.new("RGB", (48, 48), "red"), "ICO"), NOT_OURS.format("ICO")),
    "texture.dds": (lambda: encoded(Image.new("RGB", (32, 32), "red"), "DDS"), NOT_OURS.format("DDS")),
    "quite.qoi": (lambda: encoded(Image.new("RGB", (32, 32), "red"), "QOI"), NOT_OURS.format("QOI")),
}
# files that are not regular files, or too large to be read whole
FILE_CASES = {
    "fifo.png": "not a regular file but a named pipe (FIFO); give the path of an image file",
    "zero.png": "not a regular file but a character device; give the path of an image file",  # -> /dev/zero
    "random.png": "not a regular file but a character device; give the path of an image file",  # -> /dev/urandom
    "sparse.png": "a file of 20 GB, over the limit of 100 MB for an image; shrink it or save it as a JPEG",
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    """A folder of every file above, plus one good photo."""
    folder = tmp_path_factory.mktemp("hostile")
    (folder / "good.png").write_bytes(good_png())
    for name, (make, _) in CONTENT_CASES.items():
        (folder / name).write_bytes(make())
    os.mkfifo(folder / "fifo.png")
    (folder / "zero.png").symlink_to("/dev/zero")
    (folder / "random.png").symlink_to("/dev/urandom")
    with open(folder / "sparse.png", "wb") as f:
        f.truncate(20 * 2**30)  # 20 GB that take no room: a hole, never written
    return folder


@pytest.fixture(scope="module")
def bundle(small_cache, data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("images-run")
    return train(small_cache, ModelConfig(num_layers=1), quick_train_config(out, max_steps=2),
                 RuntimeConfig(offline=True, device="cpu"), data_dir).bundle


@pytest.fixture(scope="module")
def captioner(bundle, models_dir):
    captioner = Captioner.from_pretrained(bundle)
    captioner.image_encoder(models_dir)
    return captioner


@pytest.fixture(scope="module")
def client(captioner, models_dir):
    return create_app(captioner, translators=Translators(offline=True, models_dir=models_dir)).test_client()


def still_serving(client) -> None:
    status, reply = post(client, (good_png(), "good.png"))
    assert status == 200 and reply["captions"], reply


class within:
    """Fail, instead of hanging the test run, when the block takes more than `seconds` (a FIFO opened
    for reading blocks until a writer comes: that is the bug these rows guard against)."""

    def __init__(self, seconds: int):
        self.seconds = seconds

    def __enter__(self):
        def hung(*_):
            raise AssertionError(f"still running after {self.seconds} s: it hangs")
        self.previous = signal.signal(signal.SIGALRM, hung)
        signal.alarm(self.seconds)

    def __exit__(self, *_):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.previous)


# ---------------------------------------------------------------------------- `python -m utils caption`

@pytest.mark.parametrize("name", [*FILE_CASES, *CONTENT_CASES])
def test_caption_refuses_in_one_line(hostile, bundle, data_dir, monkeypatch, capsys, name):
    """In this process, through the entry point of `python -m utils caption` (one subprocess below)."""
    monkeypatch.setenv("CLIPCAP_DATA", str(data_dir))
    monkeypatch.setenv("CLIPCAP_OFFLINE", "1")
    reason = FILE_CASES.get(name) or CONTENT_CASES[name][1]
    path = hostile / name
    with within(60), pytest.raises(SystemExit) as info:
        main(["caption", "--model", str(bundle), str(path)])
    message = str(info.value.code)
    assert message.startswith(f"error: {path} cannot be captioned: {reason}") and "\n" not in message, message
    said = capsys.readouterr()
    assert said.out == "" and "skipped" not in said.err and "Traceback" not in said.err, "nothing but the one line"


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_caption_of_a_device_named_on_the_command_line(bundle, data_dir, monkeypatch, device):
    monkeypatch.setenv("CLIPCAP_DATA", str(data_dir))
    monkeypatch.setenv("CLIPCAP_OFFLINE", "1")
    with within(60), pytest.raises(SystemExit, match=re.escape(f"error: {device} cannot be captioned: not a "
                                                                "regular file but a character device")):
        main(["caption", "--model", str(bundle), device])


def test_a_shard_member_of_2_gb_in_a_10_kb_shard(bundle, data_dir, monkeypatch, tmp_path):
    """GNU tar's sparse members: 2 GB that take 10 KB in the shard, refused by the size its header states."""
    if shutil.which("tar") is None:
        pytest.skip("no tar here to write a sparse member")
    with open(tmp_path / "hole.png", "wb") as f:
        f.truncate(2 * 2**30)
    subprocess.run(["tar", "-S", "-cf", "shard.tar", "hole.png"], cwd=tmp_path, check=True)
    (tmp_path / "hole.png").unlink()
    assert (tmp_path / "shard.tar").stat().st_size < 100_000
    monkeypatch.setenv("CLIPCAP_DATA", str(data_dir))
    monkeypatch.setenv("CLIPCAP_OFFLINE", "1")
    member = f"{tmp_path / 'shard.tar'}::hole.png"
    with within(60), pytest.raises(SystemExit, match=re.escape(f"error: {member} cannot be captioned: a file of "
                                                                "2 GB, over the limit of 100 MB for an image")):
        main(["caption", "--model", str(bundle), member])


def test_a_fifo_never_hangs_the_real_command(hostile, bundle, data_dir):
    proc = run_cli("caption", "--model", str(bundle), str(hostile / "fifo.png"), data_dir=data_dir, check=False,
                   timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1] == (f"error: {hostile / 'fifo.png'} cannot be captioned: "
                                                    f"{FILE_CASES['fifo.png']}.")


def test_the_readable_image_beside_them_is_still_captioned(hostile, bundle, data_dir):
    proc = run_cli("caption", "--model", str(bundle), str(hostile), data_dir=data_dir, check=False, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    assert [line.split("\t")[0] for line in proc.stdout.splitlines()] == [str(hostile / "good.png")]
    for name in ("sparse.png", "strip.png", "needle.png"):  # a folder scan lists files named as images only
        reason = FILE_CASES.get(name) or CONTENT_CASES[name][1]
        assert f"skipped {hostile / name}: {reason}" in proc.stderr


# ---------------------------------------------------------------------------- `python -m utils features`

@pytest.fixture(scope="module")
def features_run(hostile, data_dir, tmp_path_factory):
    """One real `features` run over a captions file naming every file, with two workers as a user runs it."""
    root = tmp_path_factory.mktemp("hostile-features")
    names = ["good.png", *FILE_CASES, *CONTENT_CASES]
    (root / "caps.csv").write_text("image,caption\n" + "".join(f"{n},a picture called {n}\n" for n in names))
    proc = run_cli("features", "--dataset", "csv", "--path", str(root / "caps.csv"), "--images-dir", str(hostile),
                   "--cache-dir", str(root / "cache"), "--num-workers", "2", "--batch-size", "4", "--device", "cpu",
                   data_dir=data_dir, timeout=300)
    return proc.stdout + proc.stderr, load_cache(root / "cache")


@pytest.mark.parametrize("name", [*FILE_CASES, *CONTENT_CASES])
def test_features_skips_and_counts(features_run, hostile, name):
    output, cache = features_run
    reason = FILE_CASES.get(name) or CONTENT_CASES[name][1]
    skipped = dict(zip(cache.skipped["image_path"].map(lambda p: Path(p).name), cache.skipped["reason"]))
    assert skipped[name].startswith(reason), skipped[name]
    assert list(cache.images["image_path"].map(lambda p: Path(p).name)) == ["good.png"]
    total = len(FILE_CASES) + len(CONTENT_CASES)
    assert cache.meta["num_skipped"] == total and f"{total} unreadable image(s)" in output
    assert "Traceback" not in output


# ---------------------------------------------------------------------------- the web demo

@pytest.mark.parametrize("name", CONTENT_CASES)
def test_the_demo_refuses_with_the_reason_caption_gives(client, hostile, name):
    status, reply = post(client, ((hostile / name).read_bytes(), name))
    assert status == 400 and reply["error"].startswith(f"{name} cannot be captioned: {CONTENT_CASES[name][1]}"), reply
    assert "Upload a photo (JPEG, PNG, WebP, BMP or GIF) up to 10 MB and 120 megapixels." in reply["error"]
    still_serving(client)


def test_a_needle_png_of_4_kb_costs_the_demo_nothing(client, hostile):
    """1 x 1,000,000 pixels in 2 KB: refused from its header, before Pillow or CLIP allocates a row."""
    data = (hostile / "needle.png").read_bytes()
    assert len(data) < 4096
    start = time.perf_counter()
    status, _ = post(client, (data, "needle.png"))
    assert status == 400 and time.perf_counter() - start < 2


@pytest.mark.parametrize("example", ["9" * 5000, "-1", "1e3", "0x0", "١"])
def test_an_example_index_that_is_no_index(client, example):
    status, reply = post(client, example=example)
    assert status == 400 and "There is no example" in reply["error"] and "reload the page" in reply["error"]
    assert len(reply["error"]) < 120, "a 5,000-digit value is not echoed back whole"
    still_serving(client)


@pytest.mark.parametrize("lang", ["xx", "german!", "EN", "zh"])
def test_a_language_the_demo_does_not_offer_loads_nothing(captioner, models_dir, lang):
    translators = Translators(offline=True, models_dir=models_dir)
    client = create_app(captioner, translators=translators).test_client()
    status, reply = post(client, (good_png(), "good.png"), translate=lang)
    assert status == 400 and f"does not translate to {lang.lower()!r}: choose one of de (German)" in reply["error"]
    assert translators._loaded == {}, "no model loaded for a language the page does not offer"
    still_serving(client)


def test_fuzzed_images_get_400_never_500(client):
    """Bytes flipped in files of each format the course reads: each reply a caption or one reason."""
    rng, rand = np.random.default_rng(0), random.Random(0)
    base = Image.fromarray(rng.integers(0, 255, (24, 32, 3), np.uint8))
    seeds = [encoded(base, fmt) for fmt in IMAGE_FORMATS] + [encoded(base.convert("P"), "GIF"),
                                                              encoded(base.convert("RGBA"), "PNG")]
    statuses = []
    for data in seeds:
        for _ in range(12):
            fuzzed = bytearray(data)
            for _ in range(rand.randint(1, 6)):
                fuzzed[rand.randrange(len(fuzzed))] = rand.randrange(256)
            status, reply = post(client, (bytes(fuzzed), "fuzzed"))
            assert status in (200, 400), reply
            statuses.append(status)
    assert 400 in statuses and 200 in statuses
    still_serving(client)


def test_whatever_pillow_raises_becomes_a_reason():
    """The decoders of the formats the course does not read never run, whatever the bytes after the magic."""
    rand = random.Random(1)
    for magic in (b"DDS |\x00\x00\x00", b"qoif", b"\x00\x00\x01\x00\x01\x00", b"II*\x00", b"8BPS"):
        for _ in range(20):
            with pytest.raises(UnreadableImage, match="not an image the course reads"):
                decode_image(magic + bytes(rand.randrange(256) for _ in range(200)))


def test_a_decode_over_the_time_budget_is_refused_and_the_demo_goes_on(captioner, client):
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 255, (1500, 1500, 3), np.uint8))
    data = encoded(noise, "PNG", compress_level=1)  # 6.7 MB of pixels, read in 64 KB blocks
    hurried = create_app(captioner, decode_seconds=0.001).test_client()
    status, reply = post(hurried, (data, "noise.png"))
    assert status == 400 and "took over 0.001 s to decode, this server's limit; send a smaller image" \
        in reply["error"]
    still_serving(client)


def test_large_images_wait_their_turn_small_ones_do_not(captioner):
    """One client looping on large images holds the one large-image slot; others' photos still pass."""
    slots = DecodeSlots(heavy_pixels=5000, wait=0.5)
    client = create_app(captioner, slots=slots).test_client()
    big = encoded(Image.new("RGB", (120, 90), "navy"), "PNG")  # 10,800 pixels: "large" here
    with slots(10_000):  # a large decode in progress
        status, reply = post(client, (big, "big.png"))
        assert status == 503 and "busy decoding other images: try again" in reply["error"]
        status, reply = post(client, (encoded(Image.new("RGB", (40, 30), "red"), "PNG"), "small.png"))
        assert status == 200 and reply["captions"]
    status, reply = post(client, (big, "big.png"))
    assert status == 200 and reply["captions"]


def test_the_wait_for_a_turn_is_not_counted_in_the_decode_budget(captioner):
    slots = DecodeSlots(heavy_pixels=5000, wait=10)
    client = create_app(captioner, slots=slots, decode_seconds=0.5).test_client()
    slots.heavy.acquire()  # another large image decoding for 1 s
    threading.Timer(1.0, slots.heavy.release).start()
    start = time.monotonic()
    status, reply = post(client, (encoded(Image.new("RGB", (120, 90), "navy"), "PNG"), "big.png"))
    assert status == 200 and reply["captions"] and time.monotonic() - start >= 1.0


def test_a_bug_is_a_json_500_and_the_demo_goes_on(captioner, models_dir):
    class Broken(Translators):
        def __getitem__(self, lang):
            raise RuntimeError("a bug")

    client = create_app(captioner, translators=Broken(offline=True, models_dir=models_dir)).test_client()
    status, reply = post(client, (good_png(), "good.png"), translate="de")
    assert status == 500 and reply["error"].startswith("The demo failed (RuntimeError); its terminal shows why")
    still_serving(client)



# ---------------------------------------------------------------------------- the demo's server: slow clients

@pytest.fixture
def server(captioner):
    """The server `python -m utils serve` runs (make_demo_server), with short limits, in a thread."""
    app = create_app(captioner, body_seconds=1.0)
    srv = make_demo_server(app, "127.0.0.1", 0, socket_seconds=1.0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv.port
    srv.shutdown()
    srv.server_close()


def _reply(sock: socket.socket) -> str:
    sock.settimeout(10)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
        if b"\r\n\r\n" in data and b"}" in data:
            break
    return data.decode(errors="replace")


def _get_ok(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head = sock.recv(200).decode()
    assert head.startswith("HTTP/1.1 200"), head


@pytest.mark.parametrize("pace", ["stalls", "drips"])
def test_a_slow_upload_is_cut_off_and_the_demo_goes_on(server, pace):
    head = (b"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 100000\r\n\r\n")
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", server), timeout=10) as sock:
        sock.sendall(head + b"--b\r\n")
        if pace == "drips":  # a byte every 0.2 s: each wait is short, the whole is not
            try:
                for _ in range(40):
                    time.sleep(0.2)
                    sock.sendall(b"x")
            except OSError:
                pass  # the server closed the connection: what is wanted
        reply = _reply(sock)
    assert reply.startswith("HTTP/1.1 408") and "did not arrive within 1 s" in reply, reply
    assert time.monotonic() - start < 6
    _get_ok(server)


def test_every_reply_carries_the_security_headers(client):
    page = client.get("/")
    nonce = re.search(r'<script nonce="([^"]+)">', page.get_data(as_text=True)).group(1)
    policy = page.headers["Content-Security-Policy"]
    assert f"script-src 'nonce-{nonce}'" in policy and "frame-ancestors 'none'" in policy
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    for reply in (page, client.post("/caption", data={"example": "x"}), client.get("/nowhere")):
        assert reply.headers["X-Frame-Options"] == "DENY" and reply.headers["X-Content-Type-Options"] == "nosniff"
    assert client.get("/").headers["Content-Security-Policy"] != policy, "a new nonce for every page"
