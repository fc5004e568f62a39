"""DMD2's quality on a 2-D mixture with an exact (analytic) teacher, measured for real on CPU.

Mixture: 8 Gaussians (std 0.2) on a circle of radius 2 with unequal weights 1..8 (2.8% to 22.2%), so per-mode
mass is something a student visibly gets wrong. Generator and fake score: width-128 MLPs; the fake score is the
teacher plus a zero-initialised residual (it starts as the teacher). Metrics against 10,000-20,000 true samples:
sliced-W2 over 512 fixed directions, per-mode mass by nearest mean.

`test_dmd2_learns_the_mixture` runs in the suite (500 steps). The issue's full bar (within 1.2x of the teacher's
64-step sliced-W2, mode masses within 2 points) is `test_one_step_dmd2_meets_the_quality_bar`, behind
KDKIT_SLOW=1: it has NOT been seen to pass yet (see the diffusion README section for what was measured).
"""
import os

import pytest
import torch

from kdkit.diffusion.run import Runner, resolve_config


def _run(tmp_path, steps: int, samples: int, teacher_steps: int, extra=()):
    torch.set_num_threads(2)
    cfg = resolve_config("dmd2", [
        f"steps={steps}", "batch_size=256", "width=128", "depth=3", "eval_every=0", "sample_every=0", "save_every=0",
        f"eval_samples={samples}", f"teacher_steps={teacher_steps}", "progress=false", f"output_dir={tmp_path}",
        "name=q", "seed=0", *extra])
    metrics = Runner(cfg).fit()
    teacher, student = metrics["teacher"], metrics["final"]
    print(f"teacher {teacher_steps}-step Heun: sw2={teacher['sw2']:.4f} mmd={teacher['mmd']:.5f} "
          f"mode err={teacher['mode_mass_max_err']:.2f}")
    print(f"one-step DMD2 ({steps} steps): sw2={student['sw2']:.4f} mmd={student['mmd']:.5f} "
          f"mode err={student['mode_mass_max_err']:.2f}  (vs teacher samples sw2={student['sw2_vs_teacher']:.4f})")
    return teacher, student


def test_dmd2_learns_the_mixture(tmp_path):
    """500 one-step DMD2 iterations (5 fake-score updates each) from a random generator: all eight modes found with
    the right masses (within 3 points), and a sliced-W2 far below a one-Gaussian fit's (~0.6)."""
    teacher, student = _run(tmp_path, 500, 10000, 32)
    assert student["nfe"] == 1
    assert student["mode_mass_max_err"] < 3.0
    assert student["sw2"] < 0.2
    assert student["mmd"] < 0.06


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("KDKIT_SLOW"), reason="the issue's full quality bar; KDKIT_SLOW=1")
def test_one_step_dmd2_meets_the_quality_bar(tmp_path):
    teacher, student = _run(tmp_path, 3000, 20000, 64, ["warmup_steps=1500", "lr_generator=1e-4",
                                                       "regression_weight=0.25", "gan=true", "gan_generator_weight=0.05",
                                                       "gan_fake_weight=0.1"])
    assert student["nfe"] == 1 and teacher["nfe"] == 127
    assert student["sw2"] <= 1.2 * teacher["sw2"]
    assert student["mode_mass_max_err"] <= 2.0
