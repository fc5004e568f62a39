"""The LM distiller under `accelerate launch` with 2 CPU processes (gloo DDP, frozen teacher): each process takes
its contiguous share of the global batch, so 2 processes at batch B train exactly as 1 process at batch 2B: the same
weights, evaluation and (all-reduced) loss terms, to float rounding."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdkit.cli import main


def test_two_process_ddp_lm_run_equals_one_process_at_twice_the_batch(tmp_path, tiny_dir):
    args = ["distill", "recipe=smollm2-kd-small", f"teacher.model={tiny_dir}", "student.options.layers=1",
            "llm.block_size=32", "llm.train_examples=40", "llm.eval_examples=8", "llm.max_steps=6",
            "llm.eval_every_steps=3", "data.eval_batch_size=4", "trainer.progress=false", "trainer.threads=1",
            f"output_dir={tmp_path}"]
    assert main([*args, "data.batch_size=4", "name=single"]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kdkit.cli", *args,
           "data.batch_size=2", "name=ddp"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("single", "ddp"))
    assert two["summary"]["processes"] == 2 and two["summary"]["train_tokens"] == one["summary"]["train_tokens"]
    for a, b in zip(one["history"], two["history"], strict=True):
        assert b["test_ppl"] == pytest.approx(a["test_ppl"], rel=1e-6)
        # the mean over both processes, not process 0's own; KD (3e-4 here) is a difference of ~10-nat
        # cross-entropies, so its float32 rounding is absolute
        for term in ("train_ce", "train_kd"):
            assert b[term] == pytest.approx(a[term], rel=1e-5, abs=1e-7)
    w1, w2 = (load_file(str(tmp_path / n / "student" / "model.safetensors")) for n in ("single", "ddp"))
    assert w1.keys() == w2.keys() and max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-6
    assert not torch.equal(w1["model.norm.weight"], torch.ones_like(w1["model.norm.weight"]))  # it trained
