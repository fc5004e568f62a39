"""Condensation on the run core: paper settings per IPC as recipes, typed options, the one run-folder layout,
resume after `kill -9` (images and graphs), planted pickles, and a new method as one registered class.

The SIGKILL tests kill a real `kdkit condense` process on a tiny config (CIFAR-10 subsets of 200 images, width-8
ConvNets; MUTAG with 2-epoch GNNs) after its first checkpoint, rerun the command with resume=auto, and compare
with an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kdkit.checkpoint import latest_checkpoint, read_safetensors
from kdkit.cli import main
from kdkit.config import PositiveFloat, PositiveInt
from kdkit.condense import condense
from kdkit.condense.image_data import ImageSplit, random_real
from kdkit.condense.image_method import ImageCondenseMethod
from kdkit.condense.mirage import MirageDataset
from kdkit.condense.resolve import load_condense_config
from kdkit.errors import CheckpointError, ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def _dataset_or_skip(exc: Exception) -> None:
    from kdkit.errors import MissingDatasetError

    if isinstance(exc, MissingDatasetError):
        pytest.skip(str(exc))


# --- the paper settings per method and IPC are recipes, and resolve as the old tables did ----------------------

# the tables that lived in code before (trajectory.PAPER_DEFAULTS / COMMON, distribution_matching.PAPER_DEFAULTS,
# committee_voting.PAPER_DEFAULTS / CPU_PRESET), which the recipes replace
MTT = {1: dict(syn_steps=50, match_epochs=2, max_start_epoch=2, lr_img=1000.0, lr_lr=1e-7, lr_teacher=0.01, zca=True),
       10: dict(syn_steps=30, match_epochs=2, max_start_epoch=20, lr_img=1000.0, lr_lr=1e-5, lr_teacher=0.01, zca=True),
       50: dict(syn_steps=30, match_epochs=2, max_start_epoch=40, lr_img=100.0, lr_lr=1e-5, lr_teacher=0.01, zca=False)}
DATM = {1: dict(syn_steps=80, match_epochs=2, min_start_epoch=0, current_max_start=4, max_start_epoch=4, lr_img=100.0,
                lr_lr=1e-7, lr_teacher=0.01, lr_y=5.0, zca=True, expand_until=0, ema_decay=0.995),
        10: dict(syn_steps=80, match_epochs=2, min_start_epoch=0, current_max_start=10, max_start_epoch=20,
                 lr_img=100.0, lr_lr=1e-5, lr_teacher=0.01, lr_y=2.0, zca=True, expand_until=1000, ema_decay=0.9995),
        50: dict(syn_steps=80, match_epochs=2, min_start_epoch=0, current_max_start=20, max_start_epoch=40,
                 lr_img=1000.0, lr_lr=1e-5, lr_teacher=0.01, lr_y=2.0, zca=True, expand_until=2000, ema_decay=0.995)}
CVDD = {"iterations": 4000, "recover_lr": 0.25, "r_bn": 0.01, "first_bn_multiplier": 10.0, "jitter": 4, "voters": 2,
        "recover_temperature": 5.0, "relabel_temperature": 10.0, "patch_factor": 2, "patch_difficulty": "medium",
        "patch_candidates": 300, "label_batch": 16, "bn_batch": 8, "cutmix": True, "label_topk": None,
        "min_scale": 0.08, "member_epochs": 200, "members": "resnet18,resnet32x4,shufflenetv2,mobilenetv2,wrn_40_2"}
CVDD_CPU = {"members": "convnet3_bn_w32,convnet3_bn_w16,convnet2_bn_w32", "member_epochs": 8, "iterations": 150,
            "recover_lr": 0.05, "patch_candidates": 100, "train_subset": 5000, "test_subset": 2000, "eval_epochs": 150,
            "eval_nets": 3, "eval_student": "convnet3_bn_w32"}
SUPPORTS = {"nci1": 0.1, "nci109": 0.1, "mutag": 0.28, "ptc_mr": 0.1, "proteins": 0.02}


@pytest.mark.parametrize("ipc, published", [(1, 1), (2, 1), (3, 1), (4, 10), (5, 10), (10, 10), (30, 50), (50, 50),
                                            (100, 50)])
def test_paper_settings_per_ipc_resolve_as_before(ipc, published):
    for method, table, iterations in (("mtt", MTT, 5000), ("datm", DATM, 10000)):
        cfg = load_condense_config("cifar10", method, [], ipc=ipc)
        assert cfg.recipe == f"condense-cifar10-{method}-ipc{published}" and cfg.ipc == ipc
        assert cfg.eval == "convnet" and cfg.options["iterations"] == iterations
        assert cfg.options["experts"] == 100 and cfg.options["expert_epochs"] == 50 and not cfg.options["tesla"]
        for key, value in table[published].items():
            assert cfg.setting(key) == value, (method, ipc, key)
    dm = load_condense_config("cifar10", "dm", [], ipc=ipc)
    assert dm.options == {"iterations": 20000, "lr_img": 1.0, "momentum": 0.5, "batch_real": 256}
    assert (dm.zca, dm.eval, dm.recipe) == (False, "convnet", "condense-cifar10-dm")


def test_cvdd_paper_and_cpu_preset_and_graph_supports_resolve_as_before():
    paper = load_condense_config("cifar10", "cvdd", [], ipc=10)
    assert paper.eval == "resnet18" and all(paper.setting(k) == v for k, v in CVDD.items())
    cpu = load_condense_config("cifar10", "cvdd", ["preset=cpu"], ipc=10)
    assert cpu.recipe == "condense-cifar10-cvdd-cpu"
    assert all(cpu.setting(k) == v for k, v in {**CVDD, **CVDD_CPU}.items())
    # a setting given on the command line wins over the preset, as before
    assert load_condense_config("cifar10", "cvdd", ["preset=cpu", "iterations=7"], ipc=1).options["iterations"] == 7
    for dataset, support in SUPPORTS.items():
        cfg = load_condense_config(dataset, "mirage", [])
        assert cfg.recipe == f"condense-{dataset}-mirage" and cfg.options["min_support"] == support
        assert (cfg.gnns, cfg.seeds, cfg.options["depth"], cfg.options["top_trees"]) == (["gcn"], 5, 2, 12)
    assert load_condense_config("nci1", "mirage", ["min_support=null"]).options["min_support"] is None
    # `kdkit recipes` lists them with their verb and a one-line description
    from kdkit.config import list_recipes, recipe_description

    names = list_recipes("condense")
    assert {"condense-cifar10-dm", "condense-cifar10-mtt-ipc10", "condense-cifar10-cvdd-cpu",
            "condense-nci1-mirage"} <= set(names)
    assert all(recipe_description(n) for n in names)


def test_yaml_values_and_ranges_before_any_work(tmp_path):
    assert load_condense_config("cifar10", "mtt", ["tesla=no"]).options["tesla"] is False
    assert load_condense_config("cifar10", "mtt", ["tesla=yes"]).options["tesla"] is True
    assert load_condense_config("cifar10", "mtt", ["tesla=true"]).options["tesla"] is True
    for bad, message in [("experts=0", "experts=0 is not allowed: expected an integer >= 1"),
                         ("lr_img=nan", "lr_img='nan' is not allowed"),
                         ("name=../x", "name='../x' is not allowed"),
                         ("seed=abc", "seed='abc' is not allowed: expected an integer >= 0"),
                         ("syn_steps=0", "syn_steps=0 is not allowed"), ("eval_nets=0", "eval_nets=0 is not allowed")]:
        with pytest.raises(ConfigError, match=message):
            load_condense_config("cifar10", "mtt", [bad])
    # a rule between a method's options is checked by its factory, still before the run folder or any data
    with pytest.raises(ConfigError, match="match_epochs=60 must be <= expert_epochs=50"):
        condense("cifar10", "mtt", ["match_epochs=60", f"output_dir={tmp_path}"])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="dropout=1.5 is not allowed: expected a number >= 0 and < 1"):
        load_condense_config("mutag", "mirage", ["dropout=1.5"])
    with pytest.raises(ConfigError, match="pool='max' is not allowed: expected one of 'sum', 'mean'"):
        load_condense_config("mutag", "mirage", ["pool=max"])


# --- the one run-folder layout, and resume after kill -9 --------------------------------------------------------

DM_TINY = ["train_subset=200", "test_subset=100", "width=8", "batch_real=8", "iterations=60", "checkpoint_every=5",
           "eval_epochs=1", "eval_nets=1", "baseline=false", "progress=false", "threads=1"]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), KDKIT_THREADS="1")


def _kill_after_first_checkpoint(args: list[str], run_dir: Path, cwd: Path) -> None:
    """Start `kdkit ARGS`, SIGKILL it as soon as its first checkpoint is complete."""
    proc = subprocess.Popen([sys.executable, "-m", "kdkit.cli", *args], cwd=cwd, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while latest_checkpoint(run_dir) is None:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before its first checkpoint: {proc.stderr.read()[-2000:]}")
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    proc.stderr.close()


def _resume(args: list[str], capsys) -> None:
    """Rerun the killed command with resume=auto (in this process: only the kill needs a process of its own)."""
    assert main([*args, "resume=auto"]) == 0, capsys.readouterr().err[-3000:]
    assert "run folder:" in capsys.readouterr().out


def test_image_run_resumes_bit_exactly_after_kill_9_and_ctrl_c(tmp_path, monkeypatch, capsys):
    try:
        full = condense("cifar10", "dm", DM_TINY + [f"output_dir={tmp_path}", "name=full"], ipc=1)
    except Exception as e:
        _dataset_or_skip(e)
        raise
    run = Path(full["run_dir"])
    for f in ("config.yaml", "metrics.json", "metrics.jsonl", "train.log", "synthetic.safetensors", "grid.png",
              "curves.json", "curves.png"):
        assert (run / f).is_file(), f
    assert not (run / "checkpoint.pt").exists() and latest_checkpoint(run).name == "step-00000060"
    # the cost estimate (issue 24): the steps timed, the recipe's budget, and the evaluation it does not time
    estimate = next(x for x in (run / "train.log").read_text().splitlines() if "estimate: " in x)
    assert "estimate: 60 training steps, about " in estimate and "; recipe condense-cifar10-dm: paper budget" in estimate
    assert estimate.endswith("; then evaluation, not in the estimate: 1 x 1 epochs (convnet) on the set")
    args = ["condense", "cifar10", "--ipc", "1", *DM_TINY, f"output_dir={tmp_path}", "name=killed"]
    killed = tmp_path / "condense-cifar10-dm-ipc1-killed"
    _kill_after_first_checkpoint(args, killed, tmp_path)
    stopped_at = int(latest_checkpoint(killed).name.removeprefix("step-"))
    assert stopped_at < 60 and not (killed / "metrics.json").exists()
    _resume(args, capsys)
    a, _ = read_safetensors(run / "synthetic.safetensors")
    b, _ = read_safetensors(killed / "synthetic.safetensors")
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
    assert [c["it"] for c in json.loads((killed / "curves.json").read_text())] == list(range(60))
    assert "resumed from" in (killed / "train.log").read_text()
    # Ctrl-C: a checkpoint at the current step, one line, exit 130; the rerun (resume=auto by default) continues
    from kdkit.condense.distribution_matching import DistributionMatching

    real_step = DistributionMatching.step

    def ctrl_c_at_7(self, it):
        if it == 7:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, it)

    ctrl_c = ["condense", "cifar10", "--ipc", "1", *DM_TINY, f"output_dir={tmp_path}", "name=ctrl-c"]
    monkeypatch.setattr(DistributionMatching, "step", ctrl_c_at_7)
    assert main(ctrl_c) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted at step 8" in err[0] and "Traceback" not in err[0]
    assert latest_checkpoint(tmp_path / "condense-cifar10-dm-ipc1-ctrl-c").name == "step-00000008"
    monkeypatch.setattr(DistributionMatching, "step", real_step)
    assert main(ctrl_c) == 0
    c, _ = read_safetensors(tmp_path / "condense-cifar10-dm-ipc1-ctrl-c" / "synthetic.safetensors")
    assert torch.equal(a["images"], c["images"])
    # resuming with a changed training setting is refused, naming it; evaluation settings may change
    assert main(args + ["lr_img=2", "resume=auto"]) == 2
    with pytest.raises(ConfigError, match=r"options.batch_real: 8 -> 16"):
        condense("cifar10", "dm", DM_TINY + [f"output_dir={tmp_path}", "name=killed", "batch_real=16"], ipc=1)
    again = condense("cifar10", "dm", DM_TINY + [f"output_dir={tmp_path}", "name=killed", "eval_nets=2"], ipc=1)
    assert again["eval"]["nets"] == 2


def test_mirage_run_resumes_between_seeds_after_kill_9(tmp_path, capsys):
    tiny = ["--gnn", "gin", "--seeds", "4", "epochs=2", "samples_per_epoch=32", "baselines=random", "threads=1",
            f"output_dir={tmp_path}"]
    assert main(["condense", "mutag", *tiny, "name=full", "verbose=false"]) == 0
    args = ["condense", "mutag", *tiny, "name=killed"]
    _kill_after_first_checkpoint(args, tmp_path / "killed", tmp_path)
    assert not (tmp_path / "killed" / "metrics.json").exists()
    _resume(args, capsys)
    full, resumed = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("full", "killed"))
    assert [r["seed"] for r in resumed["seeds"]] == [0, 1, 2, 3]
    for a, b in zip(full["seeds"], resumed["seeds"]):
        for what in ("mirage", "random"):
            ra, rb = a["results"]["gin"][what], b["results"]["gin"][what]
            assert {k: ra[k] for k in ("test_auc", "test_acc", "val_auc", "epoch")} == \
                   {k: rb[k] for k in ("test_auc", "test_acc", "val_auc", "epoch")}
        name = f"mirage-seed{a['seed']}.safetensors"  # the same arrays (the metadata holds the timings)
        x, y = (MirageDataset.load(tmp_path / run / name) for run in ("full", "killed"))
        assert all(np.array_equal(getattr(x, k), getattr(y, k)) for k in MirageDataset.ARRAYS)
    rows = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows} == {1, 2, 3, 4}
    # a changed training setting is refused; more seeds extend the run
    with pytest.raises(ConfigError, match=r"epochs: 2 -> 3"):
        condense("mutag", "mirage", tiny[4:] + ["name=killed", "epochs=3", "verbose=false"], gnns="gin", seeds=4)


# --- planted pickles are never executed ------------------------------------------------------------------------

class _Boom:
    """A pickle that writes a file when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pickle executed"))


def test_planted_pickles_are_never_executed(tmp_path, capsys):
    marker = tmp_path / "executed"
    run = tmp_path / "runs" / "condense-cifar10-dm-ipc1-planted"
    run.mkdir(parents=True)
    (run / "checkpoint.pt").write_bytes(pickle.dumps({"state": _Boom(marker)}))
    settings = DM_TINY + ["iterations=3", "checkpoint_every=3", f"output_dir={tmp_path / 'runs'}", "name=planted"]
    try:
        assert main(["condense", "cifar10", "--ipc", "1", *settings]) == 0
    except Exception as e:
        _dataset_or_skip(e)
        raise
    assert not marker.exists()
    assert "ignoring" in (run / "train.log").read_text() and "checkpoint.pt" in capsys.readouterr().out
    # a checkpoint folder with a bogus manifest (and a pickle inside) is refused in one line, never read
    bogus = run / "checkpoints" / "step-00000099"
    bogus.mkdir(parents=True)
    (bogus / "manifest.json").write_text('{"format": "not-kdkit", "files": {}}')
    (bogus / "state.json").write_text("{}")
    (bogus / "state.pt").write_bytes(pickle.dumps(_Boom(marker)))
    assert main(["condense", "cifar10", "--ipc", "1", *settings]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "manifest" in err[0] and err[0].startswith("kdkit: error: ")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="manifest"):
        condense("cifar10", "dm", settings, ipc=1)


# --- a new image method is one class and one registration --------------------------------------------------------

class Jitter:
    """A stand-in algorithm: random real images nudged by seeded noise each iteration."""

    def __init__(self, x, y, scale, seed):
        self.x, self.y, self.scale, self.seed = x.clone(), y, scale, seed

    def step(self, it):
        g = torch.Generator().manual_seed(self.seed * 1000 + it)
        self.x += self.scale * torch.randn(self.x.shape, generator=g)
        return {"loss": float(self.x.abs().mean())}

    def synthetic(self):
        return {"images": self.x.clone(), "labels": self.y.clone(), "lr": None}

    def state_dict(self):
        return {"x": self.x.clone()}

    def load_state_dict(self, state):
        self.x = state["x"].clone()


class JitterMethod(ImageCondenseMethod):
    """The whole of a new method: typed options, their rules, `build`. Registered in the test (so that it does not
    outlive it) with the same `register_method("condense", NAME)` a module in `kdkit/condense/methods/` uses."""

    def __init__(self, ctx, *, iterations: PositiveInt = 4, scale: PositiveFloat = 0.01):
        super().__init__(ctx, iterations)
        self.scale = scale

    def build(self, run, train):
        return Jitter(*random_real(train, self.cfg.ipc, self.cfg.seed), self.scale, self.cfg.seed)


def test_a_new_method_is_one_registered_class(tmp_path):
    from kdkit.condense.image_run import build_image_config, run_image_condense
    from kdkit.method import methods, register_method

    register_method("condense", "test-jitter")(JitterMethod)
    try:
        g = torch.Generator().manual_seed(0)
        split = ImageSplit(torch.randn(40, 3, 8, 8, generator=g), torch.arange(4).repeat(10), 4, list("abcd"),
                           (0.5,) * 3, (0.25,) * 3)
        with pytest.raises(ConfigError, match="scale=-1 is not allowed"):
            build_image_config("cifar10", "test-jitter", ["scale=-1"])
        cfg = build_image_config("cifar10", "test-jitter", ["eval_epochs=0", "width=4", f"output_dir={tmp_path}",
                                                            "progress=false", "checkpoint_every=2"], ipc=2)
        assert cfg.options == {"iterations": 4, "scale": 0.01}
        m = run_image_condense(cfg, splits=(split, split))
        assert m["iterations"] == 4 and latest_checkpoint(cfg.run_dir()).name == "step-00000004"
        assert (cfg.run_dir() / "synthetic.safetensors").is_file()
    finally:
        methods("condense")._items.pop("test-jitter", None)
