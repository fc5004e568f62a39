"""Features and attention maps tapped by module path with forward hooks, so no model code is edited."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

_TAP = re.compile(r"^(?P<path>[^\[\]]*)(\[(?P<index>\d+)\])?$")


@dataclass(frozen=True)
class Tap:
    """`path` names a submodule (``layer3``, ``model.layers.0.self_attn``); ``path[i]`` picks output i
    of a module returning a tuple (e.g. ``self_attn[1]`` = attention weights in eager HF attention).
    ``input=True`` taps what goes into the module instead (e.g. the features before a classifier)."""

    path: str
    index: int | None = None
    input: bool = False

    @classmethod
    def parse(cls, spec: "str | Tap") -> "Tap":
        if isinstance(spec, Tap):
            return spec
        is_input = spec.startswith("in:")
        m = _TAP.match(spec[3:] if is_input else spec)
        if not m:
            raise ValueError(f"bad tap '{spec}': use 'module.path', 'module.path[i]' or 'in:module.path'")
        idx = m.group("index")
        return cls(m.group("path"), None if idx is None else int(idx), is_input)

    @property
    def name(self) -> str:
        s = ("in:" if self.input else "") + self.path
        return s if self.index is None else f"{s}[{self.index}]"


class FeatureTaps:
    """Registers hooks on the named submodules of `model`; `.features` holds the latest values."""

    def __init__(self, model: nn.Module, taps=()):
        self.model = model
        self.taps = [Tap.parse(t) for t in taps]
        self.features: dict[str, torch.Tensor] = {}
        self._handles = []
        modules = dict(model.named_modules())
        for tap in self.taps:
            if tap.path not in modules:
                raise KeyError(_unknown_path(tap.path, modules))
            self._handles.append(modules[tap.path].register_forward_hook(self._hook(tap), with_kwargs=True))

    def _hook(self, tap: Tap):
        def hook(module, args, kwargs, output):
            value = (args[0] if args else next(iter(kwargs.values()))) if tap.input else output
            if tap.index is not None:
                value = value[tap.index]
            elif isinstance(value, (tuple, list)):
                value = value[0]
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"tap '{tap.name}' caught a {type(value).__name__}, not a tensor")
            # A clone, so an in-place op later in the forward (timm's `x += shortcut`, ReLU(inplace=True))
            # cannot silently change the tapped value; clone is differentiable, gradients still flow.
            self.features[tap.name] = value.clone()

        return hook

    def pop(self) -> dict[str, torch.Tensor]:
        out, self.features = self.features, {}
        return out

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _unknown_path(path: str, modules: dict) -> str:
    import difflib

    names = [n for n in modules if n]
    close = difflib.get_close_matches(path, names, n=5)
    tops = sorted({n.split(".")[0] for n in names})
    return (f"no submodule '{path}' to tap. " + (f"Close: {', '.join(close)}. " if close else "")
            + f"Top-level modules: {', '.join(tops)}")
