"""`--method cvdd`: committee voting (CV-DD; algorithm: `condense/committee_voting.py`, the committee:
`committee.py`, cached as safetensors, crop labels: `crop_labels.py`). Evaluated with the relabel protocol: the
committee's FKD crop labels, beside random real images relabelled the same way and with hard labels. The paper's
settings are `recipes/condense-cifar10-cvdd.yaml`, a CPU-sized committee `recipes/condense-cifar10-cvdd-cpu.yaml`
(`preset=cpu`)."""
from __future__ import annotations

import time
from typing import Annotated, Literal

from ...config import NonNegFloat, NonNegInt, PositiveFloat, PositiveInt, Range
from ...method import register_method
from ..committee import build_committee, parse_members
from ..committee_voting import CommitteeVoting, patch_init, pixel_bounds, relabel
from ..crop_labels import save_crop_labels
from ..image_data import random_real
from ..image_eval import evaluate_crop_labels
from ..image_method import ImageCondenseMethod, eval_settings
from ..networks import check_member

# the paper's ResNet-18, ResNet-50, ShuffleNetV2, MobileNetV2, DenseNet-121; kdkit's zoo has no ResNet-50 or
# DenseNet-121, so resnet32x4 and wrn_40_2 stand in for them
PAPER_COMMITTEE = "resnet18,resnet32x4,shufflenetv2,mobilenetv2,wrn_40_2"


@register_method("condense", "cvdd")
class CommitteeVotingMethod(ImageCondenseMethod):
    """CV-DD (Cui et al. 2025): `iterations` per recovered batch (one image per class), so ipc x iterations steps."""

    # relabelling settings only change the evaluation
    resume_may_change = ("relabel_temperature", "label_batch", "bn_batch", "cutmix", "label_topk")

    def __init__(self, ctx, *, iterations: PositiveInt = 4000, members: str | list[str] = PAPER_COMMITTEE,
                 member_epochs: PositiveInt = 200, voters: PositiveInt = 2, recover_lr: PositiveFloat = 0.25,
                 r_bn: NonNegFloat = 0.01, first_bn_multiplier: NonNegFloat = 10.0, jitter: NonNegInt = 4,
                 recover_temperature: PositiveFloat = 5.0, relabel_temperature: PositiveFloat = 10.0,
                 patch_factor: PositiveInt = 2, patch_difficulty: Literal["easy", "medium", "hard"] = "medium",
                 patch_candidates: PositiveInt = 300, min_scale: Annotated[float, Range(gt=0, le=1)] = 0.08,
                 label_batch: PositiveInt = 16, bn_batch: PositiveInt = 8, cutmix: bool = True,
                 label_topk: PositiveInt | None = None):
        # members: committee networks (`networks.member_model` names, a list or a comma list);
        # label_topk: store only each crop label's k largest logits (null: all)
        self.members = [check_member(n, "members") for n in parse_members(members)]
        super().__init__(ctx, ctx.config.ipc * iterations)
        self.iterations, self.member_epochs, self.voters = iterations, member_epochs, voters
        self.recover = dict(lr=recover_lr, r_bn=r_bn, first_bn_multiplier=first_bn_multiplier, jitter=jitter,
                            temperature=recover_temperature, min_scale=min_scale)
        self.patches = dict(factor=patch_factor, difficulty=patch_difficulty, candidates=patch_candidates)
        self.relabelling = {"relabel_temperature": relabel_temperature, "bn_batch": bn_batch,
                            "label_batch": label_batch, "cutmix": cutmix, "min_scale": min_scale,
                            "label_topk": label_topk}

    def build(self, run, train):
        cfg = self.cfg
        members = build_committee(self.members, train, dataset=cfg.dataset, epochs=self.member_epochs,
                                  seed=cfg.seed, progress=cfg.progress, log=run.log,
                                  budget=getattr(cfg, "budget", None))
        run.log("committee (val accuracy): " + ", ".join(f"{m.name} {100 * m.prior:.1f}" for m in members))
        observer = max(members, key=lambda m: m.prior).model
        x0, y0 = patch_init(train, observer, cfg.ipc, seed=cfg.seed, **self.patches)
        algorithm = CommitteeVoting(members, x0, y0, cfg.ipc, iterations=self.iterations, voters=self.voters,
                                    bounds=pixel_bounds(train, x0.device), seed=cfg.seed, **self.recover)
        algorithm.settings = self.relabelling
        return algorithm

    def evaluate_set(self, run, syn: dict) -> dict:
        """CV-DD's relabel step and protocol (b): committee crop labels for the synthetic set (one set of crops per
        student epoch), students trained on them; beside it the random real images (i) relabelled by the same
        committee the same way and (ii) with hard labels (same crops, CutMix, optimiser), all with the same
        student and epochs; and DD-Ranking's scores (`dd_ranking.py`): the synthetic images with hard labels through
        their own crops (HLR, against the student trained on the whole training split), IOR against (i)."""
        cfg, method = self.cfg, self.algorithm
        out: dict = {"committee": [{"name": m.name, "prior": m.prior} for m in method.members],
                     "voter_schedule": [list(v) for v in method.schedule]}
        if cfg.eval_epochs < 1:
            return out
        es, test = eval_settings(cfg), self.test
        t0 = time.time()
        store = relabel(method, syn["images"], cfg.eval_epochs, seed=cfg.seed, progress=cfg.progress)
        out["relabel_seconds"] = time.time() - t0
        save_crop_labels(store, run.run_dir / "crop_labels.safetensors")
        out["eval"] = evaluate_crop_labels(syn["images"], store, test.images, test.labels, es)
        if cfg.baseline:
            xr, yr = random_real(self.train, cfg.ipc, cfg.seed)
            store_r = relabel(method, xr, cfg.eval_epochs, seed=cfg.seed, progress=cfg.progress)
            save_crop_labels(store_r, run.run_dir / "crop_labels_random_real.safetensors")
            out["random_real_relabelled"] = evaluate_crop_labels(xr, store_r, test.images, test.labels, es)
            # hard labels through the very same crops, optimiser and epochs: only the labels differ
            out["random_real"] = evaluate_crop_labels(xr, store_r, test.images, test.labels, es, hard_labels=yr)
            # DD-Ranking: the synthetic images with hard labels the same way (HLR); IOR against (i)
            out["eval_hard_labels"] = evaluate_crop_labels(syn["images"], store, test.images, test.labels, es,
                                                           hard_labels=syn["labels"])
            out.update(self.dd_ranking_scores(run, out, syn_hard="eval_hard_labels",
                                              rdm_any="random_real_relabelled", rdm_labels="committee crop labels"))
        return out
