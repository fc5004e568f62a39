"""`--method mtt` and `--method datm`: trajectory matching (algorithm: `condense/trajectory.py`, the expert
trajectories it matches: `condense/experts.py`, cached as safetensors). The papers' settings per IPC are the
recipes `recipes/condense-cifar10-{mtt,datm}-ipc{1,10,50}.yaml`; the defaults here are IPC 10's."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

import torch

from ...config import ExistingPath, NonNegFloat, NonNegInt, PositiveFloat, PositiveInt, Range
from ...method import register_method, require
from ..convnet_functional import FlatConvNet, make_convnet
from ..experts import load_expert, train_experts
from ..image_data import random_real
from ..image_method import ImageCondenseMethod
from ..trajectory import TrajectoryMatching, datm_init

# DATM's `expand_until` and `ema_decay` are its official values for its 10,000-iteration runs. A run of another
# length keeps their share of it: the window grows over the same fraction of the run, and the EMA's horizon
# 1/(1 - decay) keeps its share, so a shortened run is not mostly its initial images.
DATM_RUN_LENGTH = 10000


class _TrajectoryMatchingMethod(ImageCondenseMethod):
    """What MTT and DATM share: the rules between their options, the experts, the matching network."""

    def __init__(self, ctx, iterations: int, **options):
        super().__init__(ctx, iterations)
        o = self.opts = SimpleNamespace(**options)
        require(o.match_epochs <= o.expert_epochs,
                f"match_epochs={o.match_epochs} must be <= expert_epochs={o.expert_epochs}: experts trained "
                f"{o.expert_epochs} epochs cannot be matched {o.match_epochs} epochs ahead")

    def experts_folder(self) -> Path:
        cfg, o = self.cfg, self.opts
        if o.experts_dir:
            return Path(o.experts_dir)
        return Path(cfg.output_dir) / (f"experts-{cfg.dataset}-w{cfg.width}-e{o.expert_epochs}-lr{o.lr_teacher}"
                                       f"{'-zca' if cfg.zca else ''}"
                                       f"{f'-sub{cfg.train_subset}' if cfg.train_subset else ''}")

    def matching(self, train, log=print):
        """(expert paths, matching network, capped max start epoch, TrajectoryMatching keyword arguments)."""
        cfg, o = self.cfg, self.opts
        paths = train_experts(train, self.experts_folder(), o.experts, o.expert_epochs, lr=o.lr_teacher,
                              width=cfg.width, dsa_strategy=cfg.dsa_strategy, seed=cfg.seed * 1000,
                              progress=cfg.progress, compiled=o.compile, budget=getattr(cfg, "budget", None), log=log)
        net = FlatConvNet(make_convnet(train.num_classes, width=cfg.width, im_size=train.images.shape[-1],
                                       in_channels=train.images.shape[1]))
        max_start = min(o.max_start_epoch, o.expert_epochs - o.match_epochs + 1)  # exclusive, as in distill.py
        kwargs = dict(syn_steps=o.syn_steps, match_epochs=o.match_epochs, max_start_epoch=max_start,
                      lr_img=o.lr_img, lr_lr=o.lr_lr, lr_teacher=o.lr_teacher, batch_syn=o.batch_syn,
                      dsa_strategy=cfg.dsa_strategy, constant_memory=o.tesla, seed=cfg.seed,
                      expert_epochs=o.expert_epochs, compiled=o.compile)
        return paths, net, max_start, kwargs


@register_method("condense", "mtt")
class MTTMethod(_TrajectoryMatchingMethod):
    """MTT (Cazenavette et al. 2022); `tesla=true`: the constant-memory gradient (TESLA, exact adjoint)."""

    resume_may_change = ("iterations", "experts_dir")  # more iterations continue the same run exactly

    def __init__(self, ctx, *, iterations: NonNegInt = 5000, experts: PositiveInt = 100,
                 expert_epochs: PositiveInt = 50, syn_steps: PositiveInt = 30, match_epochs: PositiveInt = 2,
                 max_start_epoch: NonNegInt = 20, lr_img: PositiveFloat = 1000.0, lr_lr: NonNegFloat = 1e-5,
                 lr_teacher: PositiveFloat = 0.01, batch_syn: PositiveInt | None = None, tesla: bool = False,
                 experts_dir: ExistingPath | None = None, compile: bool = True):
        # batch_syn null: every synthetic image in each student step; experts_dir: reuse another run's experts;
        # compile: torch.compile the student step and the experts' training (same math; condense/tm_step.py)
        super().__init__(ctx, iterations, experts=experts, expert_epochs=expert_epochs, syn_steps=syn_steps,
                         match_epochs=match_epochs, max_start_epoch=max_start_epoch, lr_img=lr_img, lr_lr=lr_lr,
                         lr_teacher=lr_teacher, batch_syn=batch_syn, tesla=tesla, experts_dir=experts_dir,
                         compile=compile)

    def build(self, run, train):
        x0, y0 = random_real(train, self.cfg.ipc, self.cfg.seed)
        paths, net, _, kwargs = self.matching(train, run.log)
        return TrajectoryMatching(paths, net, x0, y0, **kwargs)


@register_method("condense", "datm")
class DATMMethod(_TrajectoryMatchingMethod):
    """DATM (Guo et al. 2024): MTT with learned soft labels, a growing start-epoch window and an EMA of the
    images (the set written at the end)."""

    resume_may_change = ("experts_dir",)  # iterations set the window's growth and the EMA: not free

    def __init__(self, ctx, *, iterations: NonNegInt = 10000, experts: PositiveInt = 100,
                 expert_epochs: PositiveInt = 50, syn_steps: PositiveInt = 80, match_epochs: PositiveInt = 2,
                 min_start_epoch: NonNegInt = 0, current_max_start: NonNegInt = 10, max_start_epoch: NonNegInt = 20,
                 expand_until: NonNegInt = 1000, lr_img: PositiveFloat = 100.0, lr_lr: NonNegFloat = 1e-5,
                 lr_teacher: PositiveFloat = 0.01, lr_y: PositiveFloat = 2.0,
                 ema_decay: Annotated[float, Range(ge=0, lt=1)] = 0.9995, batch_syn: PositiveInt | None = None,
                 tesla: bool = False, experts_dir: ExistingPath | None = None, compile: bool = True):
        # current_max_start: the window's first upper bound, grown to max_start_epoch over expand_until
        # iterations (of DATM's 10,000; scaled to this run's length, as is the EMA's ema_decay)
        super().__init__(ctx, iterations, experts=experts, expert_epochs=expert_epochs, syn_steps=syn_steps,
                         match_epochs=match_epochs, max_start_epoch=max_start_epoch, lr_img=lr_img, lr_lr=lr_lr,
                         lr_teacher=lr_teacher, batch_syn=batch_syn, tesla=tesla, experts_dir=experts_dir,
                         compile=compile, min_start_epoch=min_start_epoch, current_max_start=current_max_start,
                         expand_until=expand_until, lr_y=lr_y, ema_decay=ema_decay)
        require(min_start_epoch <= expert_epochs - match_epochs,
                f"min_start_epoch={min_start_epoch} must be <= expert_epochs - match_epochs = "
                f"{expert_epochs - match_epochs} (the last epoch a student can start from)")

    def build(self, run, train):
        cfg, o, n = self.cfg, self.opts, self.total_steps
        paths, net, max_start, kwargs = self.matching(train, run.log)
        expert = load_expert(paths[0])
        epoch = min(max_start, expert.shape[0] - 1)
        flat = expert[epoch].to(train.images.device)
        images, labels = datm_init(train, flat, net, cfg.ipc, cfg.seed)
        self.labeller = (net, flat, epoch)
        kwargs.update(min_start_epoch=o.min_start_epoch, current_max_start=min(o.current_max_start, max_start),
                      expand_until=round(o.expand_until * n / DATM_RUN_LENGTH), lr_y=o.lr_y,
                      ema_decay=1 - min(1.0, (1 - o.ema_decay) * DATM_RUN_LENGTH / max(n, 1)))
        return TrajectoryMatching(paths, net, images, labels, **kwargs)

    @torch.no_grad()
    def random_real_labels(self, images, labels):
        """DATM's own label source: the logits of the expert (and epoch) its soft labels start from (`datm_init`),
        as DD-Ranking labels random images with the soft-label teacher."""
        net, flat, epoch = self.labeller
        logits = torch.cat([net(flat, images[i:i + 500]) for i in range(0, images.shape[0], 500)])
        return logits, f"expert 0 logits (epoch {epoch})"
