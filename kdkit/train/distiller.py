"""The Distiller: one training loop on accelerate for teacher training, baselines and knowledge distillation.

Trainer = losses × models × data × config. The student and every parameter a loss owns (projectors)
live in one `DistillModule`, the only thing handed to DDP; the teacher is frozen, never wrapped,
and runs under inference mode, so several processes (`accelerate launch`) work unchanged.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Recipe
from ..data.loader import TensorLoader
from ..data.subsets import balanced_subset
from ..errors import ConfigError
from ..losses.base import DistillLoss
from ..models.outputs import Outputs
from ..models.teacher import CachedTeacher, Student, Teacher
from .. import checkpoint as ckpt
from .optim import build_optimizer, lr_at, set_lr
from .run_dir import RunLog


class DistillModule(nn.Module):
    """Student + the losses' own parameters; forward returns the student's logits and each weighted loss term."""

    def __init__(self, student: Student, losses: dict[str, tuple[float, DistillLoss]], ce_weight: float,
                 peer: Student | None = None):
        super().__init__()
        self.student = student
        self.peer = peer  # online distillation: trained jointly, its outputs (with gradients) are the "teacher"
        self.losses = nn.ModuleDict({name: loss for name, (_, loss) in losses.items()})
        self.weights = {name: float(w) for name, (w, _) in losses.items()}
        self.ce_weight = float(ce_weight)

    def forward(self, images: torch.Tensor, labels: torch.Tensor, teacher,
                index: torch.Tensor | None = None):
        out = self.student(images)
        if self.peer is not None:
            teacher = self.peer(images)
        terms = {}
        if self.ce_weight:
            terms["ce"] = self.ce_weight * F.cross_entropy(out.logits.float(), labels)
        for name, loss in self.losses.items():
            extra = {"index": index} if loss.needs_index else {}
            terms[name] = self.weights[name] * loss(out, teacher, labels, **extra)
        return out.logits, terms


class Distiller:
    """Trains `student` (optionally from `teacher` through `losses`) on in-memory image tensors.

    `losses` maps a name to `(weight, DistillLoss)`; with no teacher and no losses this is plain
    supervised training (how teachers and no-teacher baselines are made). `teacher` may be a list (several
    frozen teachers, for losses with `takes_teacher_list`); `peer` is a second network trained jointly with the
    student (online distillation), whose outputs the losses receive as the teacher. `on_step(distiller, step)`
    is called after every optimiser step (tests use it to simulate a crash).
    """

    def __init__(self, student: nn.Module, teacher, losses: dict, train, test, cfg: Recipe,
                 run_dir: str | Path, *, train_indices: torch.Tensor | None = None,
                 model_meta: dict | None = None, on_step: Callable | None = None, peer: nn.Module | None = None):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.cfg, self.tcfg = cfg, cfg.trainer
        self.run_dir = Path(run_dir)
        if self.tcfg.threads:
            torch.set_num_threads(self.tcfg.threads)
        _match_accelerator_state(self.tcfg.mixed_precision)
        self.accelerator = acc = Accelerator(
            cpu=use_cpu(cfg), mixed_precision=self.tcfg.mixed_precision, log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs")))
        self.on_step = on_step
        self.model_meta = dict(model_meta or {})
        self.peer_meta = {k: v for k, v in self.model_meta.items() if k in ("num_classes", "dataset")}

        student = student if isinstance(student, Student) else Student(student)
        many = isinstance(teacher, (list, tuple))
        teachers = [t if isinstance(t, (Teacher, CachedTeacher)) else Teacher(t)
                    for t in (teacher if many else [teacher] if teacher is not None else [])]
        if peer is not None and teachers:
            raise ConfigError("give either a frozen teacher or a jointly trained peer, not both")
        peer = None if peer is None else peer if isinstance(peer, Student) else Student(peer)
        losses = {n: (l if isinstance(l, tuple) else (1.0, l)) for n, l in (losses or {}).items()}
        if not teachers and peer is None and any(l.needs_teacher for _, l in losses.values()):
            raise ConfigError(f"losses {sorted(losses)} need a teacher, but none was given (set teacher.model "
                              "and teacher.checkpoint, or teacher.cache)")
        for name, (_, loss) in losses.items():
            if many != loss.takes_teacher_list and loss.needs_teacher:
                raise ConfigError(f"loss '{name}' ({type(loss).__name__}) takes "
                                  f"{'a list of teachers' if loss.takes_teacher_list else 'one teacher'}, but the run "
                                  f"has {f'{len(teachers)} teachers (teachers:)' if many else 'one (teacher:)'}")
            student.add_taps(loss.student_taps)
            for t in teachers + ([peer] if peer is not None else []):
                if isinstance(t, CachedTeacher):
                    if loss.teacher_taps:
                        raise ConfigError(f"{type(loss).__name__} needs teacher features {loss.teacher_taps}; "
                                          "a cached teacher only has logits")
                else:
                    t.add_taps(loss.teacher_taps)
        teachers = [t.to(acc.device) for t in teachers]
        for t in teachers:
            if isinstance(t, Teacher):
                if self.tcfg.channels_last:
                    t.to(memory_format=torch.channels_last)
                if self.tcfg.compile:
                    t.model.compile(mode=self.tcfg.compile_mode)
        self.teacher = teachers if many else teachers[0] if teachers else None
        student.to(acc.device)
        if peer is not None:
            peer.to(acc.device)

        dev = acc.device
        if dev.type == "cuda" and self.tcfg.data_on_device:  # GPU-resident data: augmentation runs there too
            train = _on_device(train, dev)
            test = _on_device(test, dev)
        seed = self.tcfg.seed
        test_idx = torch.arange(len(test.labels))
        if cfg.data.test_limit is not None and cfg.data.test_limit < len(test.labels):
            # class-balanced: the stored test split may be sorted by label
            n_classes = int(test.labels.max()) + 1
            test_idx = balanced_subset(test.labels.cpu(), max(1, cfg.data.test_limit // n_classes), seed=0).sort().values
        try:
            self.train_loader = TensorLoader(
                train.images, train.labels, cfg.data.batch_size, shuffle=True, augment=cfg.data.augment,
                mean=train.mean, std=train.std, seed=seed, drop_last=True, rank=acc.process_index,
                world_size=acc.num_processes, device=dev, indices=train_indices)
            self.eval_loader = TensorLoader(
                test.images, test.labels, cfg.data.eval_batch_size, shuffle=False, augment=False, mean=test.mean,
                std=test.std, drop_last=False, device=dev,
                indices=test_idx[acc.process_index::acc.num_processes])
        except ValueError as e:
            raise ConfigError(f"data: {e} (data.batch_size={cfg.data.batch_size}, "
                              f"data.train_per_class={cfg.data.train_per_class}, {acc.num_processes} process(es))") from e

        # Let losses size their parameters (projectors) and check shapes on one real batch.
        self._setup_losses(student, losses, peer)
        for _, loss in losses.values():  # per-sample losses that need every training label (CRD's exact negatives)
            for m in loss.modules():
                if hasattr(m, "set_dataset_labels"):
                    m.set_dataset_labels(self.train_loader.labels)
        module = DistillModule(student, losses, cfg.ce_weight, peer)
        if self.tcfg.channels_last:
            module.to(memory_format=torch.channels_last)
        if self.tcfg.compile:
            module = torch.compile(module, mode=self.tcfg.compile_mode)
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, cfg.optim)
        self.module, self.optimizer = acc.prepare(module, optimizer)
        self.raw = acc.unwrap_model(self.module)
        if hasattr(self.raw, "_orig_mod"):
            self.raw = self.raw._orig_mod
        self.log = RunLog(self.run_dir, acc)
        self.state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "history": [], "best_acc": 0.0,
                      "train_seconds": 0.0}

    # ------------------------------------------------------------ set-up

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
            outs = [t(images, index=index) if isinstance(t, CachedTeacher) else t(images)
                    for t in (self.teacher if isinstance(self.teacher, list) else [self.teacher])]
        return outs if isinstance(self.teacher, list) else outs[0]

    # ------------------------------------------------------------ resume

    def resume(self, where: str | Path) -> bool:
        """Restore from a checkpoint folder or a run folder's latest checkpoint; False if there is none."""
        where = Path(where)
        folder = where if (where / ckpt.MANIFEST).is_file() else ckpt.latest_checkpoint(where)
        if folder is None:
            return False
        state = ckpt.load_checkpoint(folder, self._modules(), self.optimizer.optimizer
                                     if hasattr(self.optimizer, "optimizer") else self.optimizer)
        scaler = state.pop("scaler", {})
        if scaler and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(scaler)
        self.state = state
        self.accelerator.print(f"resumed from {folder} (epoch {state['epoch']}, step {state['step_in_epoch']})")
        return True

    def _modules(self) -> dict[str, nn.Module]:
        mods = {"student": self.raw.student.model, "losses": self.raw.losses}
        if self.raw.peer is not None:
            mods["peer"] = self.raw.peer.model
        return mods

    def save(self) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            opt = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
            scaler = acc.scaler.state_dict() if acc.scaler is not None else None
            folder = self.run_dir / "checkpoints" / f"step-{self.state['global_step']:08d}"
            ckpt.save_checkpoint(folder, self._modules(), opt, self.state, scaler)
            ckpt.prune_checkpoints(self.run_dir, self.tcfg.keep_checkpoints)
        acc.wait_for_everyone()

    # ------------------------------------------------------------ loop

    def fit(self) -> dict:
        acc, t = self.accelerator, self.tcfg
        acc.init_trackers("kdkit", config=_flat_scalars(asdict(self.cfg)))
        live = [t for t in (self.teacher if isinstance(self.teacher, list) else [self.teacher])
                if t is not None and not isinstance(t, CachedTeacher)]
        if live and "teacher_acc" not in self.state:
            accs = [self.evaluate(t)["acc"] for t in live]
            self.state["teacher_acc"] = accs if isinstance(self.teacher, list) else accs[0]
            acc.print("teacher test accuracy: " + ", ".join(f"{a:.2f}%" for a in accs))
        steps_per_epoch = len(self.train_loader)
        accum = max(1, t.grad_accum)
        while self.state["epoch"] < t.epochs:
            epoch = self.state["epoch"]
            self.train_loader.set_epoch(epoch)
            self.module.train()
            running, names, means = None, [], {}  # per-term sums stay on the device: no sync per step
            count, seen, t0 = 0, 0, time.perf_counter()
            bar = self.log.progress(steps_per_epoch, f"epoch {epoch + 1}/{t.epochs}",
                                    initial=self.state["step_in_epoch"], enabled=t.progress)
            for step, batch in enumerate(self.train_loader.iter_from(self.state["step_in_epoch"]),
                                         start=self.state["step_in_epoch"]):
                progress = epoch + step / steps_per_epoch
                set_lr(self.optimizer, lr := lr_at(progress, t.epochs, self.cfg.optim.lr, self.cfg.scheduler))
                for loss in self.raw.losses.values():
                    loss.set_epoch(progress)
                images = batch.images.contiguous(memory_format=torch.channels_last) if t.channels_last else batch.images
                t_out = self._teacher_out(images, batch.index)
                sync = (step + 1) % accum == 0 or step + 1 == steps_per_epoch
                ctx = acc.no_sync(self.module) if not sync else contextlib.nullcontext()
                with ctx:
                    _, terms = self.module(images, batch.labels, t_out, batch.index)
                    loss = sum(terms.values())
                    acc.backward(loss / accum)
                if sync:
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                self.state["step_in_epoch"] = step + 1
                self.state["global_step"] += 1
                names = [*terms, "loss"]
                values = torch.stack([v.detach().float() for v in terms.values()] + [loss.detach().float()])
                running = values if running is None else running + values
                count += 1
                seen += batch.labels.numel() * acc.num_processes
                bar.update(1)
                if self.state["global_step"] % t.log_every == 0 or step + 1 == steps_per_epoch:
                    means = dict(zip(names, (running / count).tolist()))  # the one sync every log_every steps
                    if not all(math.isfinite(v) for v in means.values()):
                        raise FloatingPointError(f"non-finite loss in epoch {epoch + 1} (mean terms so far: "
                                                 f"{means}); lower optim.lr or check the data")
                    bar.set_postfix({k: f"{v:.3f}" for k, v in means.items()})
                    acc.log({f"train/{k}": v for k, v in zip(names, values.tolist())} | {"lr": lr},
                            step=self.state["global_step"])
                if sync and t.save_every_steps and self.state["global_step"] % t.save_every_steps == 0:
                    self.save()
                if self.on_step is not None:
                    self.on_step(self, self.state["global_step"])
            bar.close()
            seconds = time.perf_counter() - t0
            self.state["train_seconds"] += seconds
            self.state["epoch"] += 1
            self.state["step_in_epoch"] = 0
            record = {"epoch": self.state["epoch"], "lr": lr, "images_per_s": seen / max(seconds, 1e-9)}
            record |= {f"train_{k}": v for k, v in means.items()}
            if self.state["epoch"] % t.eval_every == 0 or self.state["epoch"] == t.epochs:
                ev = self.evaluate()
                record |= {"test_acc": ev["acc"], "test_loss": ev["loss"]}
                if self.raw.peer is not None:
                    record["peer_test_acc"] = self.evaluate(self.raw.peer)["acc"]
                self.state["best_acc"] = max(self.state["best_acc"], ev["acc"])
            self.state["history"].append(record)
            acc.log({f"epoch/{k}": v for k, v in record.items() if k != "epoch"}, step=self.state["global_step"])
            self.log.epoch(record)
            self.save()
        return self.finish()

    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> dict:
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

    def finish(self) -> dict:
        acc = self.accelerator
        final = self.state["history"][-1] if self.state["history"] else {}
        summary = {
            "final_acc": final.get("test_acc"), "best_acc": self.state["best_acc"],
            **({"peer_final_acc": final.get("peer_test_acc")} if self.raw.peer is not None else {}),
            "teacher_acc": self.state.get("teacher_acc"), "epochs": self.state["epoch"],
            "steps": self.state["global_step"], "train_seconds": self.state["train_seconds"],
            "images_per_s": _mean([h["images_per_s"] for h in self.state["history"]]),
            "processes": acc.num_processes, "device": str(acc.device),
        }
        if acc.is_main_process:
            ckpt.save_model(self.raw.student.model, self.run_dir / "model.safetensors", self.model_meta)
            if self.raw.peer is not None:
                ckpt.save_model(self.raw.peer.model, self.run_dir / "peer.safetensors", self.peer_meta)
            (self.run_dir / "metrics.json").write_text(json.dumps(
                {"summary": summary, "history": self.state["history"]}, indent=1))
            self.log.curves(self.state["history"])
        acc.wait_for_everyone()
        acc.end_training()  # last: it may tear down the process group
        return summary


def _match_accelerator_state(mixed_precision: str) -> None:
    """accelerate fixes mixed precision once per process; a later Distiller in the same (single) process
    with another setting (a notebook, a benchmark) gets a fresh state instead of accelerate's error."""
    from accelerate.state import AcceleratorState, PartialState

    current = AcceleratorState._shared_state.get("_mixed_precision")
    if current is None or current == mixed_precision:
        return
    if PartialState().num_processes > 1:
        raise ConfigError(f"this process already trains with mixed_precision={current}; under a multi-process "
                          f"launch every run must use the same trainer.mixed_precision (got {mixed_precision})")
    AcceleratorState._reset_state(reset_partial_state=True)


def use_cpu(cfg: Recipe) -> bool:
    """CPU unless asked otherwise and CUDA is present; accelerate then runs several processes over gloo."""
    return cfg.trainer.cpu or not torch.cuda.is_available()


def _on_device(data, device):
    """A shallow copy of an `ImageTensors` with images and labels moved to `device`."""
    import dataclasses

    return dataclasses.replace(data, images=data.images.to(device), labels=data.labels.to(device))


def _normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255.0 - m) / s


def _flat_scalars(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= _flat_scalars(v, key + ".")
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        elif isinstance(v, list):
            out[key] = str(v)
    return out


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


