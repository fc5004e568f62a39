"""The one method contract, and the one training loop that runs it in a `Run`.

A method is what a pillar does with its losses and models: classifier KD and teacher training, LM KD, the CoT
stages, DM, MTT, DATM, CV-DD, Mirage, DMD2, SiD, CD, rectified flow, diffusion teacher training. Each is

- a factory registered under its pillar, `@register_method("condense", "dm")`, whose typed keyword-only
  arguments *are* its options (declared with their ranges: `ipc: PositiveInt = 10`), called as
  `factory(ctx, **options)` with the pillar's context (data, models, the `Run`);
- returning a `Method`: `step(batch) -> logs`, `state_dict()` / `load_state_dict()` (nested tensors, numbers and
  strings: the one checkpoint format stores them), `evaluate(run, step)`, and `artefacts(run)`, which writes the
  pillar's files and returns the run's summary.

`fit(run, method)` is the loop every pillar shares: resume, steps, per-term logs to metrics.jsonl (one device
sync per `log_every`), evaluations, checkpoints, Ctrl-C, and one line early on with what the run will cost
(`kdkit/budget.py`). Adding a method to any pillar is one file with a
`Method` subclass and one `register_method` line.
"""
from __future__ import annotations

import abc
import itertools
import math
from typing import Any, Callable, Iterator

import torch

from .budget import CostLine
from .config import build_options, factory_options
from .errors import ConfigError
from .registry import Registry
from .run import Interrupted, Run

_PILLARS: dict[str, Registry] = {}


def register_method(pillar: str, name: str):
    """Decorator: `factory(ctx, *, options...) -> Method` becomes method `name` of `pillar`."""
    return _PILLARS.setdefault(pillar, Registry(f"{pillar} method")).register(name)


def methods(pillar: str) -> Registry:
    """The registry of one pillar's methods."""
    return _PILLARS.setdefault(pillar, Registry(f"{pillar} method"))


def method_options(pillar: str, name: str) -> dict[str, tuple[Any, Any]]:
    """{option: (type, default)} of a registered method."""
    return factory_options(methods(pillar).get(name))


def check_method_options(pillar: str, name: str, options: dict, prefix: str = "options.") -> dict:
    """The method's options typed and range-checked (unknown ones refused, naming the allowed), before any work."""
    return build_options(methods(pillar).get(name), options, prefix, f"{pillar} method '{name}'")


def build_method(pillar: str, name: str, ctx, options: dict) -> "Method":
    factory = methods(pillar).get(name)
    return factory(ctx, **check_method_options(pillar, name, options))


class Method(abc.ABC):
    """See the module docstring. Subclasses set `total_steps` (and optionally `log_every`, `eval_every`,
    `save_every`) and implement `step`, `state_dict` and `load_state_dict`."""

    total_steps: int = 1
    log_every: int = 50
    eval_every: int = 0  # steps between evaluations (0: only after the last step)
    save_every: int = 0  # steps between checkpoints (0: only after the last step)
    name: str = "method"

    def prepare(self, run: Run, resuming: bool) -> None:
        """One-off work before the first step (expert trajectories, teacher pairs, committee training); a resumed
        run calls it too, before its state is loaded."""

    def batches(self, start: int) -> Iterator:
        """The batches of steps `start`, `start + 1`, ... (deterministic in the seed and the step, so a resumed
        run sees what the uninterrupted one saw). Default: no data (the method draws its own)."""
        return itertools.repeat(None)

    @abc.abstractmethod
    def step(self, batch) -> dict[str, torch.Tensor | float]:
        """One training step; returns the logged terms (tensors stay on the device; the loop syncs rarely)."""

    @abc.abstractmethod
    def state_dict(self) -> dict:
        """Everything a resumed run needs, as nested tensors, numbers, strings, lists and dicts."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""

    def is_eval_step(self, step: int) -> bool:
        return step == self.total_steps or bool(self.eval_every and step % self.eval_every == 0)

    def is_save_step(self, step: int) -> bool:
        return step == self.total_steps or bool(self.save_every and step % self.save_every == 0)

    def can_stop(self, step: int) -> bool:
        """Whether a Ctrl-C may checkpoint after `step` (False mid gradient-accumulation under several processes,
        whose unsynchronised gradients one checkpoint cannot hold); the loop then stops at the next step that may."""
        return True

    def cost_note(self) -> str:
        """What the run does after its steps that the cost estimate does not time (a long final evaluation), in a
        few words; '' when nothing."""
        return ""

    def on_log(self, run: Run, step: int, row: dict[str, float]) -> dict[str, float]:
        """At each log, after the one sync: checks on the averaged terms `row` (the diffusion guards), and any
        further numbers to record with them."""
        return {}

    def evaluate(self, run: Run, step: int) -> dict:
        """Metrics at `step` (recorded in metrics.jsonl and train.log)."""
        return {}

    def artefacts(self, run: Run) -> dict:
        """After the last step: write the pillar's files (weights, synthetic sets, reports, pictures) and return
        the run's summary (also written to metrics.json by the caller that wants it)."""
        return {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _finite(row: dict) -> bool:
    return all(math.isfinite(v) for v in row.values() if isinstance(v, float))


def fit(run: Run, method: Method, on_step: Callable[[Method, int], None] | None = None) -> dict:
    """Run `method` to `method.total_steps` in `run`: resume, step, log, evaluate, checkpoint, stop cleanly on
    Ctrl-C (checkpoint at the current step, then `Interrupted`). Returns `method.artefacts(run)`."""
    run.start()
    resumed = run.resume_folder is not None
    method.prepare(run, resuming=resumed)
    start = 0
    if resumed:
        start, state = run.restore()
        method.load_state_dict(state)
    step, stopping = start, False
    with run.interruptible():
        bar = run.progress(method.total_steps, start, desc=method.name)
        cost = CostLine(method.total_steps, run.log, f"training steps left of {method.total_steps:,}" if start
                        else "training steps", budget=getattr(run.config, "budget", None), note=method.cost_note(),
                        start=start, sync=lambda: _sync(run.device))
        sums: dict[str, torch.Tensor] = {}
        count = 0
        batches = method.batches(start)
        while step < method.total_steps:
            logs = method.step(next(batches))
            step += 1
            if on_step is not None:
                on_step(method, step)
            for k, v in logs.items():
                v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
                sums[k] = sums[k] + v if k in sums else v.clone()  # a captured graph reuses its outputs
            count += 1
            bar.update(1)
            cost.tick()
            if sums and (step % method.log_every == 0 or step == method.total_steps):
                row = {k: float(v) / count for k, v in sums.items()}  # the one sync per log_every steps
                if not _finite(row):
                    raise FloatingPointError(f"non-finite loss at step {step} ({row}); lower the learning rate or "
                                             "check the data")
                row.update(method.on_log(run, step, row))
                bar.set_postfix({k: f"{v:.3g}" for k, v in list(row.items())[:4]})
                run.record({"step": step, **row})
                sums, count = {}, 0
            if method.is_eval_step(step):
                ev = method.evaluate(run, step)
                if ev:
                    run.record({"step": step, **ev})
            due = step % method.log_every == 0 or method.is_save_step(step)
            stopping = stopping or run.stop_requested(due)
            stop_now = stopping and method.can_stop(step)
            saved = None
            if method.is_save_step(step) or stop_now:
                saved = run.save(step, method.state_dict())
            if stop_now and step < method.total_steps:
                bar.close()
                raise Interrupted(step, saved, run.run_dir)
        bar.close()
    summary = method.artefacts(run)
    run.close()
    return summary


def require(cond: bool, message: str) -> None:
    """A cross-option rule a method factory checks before any work."""
    if not cond:
        raise ConfigError(message)
