"""`kdkit bench classifier`: protocol scaling, method -> recipe resolution, a real tiny row, the rendered table."""
import json

import pytest

from kdkit.bench.classifier import method_recipe, parse_pair, protocol_overrides, read_rows, run_classifier
from kdkit.bench.classifier_table import render, verdict, write_figure
from kdkit.config import load_recipe
from kdkit.errors import ConfigError, KdkitError


def test_shorter_protocol_scales_milestones_and_dkd_warmup():
    r = load_recipe("dkd-resnet32x4-resnet8x4")
    assert protocol_overrides(240, r) == []
    assert protocol_overrides(24, r) == ["trainer.epochs=24", "scheduler.milestones=[15,18,21]", "losses.dkd.warmup=2"]
    assert protocol_overrides(15, r)[-1] == "losses.dkd.warmup=1"  # 1.25 epochs -> 1, never 0
    with pytest.raises(ConfigError):
        protocol_overrides(0, r)


def test_method_resolution_uses_pair_recipes_and_the_light_student_lr():
    assert method_recipe("dkd", "resnet56", "resnet20")[1] == "dkd-resnet56-resnet20"  # beta 2, as mdistiller
    verb, name, over = method_recipe("kd", "wrn_40_2", "wrn_16_2")
    assert (verb, name) == ("distill", "kd-resnet32x4-resnet8x4")
    assert over == ["teacher.model=wrn_40_2", "student.model=wrn_16_2"]
    assert "optim.lr=0.01" in method_recipe("baseline", "resnet32x4", "shufflenetv2")[2]
    assert method_recipe("teacher", "vgg13", "vgg8")[:2] == ("train", "train-vgg13")
    assert load_recipe("dkd-resnet56-resnet20").losses["dkd"]["beta"] == 2.0
    with pytest.raises(ConfigError, match="unknown method 'nope'.*dkd"):
        method_recipe("nope", "resnet56", "resnet20")
    with pytest.raises(ConfigError, match="TEACHER-STUDENT"):
        parse_pair("resnet56")
    with pytest.raises(ConfigError, match="unknown model 'resnet9000'"):
        parse_pair("resnet9000-resnet20")


def test_a_tiny_row_end_to_end(tmp_path):
    """Teacher, then two KD seeds in parallel processes: one result file per seed with the teacher's hash."""
    out, runs = tmp_path / "results", tmp_path / "runs"
    small = ["data.train_per_class=10", "data.test_limit=100", "trainer.threads=1", "data.batch_size=25"]
    common = [f"out={out}", f"runs={runs}", "epochs=1", *small]
    with pytest.raises(KdkitError, match="no trained convnet3_w16 teacher.*method=teacher"):
        run_classifier(["method=kd", "pair=convnet3_w16-convnet3_w8", "seeds=1", *common])
    [teacher] = run_classifier(["method=teacher", "pair=convnet3_w16-convnet3_w8", "seeds=1", *common])
    rows = run_classifier(["method=kd", "pair=convnet3_w16-convnet3_w8", "seeds=2", "jobs=2", *common])
    assert sorted(r["seed"] for r in rows) == [0, 1]
    for r in rows:
        assert r["teacher_checkpoint"]["sha256"] == teacher["checkpoint"]["sha256"]
        assert r["shorter_protocol"] and r["epochs"] == 1 and 0 <= r["final_acc"] <= 100
        assert r["command"].startswith("kdkit bench classifier method=kd pair=convnet3_w16-convnet3_w8 seeds=2")
        saved = json.loads((out / f"kd__convnet3_w16-convnet3_w8__e1__s{r['seed']}.json").read_text())
        assert saved["final_acc"] == r["final_acc"]
    assert len(read_rows(str(out))) == 3
    again = run_classifier(["method=kd", "pair=convnet3_w16-convnet3_w8", "seeds=2", "jobs=2", *common])
    by_seed = {r["seed"]: r["time"] for r in rows}  # both seeds done before: reused, not rerun
    assert {r["seed"]: r["time"] for r in again} == by_seed
    [changed] = run_classifier(["method=kd", "pair=convnet3_w16-convnet3_w8", "seeds=1", *common, "losses.kd.T=2"])
    assert changed["recipe_digest"] != rows[0]["recipe_digest"] and changed["time"] >= rows[0]["time"]


def _row(method, pair, seed, acc, epochs=240, teacher_hash="t" * 64):
    t, s = pair.split("-")
    return {"method": method, "pair": pair, "teacher": t, "student": t if method == "teacher" else s,
            "seed": seed, "epochs": epochs, "final_acc": acc, "command": f"kdkit bench classifier method={method} "
            f"pair={pair} seeds=3 epochs={epochs}", "checkpoint": {"sha256": teacher_hash if method == "teacher"
                                                                    else f"{method}{seed}"},
            "teacher_checkpoint": None if method in ("teacher", "baseline") else {"sha256": teacher_hash},
            "hardware": {"device": "cpu", "torch": "x"}, "git_commit": "abc"}


def test_table_mean_std_paper_column_and_protocol_sections():
    rows = [_row("teacher", "resnet56-resnet20", 0, 93.0)]
    rows += [_row("baseline", "resnet56-resnet20", s, a) for s, a in enumerate((90.0, 91.0, 92.0))]
    rows += [_row("kd", "resnet56-resnet20", s, a) for s, a in enumerate((92.0, 92.0, 92.0))]
    rows += [_row("kd", "resnet56-resnet20", 0, 80.0, epochs=15)]
    md = render(rows)
    standard, short = md.split("**Shorter protocol**")
    assert "| Student, no teacher | 91.00 ± 1.00 (3) | 69.06 |" in standard  # sample std, paper C100 figure
    assert "| KD (Hinton et al. 2015) | 92.00 ± 0.00 (3) | 70.66 |" in standard
    assert "| Teacher | 93.00 ± 0.00 (1) | 72.34 |" in standard
    assert "80.00 ± 0.00 (1)" in short and "80.00" not in standard
    assert "ResNet-32x4 → ResNet-8x4" in md.split("## Not measured yet")[1]


def _cpu_row(method, pair, seed, acc):
    row = _row(method, pair, seed, acc, epochs=20)
    row["protocol"] = "cpu"
    row["command"] = f"kdkit bench classifier method={method} pair={pair} seeds=3 protocol=cpu"
    row["train_seconds"], row["images_per_s"] = 600.0, 1000.0 + seed
    return row


def test_cpu_protocol_table_judges_each_method_against_the_spread(tmp_path):
    pair = "airnet_w32-airnet_w16"
    rows = [_cpu_row("teacher", pair, 0, 88.0)]
    rows += [_cpu_row("baseline", pair, s, a) for s, a in enumerate((80.0, 81.0, 82.0))]  # 81 +- 1
    rows += [_cpu_row("kd", pair, s, a) for s, a in enumerate((84.0, 84.5, 85.0))]  # +3.5 > 1 + 0.5
    rows += [_cpu_row("dkd", pair, s, a) for s, a in enumerate((81.0, 82.0, 83.0))]  # +1 < 1 + 1
    rows += [_cpu_row("crd", pair, 0, 90.0)]
    md = render(rows + [_row("kd", "resnet56-resnet20", 0, 80.0, epochs=15)])
    cpu = md.split("## CPU protocol")[1].split("**Shorter protocol**")[0]
    assert "| method | AirNet-w32 → AirNet-w16 | vs no teacher | train img/s |" in cpu
    assert "| Student, no teacher | 81.00 ± 1.00 (3) |  | 1,001 | 72.50 |" in cpu
    assert "| KD (Hinton et al. 2015) | 84.50 ± 0.50 (3) | +3.50 (beats the baseline) | 1,001 | 73.33 |" in cpu
    assert "| DKD (Zhao et al. 2022) | 82.00 ± 1.00 (3) | +1.00 (within the spread) | 1,001 | 76.32 |" in cpu
    assert "| CRD (Tian et al. 2020) | 90.00 ± 0.00 (1) | not judged (one seed) | 1,000 | 75.51 |" in cpu
    assert "| Teacher | 88.00 ± 0.00 (1) |" in cpu and "Training time of every run in this table: 1.83 h" in cpu
    assert "figures/classifier-cifar10-cpu.png" in cpu
    assert verdict([70.0, 70.2], [75.0, 75.1]).endswith("(below the baseline)")
    png = write_figure(rows, tmp_path / "bars.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert write_figure([_row("kd", "resnet56-resnet20", 0, 80.0)], tmp_path / "none.png") is None


def test_cpu_protocol_recipes_resolve_and_run_one_step(tmp_path):
    """Every method of the CPU protocol resolves to its recipe and trains one step on real CIFAR-10 batches."""
    from kdkit.train.build import check_recipe

    assert method_recipe("teacher", "airnet_w32", "airnet_w16", "cpu")[:2] == ("train", "cpu-train-airnet_w32")
    assert method_recipe("baseline", "airnet_w32", "airnet_w8", "cpu") == ("train", "cpu-cifar10",
                                                                          ["student.model=airnet_w8"])
    with pytest.raises(ConfigError, match="unknown method 'kdd' for protocol=cpu; choices: teacher, baseline, at"):
        method_recipe("kdd", "airnet_w32", "airnet_w16", "cpu")
    from kdkit.checkpoint import save_model
    from kdkit.models import build_model
    from kdkit.train.build import build_distiller

    teacher = tmp_path / "teacher.safetensors"
    save_model(build_model("airnet_w32"), teacher, {"model": "airnet_w32", "num_classes": "10", "options": "{}",
                                                    "dataset": "cifar10"})
    for method in ["kd", "dkd", "dist", "nkd", "lskd", "at", "crd"]:
        verb, name, over = method_recipe(method, "airnet_w32", "airnet_w8", "cpu")
        recipe = load_recipe(name, over + [f"teacher.checkpoint={teacher}", "data.train_per_class=26", "data.test_limit=20", "trainer.epochs=1",
                                           "trainer.progress=false", f"output_dir={tmp_path}", f"name={method}"])
        assert (verb, recipe.trainer.epochs, recipe.data.batch_size) == ("distill", 1, 256)
        check_recipe(recipe, verb)
        if method in ("at", "crd"):  # one step each of a feature and a contrastive method (logit ones: test_train)
            summary = build_distiller(recipe, verb).fit()
            assert summary["steps"] == 1 and 0 <= summary["final_acc"] <= 100


def test_throughput_bench_measures_the_plain_loop_beside_kdkit(tmp_path):
    from kdkit.bench.throughput import run_throughput

    res = run_throughput(["variants=plain,fp32", "teacher=convnet3_w16", "student=convnet3_w8", "steps=3",
                          "warmup=2", "batch=16", f"out={tmp_path}"])
    plain, fp32 = res["rows"]
    assert plain["variant"] == "plain" and plain["kd_over_plain_kd"] == 1.0
    assert fp32["kd_img_s"] > 0 and fp32["kd_over_plain_kd"] == fp32["kd_img_s"] / plain["kd_img_s"]
    assert json.loads(next(tmp_path.glob("*.json")).read_text())["rows"][1]["variant"] == "fp32"
