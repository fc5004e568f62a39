"""`kdkit diffusion` runs stopped for real and resumed: a `kill -9` after the first checkpoint, or Ctrl-C (a
checkpoint at the current step, one line, exit code 130), then `resume=auto` ends with the same weights, bit for
bit, as a run that was never stopped; resuming with a changed training setting is refused, naming it."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from kdkit import checkpoint as ckpt
from kdkit.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = ["width=32", "depth=2", "batch_size=32", "eval_samples=500", "teacher_steps=8", "threads=1", "progress=false"]
DMD2 = ["diffusion", "dmd2", "steps=150", "save_every=10", "eval_every=0", "sample_every=0", "log_every=10",
        "fake_steps=2", "gan=true", "warmup_steps=20", "warmup_pairs=256", "warmup_teacher_steps=4", *TINY]
TEACHER = ["diffusion", "train-teacher", "steps=200", "save_every=10", "batch_size=32", "log_every=10",
           "arch_options={width: 16, depth: 2}", "eval_samples=200", "eval_steps=4", "threads=1", "progress=false"]


def _stopped(args: list[str], run_dir: Path, sig: int) -> tuple[int, str]:
    """Start `kdkit ARGS` in its own process and send it `sig` as soon as its first checkpoint is complete."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "kdkit.cli", *args], cwd=run_dir.parent, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not ckpt.checkpoint_folders(run_dir):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run ended or stalled before its first checkpoint: {proc.communicate()[1][-2000:]}")
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert not (run_dir / "generator.safetensors").exists() and not (run_dir / "model.safetensors").exists(), \
        "the run finished before it was stopped; make it longer"
    return proc.returncode, err


def _same_weights(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    for k in x:
        assert x[k].dtype == y[k].dtype and x[k].equal(y[k]), k


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted dmd2 run every stopped one is compared with."""
    out = tmp_path_factory.mktemp("straight")
    assert main([*DMD2, f"output_dir={out}", "name=r"]) == 0
    return out / "r"


def test_dmd2_killed_then_resumed_is_bit_exact(straight, tmp_path):
    rc, _ = _stopped([*DMD2, f"output_dir={tmp_path}", "name=r"], tmp_path / "r", signal.SIGKILL)
    assert rc == -signal.SIGKILL
    assert main([*DMD2, f"output_dir={tmp_path}", "name=r", "resume=auto"]) == 0
    _same_weights(straight / "generator.safetensors", tmp_path / "r" / "generator.safetensors")
    a, b = (json.loads((d / "metrics.json").read_text())["final"] for d in (straight, tmp_path / "r"))
    assert a["sw2"] == b["sw2"] and a["mmd"] == b["mmd"]
    assert "resumed from" in (tmp_path / "r" / "train.log").read_text()


def test_dmd2_ctrl_c_checkpoints_exits_130_then_refuses_changes_and_resumes_exactly(straight, tmp_path, capsys):
    rc, err = _stopped([*DMD2, f"output_dir={tmp_path}", "name=r"], tmp_path / "r", signal.SIGINT)
    assert rc == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdkit: interrupted at step ") and "resume=auto" in lines[0]
    step = int(lines[0].removeprefix("kdkit: interrupted at step ").split(";")[0])
    assert ckpt.latest_checkpoint(tmp_path / "r").name == f"step-{step:08d}"
    # a changed training setting is refused, naming it, before anything is written
    before = sorted(p.name for p in (tmp_path / "r").rglob("*"))
    assert main([*DMD2, f"output_dir={tmp_path}", "name=r", "resume=auto", "lr_generator=0.002"]) == 2
    assert "options.lr_generator: 0.0001 -> 0.002" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "r").rglob("*")) == before
    # evaluation settings may change
    assert main([*DMD2, f"output_dir={tmp_path}", "name=r", "resume=auto", "eval_every=50"]) == 0
    _same_weights(straight / "generator.safetensors", tmp_path / "r" / "generator.safetensors")


def test_train_teacher_killed_then_resumed_is_bit_exact(tmp_path):
    assert main([*TEACHER, f"output_dir={tmp_path}", "name=straight"]) == 0
    rc, _ = _stopped([*TEACHER, f"output_dir={tmp_path}", "name=cut"], tmp_path / "cut", signal.SIGKILL)
    assert rc == -signal.SIGKILL
    assert main([*TEACHER, f"output_dir={tmp_path}", "name=cut", "resume=auto"]) == 0
    _same_weights(tmp_path / "straight" / "model.safetensors", tmp_path / "cut" / "model.safetensors")
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text())["eval"] for d in ("straight", "cut"))
    assert a == b
