"""`kdkit condense cifar10 --method dm`: distribution matching (algorithm: `condense/distribution_matching.py`)."""
from __future__ import annotations

from typing import Annotated

from ...config import NonNegInt, PositiveFloat, PositiveInt, Range
from ...method import register_method
from ..distribution_matching import DistributionMatching
from ..image_data import random_real
from ..image_method import ImageCondenseMethod


@register_method("condense", "dm")
class DistributionMatchingMethod(ImageCondenseMethod):
    """DM (Zhao & Bilen, WACV 2023); the paper's settings are `recipes/condense-cifar10-dm.yaml`."""

    resume_may_change = ("iterations",)  # more iterations continue the same run exactly

    def __init__(self, ctx, *, iterations: NonNegInt = 20000, lr_img: PositiveFloat = 1.0,
                 momentum: Annotated[float, Range(ge=0, lt=1)] = 0.5, batch_real: PositiveInt = 256):
        super().__init__(ctx, iterations)
        self.lr_img, self.momentum, self.batch_real = lr_img, momentum, batch_real

    def build(self, run, train):
        cfg = self.cfg
        x0, y0 = random_real(train, cfg.ipc, cfg.seed)
        return DistributionMatching(train, x0, y0, lr_img=self.lr_img, momentum=self.momentum,
                                    batch_real=self.batch_real, width=cfg.width, dsa_strategy=cfg.dsa_strategy,
                                    seed=cfg.seed)
