"""What a run will cost, said before most of it is spent.

The paper-budget recipes take hours to days on a CPU (DM's 20,000 iterations: about 28 h on 2 cores), and a
progress bar's ETA, minutes in, was the only hint. So every run of the shared loop (`method.fit`) times a few steps
after the first (which pays for warm-up and compilation) and logs one line: the steps left, the time they will take
on this machine, the recipe's budget, and the CPU-sized recipe to run instead, with its measured time.

A recipe declares its budget with three top-level keys, read by `load_recipe` beside the settings (they change
nothing in the run, so they are not settings and are not in config.yaml); `budget` and `cpu_recipe` pass down a
`base:` chain, `cpu_minutes` (a measurement of one recipe) does not:

    budget: paper budget          # what the recipe's numbers are: the paper's, a CPU size, a GPU size
    cpu_recipe: condense-cifar10-dm-cpu   # the CPU-sized recipe for the same job, when this one is not
    cpu_minutes: 4                # on a CPU-sized recipe: its measured wall time on 2 cores, whole run

Loops before the first step that can take hours (MTT's experts, CV-DD's committee) use `CostLine` too.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Callable

import torch

from .errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Budget:
    recipe: str | None = None
    label: str = ""
    cpu_recipe: str | None = None
    cpu_minutes: float | None = None  # the measured whole-run time of `cpu_recipe` (2 cores)
    cpu_label: str = ""  # `cpu_recipe`'s own budget label (what it needs first, when it needs something)


def pop_budget(raw: dict, name: str | None, own_keys: Callable[[str], dict]) -> Budget:
    """Take the budget keys out of a raw recipe (checked: a string label, a recipe name, positive minutes);
    `own_keys(name)` is a recipe file's own keys, without its `base:` chain (it refuses an unknown name)."""
    label = raw.pop("budget", "")
    cpu = raw.pop("cpu_recipe", None)
    minutes = raw.pop("cpu_minutes", None)
    where = f"recipe '{name}'" if name else "recipe"
    if not isinstance(label, str):
        raise ConfigError(f"{where}: budget must be a short text such as 'paper budget', got {label!r}")
    _check_minutes(minutes, where)
    if name:  # a measured time is the recipe's own, not inherited through `base:`
        minutes = own_keys(name).get("cpu_minutes")
    if cpu is not None:
        if not isinstance(cpu, str):
            raise ConfigError(f"{where}: cpu_recipe must be a recipe name, got {cpu!r}")
        if cpu != name:
            other = own_keys(cpu)  # the named recipe must exist
            _check_minutes(other.get("cpu_minutes"), f"recipe '{cpu}' (the cpu_recipe of {where})")
            return Budget(name, label, cpu, other.get("cpu_minutes"), str(other.get("budget") or ""))
    return Budget(name, label, cpu, minutes)


def _check_minutes(minutes, where: str) -> None:
    if minutes is not None and (isinstance(minutes, bool) or not isinstance(minutes, (int, float))
                                or not math.isfinite(minutes) or minutes <= 0):
        raise ConfigError(f"{where}: cpu_minutes must be a positive number of minutes, got {minutes!r}")


def budget_summary(budget: Budget) -> str:
    """For `kdkit recipes`: 'paper budget -> condense-cifar10-dm-cpu (~5 min)', 'CPU-sized (~5 min)'."""
    label = re.split(r" \(|: ", budget.label)[0]
    if budget.cpu_recipe and budget.cpu_recipe != budget.recipe:
        return f"{label} -> {budget.cpu_recipe}" + (f" (~{duration(budget.cpu_minutes * 60)})"
                                                     if budget.cpu_minutes else "")
    return label + (f" (~{duration(budget.cpu_minutes * 60)})" if budget.cpu_minutes else "")


def duration(seconds: float) -> str:
    """A rough wall time: '40 s', '12 min', '3.5 h', '26 h', '4.2 days'."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    hours = seconds / 3600
    if hours < 48:
        return f"{hours:.1f} h" if hours < 10 else f"{round(hours)} h"
    return f"{hours / 24:.1f} days"


def estimate_line(steps_left: int, seconds_per_step: float, threads: int, budget: Budget | None,
                  what: str = "training steps", unit: str = "step") -> str:
    """The one line: 'estimate: 20,000 training steps, about 26 h here (4.70 s/step, 2 threads); recipe
    condense-cifar10-dm: paper budget; recipe=condense-cifar10-dm-cpu (CPU-sized) runs in about 5 min'."""
    per = (f"{seconds_per_step:.2f} s/{unit}" if seconds_per_step >= 0.1 else
           f"{seconds_per_step * 1000:.1f} ms/{unit}")
    line = (f"estimate: {steps_left:,} {what}, about {duration(steps_left * seconds_per_step)} here "
            f"({per}, {threads} thread{'s' if threads != 1 else ''})")
    if budget is None or budget.recipe is None:
        return line
    line += f"; recipe {budget.recipe}" + (f": {budget.label}" if budget.label else "")
    if budget.cpu_recipe and budget.cpu_recipe != budget.recipe:
        line += f"; recipe={budget.cpu_recipe} ({budget.cpu_label or 'CPU-sized'}) runs in " + (
            f"about {duration(budget.cpu_minutes * 60)}" if budget.cpu_minutes else "minutes")
    elif budget.cpu_minutes:
        line += f", measured at about {duration(budget.cpu_minutes * 60)} for the whole run"
    return line


class StepClock:
    """Times the steps after the first until it has `min_seconds` of them or `max_steps` steps (or the loop ends);
    `tick` then returns the seconds per step, once. `sync` is called before each reading (CUDA: the queued work)."""

    def __init__(self, start: int, total: int, sync=lambda: None, min_seconds: float = 2.0, max_steps: int = 5):
        self.start, self.total, self.sync = start, total, sync
        self.min_seconds, self.max_steps = min_seconds, max_steps
        self.t0: float | None = None
        self.done = total - start < 3  # too short to be worth a line

    def tick(self, step: int) -> float | None:
        """Call after `step`; returns seconds per step when the estimate is due (once), else None."""
        if self.done:
            return None
        if step == self.start + 1:  # the first step pays for warm-up: time from its end
            self.sync()
            self.t0 = time.perf_counter()
            return None
        self.sync()
        timed, spent = step - self.start - 1, time.perf_counter() - self.t0
        if spent < self.min_seconds and timed < self.max_steps and step < self.total:
            return None
        self.done = True
        return spent / timed


class CostLine:
    """A loop's one estimate line: count its steps with `tick()`; the line is logged once, after the steps that
    follow the first have been timed. `total` counts steps from 0, `start` is where a resumed loop begins."""

    def __init__(self, total: int, log: Callable[[str], None], what: str = "training steps", unit: str = "step",
                 budget: Budget | None = None, note: str = "", start: int = 0, sync: Callable[[], None] = lambda: None):
        self.clock, self.count = StepClock(start, total, sync), start
        self.total, self.start, self.log = total, start, log
        self.what, self.unit, self.budget, self.note = what, unit, budget, note

    def tick(self) -> None:
        self.count += 1
        per_step = self.clock.tick(self.count)
        if per_step is not None:
            line = estimate_line(self.total - self.start, per_step, torch.get_num_threads(), self.budget, self.what,
                                 self.unit)
            self.log(line + (f"; then {self.note}" if self.note else ""))
