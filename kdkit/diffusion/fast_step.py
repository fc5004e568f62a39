"""The fast distillation step: the same `method.train_step(batch)` run eagerly, with its loss functions compiled
(`torch.compile`; AOTAutograd compiles their backward too), or captured whole as one CUDA graph (every
forward, both backward passes, the fused optimiser updates and the `_foreach_lerp_` EMA replayed with one
launch), or both.

Eager is the default and what runs on CPU. A captured step needs optimisers built with `capturable=True`
(the run builds them so for `cuda_graph` modes), static batch shapes (the run's batches are), and copies each
new batch into the graph's input tensors before replaying. `DistillMethod.step` builds the fast step at its first
call and runs every step through it.
"""
from __future__ import annotations

from typing import Callable, Literal, get_args

import torch

from ..errors import ConfigError

FastMode = Literal["eager", "compile", "cuda_graph", "compile+cuda_graph"]
MODES = get_args(FastMode)

# the loss functions each method's step calls, which compile mode replaces by compiled versions
COMPILE_TARGETS = ("fake_loss", "generator_loss", "loss")


def compile_losses(method, mode: str | None = None, dynamic: bool = False) -> list[str]:
    """Swap the method's loss functions for `torch.compile`d ones (instance attributes shadow the methods)."""
    done = []
    for name in COMPILE_TARGETS:
        fn = getattr(method, name, None)
        if callable(fn):
            setattr(method, name, torch.compile(fn, mode=mode, dynamic=dynamic))
            done.append(name)
    return done


class CUDAGraphStep:
    """One whole distillation iteration as a CUDA graph. `example` fixes the batch shapes; call with batches of
    the same shapes. Warm-up runs (side stream, as PyTorch's whole-network capture recipe asks) happen first, so
    the first `warmup` calls are real training steps too."""

    def __init__(self, method, example: dict[str, torch.Tensor], warmup: int = 3):
        if not torch.cuda.is_available():
            raise ConfigError("fast=cuda_graph needs a CUDA device; use fast=eager or fast=compile on CPU")
        self.method = method
        self.static = {k: v.clone() for k, v in example.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                method.train_step(self.static)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = method.train_step(self.static)

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for k, v in batch.items():
            self.static[k].copy_(v, non_blocking=True)
        self.graph.replay()
        return self.outputs


def make_step(method, mode: str = "eager", example: dict[str, torch.Tensor] | None = None,
              compile_mode: str | None = None) -> Callable[[dict], dict]:
    """A callable `batch -> {loss name: tensor}` running one iteration in the given mode."""
    if mode not in MODES:
        raise ConfigError(f"unknown fast-step mode '{mode}'; choices: {', '.join(MODES)}")
    if mode in ("compile", "compile+cuda_graph"):
        compile_losses(method, compile_mode)
    if mode in ("cuda_graph", "compile+cuda_graph"):
        return CUDAGraphStep(method, example or {})
    return method.train_step
