"""The run core every verb shares: typed options with ranges, the one checkpoint format, the resume rule, Ctrl-C,
crash leftovers, and the one training loop (`kdkit.method.fit`) resuming bit for bit."""
from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import pytest
import torch
from torch import nn

from kdkit import checkpoint as ckpt
from kdkit.config import (ConfigError, NonNegInt, PositiveFloat, PositiveInt, Probability, Range, RunName, build,
                          build_options, load_recipe)
from kdkit.errors import CheckpointError
from kdkit.method import Method, fit
from kdkit.run import Interrupted, Run


@dataclass
class Toy:
    steps: PositiveInt = 6
    lr: PositiveFloat = 0.1
    seed: NonNegInt = 0
    keep: Probability = 0.5
    name: RunName | None = None
    log_every: PositiveInt = 2


@pytest.mark.parametrize("raw, message", [
    ({"steps": 0}, "steps=0 is not allowed: expected an integer >= 1"),
    ({"steps": -3}, "steps=-3 is not allowed"),
    ({"steps": 1.5}, "steps=1.5 is not allowed: expected an integer"),
    ({"lr": float("nan")}, "lr=.nan is not allowed"),
    ({"lr": "nan"}, "lr='nan' is not allowed"),
    ({"lr": "inf"}, "lr='inf' is not allowed"),
    ({"lr": 0}, "expected a number > 0"),
    ({"keep": 1.5}, "expected a number >= 0 and <= 1"),
    ({"name": "../x"}, "expected a plain folder name"),
    ({"name": "a/b"}, "expected a plain folder name"),
    ({"stepz": 3}, "unknown key 'stepz'. Did you mean 'steps'?"),
])
def test_typed_options_refuse_bad_values_naming_key_value_and_range(raw, message):
    with pytest.raises(ConfigError) as e:
        build(Toy, raw, "")
    assert message in str(e.value)


def test_recipe_ranges_and_cross_field_rules():
    with pytest.raises(ConfigError, match=r"optim.lr=-1 is not allowed: expected a number > 0"):
        load_recipe("demo-kd", ["optim.lr=-1"])
    with pytest.raises(ConfigError, match=r"optim.nesterov=true needs optim.momentum > 0"):
        load_recipe("demo-kd", ["optim.nesterov=true", "optim.momentum=0"])
    with pytest.raises(ConfigError, match=r"losses.kd.T=0 is not allowed"):
        load_recipe("demo-kd", ["losses.kd.T=0"])
    assert load_recipe("demo-kd", ["trainer.compile=no"]).trainer.compile is False  # YAML's no is false


def test_factory_options_are_typed_with_ranges():
    def factory(ctx, *, iterations: PositiveInt = 10, lr: Annotated[float, Range(gt=0, le=10)] = 1.0):
        return None

    assert build_options(factory, {"iterations": 3, "lr": "1e-3"}, "options.", "toy") == {"iterations": 3, "lr": 1e-3}
    with pytest.raises(ConfigError, match=r"options.lr=20 is not allowed: expected a number > 0 and <= 10"):
        build_options(factory, {"lr": 20}, "options.", "toy")
    with pytest.raises(ConfigError, match=r"unknown option 'options.iteration' for toy. Did you mean 'options.iterations'"):
        build_options(factory, {"iteration": 3}, "options.", "toy")


def test_checkpoint_round_trips_nested_state_without_pickle(tmp_path):
    net = nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    g = torch.Generator().manual_seed(3)
    state = {"net": net.state_dict(), "opt": opt.state_dict(), "gen": g.get_state(), "history": [{"a": 1.5}],
             "pair": (1, "x"), "ids": {3: torch.arange(3)}, "none": None}
    folder = ckpt.save_checkpoint(tmp_path / "checkpoints" / "step-00000001", state)
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "state.json", "state.safetensors"]
    back = ckpt.load_checkpoint(folder)
    assert torch.equal(back["net"]["weight"], net.weight)
    opt2 = torch.optim.AdamW(nn.Linear(3, 2).parameters(), lr=0.1)
    opt2.load_state_dict(back["opt"])
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert back["pair"] == (1, "x") and torch.equal(back["ids"][3], torch.arange(3)) and back["none"] is None
    assert torch.equal(back["gen"], g.get_state())
    # a flipped byte is named, not loaded
    data = bytearray((folder / "state.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "state.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="state.safetensors is corrupt"):
        ckpt.load_checkpoint(folder)


def test_no_pickle_loader_in_the_package():
    root = Path(__file__).resolve().parents[1] / "kdkit"
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "pickle.load" not in text and "weights_only=False" not in text.replace(" ", ""), path
        assert "torch.load(" not in text and "torch.save(" not in text, f"{path}: use kdkit.checkpoint (safetensors)"


class Counter(Method):
    """A toy method: SGD on a linear model over a fixed random dataset, batches drawn from the step number."""

    def __init__(self, steps: int, hook=None):
        torch.manual_seed(0)
        self.net = nn.Linear(4, 1)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=0.05, momentum=0.9)
        self.x, self.y = torch.randn(64, 4), torch.randn(64, 1)
        self.total_steps, self.log_every, self.save_every = steps, 2, 3
        self.hook = hook

    def batches(self, start):
        step = start
        while True:
            g = torch.Generator().manual_seed(step)
            idx = torch.randint(0, 64, (8,), generator=g)
            yield self.x[idx], self.y[idx]
            step += 1

    def step(self, batch):
        x, y = batch
        noise = torch.randn(()) * 0.01  # the global RNG: resume must restore it
        loss = ((self.net(x) - y) ** 2).mean() + noise
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return {"loss": loss.detach()}

    def state_dict(self):
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state):
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])

    def artefacts(self, run):
        return {"weight": self.net.weight.detach().clone()}


def _run(tmp_path, cfg, resume=None):
    return Run(cfg, tmp_path / "run", resume=resume, seed=cfg.seed, progress=False, may_change=("log_every",),
               console=False, tensorboard=False)


def test_fit_interrupted_then_resumed_is_bit_exact_and_refuses_changed_settings(tmp_path):
    full = fit(Run(Toy(steps=8), tmp_path / "full", seed=0, progress=False, console=False, tensorboard=False),
               Counter(8))

    def sigint_at_5(method, step):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted) as e:
        fit(_run(tmp_path, Toy(steps=8)), Counter(8), on_step=sigint_at_5)
    assert e.value.step == 5 and e.value.folder.name == "step-00000005"
    assert "resume=auto" in str(e.value)
    # a leftover of a crash mid-write is cleaned up by the next start
    (tmp_path / "run" / "checkpoints" / ".step-00000006.tmp-abc").mkdir()
    with pytest.raises(ConfigError, match=r"lr: 0.1 -> 0.2"):
        _run(tmp_path, Toy(steps=8, lr=0.2), resume="auto").start()
    assert (tmp_path / "run" / "checkpoints" / ".step-00000006.tmp-abc").exists()  # refused before any write
    resumed = fit(_run(tmp_path, Toy(steps=8, log_every=3), resume="auto"), Counter(8))
    assert torch.equal(resumed["weight"], full["weight"])
    assert not (tmp_path / "run" / "checkpoints" / ".step-00000006.tmp-abc").exists()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "train.log").is_file()
    assert [p.name for p in ckpt.checkpoint_folders(tmp_path / "run")] == ["step-00000006", "step-00000008"]


def test_explicit_resume_without_checkpoint_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint there"):
        _run(tmp_path, Toy(), resume=str(tmp_path / "empty")).start()
