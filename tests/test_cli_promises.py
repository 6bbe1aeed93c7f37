"""What README promises of the command-line programs, run as a user runs them: a run stopped and resumed by
``train.py --resume``, and a run preempted by SIGTERM and relaunched, end where a straight run ends, only
``keep_checkpoints`` checkpoints stay, ``export.py --weights params`` exports the raw weights, a non-finite loss
stops the run naming its step, and an unknown config override is an error. (The whole pipeline from a hub repo id
is in ``test_weights.py``.)"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--config", "configs/tiny.py", "--config.data.global_batch_size=2", "--config.log_every=1"]


def _run(argv: list) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, timeout=900, cwd=ROOT)


def _train(workdir: Path, *overrides: str) -> subprocess.CompletedProcess:
    run = _run(["train.py", *TINY, "--workdir", workdir, *overrides])
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def _unet(run: Path, out: Path, weights: str) -> dict[str, np.ndarray]:
    export = _run(["export.py", "--workdir", run, "--out", out, "--weights", weights])
    assert export.returncode == 0, export.stderr[-3000:]
    assert f"exported the {weights} weights of step 4" in export.stderr
    return load_file(out / "unet" / "diffusion_pytorch_model.safetensors")


def _preempted(workdir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """A run sent SIGTERM (a preemption notice) as soon as its progress bar shows, before its first step ends."""
    command = [sys.executable, "train.py", *TINY, "--workdir", str(workdir), *overrides]
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    seen = ""
    while "training (ip2p)" not in seen:
        character = process.stderr.read(1)
        assert character, f"train.py ended before training: {seen[-3000:]}"
        seen += character
    process.send_signal(signal.SIGTERM)
    rest = process.communicate(timeout=900)[1]
    return subprocess.CompletedProcess(command, process.returncode, "", seen + rest)


@pytest.mark.slow
def test_stopped_and_preempted_runs_continued_by_the_cli_end_as_a_straight_run(tmp_path):
    """Four steps straight, against (a) two steps (the run stopped after its step-2 checkpoint) and ``--resume`` for
    the last two, and (b) a run sent SIGTERM during its first step, which saves at the next step boundary and exits
    0, then the same command relaunched with no flag: the same raw and EMA weights. The straight run saves every
    step and keeps two checkpoints; ``--noresume`` refuses a work folder with a checkpoint."""
    four = ("--config.steps=4", "--config.checkpoint.every=2")
    _train(tmp_path / "straight", "--config.steps=4", "--config.checkpoint.every=1", "--config.checkpoint.keep=2")
    assert sorted(p.name for p in (tmp_path / "straight" / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "4"]
    _train(tmp_path / "stopped", "--config.steps=2", "--config.checkpoint.every=2")
    resumed = _train(tmp_path / "stopped", *four, "--resume")
    assert "resumed at step 2 (data position 2)" in resumed.stderr and "done: step 4" in resumed.stderr

    preempted = _preempted(tmp_path / "preempted", *four)
    assert preempted.returncode == 0, preempted.stderr[-3000:]
    assert "preempted: saved step 1 of 4" in preempted.stderr and "done:" not in preempted.stderr
    assert sorted(p.name for p in (tmp_path / "preempted" / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]
    relaunched = _train(tmp_path / "preempted", *four)
    assert "resumed at step 1 (data position 1)" in relaunched.stderr and "done: step 4" in relaunched.stderr
    refused = _run(["train.py", *TINY, "--workdir", tmp_path / "preempted", *four, "--noresume"])
    assert refused.returncode != 0 and "--noresume but" in refused.stderr and "holds step 4" in refused.stderr

    for weights in ("params", "ema"):
        straight = _unet(tmp_path / "straight", tmp_path / f"straight-{weights}", weights)
        for run in ("stopped", "preempted"):
            again = _unet(tmp_path / run, tmp_path / f"{run}-{weights}", weights)
            assert straight.keys() == again.keys()
            for name, value in straight.items():
                np.testing.assert_allclose(again[name], value, rtol=1e-6, atol=1e-7, err_msg=f"{run} {weights} {name}")
    # The raw weights are not the EMA's (four steps of warm-up EMA lag behind them), so --weights chose.
    params, ema = (
        load_file(tmp_path / f"straight-{w}" / "unet" / "diffusion_pytorch_model.safetensors")
        for w in ("params", "ema")
    )
    assert max(float(np.abs(params[k] - ema[k]).max()) for k in params) > 1e-6


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_naming_the_step(tmp_path):
    """A learning rate of 1e38 makes every weight overflow at the first update, so step 2's loss is not finite."""
    run = _run(["train.py", *TINY, "--workdir", tmp_path, "--config.steps=5", "--config.optim.learning_rate=1e38"])
    assert run.returncode != 0
    assert "train.py: the loss is nan at step 2; stopping" in run.stderr or "loss is inf at step 2" in run.stderr, (
        run.stderr[-2000:]
    )


def test_an_unknown_config_override_is_an_error(tmp_path):
    run = _run(["train.py", *TINY, "--workdir", tmp_path, "--config.no_such_setting=3"])
    assert run.returncode != 0, run.stderr[-2000:]
    assert (
        run.stderr.strip() == "train.py: the config has no setting 'no_such_setting' (an unknown --config.* override)"
    )
    assert not (tmp_path / "checkpoints").exists()
