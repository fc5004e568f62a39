"""Every bad command line in `tests/bad_inputs.py` (over 200, across every verb) ends in exactly one
`kdkit: error:` line and exit code 2, within seconds, with no traceback and no run folder created.

The cases run in-process through `kdkit.cli.main` (a case that started real work would hit the alarm); a few
also run as real processes, to show the console entry point behaves the same.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bad_inputs import CASES
from kdkit.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "empty").mkdir()
    (root / "corrupt.safetensors").write_bytes(os.urandom(256))
    (root / "checkpoint.pt").write_bytes(b"\x80\x04\x95planted pickle")
    return root


def _alarm(signum, frame):
    raise TimeoutError("a bad input started real work instead of being refused")


@pytest.mark.parametrize("args", CASES, ids=[" ".join(c)[:80] for c in CASES])
def test_bad_input_is_refused_in_one_line_before_any_work(args, scratch, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDKIT_RESULTS_DIR", str(tmp_path / "results"))
    argv = [a.replace("{tmp}", str(scratch)) for a in args]
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(20)
    t0 = time.perf_counter()
    try:
        rc = main(argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("kdkit: error: "), err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a run folder or file was created"
    assert seconds < 15, f"took {seconds:.1f}s before refusing"


@pytest.mark.parametrize("args", [
    ["distill", "recipe=demo-kd", "trainer.epochs=-1"],
    ["condense", "cifar10", "--method", "mtt", "experts=0"],
    ["diffusion", "dmd2", "name=../x"],
    ["recipes", "extra"],
])
def test_the_console_command_refuses_in_one_line(args, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-m", "kdkit.cli", *args], cwd=tmp_path, env=env, text=True,
                       capture_output=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("kdkit: error: ")
    assert list(tmp_path.iterdir()) == []
