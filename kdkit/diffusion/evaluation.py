"""Evaluating a few-step generator during a distillation run, against the true data and the teacher's many-step
samples from the same noise: sliced-W2 (and its ratio to the teacher's), mass off the modes, per-mode coverage,
MMD and per-mode mass on the 2-D mixture, FD (kdkit features) / FID, precision/recall and (with the FD
classifier) the normalised entropy of the predicted classes on images, and a picture of the samples
(`samples/step-N.png`).

The evaluation noise, labels, true samples and the teacher's reference are fixed by the run's seed and made once,
at the first evaluation. Every draw happens under a forked RNG, so evaluating never changes the training stream:
a run evaluated often and one evaluated rarely train the same networks.
"""
from __future__ import annotations

import time

import torch

from .metrics import mixture_report, normalised_entropy
from .samplers import SAMPLERS, nfe


class Evaluation:
    def __init__(self, cfg, teacher, data, device: torch.device):
        self.cfg, self.teacher, self.data, self.device = cfg, teacher, data, device
        self.sample_shape, self.num_classes = tuple(teacher.sample_shape), teacher.num_classes
        self._fixed: dict | None = None
        self._teacher: dict | None = None

    def clock(self) -> float:
        """Seconds, with the device's queued work finished first."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def _forked(self):
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    def fixed(self) -> dict:
        """Evaluation noise and labels, true samples and the teacher's many-step reference (computed once)."""
        if self._fixed is not None:
            return self._fixed
        cfg, n = self.cfg, self.cfg.eval_samples
        g = torch.Generator().manual_seed(10_000 + cfg.seed)
        z = torch.randn(n, *self.sample_shape, generator=g).to(self.device)
        k = self.num_classes
        labels = torch.randint(0, k, (n,), generator=g).to(self.device) if k else None
        ev = {"z": z, "labels": labels}
        t0 = time.perf_counter()
        with self._forked():
            torch.manual_seed(20_000 + cfg.seed)
            ev["teacher"] = torch.cat([SAMPLERS[cfg.sampler](self.teacher, z[i:i + 1000], cfg.teacher_steps,
                                                             None if labels is None else labels[i:i + 1000])
                                       for i in range(0, n, 1000)])
        teacher_s = time.perf_counter() - t0
        if cfg.data == "mixture":
            ev["true"] = self.data.mixture.sample(n, g).to(self.device)
            mix = self.data.mixture
            rep = mixture_report(ev["teacher"].cpu(), ev["true"].cpu(), mix.means, mix.stds)
        else:
            rep = self._image_report(ev["teacher"], ev, reference=False)
        self._teacher = rep | {"nfe": nfe(cfg.sampler, cfg.teacher_steps), "sampler": cfg.sampler,
                               "steps": cfg.teacher_steps, "sample_s": round(teacher_s, 3)}
        self._fixed = ev
        return ev

    def teacher_report(self) -> dict:
        self.fixed()
        return self._teacher

    def _image_report(self, x: torch.Tensor, ev: dict, reference: bool = True) -> dict:
        from .features import image_report

        return image_report(x, self.cfg, self.device, ev, reference)

    @torch.no_grad()
    def report(self, gen, step: int, run) -> dict:
        """The generator's numbers at `step` (and its picture)."""
        ev = self.fixed()
        t0 = time.perf_counter()
        with self._forked():
            torch.manual_seed(30_000 + self.cfg.seed)
            x = torch.cat([gen(ev["z"][i:i + 1000], None if ev["labels"] is None else ev["labels"][i:i + 1000])
                           for i in range(0, ev["z"].shape[0], 1000)])
        sample_s = time.perf_counter() - t0
        if self.cfg.data == "mixture":
            mix = self.data.mixture
            rep = mixture_report(x.cpu(), ev["true"].cpu(), mix.means, mix.stds, ev["teacher"].cpu(),
                                 reference_sw2=self._teacher["sw2"])
        else:
            rep = self._image_report(x, ev)
            if self.cfg.fd_classifier:
                rep["class_entropy"] = class_entropy(self.cfg.fd_classifier, x, self.device)
        rep |= {"step": step, "nfe": gen.steps, "sample_s": round(sample_s, 3)}
        self.picture(gen, step, run, x)
        return rep

    @torch.no_grad()
    def picture(self, gen, step: int, run, x: torch.Tensor | None = None):
        """`samples/step-N.png`: a scatter of true, teacher and generator samples (2-D), or an image grid."""
        from .pictures import image_grid_png, scatter_png

        ev = self.fixed()
        if x is None:
            n = 2000 if self.cfg.data == "mixture" else 64
            with self._forked():
                x = gen(ev["z"][:n], None if ev["labels"] is None else ev["labels"][:n])
        path = run.run_dir / "samples" / f"step-{step}.png"
        if self.cfg.data == "mixture":
            return scatter_png(path, {"true": ev["true"], f"teacher ({self.cfg.teacher_steps}-step {self.cfg.sampler})":
                                      ev["teacher"], f"{self.cfg.method} ({gen.steps}-step), step {step}": x})
        return image_grid_png(path, x[:64])


@torch.no_grad()
def class_entropy(classifier: str, x: torch.Tensor, device, batch: int = 500) -> float:
    """The normalised entropy of the classes a kdkit classifier (`fd_classifier`) predicts for images `x`: 1 =
    every class equally often, 0 = one class only (a collapse guard, `guards.py`). The logits are the classifier's
    last linear layer applied to the features FD reads."""
    from torch import nn

    from .features import _extractor

    ext = _extractor("fd", classifier, device)
    head = [m for m in ext.model.modules() if isinstance(m, nn.Linear)][-1]
    counts = torch.zeros(head.out_features, dtype=torch.long, device=device)
    for i in range(0, x.shape[0], batch):
        counts += torch.bincount(head(ext(x[i:i + batch])).argmax(1), minlength=head.out_features)
    return normalised_entropy(counts)
