"""DD-Ranking's HLR, IOR and DDRS (`kdkit/condense/dd_ranking.py`): hand-computed values, bad input, and the scores
in a tiny image-condensation run's metrics and leaderboard row."""
from __future__ import annotations

import json
import math

import pytest
import torch

from kdkit.condense.dd_ranking import ddrs, hlr, ior, scores
from kdkit.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

E = math.e


def test_hlr_and_ior_are_differences_of_fractions():
    assert hlr(0.8, 0.5) == pytest.approx(0.3)
    assert hlr(0.5, 0.8) == pytest.approx(-0.3)  # the synthetic set beat the full data: negative
    assert ior(0.55, 0.30) == pytest.approx(0.25)
    assert ior(0.0, 1.0) == -1.0 and hlr(1.0, 0.0) == 1.0


def test_ddrs_by_hand_and_at_its_bounds():
    # (e^a - e^-1) / (e - e^-1), a = w IOR - (1 - w) HLR
    assert ddrs(hlr_value=-1.0, ior_value=1.0) == pytest.approx(1.0)  # a = 1: the best possible
    assert ddrs(hlr_value=1.0, ior_value=-1.0) == pytest.approx(0.0, abs=1e-12)  # a = -1: the worst
    assert ddrs(0.0, 0.0) == pytest.approx(1 / (1 + E))  # a = 0: (1 - 1/e) / (e - 1/e) = 1 / (e + 1) = 0.26894
    assert ddrs(0.0, 0.0) == pytest.approx(0.2689414, abs=1e-7)
    assert ddrs(0.3, 0.2) == pytest.approx(0.2481915, abs=1e-7)  # a = 0.1 - 0.15 = -0.05
    # the weight: w = 0 counts only -HLR, w = 1 only IOR
    assert ddrs(0.5, 0.9, weight=0.0) == pytest.approx(0.1015363, abs=1e-7)  # (e^-0.5 - e^-1) / (e - e^-1)
    assert ddrs(0.9, 0.0, weight=1.0) == pytest.approx(1 / (1 + E))
    assert ddrs(-1.0, -1.0, weight=1.0) == pytest.approx(0.0, abs=1e-12)
    # monotone: less HLR or more IOR never lowers it
    assert ddrs(0.1, 0.2) > ddrs(0.2, 0.2) and ddrs(0.1, 0.3) > ddrs(0.1, 0.2)


def test_scores_average_per_round_like_the_reference():
    one = scores(0.8, 0.5, 0.5, 0.3)
    assert one["hlr"] == pytest.approx(0.3) and one["ior"] == pytest.approx(0.2)
    assert one["ddrs"] == pytest.approx(0.2481915, abs=1e-7) and one["rounds"] == 1 and one["ddrs_std"] == 0.0
    assert one["weight"] == 0.5 and one["acc_full"] == 0.8 and one["acc_rdm_any"] == 0.3
    # two rounds: (HLR, IOR) = (0.3, 0.25) and (0.2, 0.2); DDRS is the mean of the per-round DDRS
    two = scores(0.8, [0.5, 0.6], [0.55, 0.65], [0.30, 0.45])
    assert two["hlr"] == pytest.approx(0.25) and two["hlr_std"] == pytest.approx(0.05)
    assert two["ior"] == pytest.approx(0.225) and two["ior_std"] == pytest.approx(0.025)
    per = [0.2584368, 1 / (1 + E)]  # a = 0.125 - 0.15 = -0.025, and a = 0
    assert [r["ddrs"] for r in two["per_round"]] == pytest.approx(per, abs=1e-7)
    assert two["ddrs"] == pytest.approx(sum(per) / 2, abs=1e-7)
    assert two["ddrs"] != pytest.approx(ddrs(two["hlr"], two["ior"]), abs=1e-6)  # not the score of the means
    assert two["acc_syn_hard"] == pytest.approx(0.55) and two["rounds"] == 2


@pytest.mark.parametrize("call, match", [
    (lambda: hlr(45.0, 0.3), r"acc_full=45.0 is not allowed: expected an accuracy as a finite fraction in \[0, 1\]"),
    (lambda: hlr(0.5, -0.1), "acc_syn_hard=-0.1 is not allowed"),
    (lambda: ior(float("nan"), 0.3), "acc_syn_any=.nan is not allowed"),
    (lambda: ior(0.3, float("inf")), "acc_rdm_any=.inf is not allowed"),
    (lambda: ior(True, 0.3), "acc_syn_any=true is not allowed"),
    (lambda: ior("0.5", 0.3), "acc_syn_any='0.5' is not allowed"),
    (lambda: ddrs(0.1, 0.2, weight=1.5), r"weight=1.5 is not allowed: expected a finite number in \[0, 1\]"),
    (lambda: ddrs(0.1, 0.2, weight=float("nan")), "weight=.nan is not allowed"),
    (lambda: ddrs(1.5, 0.2), r"hlr=1.5 is not allowed: expected a finite difference of accuracies"),
    (lambda: ddrs(0.1, -2.0), "ior=-2.0 is not allowed"),
    (lambda: scores(0.8, [0.5, 0.6], [0.5, 0.6, 0.7], 0.3), r"acc_syn_hard=\[0.5, 0.6\] is not allowed: expected one"),
    (lambda: scores(0.8, [], 0.5, 0.3), "acc_syn_hard=.* is not allowed: expected at least one accuracy"),
    (lambda: scores(0.8, [0.5, 60.0], [0.5, 0.6], [0.3, 0.4]), r"acc_syn_hard\[1\]=60.0 is not allowed"),
    (lambda: scores(0.8, 0.5, 0.5, 0.3, weight=-0.1), "weight=-0.1 is not allowed"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


def test_full_epochs_is_a_validated_setting():
    from kdkit.condense.image_run import build_image_config

    with pytest.raises(ConfigError, match="full_epochs=0 is not allowed"):
        build_image_config("cifar10", "dm", ["full_epochs=0"], ipc=1)
    with pytest.raises(ConfigError, match="full_epochs='many' is not allowed"):
        build_image_config("cifar10", "dm", ["full_epochs=many"], ipc=1)
    assert build_image_config("cifar10", "dm", ["full_epochs=3"], ipc=1).full_epochs == 3


# --- end to end: a tiny DM run reports the scores, its bench row renders them -------------------------------------

TINY = ["train_subset=200", "test_subset=100", "width=8", "batch_real=8", "iterations=2", "eval_epochs=2",
        "eval_nets=2", "baseline=true", "progress=false", "threads=1"]


def _splits():
    from kdkit.condense.image_data import load_image_splits
    from kdkit.errors import MissingDatasetError

    try:
        return load_image_splits("cifar10", train_subset=200, test_subset=100, zca=False, seed=0)
    except MissingDatasetError as e:
        pytest.skip(f"CIFAR-10 not available offline: {e}")


def test_tiny_condense_run_reports_dd_ranking_scores(tmp_path, monkeypatch):
    from kdkit.bench.condense_images import dd_ranking_fields, write_table
    from kdkit.condense.image_run import build_image_config, run_image_condense

    monkeypatch.setenv("KDKIT_CACHE_DIR", str(tmp_path / "cache"))
    splits = _splits()
    cfg = build_image_config("cifar10", "dm", TINY + [f"output_dir={tmp_path}", "name=a"], ipc=1)
    m = run_image_condense(cfg, splits=splits)
    dd, full = m["dd_ranking"], m["full_data"]
    # a hard-label method: its own evaluation is both syn-hard and syn-any; random real images with hard labels
    assert (dd["syn_hard"], dd["syn_any"], dd["rdm_any"], dd["rdm_labels"]) == ("eval", "eval", "random_real", "hard")
    assert full["epochs"] == 2 and full["images"] == 200 and full["nets"] == 1 and not full["cached"]
    assert full["augmentation"] == "none" and full["steps"] == 2 * 1  # 200 images, batch 256: one step per epoch
    assert dd["rounds"] == 2 and dd["full_data_epochs"] == 2
    for k, (s, r) in enumerate(zip(m["eval"]["accs"], m["random_real"]["accs"])):  # paired round by round
        assert dd["per_round"][k]["hlr"] == pytest.approx(full["mean"] - s)
        assert dd["per_round"][k]["ior"] == pytest.approx(s - r)
    assert dd["hlr"] == pytest.approx(full["mean"] - m["eval"]["mean"])
    assert dd["ior"] == pytest.approx(m["eval"]["mean"] - m["random_real"]["mean"])
    assert 0.0 <= dd["ddrs"] <= 1.0
    on_disk = json.loads((cfg.run_dir() / "metrics.json").read_text())
    assert on_disk["dd_ranking"]["ddrs"] == pytest.approx(dd["ddrs"])
    last = json.loads((cfg.run_dir() / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["dd_ranking/ddrs"] == pytest.approx(dd["ddrs"]) and "full_data/mean" in last
    assert "DD-Ranking: HLR" in (cfg.run_dir() / "train.log").read_text()

    # a second run on the same data and settings reuses the cached full-data network
    again = run_image_condense(build_image_config("cifar10", "dm", TINY + [f"output_dir={tmp_path}", "name=b"],
                                                  ipc=1), splits=splits)
    assert again["full_data"]["cached"] and again["full_data"]["mean"] == full["mean"]
    assert len(list((tmp_path / "cache" / "condense-full-data").glob("*.json"))) == 1
    # another budget is another network
    other = run_image_condense(build_image_config(
        "cifar10", "dm", TINY + [f"output_dir={tmp_path}", "name=c", "full_epochs=1"], ipc=1), splits=splits)
    assert not other["full_data"]["cached"] and other["full_data"]["epochs"] == 1

    # the bench row: HLR / IOR in percentage points, DDRS in [0, 1]; an old row without them prints dashes
    row = {"method": "dm", "ipc": 1, "protocol": "convnet", "acc_mean": 100 * m["eval"]["mean"], "acc_std": 1.0,
           "random_real_mean": 100 * m["random_real"]["mean"], "random_real_std": 1.0, "image_bytes": 1,
           "label_bytes": 1, "settings": {}, "command": "kdkit bench x", "hardware": {"device": "cpu", "threads": 1},
           "time": "2026-01-01T00:00:00", **dd_ranking_fields(m)}
    assert row["hlr_mean"] == pytest.approx(100 * dd["hlr"]) and row["ddrs_mean"] == pytest.approx(dd["ddrs"])
    assert row["full_data"]["acc"] == pytest.approx(100 * full["mean"]) and row["full_data"]["epochs"] == 2
    old = {k: v for k, v in row.items() if k not in ("hlr_mean", "hlr_std", "ior_mean", "ior_std", "ddrs_mean",
                                                     "ddrs_std", "dd_ranking", "full_data")}
    results = tmp_path / "results" / "condense-cifar10"
    results.mkdir(parents=True)
    (results / "a.json").write_text(json.dumps(row))
    (results / "b.json").write_text(json.dumps({**old, "time": "2026-01-02T00:00:00"}))
    table = write_table(results_dir=results, out=tmp_path / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| dm |")]
    assert f"| {row['hlr_mean']:.1f} ± {row['hlr_std']:.1f} | {row['ior_mean']:.1f} ± {row['ior_std']:.1f} | " \
           f"{row['ddrs_mean']:.3f} ± {row['ddrs_std']:.3f} |" in rows[0]
    assert "full data (HLR): convnet" in rows[0] and "| — | — | — |" in rows[1]
    assert "arXiv:2505.13300" in table and "HLR ↓ | IOR ↑ | DDRS ↑" in table


def test_soft_label_run_scores_hard_labels_and_labels_random_images_like_itself(tmp_path, monkeypatch):
    """DATM: HLR from its images with their class-slot hard labels, IOR against random real images labelled by the
    expert its soft labels start from (the settings of the DATM end-to-end test in test_condense_images.py)."""
    pytest.importorskip("safetensors")
    from kdkit.condense.image_data import load_image_splits
    from kdkit.condense.image_run import build_image_config, run_image_condense
    from kdkit.errors import MissingDatasetError

    monkeypatch.setenv("KDKIT_CACHE_DIR", str(tmp_path / "cache"))
    try:
        splits = load_image_splits("cifar10", train_subset=500, test_subset=200, zca=False, seed=0)
    except MissingDatasetError as e:
        pytest.skip(f"CIFAR-10 not available offline: {e}")
    cfg = build_image_config("cifar10", "datm", [
        "width=8", "experts=1", "expert_epochs=2", "syn_steps=3", "match_epochs=1", "iterations=2", "eval_epochs=2",
        "eval_nets=1", "zca=false", "baseline=true", f"output_dir={tmp_path}", "progress=false", "compile=false"], ipc=1)
    m = run_image_condense(cfg, splits=splits)
    dd = m["dd_ranking"]
    assert (dd["syn_hard"], dd["rdm_any"]) == ("eval_hard_labels", "random_real_soft_labels")
    assert dd["rdm_labels"].startswith("expert 0 logits") and "note" not in dd
    assert m["eval_hard_labels"]["hard_labels"] == "class slot" and not m["eval_hard_labels"]["soft_labels"]
    assert m["random_real_soft_labels"]["soft_labels"] and m["eval"]["soft_labels"]
    assert dd["hlr"] == pytest.approx(m["full_data"]["mean"] - m["eval_hard_labels"]["mean"])
    assert dd["ior"] == pytest.approx(m["eval"]["mean"] - m["random_real_soft_labels"]["mean"])
    assert m["random_real"]["soft_labels"] is False  # the hard-label baseline column is still there


def test_hard_labels_of_a_soft_labelled_set_are_its_class_slots():
    from kdkit.condense.image_method import class_slots

    soft = torch.tensor([[0.1, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 2.0],
                         [0.0, 5.0, 0.0]])
    labels, how = class_slots(soft, ipc=2)  # stored class by class: slots 0 0 1 1 2 2, whatever the argmax says
    assert labels.tolist() == [0, 0, 1, 1, 2, 2] and how == "class slot"
    labels, how = class_slots(soft[:4], ipc=2)  # not 3 classes x 2: the argmax
    assert labels.tolist() == [1, 0, 1, 2] and how == "argmax of the soft label"
