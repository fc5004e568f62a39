"""The cost estimate every run of the shared loop logs early (issue 24 item 3): present, in its format, with the
recipe's budget and its CPU-sized alternative; the budget keys are checked like settings. Its value is not tested."""
import re

import pytest
import torch

from kdkit.budget import Budget, StepClock, duration, estimate_line
from kdkit.config import list_recipes, load_recipe
from kdkit.errors import ConfigError
from kdkit.method import Method, fit
from kdkit.run import Run

LINE = re.compile(r"^estimate: [\d,]+ training steps(?: left of [\d,]+)?, about [\d.]+ (s|min|h|days) here "
                  r"\([\d.]+ m?s/step, \d+ threads?\)")


class Sleepy(Method):
    total_steps, log_every, name = 12, 4, "sleepy"

    def __init__(self):
        self.w = torch.zeros(1)

    def step(self, batch):
        torch.tensor(0.0).add_(1)  # no work worth timing; the clock's step count ends the timing
        return {"loss": 1.0}

    def state_dict(self):
        return {"w": self.w}

    def load_state_dict(self, state):
        self.w = state["w"]


def test_fit_logs_one_estimate_line_with_the_recipe_budget(tmp_path, capsys):
    cfg = load_recipe("condense-cifar10-dm", schema=_condense_schema())
    run = Run(cfg, tmp_path / "r", progress=False, tensorboard=False)
    fit(run, Sleepy())
    lines = [x for x in (tmp_path / "r" / "train.log").read_text().splitlines() if "estimate:" in x]
    assert len(lines) == 1
    line = lines[0].split(" ", 2)[2]  # after the log's date and time
    assert LINE.match(line), line
    assert line.startswith("estimate: 12 training steps,")
    assert "; recipe condense-cifar10-dm: paper budget (20,000 iterations" in line
    assert line.endswith("; recipe=condense-cifar10-dm-cpu (CPU-sized) runs in about 4 min")
    assert "estimate: 12 training steps" in capsys.readouterr().out  # on the console too


def test_resumed_run_estimates_the_steps_left(tmp_path):
    run = Run(load_recipe("condense-cifar10-dm-cpu", schema=_condense_schema()), tmp_path / "r", progress=False,
              tensorboard=False)
    method = Sleepy()
    method.save_every = 6
    run.interrupted = False

    def stop_at_6(m, step):
        run.interrupted = run.interrupted or step == 6

    from kdkit.run import Interrupted
    with pytest.raises(Interrupted):
        fit(run, method, on_step=stop_at_6)
    fit(Run(run.config, tmp_path / "r", resume="auto", progress=False, tensorboard=False), Sleepy())
    lines = [x.split(" ", 2)[2] for x in (tmp_path / "r" / "train.log").read_text().splitlines() if "estimate:" in x]
    assert lines[0].startswith("estimate: 12 training steps,")
    assert lines[1].startswith("estimate: 6 training steps left of 12,") and LINE.match(lines[1])
    assert lines[1].endswith("; recipe condense-cifar10-dm-cpu: CPU-sized, measured at about 4 min for the whole run")


def test_no_line_without_steps_to_estimate():
    assert StepClock(0, 2).tick(1) is None and StepClock(0, 2).tick(2) is None


def test_estimate_line_and_duration_format():
    b = Budget("condense-cifar10-dm", "paper budget", "condense-cifar10-dm-cpu", 5)
    assert (estimate_line(20000, 4.7, 2, b) == "estimate: 20,000 training steps, about 26 h here (4.70 s/step, "
            "2 threads); recipe condense-cifar10-dm: paper budget; recipe=condense-cifar10-dm-cpu (CPU-sized) runs "
            "in about 5 min")
    assert estimate_line(10, 0.0123, 1, None) == "estimate: 10 training steps, about 1 s here (12.3 ms/step, 1 thread)"
    assert [duration(s) for s in (0.2, 59, 300, 5400, 36000, 3 * 86400)] == \
        ["1 s", "59 s", "5 min", "1.5 h", "10 h", "3.0 days"]


def test_every_named_cpu_recipe_exists_and_has_a_measured_time():
    """A recipe's `cpu_recipe` names a recipe with `cpu_minutes` (the time the line quotes)."""
    import yaml

    from kdkit.config import recipe_path
    named = 0
    for name in list_recipes():
        raw = yaml.safe_load(recipe_path(name).read_text())
        if raw.get("cpu_recipe"):
            named += 1
            target = yaml.safe_load(recipe_path(raw["cpu_recipe"]).read_text())
            assert target.get("cpu_minutes", 0) > 0, (name, raw["cpu_recipe"])
    assert named >= 5  # condense DM and CV-DD, smollm2-kd, cot-math, the 240-epoch classifier recipes


@pytest.mark.parametrize("override,expect", [
    ({"cpu_minutes": -1}, "cpu_minutes must be a positive number"),
    ({"cpu_minutes": float("nan")}, "cpu_minutes must be a positive number"),
    ({"cpu_recipe": "no-such-recipe"}, "unknown recipe 'no-such-recipe'"),
    ({"budget": 3}, "budget must be a short text"),
])
def test_bad_budget_keys_are_refused_in_one_line(tmp_path, monkeypatch, override, expect):
    import yaml
    recipe = {"pillar": "condense", "dataset": "cifar10", "method": "dm", "budget": "paper budget", **override}
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.setenv("KDKIT_RECIPES", str(tmp_path))
    with pytest.raises(ConfigError, match=re.escape(expect)) as e:
        load_recipe("mine", schema=_condense_schema())
    assert "\n" not in str(e.value)


def _condense_schema():
    from kdkit.condense.image_config import ImageCondenseConfig
    return ImageCondenseConfig


def test_expert_training_says_what_the_missing_experts_cost(tmp_path):
    """MTT's experts come before its first step (the paper's 100 x 50 epochs: days on a CPU), so they get a line."""
    from kdkit.condense.experts import train_experts
    from kdkit.condense.image_data import ImageSplit

    g = torch.Generator().manual_seed(0)
    train = ImageSplit(torch.randn(40, 3, 8, 8, generator=g), torch.arange(40) % 4, 4, list("abcd"), (0.0,) * 3,
                       (1.0,) * 3)
    lines = []
    budget = Budget("condense-cifar10-mtt", "paper budget")
    train_experts(train, tmp_path, count=2, epochs=3, width=8, progress=False, budget=budget, log=lines.append)
    assert len(lines) == 1 and lines[0].startswith("estimate: 6 expert batches (2 expert(s) x 3 epochs x 1), about ")
    assert re.search(r"\([\d.]+ m?s/batch, \d+ threads?\); recipe condense-cifar10-mtt: paper budget$", lines[0])
    lines.clear()
    train_experts(train, tmp_path, count=2, epochs=3, width=8, progress=False, log=lines.append)
    assert lines == []  # nothing left to train


def test_committee_members_say_what_they_cost(tmp_path):
    """CV-DD's committee trains before its first step (the paper's five ResNets x 200 epochs): a line per member."""
    from kdkit.condense.committee import build_committee
    from kdkit.condense.image_data import ImageSplit

    g = torch.Generator().manual_seed(0)
    train = ImageSplit(torch.randn(80, 3, 8, 8, generator=g), torch.arange(80) % 4, 4, list("abcd"), (0.0,) * 3,
                       (1.0,) * 3)
    lines = []
    build_committee("convnet3_bn_w32,convnet2_bn_w32", train, epochs=3, batch_size=16, root=tmp_path,
                    progress=False, log=lines.append, budget=Budget("condense-cifar10-cvdd", "paper budget"))
    assert [x.split(",")[0] for x in lines] == [
        "estimate: 15 batches of committee member convnet3_bn_w32 (3 epochs x 5)",
        "estimate: 15 batches of committee member convnet2_bn_w32 (3 epochs x 5)"]
    assert all(x.endswith("; recipe condense-cifar10-cvdd: paper budget") for x in lines)


def test_a_bench_shows_its_runs_estimate_lines_as_they_come(tmp_path, capsys):
    """`run_kdkit` keeps a run's output back but passes its estimate line on (a bench row can take an hour)."""
    from kdkit.bench.results import run_kdkit

    run_kdkit(["diffusion", "rectflow", "steps=12", "width=32", "depth=2", "batch_size=32", "eval_samples=200",
               "teacher_steps=4", "pairs=64", "threads=1", f"output_dir={tmp_path}", "name=r"])
    out = capsys.readouterr().out
    assert out.startswith("  diffusion name=r: estimate: 12 training steps, about ") and out.count("\n") == 1
