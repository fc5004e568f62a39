"""The Distiller on real CIFAR-10: it learns, KD beats the no-teacher student, resume is exact, bad input is refused."""
import json
import os
from pathlib import Path

import pytest
import torch

from kdkit.cli import main
from kdkit.config import load_recipe
from kdkit.errors import CheckpointError, ConfigError, MissingDatasetError, ShapeMismatchError
from kdkit.losses import FitNetLoss, KDLoss
from kdkit.models import build_model
from kdkit.train.build import build_distiller
from kdkit.train.distiller import Distiller

from conftest import SMALL


def recipe(tmp_path, name="cifar10-240ep", *overrides):
    return load_recipe(name, [f"output_dir={tmp_path}", *SMALL, *overrides])


def test_teacher_run_folder_is_complete_and_it_learned(teacher_run):
    for f in ("config.yaml", "metrics.json", "metrics.jsonl", "model.safetensors", "curves.png", "train.log"):
        assert (teacher_run / f).is_file(), f
    latest = sorted((teacher_run / "checkpoints").glob("step-*"))[-1]
    assert sorted(p.name for p in latest.iterdir()) == ["manifest.json", "state.json", "state.safetensors"]
    rows = [json.loads(line) for line in (teacher_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "test_acc" in r] == [1, 2, 3]
    assert list((teacher_run / "logs").rglob("events.out.tfevents.*")), "no TensorBoard log"
    metrics = json.loads((teacher_run / "metrics.json").read_text())
    hist = metrics["history"]
    assert len(hist) == 3 and hist[-1]["train_ce"] < hist[0]["train_ce"]  # the loss went down
    assert metrics["summary"]["final_acc"] > 40.0  # far above chance (10%) after 60k samples seen


def _student_runs(tmp_path, teacher_run, seed):
    common = [f"trainer.seed={seed}", "student.model=convnet3", "student.options={width: 16}",
              "data.train_per_class=50", "data.batch_size=50", "trainer.epochs=12", "scheduler.name=cosine",
              "optim.lr=0.05"]
    kd = build_distiller(recipe(tmp_path, "cifar10-240ep", *common, f"name=kd{seed}",
                                f"teacher.checkpoint={teacher_run}", "ce_weight=0.1", "losses.kd.weight=0.9",
                                "losses.kd.T=4"), "distill").fit()
    alone = build_distiller(recipe(tmp_path, "cifar10-240ep", *common, f"name=alone{seed}"), "train").fit()
    return kd["final_acc"], alone["final_acc"], kd["teacher_acc"]


def test_kd_student_beats_the_same_student_without_teacher(tmp_path, teacher_run):
    """500 labelled images: the student with KD from the teacher beats the same student trained alone."""
    results = [_student_runs(tmp_path, teacher_run, seed) for seed in (0, 1)]
    kd = sum(r[0] for r in results) / 2
    alone = sum(r[1] for r in results) / 2
    print(f"KD {kd:.2f}  alone {alone:.2f}  teacher {results[0][2]:.2f}")
    assert kd > alone + 2.0, (kd, alone)


def _tiny_distiller(tmp_path, cifar, teacher, on_step=None, **over):
    train, test = cifar
    cfg = recipe(tmp_path, "cifar10-240ep", "data.batch_size=32", "trainer.epochs=2", "trainer.grad_accum=2",
                 "trainer.save_every_steps=2", "trainer.keep_checkpoints=10", "data.test_limit=64",
                 *[f"{k}={v}" for k, v in over.items()])
    torch.manual_seed(0)
    student = build_model("convnet3", width=8)
    losses = {"kd": (0.9, KDLoss(T=4.0)),
              "fitnet": (10.0, FitNetLoss(student_layer="layer2", teacher_layer="layer2"))}
    from kdkit.data.subsets import balanced_subset

    return Distiller(student, teacher, losses, train, test, cfg, tmp_path / "run",
                     train_indices=balanced_subset(train.labels, 20), on_step=on_step)


class Crash(Exception):
    pass


def test_resume_after_crash_mid_epoch_gives_identical_weights(tmp_path, cifar):
    torch.manual_seed(1)
    teacher = build_model("convnet3", width=16)  # random weights are enough to test resume exactness
    full = _tiny_distiller(tmp_path / "a", cifar, teacher)
    full.fit()

    def crash(d, step):
        if step == 9:  # mid-epoch 2 (6 steps per epoch), after the step-8 checkpoint
            raise Crash

    broken = _tiny_distiller(tmp_path / "b", cifar, teacher, on_step=crash)
    with pytest.raises(Crash):
        broken.fit()
    resumed = _tiny_distiller(tmp_path / "b", cifar, teacher, resume="auto")
    resumed.fit()
    assert "resumed from" in (tmp_path / "b" / "run" / "train.log").read_text()
    assert resumed.run.resume_folder.name == "step-00000008"  # epoch 2, step 2
    a = full.raw.state_dict()
    b = resumed.raw.state_dict()
    assert a.keys() == b.keys() and any(k.startswith("losses.fitnet.") for k in a)  # projector restored too
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert full.state["history"][-1]["test_acc"] == resumed.state["history"][-1]["test_acc"]
    assert full.state["history"][-1]["train_kd"] == resumed.state["history"][-1]["train_kd"]  # the epoch's terms


def test_corrupt_checkpoint_is_refused_by_name(tmp_path, cifar):
    teacher = build_model("convnet3", width=16)
    d = _tiny_distiller(tmp_path, cifar, teacher, **{"trainer.epochs": 1})
    d.fit()
    ckpt = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1]
    target = ckpt / "state.safetensors"
    data = bytearray(target.read_bytes())
    data[-10] ^= 0xFF
    target.write_bytes(bytes(data))
    fresh = _tiny_distiller(tmp_path, cifar, teacher, resume=str(ckpt))
    with pytest.raises(CheckpointError, match="state.safetensors is corrupt"):
        fresh.fit()


def test_teacher_weights_truncated_or_for_another_model(tmp_path, teacher_run):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes((teacher_run / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt or not a safetensors file"):
        build_distiller(recipe(tmp_path, "kd-resnet32x4-resnet8x4", f"teacher.checkpoint={bad}"), "distill")
    with pytest.raises(CheckpointError, match="holds model=convnet3, but the recipe asks for resnet32x4"):
        build_distiller(recipe(tmp_path, "kd-resnet32x4-resnet8x4", f"teacher.checkpoint={teacher_run}"), "distill")


def test_feature_tap_shape_mismatch_is_a_clear_error(tmp_path, teacher_run):
    # student layer1 is 16x16, teacher layer3 is 4x4: no projector maps one onto the other
    r = recipe(tmp_path, "cifar10-240ep", "student.model=convnet3", "student.options={width: 8}",
               f"teacher.checkpoint={teacher_run}", "losses.fitnet.student_layer=layer1",
               "losses.fitnet.teacher_layer=layer3")
    with pytest.raises(ShapeMismatchError) as e:
        build_distiller(r, "distill")
    assert "16" in str(e.value) and "4" in str(e.value)


def test_unknown_tap_path_lists_modules(tmp_path, teacher_run):
    r = recipe(tmp_path, "cifar10-240ep", "student.model=convnet3", f"teacher.checkpoint={teacher_run}",
               "losses.fitnet.student_layer=layer9")
    with pytest.raises(KeyError, match="no submodule 'layer9'.*layer1"):
        build_distiller(r, "distill")


def test_mode_checks(tmp_path):
    from kdkit.train.build import check_mode

    with pytest.raises(ConfigError, match="needs at least one loss"):
        build_distiller(recipe(tmp_path), "distill")
    with pytest.raises(ConfigError, match="losses kd need a teacher"):
        build_distiller(recipe(tmp_path, "cifar10-240ep", "losses.kd.weight=1"), "distill")
    # self-distillation (no teacher) is allowed in both modes
    check_mode(recipe(tmp_path, "cifar10-240ep", "losses.pskd.weight=1", "ce_weight=0"), "train")
    check_mode(recipe(tmp_path, "cifar10-240ep", "losses.pskd.weight=1", "ce_weight=0"), "distill")
    with pytest.raises(ConfigError, match="has no weights"):
        build_distiller(recipe(tmp_path, "kd-resnet32x4-resnet8x4"), "distill")
    with pytest.raises(ConfigError, match="trains without a teacher"):
        build_distiller(recipe(tmp_path, "kd-resnet32x4-resnet8x4"), "train")


def test_cli_errors_are_one_clear_line(tmp_path, capsys, monkeypatch):
    assert main(["train", "recipe=baseline-resnet8x4", "trainer.epoch=1"]) == 2
    assert "unknown key 'trainer.epoch'. Did you mean 'trainer.epochs'?" in capsys.readouterr().err
    assert main(["distill", "recipe=nope"]) == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err
    assert main(["train", "recipe=baseline-resnet8x4", "student.model=resnet9"]) == 2
    assert "student.model='resnet9' is not allowed" in capsys.readouterr().err
    empty = tmp_path / "nodata"
    empty.mkdir()
    monkeypatch.setenv("KDKIT_DATA_DIR", str(empty))
    monkeypatch.setenv("KDKIT_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["train", "recipe=baseline-resnet8x4", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "KDKIT_DATA_DIR" in err


def test_help_on_every_verb(capsys):
    for verb in ([], ["distill"], ["train"], ["recipes"], ["demo"], ["bench"]):
        with pytest.raises(SystemExit) as e:
            main([*verb, "--help"])
        assert e.value.code == 0
        assert "usage: kdkit" in capsys.readouterr().out


def test_recipes_lists_descriptions(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "kd-resnet32x4-resnet8x4" in out and "Hinton KD" in out and "resnet32x4" in out


def test_dry_run_prints_resolved_recipe(tmp_path, capsys):
    from kdkit.checkpoint import save_model

    weights = tmp_path / "model.safetensors"  # read by the dry run's checks: its header only
    save_model(build_model("convnet3", width=8), weights, {"model": "convnet3", "options": '{"width": 8}'})
    assert main(["distill", "recipe=dkd-resnet32x4-resnet8x4", "losses.dkd.beta=2", "teacher.model=convnet3",
                 f"teacher.checkpoint={weights}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "beta: 2.0" in out and "epochs: 240" in out
    assert list(tmp_path.iterdir()) == [weights]  # nothing written


def test_lr_schedules_match_the_kd_protocol():
    from kdkit.config import SchedulerConfig
    from kdkit.train.optim import lr_at

    step = SchedulerConfig(name="step", milestones=[150, 180, 210], gamma=0.1)
    assert [lr_at(e, 240, 0.05, step) for e in (0, 149.9, 150, 180, 209.5, 239)] == pytest.approx(
        [0.05, 0.05, 0.005, 0.0005, 0.0005, 0.00005])
    cos = SchedulerConfig(name="cosine", min_lr=0.001)
    assert lr_at(0, 100, 0.1, cos) == pytest.approx(0.1)
    assert lr_at(50, 100, 0.1, cos) == pytest.approx(0.001 + 0.099 * 0.5)
    assert lr_at(100, 100, 0.1, cos) == pytest.approx(0.001)
    warm = SchedulerConfig(name="cosine", warmup_epochs=5)
    assert lr_at(2.5, 105, 0.1, warm) == pytest.approx(0.05)  # halfway through the linear warm-up
    assert lr_at(5, 105, 0.1, warm) == pytest.approx(0.1)
    cycle = SchedulerConfig(name="linear", warmup_epochs=2)  # the CPU protocol's triangular one-cycle
    assert [lr_at(e, 20, 0.2, cycle) for e in (0, 1, 2, 11, 20)] == pytest.approx([0.0, 0.1, 0.2, 0.1, 0.0])


def test_label_smoothing_is_the_classifier_cross_entropy_s():
    import torch
    import torch.nn.functional as F

    from kdkit.config import load_recipe
    from kdkit.errors import ConfigError
    from kdkit.models.teacher import Student
    from kdkit.train.distiller import DistillModule
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    x, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 4])
    module = DistillModule(Student(net), {}, 1.0, label_smoothing=0.2)
    _, terms = module(x, y, None)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(net(x), y, label_smoothing=0.2).item())
    assert terms["ce"].item() != pytest.approx(F.cross_entropy(net(x), y).item())
    assert load_recipe("cpu-cifar10", ["label_smoothing=0.1"]).label_smoothing == 0.1
    with pytest.raises(ConfigError, match="label_smoothing"):
        load_recipe("cpu-cifar10", ["label_smoothing=1.0"])
    with pytest.raises(ConfigError, match="label_smoothing is the classifier cross-entropy's; task=lm"):
        load_recipe("smollm2-kd-small", ["label_smoothing=0.1"])


def test_bf16_mixed_precision_trains_in_bf16(tmp_path, cifar):
    """trainer.mixed_precision=bf16 runs the student's convolutions in bf16 and the loss stays finite."""
    from kdkit.losses import DKDLoss

    train, test = cifar
    cfg = recipe(tmp_path, "cifar10-240ep", "trainer.mixed_precision=bf16", "data.batch_size=40",
                 "trainer.epochs=2", "scheduler.name=constant", "data.test_limit=100")
    seen = []
    torch.manual_seed(0)  # the student and the random teacher (not whatever earlier tests left in the RNG)
    student = build_model("convnet3", width=8)
    student.layer1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    from kdkit.data.subsets import balanced_subset

    d = Distiller(student, build_model("convnet3", width=8), {"dkd": (1.0, DKDLoss(warmup=1))}, train, test, cfg,
                  tmp_path / "bf16", train_indices=balanced_subset(train.labels, 20))
    d.fit()
    assert torch.bfloat16 in seen
    hist = d.state["history"]
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in hist)
    assert hist[-1]["train_ce"] < hist[0]["train_ce"]


def test_pskd_self_distillation_runs_and_fills_its_cache(tmp_path):
    """A teacher-free loss with per-sample state: run options (epochs, num_samples) come from the run."""
    r = recipe(tmp_path, "cifar10-240ep", "student.model=convnet3", "student.options={width: 8}", "ce_weight=0",
               "losses.pskd.weight=1", "data.train_per_class=10", "data.batch_size=25", "trainer.epochs=2",
               "data.test_limit=100", "name=pskd")
    d = build_distiller(r, "train")
    loss = d.raw.losses["pskd"]
    assert loss.epochs == 2 and loss.cache.latest.shape == (50000, 10)  # from the run, not the recipe
    d.fit()
    seen = torch.unique(torch.cat([d.train_loader.epoch_indices(e) for e in (0, 1)]))
    assert len(seen) == 100
    written = torch.nonzero(loss.cache.written == 1).flatten()  # last written in epoch 1 (0-based)
    assert torch.equal(written, seen)
    assert torch.allclose(loss.cache.latest[seen].sum(1), torch.ones(100))  # stored softmax rows
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in d.state["history"])


def test_diverging_run_stops_with_a_clear_error(tmp_path, cifar):
    train, test = cifar
    cfg = recipe(tmp_path, "cifar10-240ep", "optim.lr=1e30", "scheduler.name=constant", "data.batch_size=20",
                 "trainer.epochs=1", "trainer.log_every=2", "data.test_limit=100")
    from kdkit.data.subsets import balanced_subset

    d = Distiller(build_model("convnet3", width=8, norm="none"), None, {}, train, test, cfg, tmp_path / "nan",
                  train_indices=balanced_subset(train.labels, 10))
    with pytest.raises(FloatingPointError, match="non-finite loss at step 2.*lower the learning rate"):
        d.fit()


def _dml_recipe(tmp_path, name, *extra):
    return recipe(tmp_path, "dml-resnet32x4-resnet8x4", "student.model=convnet3", "student.options={width: 8}",
                  "peer.model=convnet3", "peer.options={width: 16}", "data.train_per_class=10", "data.batch_size=25",
                  "trainer.epochs=2", "data.test_limit=100", "trainer.save_every_steps=1", "trainer.keep_checkpoints=20",
                  f"name={name}", *extra)


def test_dml_peer_is_trained_jointly_checkpointed_and_resumes_exactly(tmp_path):
    """Online distillation: the peer's weights move with one optimiser, its accuracy is logged, its weights are
    saved, and a run resumed after a crash ends bitwise equal to an uninterrupted one (student and peer)."""
    torch.manual_seed(0)
    full = build_distiller(_dml_recipe(tmp_path, "full"), "distill")
    peer0 = {k: v.clone() for k, v in full.raw.peer.model.state_dict().items()}
    summary = full.fit()
    moved = [k for k, v in full.raw.peer.model.state_dict().items() if v.dtype.is_floating_point
             and not torch.equal(v, peer0[k])]
    assert moved, "the peer was not trained"
    assert "peer_test_acc" in full.state["history"][-1] and summary["peer_final_acc"] is not None
    assert (tmp_path / "full" / "peer.safetensors").is_file()

    def crash(d, step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_distiller(_dml_recipe(tmp_path, "crash"), "distill", on_step=crash).fit()
    resumed = build_distiller(_dml_recipe(tmp_path, "crash", "resume=auto"), "distill")
    resumed.fit()
    assert resumed.run.resume_folder.name == "step-00000002"  # on_step runs before its step's checkpoint
    for part in ("student", "peer"):
        a = getattr(full.raw, part).model.state_dict()
        b = getattr(resumed.raw, part).model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_dml_and_bdkd_refuse_a_frozen_teacher_too(tmp_path):
    from kdkit.train.build import check_mode

    (tmp_path / "x").touch()
    with pytest.raises(ConfigError, match="either a frozen teacher"):
        check_mode(recipe(tmp_path, "bdkd-resnet32x4-resnet8x4", f"teacher.checkpoint={tmp_path / 'x'}"), "distill")
    with pytest.raises(ConfigError, match="kdkit train.*peer"):
        check_mode(recipe(tmp_path, "dml-resnet32x4-resnet8x4"), "train")


def test_multi_teacher_run_gets_one_output_per_teacher(tmp_path, teacher_run):
    """Two teachers (here the same checkpoint twice): the mean of their distributions is that teacher's, so the
    multi-teacher term equals KD's on the same batch; a one-teacher loss is refused with a list of teachers."""
    from kdkit.losses import kd_loss

    common = ["student.model=convnet3", "student.options={width: 8}", "data.train_per_class=10",
              "data.batch_size=25", "trainer.epochs=1", "data.test_limit=100",
              f"teachers.0.checkpoint={teacher_run}", f"teachers.1.checkpoint={teacher_run}",
              "teachers.0.model=convnet3", "teachers.1.model=convnet3", "teachers.0.options={width: 32}",
              "teachers.1.options={width: 32}"]
    d = build_distiller(recipe(tmp_path, "multi-teacher-resnet8x4", *common, "name=mt"), "distill")
    assert isinstance(d.teacher, list) and len(d.teacher) == 2
    assert d.raw.losses["multi_teacher"].num_teachers == 2  # filled from the run
    batch = next(iter(d.train_loader))
    outs = d._teacher_out(batch.images, batch.index)
    assert len(outs) == 2
    s = d.raw.student(batch.images)
    got = d.raw.losses["multi_teacher"](s, outs, batch.labels)
    torch.testing.assert_close(got, kd_loss(s.logits, outs[0].logits, T=4.0), rtol=1e-5, atol=1e-6)
    summary = d.fit()
    assert isinstance(summary["teacher_acc"], list) and summary["teacher_acc"][0] == summary["teacher_acc"][1]
    with pytest.raises(ConfigError, match="takes one teacher.*2 teachers"):
        build_distiller(recipe(tmp_path, "multi-teacher-resnet8x4", *common, "name=mt2", "losses.multi_teacher=null",
                               "losses.kd.weight=0.9"), "distill")
