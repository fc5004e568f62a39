"""Image condensation on the one method contract: what every image method shares, so a method only builds its
algorithm.

A subclass (registered with `@register_method("condense", NAME)` in a module of `methods/`) takes its options
as typed keyword-only arguments, checks the rules between them in `__init__` (before any data loads), and
implements `build(run, train)`, which returns the algorithm: an object with `step(it) -> dict` (one iteration;
all its randomness derived from (seed, it)), `synthetic() -> {"images", "labels", "lr"}`, `state_dict()` and
`load_state_dict()`. This class runs it in `kdkit.method.fit`: checkpoints every `checkpoint_every`
iterations (the algorithm's state, the loss curves and the condensation time), resume, Ctrl-C, and at the end
the artefacts (`image_artefacts.py`) and the evaluation, written to `metrics.json` and `metrics.jsonl`.
A method with its own evaluation (CV-DD's relabelling) overrides `evaluate_set`; with `baseline` it adds
`dd_ranking_scores` too. A method with learned soft labels says how it would label random real images
(`random_real_labels`), so that DD-Ranking's IOR compares like with like.
"""
from __future__ import annotations

import abc
import itertools
import time
from typing import ClassVar

import torch

from ..method import Method
from ..run import Run
from .dd_ranking import scores as dd_ranking
from .image_artefacts import curve_columns, curve_rows, save_curves, save_grid, save_synthetic
from .image_data import ImageSplit, load_image_splits, random_real
from .image_eval import EvalSettings, evaluate_synthetic, full_data_accuracy, full_data_epochs


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
        self.setup_seconds = 0.0
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
        t0 = time.perf_counter()
        self.algorithm = self.build(run, train)
        self.setup_seconds = time.perf_counter() - t0  # expert training, DATM's labelling: what `build` costs

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

    def random_real_labels(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, str] | None:
        """A soft-label method's labels for random real images, made the way it labels its own set, and where they
        come from; None: it has no such labelling (IOR then falls back to hard labels, and says so)."""
        return None

    def cost_note(self) -> str:
        cfg = self.cfg
        if cfg.eval_epochs < 1:
            return ""
        sets = "the set and its baselines (random real images)" if cfg.baseline else "the set"
        net = "convnet" if cfg.eval == "convnet" else f"relabel protocol, {cfg.eval_student}"
        note = f"evaluation, not in the estimate: {cfg.eval_nets} x {cfg.eval_epochs:,} epochs ({net}) on {sets}"
        if cfg.baseline:
            n = len(self.train.labels) if self.train is not None else cfg.train_subset
            note += (f", and a full-data network ({full_data_epochs(cfg.full_epochs, cfg.eval_epochs)} epochs"
                     f"{f' on {n:,} images' if n else ''}; once per setting, then cached)")
        return note

    def evaluate_set(self, run: Run, syn: dict) -> dict:
        """The set under the config's protocol and, with `baseline`, the `ipc` random real images per class it
        started from (same protocol and seeds) and DD-Ranking's scores (`dd_ranking.py`): for a soft-label set
        also the images with hard labels (their class slots; same learned lr) and the random real images with the
        method's own kind of labels (`random_real_labels`)."""
        cfg = self.cfg
        if cfg.eval_epochs < 1:
            return {}
        es, test = eval_settings(cfg), self.test
        out = {"eval": evaluate_synthetic(syn["images"], syn["labels"], test.images, test.labels, es,
                                          lr=syn.get("lr"))}
        if not cfg.baseline:
            return out
        xr, yr = random_real(self.train, cfg.ipc, cfg.seed)
        out["random_real"] = evaluate_synthetic(xr, yr, test.images, test.labels, es)
        if syn["labels"].ndim == 1:  # hard labels: the main evaluation is both syn-hard and syn-any
            return {**out, **self.dd_ranking_scores(run, out, syn_hard="eval", rdm_any="random_real",
                                                    rdm_labels="hard")}
        hard, source = class_slots(syn["labels"], cfg.ipc)
        out["eval_hard_labels"] = {**evaluate_synthetic(syn["images"], hard, test.images, test.labels, es,
                                                        lr=syn.get("lr")), "hard_labels": source,
                                  "argmax_agreement": float((syn["labels"].argmax(1) == hard).float().mean())}
        labelled = self.random_real_labels(xr, yr)
        if labelled is None:
            return {**out, **self.dd_ranking_scores(
                run, out, syn_hard="eval_hard_labels", rdm_any="random_real", rdm_labels="hard",
                note=f"{cfg.method} has no labelling for random real images: IOR compares its soft labels with "
                     "random real images with hard labels")}
        soft, label_source = labelled
        out["random_real_soft_labels"] = {**evaluate_synthetic(xr, soft, test.images, test.labels, es),
                                          "label_source": label_source}
        return {**out, **self.dd_ranking_scores(run, out, syn_hard="eval_hard_labels",
                                                rdm_any="random_real_soft_labels", rdm_labels=label_source)}

    def dd_ranking_scores(self, run: Run, out: dict, *, syn_hard: str, rdm_any: str, rdm_labels: str,
                          syn_any: str = "eval", note: str | None = None) -> dict:
        """`full_data` (Acc(real-hard): the protocol's network on the whole training split, cached) and
        `dd_ranking` (HLR, IOR, DDRS, paired round by round over the evaluation networks) from the evaluations
        `out[syn_hard]`, `out[syn_any]` and `out[rdm_any]`."""
        cfg = self.cfg
        es = eval_settings(cfg)
        full = full_data_accuracy(cfg.dataset, self.train, self.test, es,
                                  full_data_epochs(cfg.full_epochs, cfg.eval_epochs), log=run.log)
        got = dd_ranking(full["mean"], out[syn_hard]["accs"], out[syn_any]["accs"], out[rdm_any]["accs"])
        got.update(syn_hard=syn_hard, syn_any=syn_any, rdm_any=rdm_any, rdm_labels=rdm_labels,
                   full_data_epochs=full["epochs"], full_data_images=full["images"])
        if note:
            got["note"] = note
        return {"full_data": full, "dd_ranking": got}

    def artefacts(self, run: Run) -> dict:
        cfg = self.cfg
        syn = self.algorithm.synthetic()
        save_synthetic(run.run_dir / "synthetic.safetensors", syn)
        save_grid(syn["images"], cfg.ipc, self.train, run.run_dir / "grid.png", cfg.zca)
        save_curves(self.curves, run.run_dir)
        metrics = {"dataset": cfg.dataset, "method": cfg.method, "ipc": cfg.ipc, "iterations": self.total_steps,
                   "condense_seconds": self.seconds,
                   "setup_seconds": self.setup_seconds, "run_dir": str(run.run_dir)}
        metrics.update(self.evaluate_set(run, syn))
        scores = {f"{k}/{s}": v[s] for k, v in metrics.items() if isinstance(v, dict) and "mean" in v
                  for s in ("mean", "std")}
        dd = metrics.get("dd_ranking")
        if dd:
            scores.update({f"dd_ranking/{k}": dd[k] for k in ("hlr", "hlr_std", "ior", "ior_std", "ddrs", "ddrs_std")})
        if scores:
            run.record({"step": self.total_steps, **scores})
            run.log("test accuracy: " + ", ".join(f"{k} {100 * v['mean']:.2f} ± {100 * v['std']:.2f}"
                                                  for k, v in metrics.items() if isinstance(v, dict) and "mean" in v))
        if dd:
            run.log(f"DD-Ranking: HLR {100 * dd['hlr']:.2f} ± {100 * dd['hlr_std']:.2f} points, IOR "
                    f"{100 * dd['ior']:.2f} ± {100 * dd['ior_std']:.2f} points, DDRS {dd['ddrs']:.4f} ± "
                    f"{dd['ddrs_std']:.4f} (random real images with {dd['rdm_labels'].removesuffix(' labels')} labels)")
        run.write_json("metrics.json", metrics)
        return metrics


def class_slots(labels: torch.Tensor, ipc: int) -> tuple[torch.Tensor, str]:
    """The hard labels of a soft-labelled set stored class by class (`ipc` images per class, as every method here
    stores it and as DD-Ranking assumes, `soft_label.py` line 505): each image's class slot; a set of another
    size falls back to the argmax of its soft labels. Returns the labels and which rule made them."""
    n, c = labels.shape
    if n == c * ipc:
        return torch.arange(c, device=labels.device).repeat_interleave(ipc), "class slot"
    return labels.argmax(1), "argmax of the soft label"
