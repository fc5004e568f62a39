"""The diffusion runs' guards (`kdkit/diffusion/guards.py`): per-step readings of sample drift, mode coverage, the
DMD gradient, G's gradient norm and the fake-score loss, logged in metrics.jsonl and summarised in metrics.json,
and one warning line per guard that trips.

On the 2-D mixture, measured (seed 0, one thread): the healthy short run below reads std ratio 1.02-1.18, mean
shift under 0.1 data stds, every mode reached, DMD gradient 0.11-0.18 of its normaliser, G's gradient norm
0.69-0.99, fake-score loss 0.84-1.09; the full default `kdkit diffusion dmd2` 1.02-1.03, under 0.09, 1.00 and
0.014-0.029 (SiD, CD and rectflow's defaults trip nothing either). With the conditional mixture's teacher and
guidance_scale=8 the guided teacher's own samples overshoot the ring (the warm-up regresses onto them): std 3.1x
the data's at the first log (2.3x at the last), mean 2.6 data stds off, DMD gradient 0.91-1.01, fake-score loss
23 falling to 2 — the std, mean and DMD-gradient guards trip at step 10."""
import json
import math

import pytest
import torch

from kdkit.cli import main
from kdkit.errors import ConfigError

# a healthy 2-D run at a fraction of the default recipe's budget (cf. test_diffusion_quality.SHORT)
SHORT = ["warmup_steps=200", "warmup_pairs=1500", "warmup_teacher_steps=8", "steps=30", "log_every=10",
         "eval_every=0", "sample_every=0", "save_every=0", "eval_samples=500", "teacher_steps=8", "seed=0",
         "threads=1"]
SATURATING = ["mixture.conditional=true", "guidance_scale=8"]


def _run(tmp_path, name, extra=(), progress=False):
    from kdkit.diffusion.run import distill, resolve_config

    torch.set_num_threads(1)
    cfg = resolve_config("dmd2", [*SHORT, f"output_dir={tmp_path}", f"name={name}", f"progress={progress}".lower(),
                                  *extra])
    summary = distill(cfg)
    run = tmp_path / name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return summary, json.loads((run / "metrics.json").read_text()), rows, (run / "train.log").read_text()


def _readings_recorded(metrics, rows):
    """Every reading of a 2-D DMD2 run is in each training row and summarised; the DMD gradient, G's gradient norm
    and the fake-score loss are finite and positive."""
    train = [r for r in rows if "generator" in r]
    assert [r["step"] for r in train] == [10, 20, 30]
    names = {"sample_std_ratio", "sample_mean_shift", "modes_reached", "dmd_grad_abs", "generator_grad_norm",
             "fake_denoise"}
    assert all(names <= set(r) for r in train)
    readings = metrics["guards"]["readings"]
    assert names <= set(readings) and "sample_clipped" not in readings  # no clip range on 2-D points
    for name in ("dmd_grad_abs", "generator_grad_norm", "fake_denoise"):
        r = readings[name]
        assert math.isfinite(r["max"]) and r["min"] > 0, (name, r)
        assert r["first"] == train[0][name] and r["last"] == train[-1][name] and r["max"] == max(t[name] for t in train)
    return readings


def test_healthy_run_trips_no_guard(tmp_path):
    summary, metrics, rows, log = _run(tmp_path, "healthy")
    readings = _readings_recorded(metrics, rows)
    assert metrics["guards"]["warnings"] == [] and "warning" not in log
    assert not any(r["tripped"] for r in readings.values())
    assert 0.85 < readings["sample_std_ratio"]["min"] and readings["sample_std_ratio"]["max"] < 1.3
    assert readings["sample_mean_shift"]["max"] < 0.3
    assert readings["modes_reached"]["min"] == 1.0
    assert readings["dmd_grad_abs"]["max"] < 0.4
    assert readings["sample_std_ratio"]["threshold"] == 1.5 and metrics["guards"]["thresholds"]["std_ratio"] == 1.5


def test_too_large_guidance_trips_the_saturation_guard(tmp_path, capsys):
    summary, metrics, rows, log = _run(tmp_path, "saturating", SATURATING, progress=True)
    readings = _readings_recorded(metrics, rows)
    std = readings["sample_std_ratio"]
    assert std["tripped"] and std["tripped_step"] == 10 and std["tripped_value"] > 2.0 and std["max"] > 2.0
    line = next(w for w in metrics["guards"]["warnings"] if "generated std" in w)
    assert line.startswith("kdkit: warning: step 10: generated std ") and "x the data's (guard: > 1.5x)" in line
    assert "lower guidance_scale or lr_generator" in line
    # once per guard, on the console and in train.log, though the std stays above 1.5x at every log
    assert all(r["sample_std_ratio"] > 1.5 for r in rows if "generator" in r)
    console = capsys.readouterr().out
    assert log.count("generated std") == 1 and console.count("kdkit: warning: step 10: generated std") == 1
    assert readings["dmd_grad_abs"]["tripped"]  # the fake score sees samples far from the teacher's


def test_a_bad_threshold_is_one_line(capsys):
    from kdkit.diffusion.run import resolve_config

    with pytest.raises(ConfigError, match=r"guards.std_ratio=0.9 is not allowed: expected a number > 1"):
        resolve_config("dmd2", ["guards.std_ratio=0.9"])
    with pytest.raises(ConfigError, match="unknown key 'guards.coverag'.*Did you mean 'guards.coverage'"):
        resolve_config("dmd2", ["guards.coverag=0.5"])
    assert main(["diffusion", "dmd2", "guards.coverage=1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdkit: error: guards.coverage=1.5 is not allowed")


class _Log:
    def __init__(self):
        self.lines = []

    def log(self, text):
        self.lines.append(text)


def test_guard_rules():
    """Above / below / growth rules, once per guard, `start`, the summary and its checkpointed state."""
    from kdkit.diffusion.data import MixtureData
    from kdkit.diffusion.guards import Guards, GuardSpec
    from kdkit.diffusion.mixture import ring_mixture

    torch.set_num_threads(1)
    mix = ring_mixture()
    guards = Guards(GuardSpec(start=20), MixtureData(mix), torch.device("cpu"))
    rng = torch.get_rng_state()
    assert Guards(GuardSpec(), MixtureData(mix), torch.device("cpu")).mean.tolist() == guards.mean.tolist()
    assert torch.equal(torch.get_rng_state(), rng)  # the reference is drawn under a forked RNG
    # the readings of true samples: std ratio ~1, mean ~0 data stds off, every mode reached
    x = mix.sample(4096, torch.Generator().manual_seed(1))
    r = guards.read(x)
    assert abs(float(r["sample_std_ratio"]) - 1) < 0.05 and float(r["sample_mean_shift"]) < 0.05
    assert float(r["modes_reached"]) == 1.0 and float(guards.read(mix.means[:6].repeat(10, 1))["modes_reached"]) == 0.75
    assert float(guards.read(2 * x)["sample_std_ratio"]) == pytest.approx(2 * float(r["sample_std_ratio"]), rel=1e-5)

    run = _Log()
    guards.check(run, 10, {"sample_std_ratio": 3.0, "fake_denoise": 1.0, "modes_reached": 1.0})  # before start
    guards.check(run, 20, {"sample_std_ratio": 1.2, "fake_denoise": 5.0, "modes_reached": 0.5})
    guards.check(run, 30, {"sample_std_ratio": 1.6, "fake_denoise": 11.0, "modes_reached": 0.5})
    guards.check(run, 40, {"sample_std_ratio": 2.0, "fake_denoise": 20.0, "modes_reached": 0.25})
    assert [line.split(":")[2].strip() for line in run.lines] == ["step 20", "step 30", "step 30"]
    assert "reach 50% of the modes (guard: < 75%)" in run.lines[0]
    assert "fake-score loss 11, 11.0x its lowest 1 (guard: > 10x)" in run.lines[2]
    s = guards.summary()["readings"]
    assert s["sample_std_ratio"] == {"first": 3.0, "last": 2.0, "min": 1.2, "max": 3.0, "first_step": 10,
                                         "last_step": 40, "tripped": True, "tripped_step": 30, "tripped_value": 1.6,
                                         "threshold": 1.5}
    fresh = Guards(GuardSpec(), MixtureData(mix), torch.device("cpu"))
    fresh.load_state_dict(guards.state_dict())
    assert fresh.summary()["readings"] == s and fresh.summary()["warnings"] == run.lines


def test_other_methods_read_a_fixed_noise_batch(tmp_path):
    """Methods whose step generates no batch (CD, paired regression) get the sample readings from the sampler at
    each log, without moving the training RNG: the generator is the same with and without guards."""
    torch.set_num_threads(1)
    common = ["steps=4", "log_every=2", "eval_every=0", "sample_every=0", "save_every=0", "width=32", "depth=2",
              "batch_size=32", "eval_samples=200", "teacher_steps=4", "pairs=64", "progress=false", "threads=1",
              f"output_dir={tmp_path}"]
    assert main(["diffusion", "rectflow", *common, "name=r"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "regression" in r]
    assert [r["step"] for r in train] == [2, 4]
    assert all({"sample_std_ratio", "sample_mean_shift", "modes_reached"} <= set(r) for r in train)
    assert all(0 < r["sample_std_ratio"] < 10 and 0 <= r["modes_reached"] <= 1 for r in train)


def test_image_readings(tmp_path):
    """On CIFAR-10 images (a random tiny U-Net teacher: only the path is tested) the readings are per colour
    channel, with the share of values at or beyond [-1, 1] against the data's (about 1.7% of CIFAR-10's), and
    the evaluation reads the normalised entropy of the FD classifier's predicted classes."""
    from kdkit.checkpoint import save_model
    from kdkit.diffusion.teachers import make_denoiser, save_denoiser
    from kdkit.models import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    save_denoiser(make_denoiser("unet", channels=8, mult=[1], blocks=1, attn=[], dropout=0.0, num_classes=10),
                  tmp_path / "t.safetensors")
    save_model(build_model("convnet3", width=8), tmp_path / "clf.safetensors",
               {"model": "convnet3", "options": json.dumps({"width": 8}), "num_classes": "10"})
    assert main(["diffusion", "dmd2", "data=cifar10", f"teacher={tmp_path / 't.safetensors'}", "steps=2",
                 "log_every=1", "batch_size=4", "fake_steps=1", "gan=false", "eval_samples=8", "teacher_steps=1",
                 f"fd_classifier={tmp_path / 'clf.safetensors'}", "train_limit=64", "sample_every=0",
                 f"output_dir={tmp_path}", "name=d", "threads=1", "progress=false"]) == 0
    m = json.loads((tmp_path / "d" / "metrics.json").read_text())
    g = m["guards"]
    assert len(g["data"]["mean"]) == 3 and 0.005 < g["data"]["clipped"] < 0.05
    assert {"sample_std_ratio", "sample_mean_shift", "sample_clipped", "dmd_grad_abs", "generator_grad_norm",
            "fake_denoise", "class_entropy"} <= set(g["readings"]) and "modes_reached" not in g["readings"]
    entropy = m["final"]["class_entropy"]
    assert 0 <= entropy <= 1 and g["readings"]["class_entropy"]["last"] == entropy
    assert 0 <= g["readings"]["sample_clipped"]["max"] <= 1
