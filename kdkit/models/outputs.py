"""The one output type every Teacher and Student returns, whatever model is inside."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Outputs:
    """Logits plus tapped features (module path -> tensor); losses read only this."""

    logits: torch.Tensor | None
    features: dict[str, torch.Tensor] = field(default_factory=dict)

    def feature(self, path: str, who: str = "model") -> torch.Tensor:
        if path not in self.features:
            raise KeyError(f"{who} has no tapped feature '{path}'; tapped: {sorted(self.features) or 'none'}")
        return self.features[path]

    def detach(self) -> "Outputs":
        return Outputs(
            None if self.logits is None else self.logits.detach(),
            {k: v.detach() for k, v in self.features.items()},
        )


def logits_of(raw) -> torch.Tensor | None:
    """Find the logits in whatever a model returned: a tensor, a HF ModelOutput, a tuple."""
    if raw is None or isinstance(raw, torch.Tensor):
        return raw
    if hasattr(raw, "logits"):
        return raw.logits
    if isinstance(raw, dict) and "logits" in raw:
        return raw["logits"]
    if isinstance(raw, (tuple, list)) and raw and isinstance(raw[0], torch.Tensor):
        return raw[0]
    raise TypeError(f"cannot find logits in a model output of type {type(raw).__name__}")
