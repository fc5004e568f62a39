"""What the classifier `Distiller` and the `LMDistiller` share: the accelerate set-up, the optimiser step and the
checkpointed state, as one `Method` base that `kdkit.method.fit` runs inside a `kdkit.run.Run`.

Why one base: both train one module (student + the losses' own parameters, the only thing DDP wraps) with one
optimiser, a per-step learning rate from `optim`/`scheduler`, gradient accumulation with `no_sync`, accelerate's
mixed precision and its main-process/barrier rules. A subclass says what a step feeds the module (`step`),
what an evaluation measures and what the run leaves behind (`evaluate`, `artefacts`).

A step is one micro-batch: with `trainer.grad_accum=N` the optimiser steps every N steps (and at an epoch's
end). A checkpoint taken between two optimiser steps (Ctrl-C) keeps the accumulated gradients, so a resumed run
continues bit for bit.
"""
from __future__ import annotations

import abc
import contextlib
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .. import checkpoint as ckpt
from ..config import Recipe
from ..errors import ConfigError
from ..method import Method, fit
from ..run import Run
from .curves import plot_curves
from .optim import build_optimizer, lr_at, set_lr


def use_cpu(cfg: Recipe) -> bool:
    """CPU unless asked otherwise and CUDA is present; accelerate then runs several processes over gloo."""
    return cfg.trainer.cpu or not torch.cuda.is_available()


def match_accelerator_state(mixed_precision: str) -> None:
    """accelerate fixes mixed precision once per process; a later run in the same (single) process with another
    setting (a notebook, a benchmark) gets a fresh state instead of accelerate's error."""
    from accelerate.state import AcceleratorState, PartialState

    current = AcceleratorState._shared_state.get("_mixed_precision")
    if current is None or current == mixed_precision:
        return
    if PartialState().num_processes > 1:
        raise ConfigError(f"this process already trains with mixed_precision={current}; under a multi-process "
                          f"launch every run must use the same trainer.mixed_precision (got {mixed_precision})")
    AcceleratorState._reset_state(reset_partial_state=True)


def make_run(recipe: Recipe, run_dir: Path, main: bool = True, barrier: Callable[[], None] | None = None,
             device: str = "auto", agree: Callable[[bool], bool] | None = None) -> Run:
    """The `Run` of a `kdkit distill|train` recipe: its folder, seed, threads, progress, checkpoints and the
    resume rule (`Recipe.RESUME_MAY_CHANGE` lists the settings a resumed run may change)."""
    t = recipe.trainer
    return Run(recipe, run_dir, resume=recipe.resume, seed=t.seed, device=device, threads=t.threads,
               progress=t.progress, keep_checkpoints=t.keep_checkpoints, may_change=Recipe.RESUME_MAY_CHANGE,
               main=main, barrier=barrier, agree=agree)


def check_resume(recipe: Recipe, run_dir: Path) -> None:
    """The resume rule, before any work: the checkpoint to resume from exists and was made with the same
    training settings (reads only the checkpoint's verified state.json)."""
    run = make_run(recipe, run_dir, device="cpu")
    folder = run.find_resume()
    if folder is not None:
        run.check_same_settings(folder)


class TermMeans:
    """Per-term sums kept on the device (no sync per step); `means()` reads them in one sync and starts anew."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        for k, v in terms.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1

    def means(self, accelerator=None) -> dict[str, float]:
        """The mean of each term since the last call; with a multi-process `accelerator`, over every process (the
        same steps on each, so the mean of the processes' means), so the history is the run's, not process 0's."""
        if not self.sums:
            return {}
        values = torch.stack(list(self.sums.values()))
        if accelerator is not None and accelerator.num_processes > 1:
            values = accelerator.reduce(values, reduction="mean")
        values = values.tolist()
        out = {k: v / self.counts[k] for k, v in zip(self.sums, values)}
        self.sums, self.counts = {}, {}
        return out

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.sums = {k: v.to(device) for k, v in state["sums"].items()}
        self.counts = dict(state["counts"])


class AcceleratedMethod(Method):
    """A `Method` training `self.module` with accelerate; see the module docstring. Subclasses call
    `wrap(module)` once their module is built, and set `total_steps` and `steps_per_epoch`."""

    steps_per_epoch: int = 1

    def __init__(self, recipe: Recipe, run_dir: str | Path, on_step: Callable | None = None):
        from accelerate import Accelerator

        self.cfg, self.tcfg = recipe, recipe.trainer
        self.run_dir = Path(run_dir)
        self.on_step = on_step  # on_step(method, step) after every step (tests simulate crashes with it)
        self.log_every = self.tcfg.log_every
        if self.tcfg.threads:
            torch.set_num_threads(self.tcfg.threads)
        match_accelerator_state(self.tcfg.mixed_precision)
        self.accelerator = acc = Accelerator(cpu=use_cpu(recipe), mixed_precision=self.tcfg.mixed_precision)
        if acc.distributed_type.name in ("FSDP", "DEEPSPEED"):
            raise ConfigError(f"accelerate launched this run with {acc.distributed_type.name}, which shards the "
                              "weights; kdkit's checkpoints and saved students hold whole tensors and gather none "
                              "yet: launch with --multi_gpu (DDP) instead")
        self.run = make_run(recipe, self.run_dir, main=acc.is_main_process, barrier=acc.wait_for_everyone,
                            device=str(acc.device), agree=self._any_process if acc.num_processes > 1 else None)
        self.window = TermMeans()  # the loss terms since the last history record
        self.state: dict = {"history": [], "train_seconds": 0.0}

    def _any_process(self, flag: bool) -> bool:
        """True on every process when any process saw Ctrl-C (one all-reduce)."""
        acc = self.accelerator
        return bool(acc.reduce(torch.tensor([float(flag)], device=acc.device), reduction="sum").item() > 0)

    def can_stop(self, step: int) -> bool:
        """Under several processes a Ctrl-C waits for the end of a gradient accumulation (each process's local
        gradients differ before DDP's all-reduce; one checkpoint holds one set)."""
        return self.accelerator.num_processes == 1 or all(p.grad is None for p in self.params)

    # ------------------------------------------------------------ set-up

    def wrap(self, module: nn.Module) -> None:
        """Hand `module` and its optimiser to accelerate (DDP under a multi-process launch)."""
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("the student has no trainable parameters")
        self.params = params
        self.module, self.optimizer = self.accelerator.prepare(module, build_optimizer(params, self.cfg.optim))
        raw = self.accelerator.unwrap_model(self.module)
        self.raw = getattr(raw, "_orig_mod", raw)  # under torch.compile

    @abc.abstractmethod
    def modules(self) -> dict[str, nn.Module]:
        """The modules a checkpoint holds (student, the losses' parameters, a peer)."""

    # ------------------------------------------------------------ one step

    def schedule(self, step: int) -> float:
        """Set the learning rate of `step` (stateless in the step, so a resumed run gets the same rates) and tell
        the losses the run's progress in epochs; returns the rate."""
        epochs = step / self.steps_per_epoch
        lr = lr_at(epochs, self.total_steps / self.steps_per_epoch, self.cfg.optim.lr, self.cfg.scheduler)
        set_lr(self.optimizer, lr)
        for loss in self.raw.losses.values():
            loss.set_epoch(epochs)
        return lr

    def backward(self, forward: Callable[[], dict[str, torch.Tensor]], sync: bool) -> dict[str, torch.Tensor]:
        """Run `forward` (-> weighted loss terms) and back-propagate their sum / grad_accum; step the optimiser
        when `sync`, else accumulate without DDP's all-reduce. Returns the terms and their sum as `loss`."""
        acc = self.accelerator
        with contextlib.nullcontext() if sync else acc.no_sync(self.module):
            terms = forward()
            loss = sum(terms.values())
            acc.backward(loss / self.tcfg.grad_accum)
        if sync:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        terms = {**terms, "loss": loss}
        self.window.add(terms)
        return terms

    # ------------------------------------------------------------ checkpoints

    def _inner_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def state_dict(self) -> dict:
        scaler = self.accelerator.scaler
        grads = [p.grad for p in self.params]
        return {"modules": ckpt.module_state(self.modules()), "optimizer": self._inner_optimizer().state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "grads": grads if any(g is not None for g in grads) else None,  # mid-accumulation
                "window": self.window.state_dict(), "state": self.state}

    def load_state_dict(self, state: dict) -> None:
        where = str(self.run.resume_folder)
        ckpt.load_module_state(self.modules(), state["modules"], where)
        self._inner_optimizer().load_state_dict(state["optimizer"])
        if state.get("scaler") and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        for p, g in zip(self.params, state.get("grads") or [None] * len(self.params)):
            p.grad = None if g is None else g.to(device=p.device, dtype=p.dtype)
        self.window.load_state_dict(state["window"], self.accelerator.device)
        self.state = state["state"]

    # ------------------------------------------------------------ the run

    def write_summary(self, run: Run, summary: dict) -> dict:
        """metrics.json (the summary and the history) and curves.png; every process waits for the files."""
        if self.accelerator.is_main_process:
            plot_curves(self.run_dir, self.state["history"])
        run.write_json("metrics.json", {"summary": summary, "history": self.state["history"]})
        self.accelerator.wait_for_everyone()
        return summary

    def fit(self) -> dict:
        """Train to the last step in `self.run` (resume, logs, evaluations, checkpoints, Ctrl-C: `kdkit.method.fit`)
        and return the summary; only the main process writes files."""
        summary = fit(self.run, self, on_step=self.on_step)
        self.accelerator.end_training()  # last: it may tear down the process group
        return summary
