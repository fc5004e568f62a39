"""The Distiller: classifier knowledge distillation, teacher training and no-teacher baselines, as one `Method`.

Trainer = losses × models × data × config. The student and every parameter a loss owns (projectors) live in one
`DistillModule`, the only thing handed to DDP; the teacher is frozen, never wrapped, and runs under inference
mode, so several processes (`accelerate launch`) work unchanged. The loop is `kdkit.method.fit`; the epochs are
in the batches (`batches(start)` picks up mid-epoch after a resume), the per-epoch evaluation and history in
`evaluate`, and a checkpoint is written at each epoch's end and every `trainer.save_every_steps` steps.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import checkpoint as ckpt
from ..config import Recipe
from ..data.loader import TensorLoader
from ..data.subsets import balanced_subset
from ..errors import ConfigError
from ..losses.base import DistillLoss
from ..method import register_method
from ..models.teacher import CachedTeacher, Student, Teacher
from .accelerated import AcceleratedMethod


class DistillModule(nn.Module):
    """Student + the losses' own parameters; forward returns the student's logits and each weighted loss term."""

    def __init__(self, student: Student, losses: dict[str, tuple[float, DistillLoss]], ce_weight: float,
                 peer: Student | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.student = student
        self.peer = peer  # online distillation: trained jointly, its outputs (with gradients) are the "teacher"
        self.losses = nn.ModuleDict({name: loss for name, (_, loss) in losses.items()})
        self.weights = {name: float(w) for name, (w, _) in losses.items()}
        self.ce_weight = float(ce_weight)
        self.label_smoothing = float(label_smoothing)

    def forward(self, images: torch.Tensor, labels: torch.Tensor, teacher,
                index: torch.Tensor | None = None):
        out = self.student(images)
        if self.peer is not None:
            teacher = self.peer(images)
        terms = {}
        if self.ce_weight:
            terms["ce"] = self.ce_weight * F.cross_entropy(out.logits.float(), labels,
                                                            label_smoothing=self.label_smoothing)
        for name, loss in self.losses.items():
            extra = {"index": index} if loss.needs_index else {}
            terms[name] = self.weights[name] * loss(out, teacher, labels, **extra)
        return out.logits, terms


def check_loss_teachers(losses: dict[str, DistillLoss], *, teachers: int, many: bool, peer: bool,
                        cached: bool) -> None:
    """The rules between a run's losses and what teaches them (`teachers` frozen ones, `many`: given as a list,
    a jointly trained `peer`, a `cached` teacher holding logits only); `kdkit distill` checks them before any
    work, the Distiller again for the Python API."""
    if teachers and peer:
        raise ConfigError("give either a frozen teacher or a jointly trained peer, not both")
    if not teachers and not peer and any(loss.needs_teacher for loss in losses.values()):
        raise ConfigError(f"losses {sorted(losses)} need a teacher, but none was given (set teacher.model "
                          "and teacher.checkpoint, or teacher.cache)")
    for name, loss in losses.items():
        if loss.needs_teacher and not peer and many != loss.takes_teacher_list:
            raise ConfigError(f"loss '{name}' ({type(loss).__name__}) takes "
                              f"{'a list of teachers' if loss.takes_teacher_list else 'one teacher'}, but the run "
                              f"has {f'{teachers} teachers (teachers:)' if many else 'one (teacher:)'}")
        if cached and loss.teacher_taps:
            raise ConfigError(f"{type(loss).__name__} needs teacher features {list(loss.teacher_taps)}; "
                              "a cached teacher only has logits")


class Distiller(AcceleratedMethod):
    """Trains `student` (optionally from `teacher` through `losses`) on in-memory image tensors.

    `losses` maps a name to `(weight, DistillLoss)`; with no teacher and no losses this is plain
    supervised training (how teachers and no-teacher baselines are made). `teacher` may be a list (several
    frozen teachers, for losses with `takes_teacher_list`); `peer` is a second network trained jointly with the
    student (online distillation), whose outputs the losses receive as the teacher. `on_step(distiller, step)`
    is called after every step (tests use it to simulate a crash). `fit()` runs it in its `Run` (`cfg.resume`
    continues a run) and returns the summary.
    """

    name = "classify"

    def __init__(self, student: nn.Module, teacher, losses: dict, train, test, cfg: Recipe,
                 run_dir: str | Path, *, train_indices: torch.Tensor | None = None,
                 model_meta: dict | None = None, on_step: Callable | None = None, peer: nn.Module | None = None,
                 peer_meta: dict | None = None):
        super().__init__(cfg, run_dir, on_step)
        acc, t = self.accelerator, self.tcfg
        self.model_meta = dict(model_meta or {})
        self.peer_meta = dict(peer_meta or {k: v for k, v in self.model_meta.items()
                                            if k in ("num_classes", "dataset")})

        student = student if isinstance(student, Student) else Student(student)
        many = isinstance(teacher, (list, tuple))
        teachers = [tc if isinstance(tc, (Teacher, CachedTeacher)) else Teacher(tc)
                    for tc in (teacher if many else [teacher] if teacher is not None else [])]
        peer = None if peer is None else peer if isinstance(peer, Student) else Student(peer)
        losses = {n: (l if isinstance(l, tuple) else (1.0, l)) for n, l in (losses or {}).items()}
        check_loss_teachers({n: l for n, (_, l) in losses.items()}, teachers=len(teachers), many=many,
                            peer=peer is not None, cached=any(isinstance(tc, CachedTeacher) for tc in teachers))
        for _, loss in losses.values():
            student.add_taps(loss.student_taps)
            for tc in teachers + ([peer] if peer is not None else []):
                if not isinstance(tc, CachedTeacher):
                    tc.add_taps(loss.teacher_taps)
        teachers = [tc.to(acc.device) for tc in teachers]
        for tc in teachers:
            if isinstance(tc, Teacher):
                if t.channels_last:
                    tc.to(memory_format=torch.channels_last)
                if t.compile:
                    tc.model.compile(mode=t.compile_mode)
        self.teacher = teachers if many else teachers[0] if teachers else None
        student.to(acc.device)
        if peer is not None:
            peer.to(acc.device)

        dev = acc.device
        if dev.type == "cuda" and t.data_on_device:  # GPU-resident data: augmentation runs there too
            train, test = _on_device(train, dev), _on_device(test, dev)
        test_idx = torch.arange(len(test.labels))
        if cfg.data.test_limit is not None and cfg.data.test_limit < len(test.labels):
            # class-balanced: the stored test split may be sorted by label
            n_classes = int(test.labels.max()) + 1
            test_idx = balanced_subset(test.labels.cpu(), max(1, cfg.data.test_limit // n_classes), seed=0).sort().values
        try:
            self.train_loader = TensorLoader(
                train.images, train.labels, cfg.data.batch_size, shuffle=True, augment=cfg.data.augment,
                mean=train.mean, std=train.std, seed=t.seed, drop_last=True, rank=acc.process_index,
                world_size=acc.num_processes, device=dev, indices=train_indices)
            self.eval_loader = TensorLoader(
                test.images, test.labels, cfg.data.eval_batch_size, shuffle=False, augment=False, mean=test.mean,
                std=test.std, drop_last=False, device=dev,
                indices=test_idx[acc.process_index::acc.num_processes])
        except ValueError as e:
            raise ConfigError(f"data: {e} (data.batch_size={cfg.data.batch_size}, "
                              f"data.train_per_class={cfg.data.train_per_class}, {acc.num_processes} process(es))") from e
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = self.steps_per_epoch * t.epochs

        # Let losses size their parameters (projectors) and check shapes on one real batch.
        self._setup_losses(student, losses, peer)
        for _, loss in losses.values():  # per-sample losses that need every training label (CRD's exact negatives)
            for m in loss.modules():
                if hasattr(m, "set_dataset_labels"):
                    m.set_dataset_labels(self.train_loader.labels)
        module = DistillModule(student, losses, cfg.ce_weight, peer, cfg.label_smoothing)
        if t.channels_last:
            module.to(memory_format=torch.channels_last)
        if t.compile:
            module = torch.compile(module, mode=t.compile_mode)
        self.wrap(module)
        self.state |= {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_acc": 0.0}

    def _setup_losses(self, student: Student, losses: dict, peer: Student | None = None) -> None:
        if not losses:
            return
        idx = self.train_loader.base_indices[:2]
        x = _normalize(self.train_loader.images[idx].to(self.accelerator.device), self.train_loader.mean,
                       self.train_loader.std)
        nets = [student] + ([peer] if peer is not None else [])
        was = [n.training for n in nets]
        for n in nets:
            n.eval()
        with torch.no_grad():
            s_out = student(x)
            t_out = peer(x) if peer is not None else self._teacher_out(x, idx.to(x.device))
        for n, w in zip(nets, was):
            n.train(w)
        for _, loss in losses.values():
            loss.setup(s_out, t_out)
            loss.to(self.accelerator.device)

    def _teacher_out(self, images, index):
        """The frozen teacher's `Outputs` (a list of them with several teachers; None without a teacher)."""
        if self.teacher is None:
            return None
        with self.accelerator.autocast():
            outs = [tc(images, index=index) if isinstance(tc, CachedTeacher) else tc(images)
                    for tc in (self.teacher if isinstance(self.teacher, list) else [self.teacher])]
        return outs if isinstance(self.teacher, list) else outs[0]

    def modules(self) -> dict[str, nn.Module]:
        mods = {"student": self.raw.student.model, "losses": self.raw.losses}
        if self.raw.peer is not None:
            mods["peer"] = self.raw.peer.model
        return mods

    # ------------------------------------------------------------ the method contract

    def prepare(self, run, resuming: bool) -> None:
        self.module.train()
        live = [tc for tc in (self.teacher if isinstance(self.teacher, list) else [self.teacher])
                if tc is not None and not isinstance(tc, CachedTeacher)]
        if live and not resuming:
            accs = [self.accuracy(tc)["acc"] for tc in live]
            self.state["teacher_acc"] = accs if isinstance(self.teacher, list) else accs[0]
            run.log("teacher test accuracy: " + ", ".join(f"{a:.2f}%" for a in accs))
        self._t0, self._seen = time.perf_counter(), 0  # images/s: this process's own time since the last record

    def batches(self, start: int):
        """(step, batch) from global step `start` on: epoch e's batches are fixed by (seed, e), so a resumed run
        draws exactly what the uninterrupted one drew."""
        epoch, offset = divmod(start, self.steps_per_epoch)
        step = start
        while True:
            self.train_loader.set_epoch(epoch)
            for batch in self.train_loader.iter_from(offset):
                yield step, batch
                step += 1
            epoch, offset = epoch + 1, 0

    def step(self, item) -> dict:
        step, batch = item
        in_epoch = step % self.steps_per_epoch
        self._lr = lr = self.schedule(step)
        images = batch.images.contiguous(memory_format=torch.channels_last) if self.tcfg.channels_last \
            else batch.images
        t_out = self._teacher_out(images, batch.index)
        sync = (in_epoch + 1) % self.tcfg.grad_accum == 0 or in_epoch + 1 == self.steps_per_epoch
        terms = self.backward(lambda: self.module(images, batch.labels, t_out, batch.index)[1], sync)
        self.state["global_step"] = step + 1
        self.state["epoch"], self.state["step_in_epoch"] = divmod(step + 1, self.steps_per_epoch)
        self._seen += batch.labels.numel() * self.accelerator.num_processes
        return {**terms, "lr": lr}

    def is_eval_step(self, step: int) -> bool:
        return step % self.steps_per_epoch == 0  # each epoch's end: its history record

    def is_save_step(self, step: int) -> bool:
        every = self.tcfg.save_every_steps
        at_sync = (step % self.steps_per_epoch) % self.tcfg.grad_accum == 0
        return step % self.steps_per_epoch == 0 or bool(every and step % every == 0 and at_sync)

    def evaluate(self, run, step: int) -> dict:
        """The epoch's record: mean loss terms, learning rate, images/s, and test accuracy every
        `trainer.eval_every` epochs and after the last."""
        seconds = time.perf_counter() - self._t0
        self.state["train_seconds"] += seconds
        epoch = step // self.steps_per_epoch
        record = {"epoch": epoch, "lr": self._lr, "images_per_s": self._seen / max(seconds, 1e-9)}
        record |= {f"train_{k}": v for k, v in self.window.means(self.accelerator).items()}
        if epoch % self.tcfg.eval_every == 0 or epoch == self.tcfg.epochs:
            ev = self.accuracy()
            record |= {"test_acc": ev["acc"], "test_loss": ev["loss"]}
            if self.raw.peer is not None:
                record["peer_test_acc"] = self.accuracy(self.raw.peer)["acc"]
            self.state["best_acc"] = max(self.state["best_acc"], ev["acc"])
        self.state["history"].append(record)
        run.log("  ".join([f"epoch {epoch}"] + [f"{k}={v:.4g}" for k, v in record.items()
                                                  if k != "epoch" and isinstance(v, float)]))
        self._t0, self._seen = time.perf_counter(), 0
        return record

    @torch.no_grad()
    def accuracy(self, model: nn.Module | None = None) -> dict:
        """Top-1 accuracy (%) and mean cross-entropy on the test split, summed over all processes."""
        model = model if model is not None else self.raw.student
        was = model.training
        model.eval()
        correct = torch.zeros((), device=self.accelerator.device, dtype=torch.float64)
        total, loss_sum = correct.clone(), correct.clone()
        for batch in self.eval_loader:
            with self.accelerator.autocast():
                logits = model(batch.images).logits.float()
            correct += (logits.argmax(1) == batch.labels).sum()
            loss_sum += F.cross_entropy(logits, batch.labels, reduction="sum")
            total += batch.labels.numel()
        stats = self.accelerator.reduce(torch.stack([correct, total, loss_sum]), reduction="sum")
        model.train(was)
        return {"acc": float(100.0 * stats[0] / stats[1]), "loss": float(stats[2] / stats[1])}

    def artefacts(self, run) -> dict:
        """model.safetensors (architecture in its metadata), peer.safetensors, metrics.json, curves.png."""
        acc, history = self.accelerator, self.state["history"]
        final = history[-1] if history else {}
        rates = [h["images_per_s"] for h in history]
        summary = {
            "final_acc": final.get("test_acc"), "best_acc": self.state["best_acc"],
            **({"peer_final_acc": final.get("peer_test_acc")} if self.raw.peer is not None else {}),
            "teacher_acc": self.state.get("teacher_acc"), "epochs": self.state["epoch"],
            "steps": self.state["global_step"], "train_seconds": self.state["train_seconds"],
            "images_per_s": sum(rates) / len(rates) if rates else None,
            "processes": acc.num_processes, "device": str(acc.device),
        }
        if acc.is_main_process:
            ckpt.save_model(self.raw.student.model, self.run_dir / "model.safetensors", self.model_meta)
            if self.raw.peer is not None:
                ckpt.save_model(self.raw.peer.model, self.run_dir / "peer.safetensors", self.peer_meta)
        return self.write_summary(run, summary)


@register_method("distill", "classify")
def classify(ctx: dict) -> Distiller:
    """Classifier KD, teacher training and no-teacher baselines (`task: classify`); the recipe's sections are its
    options, `ctx` the Distiller's arguments (models, losses, data, recipe, run folder)."""
    return Distiller(**ctx)


def _on_device(data, device):
    """A shallow copy of an `ImageTensors` with images and labels moved to `device`."""
    import dataclasses

    return dataclasses.replace(data, images=data.images.to(device), labels=data.labels.to(device))


def _normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255.0 - m) / s
