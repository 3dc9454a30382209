"""Fault matrix: checkpoints crafted to break a resumed run (a classmate's file, a forum's "trained run"), through the
real `train --resume`. Each is refused with one message naming the file and the field, exit 1, no traceback, before
anything is changed: the checkpoint on disk stays as it was."""

from __future__ import annotations

import re
import shutil
import zipfile

import pytest
import torch

from utils.__main__ import main

ARGS = ["--epochs", "2", "--batch-size", "16", "--num-layers", "1", "--warmup-steps", "5", "--log-every", "2",
        "--device", "cpu", "--offline"]


@pytest.fixture(scope="module")
def run(small_cache, data_dir, tmp_path_factory):
    """A run stopped at step 6 (of 78), to resume."""
    out = tmp_path_factory.mktemp("faults") / "run"
    main(["train", "--features", str(small_cache), *ARGS, "--max-steps", "6", "--out-dir", str(out),
          "--data-dir", str(data_dir)])
    return out


def _resume(small_cache, data_dir, out, capsys) -> str:
    """`train --resume` on `out`: its one line of error (exit 1), the checkpoint left as it was."""
    before = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["train", "--features", str(small_cache), *ARGS, "--out-dir", str(out), "--resume",
              "--data-dir", str(data_dir)])
    message = str(info.value.code)
    assert message.startswith("error: ") and "Traceback" not in message + capsys.readouterr().err, message
    assert (out / "checkpoint.pt").read_bytes() == before, "nothing changed"
    return message


def _crafted(run, tmp_path, change) -> object:
    out = shutil.copytree(run, tmp_path / "run")
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    torch.save(change(checkpoint), out / "checkpoint.pt")
    return out


def _set(path: str, value):
    def change(checkpoint):
        *parents, last = path.split(".")
        node = checkpoint
        for key in parents:
            node = node[key]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value
        return checkpoint
    return change


def _first_moment_reshaped(checkpoint):
    moments = next(iter(checkpoint["optimizer"]["state"].values()))
    moments["exp_avg"] = torch.zeros(3, 5)
    return checkpoint


CASES = {  # name: (change, what the message must say)
    "top level a list": (lambda c: [c], "holds a list, not a checkpoint of this course"),
    "top level a string": (lambda c: "checkpoint", "holds a str, not a checkpoint of this course"),
    "no config": (_set("config", KeyError), "'config' does not hold the model, train and features settings"),
    "config.model a string": (_set("config.model", "transformer"), "'config' does not hold the model"),
    "state a list": (_set("state", [1, 2]), "'state' is a list, not the training state"),
    "state without step": (_set("state.step", KeyError), "the training state has no 'step'"),
    "state.step a string": (_set("state.step", "6"), "state.step is '6', not a whole number"),
    "negative step": (_set("state.step", -4), "the training state holds a negative count (step -4"),
    "step far beyond the run": (_set("state.step", 10**9), "is at step 1000000000 (epoch 1, step 6 of it), which "
                                                          "is not a place in this run of 2 epoch(s) of 39 steps"),
    "rng of another dtype": (_set("rng.torch", torch.zeros(5000)), "'rng' does not hold the random number "
                                                                  "generators' states"),
    "optimiser state of other shapes": (_first_moment_reshaped, "is (3, 5), the tensor"),
    "trainable a list": (_set("trainable", [torch.zeros(2)]), "'trainable' is not a dict of named tensors"),
    "an earlier format": (_set("version", 2), "is a version 2 checkpoint; this course writes version 3"),
}


@pytest.mark.fault
@pytest.mark.parametrize("case", list(CASES))
def test_a_crafted_checkpoint_is_refused_by_name(case, run, small_cache, data_dir, tmp_path, capsys):
    change, says = CASES[case]
    out = _crafted(run, tmp_path, change)
    message = _resume(small_cache, data_dir, out, capsys)
    assert str(out / "checkpoint.pt") in message and says in message, message


@pytest.mark.fault
def test_a_checkpoint_that_inflates_far_past_its_size_is_refused_before_loading(run, small_cache, data_dir, tmp_path,
                                                                               capsys):
    """A file that would unpack to 25 times its size (200 MB of zeros, zipped): refused from the archive's
    directory, before torch allocates anything."""
    out = shutil.copytree(run, tmp_path / "run")
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    checkpoint["trainable"]["padding"] = torch.zeros(50 * 2**20)  # 200 MB of zeros
    plain = tmp_path / "plain.pt"
    torch.save(checkpoint, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(out / "checkpoint.pt", "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    plain.unlink()
    assert (out / "checkpoint.pt").stat().st_size < 16 * 2**20  # the run's own 8 MB, and 200 MB of zeros in 0.2 MB
    message = _resume(small_cache, data_dir, out, capsys)
    assert re.search(r"would unpack to 2\d\d MB from \d+\.\d MB on disk", message), message
    assert "refused before anything is allocated" in message, message
