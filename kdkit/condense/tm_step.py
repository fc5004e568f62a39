"""One student step of trajectory matching as pure functions of (θ, x, y), eager or compiled.

Trajectory matching spends its time in two per-step computations on the matching network:

- `grad(θ, x, y)`: the student's gradient g = ∇θ CE(f(θ, x), y), which moves θ_i to θ_{i+1} = θ_i − α g;
- `adjoint(θ, x, y, λ)`: the gradient of s = g·λ with respect to θ, x (and soft labels y), plus s itself.
  ∂s/∂θ = H λ carries the adjoint λ back one step; ∂s/∂x and ∂s/∂y are what the synthetic data receive.

Eager autograd runs each of these as dozens of separate passes over the layer-1 activation maps (100 × 128 ×
32 × 32 floats at IPC 10), and on a CPU those memory passes, not the convolutions, are half of the time.
`torch.compile` traces both functions once, through `torch.func.grad`, into one graph each with the
element-wise work fused. The compiled adjoint differentiates s once, written as the loss's tangent along λ
(`convnet_tangent.py`), so its convolutions are plain forward/backward ones rather than autograd's double
backward. The math is unchanged: the compiled functions agree with eager autograd to float rounding (tested),
and `compiled=False` runs exactly MTT's own autograd.

`differentiable_grad` is `grad` inside an outer autograd graph (the unrolled mode): eager, it is
`autograd.grad(create_graph=True)` as in the reference `distill.py`; compiled, AOTAutograd builds the
backward of the compiled gradient graph.
"""
from __future__ import annotations

import warnings

import torch
from torch.func import grad as func_grad

from . import convnet_tangent
from .convnet_functional import FlatConvNet
from .image_eval import soft_cross_entropy


class StepFunctions:
    """The step math of one matching network; `compiled=True` compiles it on first use (falls back to eager,
    with one warning, where the compiler is unavailable)."""

    def __init__(self, net: FlatConvNet, compiled: bool = False):
        self.net = net
        self.compiled = compiled
        self.tangent = convnet_tangent.supports(net.model)  # the adjoint as one first-order backward
        self._grad = func_grad(self._loss)
        self._adjoint_hard = func_grad(self._dot, argnums=(0, 1), has_aux=True)
        self._adjoint_soft = func_grad(self._dot, argnums=(0, 1, 2), has_aux=True)
        if compiled:
            self._grad_c = torch.compile(self._grad, dynamic=False)
            self._adjoint_hard_c = torch.compile(self._adjoint_hard, dynamic=False)
            self._adjoint_soft_c = torch.compile(self._adjoint_soft, dynamic=False)

    def _loss(self, theta, x, y):
        return soft_cross_entropy(self.net(theta, x), y)

    def _dot(self, theta, x, y, lam):
        if self.tangent:
            s = convnet_tangent.tangent_loss(self.net, theta, x, y, lam)
        else:
            s = (self._grad(theta, x, y) * lam).sum()
        return s, s.detach()

    def _call(self, name: str, *args):
        if self.compiled:
            try:
                return getattr(self, name + "_c")(*args)
            except Exception as e:  # a missing C++ compiler or an unsupported op: run eager, say so once
                warnings.warn(f"trajectory matching runs eager: torch.compile failed ({type(e).__name__}: {e})",
                              stacklevel=3)
                self.compiled = False
        return getattr(self, name)(*args)

    def grad(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """g = ∇θ loss, no graph kept (the constant-memory forward pass)."""
        theta, x, y = theta.detach(), x.detach(), y.detach()
        if self.compiled:
            return self._call("_grad", theta, x, y)
        theta.requires_grad_(True)
        return torch.autograd.grad(self._loss(theta, x, y), theta)[0]

    def differentiable_grad(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """g = ∇θ loss as a differentiable function of θ, x and y (the unrolled mode)."""
        if self.compiled:
            return self._call("_grad", theta, x, y)
        return torch.autograd.grad(self._loss(theta, x, y), theta, create_graph=True)[0]

    def adjoint(self, theta, x, y, lam):
        """(H λ, ∂(g·λ)/∂x, ∂(g·λ)/∂y or None, g·λ) at (θ, x, y): one backward step of the adjoint recursion."""
        theta, x, lam = theta.detach(), x.detach(), lam.detach()
        soft = y.is_floating_point()
        y = y.detach()
        if self.compiled:
            if soft:
                (hv, gx, gy), dot = self._call("_adjoint_soft", theta, x, y, lam)
                return hv, gx, gy, dot
            (hv, gx), dot = self._call("_adjoint_hard", theta, x, y, lam)
            return hv, gx, None, dot
        wrt = [theta.requires_grad_(True), x.requires_grad_(True)] + ([y.requires_grad_(True)] if soft else [])
        with torch.enable_grad():
            g = torch.autograd.grad(self._loss(theta, x, y), theta, create_graph=True)[0]
            dot = (g * lam).sum()
            grads = torch.autograd.grad(dot, wrt, allow_unused=True)
        return grads[0], grads[1], grads[2] if soft else None, dot.detach()
