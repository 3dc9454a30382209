"""Kaggle's two T4s from a notebook: `launch.train_everywhere` through accelerate's notebook_launcher, on
two CPU processes here, ends with the weights and logged losses of one process with --grad-accum 2."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, assert_same_weights_and_losses, cli_env, lm_without_dropout, run_cli


@pytest.mark.slow
def test_notebook_launcher_two_processes_equal_one_with_accumulation(small_cache, data_dir, models_dir, tmp_path):
    lm = lm_without_dropout(tmp_path / "lm-no-dropout")
    # as notebook 03's training cell: settings as dataclasses, one call, in a fresh kernel (here a fresh process)
    script = textwrap.dedent(f"""
        import dataclasses
        from utils.config import RuntimeConfig, standin_preset
        from utils.launch import train_everywhere
        model, train = standin_preset()
        model = dataclasses.replace(model, num_layers=1, dropout=0.0, lm={str(lm)!r})
        train = dataclasses.replace(train, max_steps=6, batch_size=8, warmup_steps=2, log_every=1,
                                    out_dir={str(tmp_path / "two")!r})
        result = train_everywhere({str(small_cache)!r}, model, train, RuntimeConfig(offline=True, device="cpu"),
                                  {str(data_dir)!r}, processes=2)
        print("STEPS", result.steps, "BUNDLE", result.bundle, "FROM", result.first_step, "TIMED", result.seconds > 0)
    """)
    two = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=cli_env(data_dir), capture_output=True,
                         text=True, timeout=400)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    assert "training with 2 processes" in two.stdout and "STEPS 6" in two.stdout, two.stdout
    assert "FROM 0 TIMED True" in two.stdout, "this session's own steps and time, as train() reports them"
    run_cli("train", "--features", str(small_cache), "--max-steps", "6", "--batch-size", "8", "--num-layers", "1",
            "--dropout", "0", "--warmup-steps", "2", "--log-every", "1", "--lm", str(lm), "--device", "cpu",
            "--grad-accum", "2", "--out-dir", str(tmp_path / "one"), data_dir=data_dir)
    assert_same_weights_and_losses(tmp_path / "two", tmp_path / "one")
