"""Image condensation on the one method contract: what every image method shares, so a method only builds its
algorithm.

A subclass (registered with `@register_method("condense", NAME)` in a module of `methods/`) takes its options
as typed keyword-only arguments, checks the rules between them in `__init__` (before any data loads), and
implements `build(run, train)`, which returns the algorithm: an object with `step(it) -> dict` (one iteration;
all its randomness derived from (seed, it)), `synthetic() -> {"images", "labels", "lr"}`, `state_dict()` and
`load_state_dict()`. This class runs it in `kdkit.method.fit`: checkpoints every `checkpoint_every`
iterations (the algorithm's state, the loss curves and the condensation time), resume, Ctrl-C, and at the end
the artefacts (`image_artefacts.py`) and the evaluation, written to `metrics.json` and `metrics.jsonl`.
A method with its own evaluation (CV-DD's relabelling) overrides `evaluate_set`.
"""
from __future__ import annotations

import abc
import itertools
import time
from typing import ClassVar

from ..method import Method
from ..run import Run
from .image_artefacts import curve_columns, curve_rows, save_curves, save_grid, save_synthetic
from .image_data import ImageSplit, load_image_splits, random_real
from .image_eval import EvalSettings, evaluate_synthetic


def eval_settings(cfg) -> EvalSettings:
    """The evaluation protocol of an `ImageCondenseConfig`."""
    return EvalSettings(protocol=cfg.eval, epochs=cfg.eval_epochs, nets=cfg.eval_nets, lr=cfg.eval_lr,
                        dsa_strategy=cfg.dsa_strategy, width=cfg.width, seed=cfg.seed, student=cfg.eval_student,
                        temperature=cfg.eval_temperature, adamw_lr=cfg.eval_lr_adamw)


class ImageCondenseMethod(Method):
    """See the module docstring."""

    kind: ClassVar[str] = "image"
    # the method's own options a resumed run may change (e.g. `iterations` where more iterations continue exactly)
    resume_may_change: ClassVar[tuple[str, ...]] = ()
    log_every = 10

    def __init__(self, ctx, iterations: int):
        self.ctx, self.cfg = ctx, ctx.config
        self.name = f"{self.cfg.method} ipc={self.cfg.ipc}"
        self.total_steps = iterations
        self.save_every = self.cfg.checkpoint_every
        self.curves: list[dict] = []
        self.seconds = 0.0
        self.algorithm = None
        self.train: ImageSplit | None = None
        self.test: ImageSplit | None = None

    @abc.abstractmethod
    def build(self, run: Run, train: ImageSplit):
        """The algorithm object (see the module docstring), on the training split's device."""

    def prepare(self, run: Run, resuming: bool) -> None:
        cfg = self.cfg
        if (run.run_dir / "checkpoint.pt").exists():
            run.log(f"ignoring {run.run_dir / 'checkpoint.pt'}: a pickle from an older kdkit, which kdkit never "
                    "loads (checkpoints are checkpoints/step-N/); delete it")
        train, test = self.ctx.splits or load_image_splits(cfg.dataset, cfg.train_subset, cfg.test_subset, cfg.zca,
                                                           cfg.seed)
        for split in (train, test):
            split.images, split.labels = split.images.to(run.device), split.labels.to(run.device)
        self.train, self.test = train, test
        run.log(f"{cfg.method} on {cfg.dataset}: {cfg.ipc} image(s) per class from {train.images.shape[0]} training "
                f"images, {self.total_steps} iterations, on {run.device}")
        self.algorithm = self.build(run, train)

    def batches(self, start: int):
        return itertools.count(start)  # the iteration number: the algorithm derives its randomness from it

    def step(self, it: int) -> dict:
        t0 = time.perf_counter()
        m = self.algorithm.step(it)
        self.seconds += time.perf_counter() - t0
        self.curves.append({"it": it, **m})
        return {k: v for k, v in m.items() if isinstance(v, float)}  # ints are bookkeeping (expert, batch)

    def state_dict(self) -> dict:
        return {"algorithm": self.algorithm.state_dict(), "curves": curve_columns(self.curves),
                "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.algorithm.load_state_dict(state["algorithm"])
        self.curves = curve_rows(state["curves"])
        self.seconds = float(state["seconds"])

    def evaluate_set(self, run: Run, syn: dict) -> dict:
        """The set under the config's protocol and, with `baseline`, the `ipc` random real images per class it
        started from (same protocol and seeds)."""
        cfg = self.cfg
        if cfg.eval_epochs < 1:
            return {}
        es = eval_settings(cfg)
        out = {"eval": evaluate_synthetic(syn["images"], syn["labels"], self.test.images, self.test.labels, es,
                                          lr=syn.get("lr"))}
        if cfg.baseline:
            xr, yr = random_real(self.train, cfg.ipc, cfg.seed)
            out["random_real"] = evaluate_synthetic(xr, yr, self.test.images, self.test.labels, es)
        return out

    def artefacts(self, run: Run) -> dict:
        cfg = self.cfg
        syn = self.algorithm.synthetic()
        save_synthetic(run.run_dir / "synthetic.safetensors", syn)
        save_grid(syn["images"], cfg.ipc, self.train, run.run_dir / "grid.png", cfg.zca)
        save_curves(self.curves, run.run_dir)
        metrics = {"dataset": cfg.dataset, "method": cfg.method, "ipc": cfg.ipc, "iterations": self.total_steps,
                   "condense_seconds": self.seconds, "run_dir": str(run.run_dir)}
        metrics.update(self.evaluate_set(run, syn))
        scores = {f"{k}/{s}": v[s] for k, v in metrics.items() if isinstance(v, dict) and "mean" in v
                  for s in ("mean", "std")}
        if scores:
            run.record({"step": self.total_steps, **scores})
            run.log("test accuracy: " + ", ".join(f"{k} {100 * v['mean']:.2f} ± {100 * v['std']:.2f}"
                                                  for k, v in metrics.items() if isinstance(v, dict) and "mean" in v))
        run.write_json("metrics.json", metrics)
        return metrics
