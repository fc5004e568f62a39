"""DMD2's quality on a 2-D mixture with an exact (analytic) teacher, measured for real on CPU.

Mixture: 8 Gaussians (std 0.2) on a circle of radius 2 with unequal weights 1..8 (2.8% to 22.2%), so per-mode
mass is something a student visibly gets wrong. Generator and fake score: SiLU MLPs (width 128, depth 3 in the suite;
width 256, depth 4 for the full bar); the fake score is the teacher plus a zero-initialised residual (it starts as
the teacher). Metrics against 10,000-20,000 true samples:
sliced-W2 over 512 fixed directions, per-mode mass by nearest mean.

`test_dmd2_learns_the_mixture` runs in the suite (500 steps). The issue's full bar (within 1.2x of the teacher's
64-step sliced-W2, mode masses within 2 points) is `test_one_step_dmd2_meets_the_quality_bar`, behind
KDKIT_SLOW=1 (about 15 minutes on 2 cores). What it needs is generator capacity: a width-128, depth-3 generator cannot
bend the noise-to-mode map sharply enough (10.8% of its samples fell between the modes, 1.58-1.78x the teacher's
sliced-W2); width 256, depth 4 with 6,000 regression warm-up steps on teacher-ODE pairs, then 1,000 DMD2 steps,
measured 0.99x (see the diffusion README section).
"""
import os

import pytest
import torch

from kdkit.diffusion.run import distill, resolve_config


def _run(tmp_path, steps: int, samples: int, teacher_steps: int, extra=(), width: int = 128, depth: int = 3):
    torch.set_num_threads(2)
    cfg = resolve_config("dmd2", [
        f"steps={steps}", "batch_size=256", f"width={width}", f"depth={depth}", "eval_every=0", "sample_every=0", "save_every=0",
        f"eval_samples={samples}", f"teacher_steps={teacher_steps}", "progress=false", f"output_dir={tmp_path}",
        "name=q", "seed=0", *extra])
    metrics = distill(cfg)
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
    teacher, student = _run(tmp_path, 1000, 20000, 64, ["warmup_steps=6000", "lr_generator=1e-4",
                                                       "regression_weight=0.25", "gan=true", "gan_generator_weight=0.05",
                                                       "gan_fake_weight=0.1"], width=256, depth=4)
    assert student["nfe"] == 1 and teacher["nfe"] == 127
    assert student["sw2"] <= 1.2 * teacher["sw2"]
    assert student["mode_mass_max_err"] <= 2.0
