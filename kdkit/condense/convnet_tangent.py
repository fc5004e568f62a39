"""The ConvNet's training loss differentiated along a parameter direction, written out (forward mode by hand).

Trajectory matching's backward step needs, at each student step, s = ∇θL(θ, x, y) · λ and its gradient with
respect to θ (H λ), x and soft labels y. s is the directional derivative of L along λ, so it can be computed by
pushing a tangent through the network next to the forward pass (ż = conv(a, Ẇ) + conv(ȧ, W), the normalisation's
and the cross-entropy's tangents in closed form), and then differentiated once. That one first-order backward
runs on oneDNN's forward, backward-data and backward-weight convolutions, where differentiating autograd's
backward twice goes through `_convolution_double_backward`'s slower transposed convolutions; compiled, the
convolutions of the adjoint step run at the measured fp32 convolution throughput (see `kdkit bench
condense-speed`). The value is the same: tested against autograd's double backward in float64.

Covers the trajectory-matching network: ConvNet-D with instance norm (GroupNorm(C, C)) or no norm, ReLU, 2x2
average pooling, a linear head. `supports(model)` says whether a model is one; others use autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.cifar.convnet import ConvNet
from .convnet_functional import FlatConvNet


def supports(model: nn.Module) -> bool:
    if not isinstance(model, ConvNet):
        return False
    for name in model.stages:
        mods = list(getattr(model, name))
        kinds = [type(m) for m in mods]
        if kinds not in ([nn.Conv2d, nn.GroupNorm, nn.ReLU, nn.AvgPool2d], [nn.Conv2d, nn.ReLU, nn.AvgPool2d]):
            return False
        norm = mods[1] if kinds[1] is nn.GroupNorm else None
        if norm is not None and not (norm.num_groups == norm.num_channels and norm.affine):
            return False
        conv = mods[0]
        if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1 or conv.bias is None:
            return False
        pool = mods[-1]
        if pool.kernel_size not in (2, (2, 2)) or pool.stride not in (2, (2, 2)) or pool.padding not in (0, (0, 0)):
            return False
    return True


def _instance_norm_tangent(z, dz, gamma, beta, dgamma, dbeta, eps):
    """GroupNorm(C, C) and its tangent: n = γ ẑ + β, ẑ = (z − μ)/σ; ṅ = γ̇ ẑ + γ (ż − mean ż − ẑ mean(ż ẑ))/σ + β̇."""
    mu = z.mean((2, 3), keepdim=True)
    zc = z - mu
    rs = torch.rsqrt(zc.square().mean((2, 3), keepdim=True) + eps)
    zh = zc * rs
    dzc = dz - dz.mean((2, 3), keepdim=True)
    dzh = (dzc - zh * (dzc * zh).mean((2, 3), keepdim=True)) * rs
    g, dg = gamma.view(1, -1, 1, 1), dgamma.view(1, -1, 1, 1)
    return zh * g + beta.view(1, -1, 1, 1), zh * dg + dzh * g + dbeta.view(1, -1, 1, 1)


def tangent_loss(net: FlatConvNet, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                 lam: torch.Tensor) -> torch.Tensor:
    """d/dε L(θ + ελ, x, y) at ε = 0, i.e. ∇θL · λ, for a model `supports` accepts; differentiable in θ, x, y."""
    model = net.model
    p, t = net.unflatten(theta), net.unflatten(lam)
    a, da = x, None
    for name in model.stages:
        mods = list(getattr(model, name))
        conv = mods[0]
        pad = conv.padding
        w, b = p[f"{name}.0.weight"], p[f"{name}.0.bias"]
        z = F.conv2d(a, w, b, padding=pad)
        dz = F.conv2d(a, t[f"{name}.0.weight"], t[f"{name}.0.bias"], padding=pad)
        if da is not None:
            dz = dz + F.conv2d(da, w, None, padding=pad)
        if isinstance(mods[1], nn.GroupNorm):
            z, dz = _instance_norm_tangent(z, dz, p[f"{name}.1.weight"], p[f"{name}.1.bias"], t[f"{name}.1.weight"],
                                           t[f"{name}.1.bias"], mods[1].eps)
        on = z > 0
        a = F.avg_pool2d(torch.where(on, z, 0.0), 2)
        da = F.avg_pool2d(torch.where(on, dz, 0.0), 2)
    a, da = a.flatten(1), da.flatten(1)
    logits = F.linear(a, p["fc.weight"], p["fc.bias"])
    dlogits = F.linear(da, p["fc.weight"]) + F.linear(a, t["fc.weight"], t["fc.bias"])
    probs = torch.softmax(logits, 1)
    if y.is_floating_point():  # soft labels (logits): CE against softmax(y), as `soft_cross_entropy`
        return ((probs - torch.softmax(y, 1)) * dlogits).sum(1).mean()
    return ((probs * dlogits).sum(1) - dlogits.gather(1, y[:, None]).squeeze(1)).mean()
