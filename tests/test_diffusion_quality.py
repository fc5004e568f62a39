"""One-step distillation's quality on a 2-D mixture with an exact (analytic) teacher, measured for real on CPU.

Mixture: 8 Gaussians (std 0.2) on a circle of radius 2 with unequal weights 1..8 (2.8% to 22.2%), so per-mode
mass is something a student visibly gets wrong. Metrics against 5,000-20,000 true samples: sliced-W2 over 512 fixed
directions, the mass off the modes (samples farther than 3 std from every mode: 1.1% of true data), per-mode
coverage and per-mode mass by nearest mean.

What users get from `kdkit diffusion dmd2|sid|cd` (the 2-D recipes, README "Few-step diffusion distillation"): a
width-128, depth-6 generator, warmed up by regression onto teacher ODE samples (trajectories for CD), then the
method with that regression kept as a small term; 40-80 s each on one thread, within 1.03x of the teacher's
sliced-W2 with about 2.3% of samples off the modes. In the suite, `test_shortened_default_run_separates_the_modes`
runs each default at a fraction of its budget; `test_default_run_meets_the_quality_bar` runs the full defaults
(KDKIT_SLOW=1, about 3 minutes for the three). The issue's original bar (one-step DMD2 within 1.2x of the teacher's
64-step sliced-W2, mode masses within 2 points) at width 256, depth 4 is `test_one_step_dmd2_meets_the_quality_bar`
(KDKIT_SLOW=1, 0.98x, about 3.5 minutes on one thread).
"""
import os

import pytest
import torch

from kdkit.diffusion.run import distill, resolve_config

# a fraction of each default's budget (warm-up, pairs, method steps, evaluation)
SHORT = {"dmd2": ["warmup_steps=2500", "warmup_pairs=10000", "warmup_teacher_steps=16", "steps=100"],
         "sid": ["warmup_steps=2500", "warmup_pairs=10000", "warmup_teacher_steps=16", "steps=100"],
         "cd": ["warmup_steps=2500", "warmup_pairs=10000", "warmup_substeps=1", "steps=300"]}


def _run(tmp_path, method: str, samples: int, teacher_steps: int, extra=(), threads: int = 1):
    torch.set_num_threads(threads)
    cfg = resolve_config(method, [
        "eval_every=0", "sample_every=0", "save_every=0", f"eval_samples={samples}", f"teacher_steps={teacher_steps}",
        "progress=false", f"output_dir={tmp_path}", "name=q", "seed=0", f"threads={threads}", *extra])
    metrics = distill(cfg)
    teacher, student = metrics["teacher"], metrics["final"]
    print(f"teacher {teacher_steps}-step Heun: sw2={teacher['sw2']:.4f} off-mode={teacher['off_mode_pct']:.2f}% "
          f"mode err={teacher['mode_mass_max_err']:.2f}")
    print(f"one-step {method} ({cfg.steps} steps): sw2={student['sw2']:.4f} ({student['sw2_x_teacher']:.2f}x) "
          f"off-mode={student['off_mode_pct']:.2f}% mode err={student['mode_mass_max_err']:.2f} "
          f"coverage={student['mode_coverage']}  wall {metrics['wall_s']:.0f}s")
    return teacher, student


@pytest.mark.parametrize("method", ["dmd2", "sid", "cd"])
def test_shortened_default_run_separates_the_modes(tmp_path, method):
    """The default recipe at a fraction of its budget (about 12 s each on one thread): one step, all eight modes
    separated (under 5% of samples off the modes, every mode holding most of its mass), sliced-W2 within 1.5x of
    the teacher's. Measured at this budget (seed 0): 1.06-1.16x, 3.2-3.7% off the modes, fewest mode's coverage
    0.94 (seeds 1 and 2 of DMD2 at 2,000 warm-up steps: 3.4-3.8%, coverage down to 0.82). The defaults before issue
    24 failed all of it: DMD2 a ring (25% off the modes), SiD a crescent (37%, 3 modes), CD one blob (68%, 1 mode)."""
    teacher, student = _run(tmp_path, method, 5000, 32, SHORT[method])
    assert student["nfe"] == 1
    assert student["off_mode_pct"] < 5.0
    assert student["modes_covered"] == 8 and student["min_mode_coverage"] > 0.75
    assert student["sw2_x_teacher"] <= 1.5
    assert student["mode_mass_max_err"] < 2.0


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("KDKIT_SLOW"), reason="the full default runs; KDKIT_SLOW=1")
@pytest.mark.parametrize("method", ["dmd2", "sid", "cd"])
def test_default_run_meets_the_quality_bar(tmp_path, method):
    """`kdkit diffusion METHOD` exactly as users run it (20,000 evaluation samples, the teacher's 64-step Heun):
    within 1.2x of the teacher's sliced-W2, under 5% off the modes, mode masses within 2 points."""
    teacher, student = _run(tmp_path, method, 20000, 64)
    assert student["nfe"] == 1 and teacher["nfe"] == 127
    assert student["sw2"] <= 1.2 * teacher["sw2"]
    assert student["off_mode_pct"] < 5.0 and student["modes_covered"] == 8
    assert student["mode_mass_max_err"] <= 2.0


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("KDKIT_SLOW"), reason="the issue's full quality bar; KDKIT_SLOW=1")
def test_one_step_dmd2_meets_the_quality_bar(tmp_path):
    """Width 256, depth 4: 6,000 regression warm-up steps (mean squared error) on 20,000 teacher-ODE pairs, then
    1,000 DMD2 steps with the regression term (weight 0.25) and the GAN head."""
    teacher, student = _run(tmp_path, "dmd2", 20000, 64, [
        "steps=1000", "batch_size=256", "width=256", "depth=4", "warmup_steps=6000", "lr_generator=1e-4",
        "regression_weight=0.25", "regression_loss=mse", "gan=true", "gan_generator_weight=0.05",
        "gan_fake_weight=0.1"])
    assert student["nfe"] == 1 and teacher["nfe"] == 127
    assert student["sw2"] <= 1.2 * teacher["sw2"]
    assert student["mode_mass_max_err"] <= 2.0
